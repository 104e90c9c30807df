"""Which training methods a dataset's rows fit, and what is wrong with a row, for every method.

The lowest layer of dataset checking: no tokenizer, no file reading. data.py uses it to validate SFT
rows while loading; check_data.py uses it for the per-method verdicts and the DPO/ORPO/KTO/GRPO row
checks, and both for COLUMN_MAP / --map parsing and renaming. A `Problem` is one line naming where
("file:line" or "file: row N") and what to do.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from finetune.errors import UserError
from finetune.methods import NAMES

ROLES = ("system", "user", "assistant", "tool")
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")  # kept on a message for the chat template
METHODS = NAMES  # the one list of method names (finetune/methods/__init__.py)
# Column sets each method accepts, most specific first (TRL's dataset formats).
FORMS = {
    "sft": (("messages",), ("prompt", "completion"), ("text",)),
    "dpo": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "orpo": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "kto": (("prompt", "completion", "label"),),
    "grpo": (("prompt",),),
}
# Column names that usually mean a canonical column, best guess first. Whole names rank above
# single words inside a name ("good_response" -> chosen because of "good").
ALIASES = {
    "prompt": ("instruction", "question", "input", "query", "problem", "context", "source", "human", "user"),
    "completion": ("output", "response", "answer", "target", "reply", "solution", "assistant", "gpt", "chosen"),
    "chosen": ("preferred", "good", "winner", "accepted", "positive", "better", "pos", "win"),
    "rejected": ("dispreferred", "bad", "loser", "declined", "negative", "worse", "neg", "lose"),
    "label": ("kto_label", "desirable", "is_good", "thumbs_up", "feedback"),
    "messages": ("conversations", "conversation", "chat", "dialog", "dialogue", "turns"),
    "text": ("content", "body", "document", "passage", "sentence"),
}
REWARD_COLUMNS = ("answer", "solution", "ground_truth", "reference", "target", "final_answer", "label")
ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
              "chatgpt": "assistant", "agent": "assistant", "function": "tool"}
LABEL_STRINGS = {"true": True, "false": False, "1": True, "0": False}  # CSV cannot hold booleans


@dataclass
class Problem:
    where: str             # "file:line", "file: row N" or "file"
    message: str           # one line: what is wrong and what to do
    level: str = "error"   # "error" stops check-data and train; "warning" is printed and recorded

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


def kind(value: Any) -> str:
    """How a value looks to the user, for 'got ...' in messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "empty text" if not value.strip() else "text"
    return {"list": "a list", "dict": "an object"}.get(type(value).__name__, type(value).__name__)


def text(row: dict, key: str, where: str, problems: list[Problem]) -> str | None:
    value = row.get(key)
    if isinstance(value, str) and value.strip():
        return value
    got = "missing" if key not in row else ("empty" if isinstance(value, str) else kind(value))
    problems.append(Problem(where, f"'{key}' must be a non-empty string (got {got})"))
    return None


def messages(value: Any, where: str, key: str, problems: list[Problem], train_from: int = 0) -> list[dict] | None:
    """Validate a list of {role, content} turns; None when it is structurally broken."""
    if not isinstance(value, list) or not value:
        hint = "; a list inside CSV is only text, use .jsonl" if isinstance(value, str) and value.lstrip()[:1] == "[" else ""
        problems.append(Problem(where, f"'{key}' must be a non-empty list of {{role, content}} messages "
                                       f"(got {kind(value) if value != [] else 'an empty list'}){hint}"))
        return None
    if isinstance(value[0], dict) and "from" in value[0] and "value" in value[0] and "role" not in value[0]:
        problems.append(Problem(where, f"'{key}' uses ShareGPT turns ({{from, value}}); each message needs 'role' "
                                       "and 'content', with human -> user and gpt -> assistant"))
        return None
    out, before = [], len(problems)
    for i, msg in enumerate(value):
        at = f"{key}[{i}]"
        calls = msg.get("tool_calls") if isinstance(msg, dict) else None
        if not isinstance(msg, dict) or "role" not in msg or ("content" not in msg and not calls):
            problems.append(Problem(where, f"{at} must be an object with 'role' and 'content'"))
        elif msg["role"] not in ROLES:
            hint = f" (use '{ROLE_HINTS[msg['role']]}')" if msg["role"] in ROLE_HINTS else ""
            problems.append(Problem(where, f"{at}.role {msg['role']!r} is not one of {', '.join(ROLES)}{hint}"))
        elif calls is not None and (msg["role"] != "assistant" or not isinstance(calls, list) or not calls
                                    or not all(isinstance(c, dict) for c in calls)):
            problems.append(Problem(where, f"{at}.tool_calls must be a non-empty list of objects on an assistant turn"))
        elif not (isinstance(msg.get("content"), str) or (calls and msg.get("content") is None)):
            problems.append(Problem(where, f"{at}.content must be a string (got {kind(msg['content'])})"))
        else:  # a tool-call turn may have no content: the calls are what it says
            out.append({"role": msg["role"], "content": msg.get("content") or "",
                        **{k: msg[k] for k in TOOL_KEYS if msg.get(k) is not None}})
    if len(problems) > before:
        return None
    _order(out, where, key, problems, train_from)
    return out


def _order(msgs: list[dict], where: str, key: str, problems: list[Problem], train_from: int) -> None:
    # Templates such as Llama's and Gemma's raise on these; Qwen's renders them but the model
    # then learns a conversation shape it never sees at inference.
    for i, msg in enumerate(msgs):
        role = msg["role"]
        if role == "system" and i > 0:
            problems.append(Problem(where, f"{key}[{i}] is a system message after the first turn; "
                                           f"only {key}[0] may be system"))
        elif role == "assistant" and i >= train_from and not says(msg) and \
                any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            problems.append(Problem(where, f"{key}[{i}] is an empty assistant turn (it would teach an empty "
                                           "reply); fill it in or drop the row"))
        elif i and role in ("user", "assistant") and msgs[i - 1]["role"] == role:
            problems.append(Problem(where, f"{key}[{i}] is a second '{role}' turn in a row; roles should "
                                           "alternate user/assistant", "warning"))


def says(msg: dict) -> bool:
    """A turn with something in it: text, or tool calls."""
    return bool(msg["content"].strip() or msg.get("tool_calls"))


def has_assistant(msgs: list[dict] | None) -> bool:
    return bool(msgs) and any(m["role"] == "assistant" and says(m) for m in msgs)


def tools_column(row: dict, where: str, problems: list[Problem]) -> list | None:
    """The row's `tools` (function schemas, passed to the chat template): a list, or JSON text of one (as many Hub
    datasets store it)."""
    value = row.get("tools")
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            problems.append(Problem(where, "'tools' is text but not JSON; give a list of function schemas"))
            return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        problems.append(Problem(where, f"'tools' must be a list of function schemas (got {kind(value)})"))
        return None
    return value


# ---------------------------------------------------------------- rows of the other methods
def preference_row(row: dict, where: str, problems: list[Problem]) -> None:
    """DPO/ORPO: prompt/chosen/rejected, or chosen/rejected with the prompt implicit; strings or messages."""
    conversational = any(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected"))
    if not conversational:
        if "prompt" in row:
            text(row, "prompt", where, problems)
        chosen, rejected = text(row, "chosen", where, problems), text(row, "rejected", where, problems)
    else:
        if "prompt" in row:
            messages(row["prompt"], where, "prompt", problems)
        chosen = messages(row.get("chosen"), where, "chosen", problems)
        rejected = messages(row.get("rejected"), where, "rejected", problems)
        for key, msgs in (("chosen", chosen), ("rejected", rejected)):
            if msgs is not None and not has_assistant(msgs):
                problems.append(Problem(where, f"'{key}' has no non-empty assistant message"))
        if "prompt" not in row and chosen and rejected and chosen[0] != rejected[0]:
            problems.append(Problem(where, "'chosen' and 'rejected' share no prompt turns; add a 'prompt' column "
                                           "or start both with the same user turn"))
    if chosen is not None and chosen == rejected:
        problems.append(Problem(where, "'chosen' and 'rejected' are identical, so the pair teaches nothing; "
                                       "drop the row", "warning"))


def kto_row(row: dict, where: str, problems: list[Problem]) -> None:
    for key in ("prompt", "completion"):
        if isinstance(row.get(key), list):
            messages(row[key], where, key, problems)
        else:
            text(row, key, where, problems)
    label = row.get("label")
    if not isinstance(label, bool) and not (isinstance(label, str) and label.strip().lower() in LABEL_STRINGS):
        got = "missing" if "label" not in row else f"{label!r}" if isinstance(label, (str, int, float)) else kind(label)
        problems.append(Problem(where, f"'label' must be true or false (got {got})"))


def grpo_row(row: dict, where: str, problems: list[Problem]) -> None:
    if isinstance(row.get("prompt"), list):
        msgs = messages(row["prompt"], where, "prompt", problems)
        if msgs and msgs[-1]["role"] == "assistant":
            problems.append(Problem(where, "'prompt' ends with an assistant turn; GRPO generates the next assistant "
                                           "turn, so end the prompt with a user turn", "warning"))
    else:
        text(row, "prompt", where, problems)


ROW_CHECKS = {"dpo": preference_row, "orpo": preference_row, "kto": kto_row, "grpo": grpo_row}


def row_problems(row: Any, where: str, method: str) -> list[Problem]:
    """Every problem of one row for a non-SFT method (SFT rows are checked by data.check_row)."""
    if not isinstance(row, dict):
        return [Problem(where, f"each row must be an object, got {kind(row)}")]
    problems: list[Problem] = []
    ROW_CHECKS[method](row, where, problems)
    return problems


def label_value(value: Any) -> bool | None:
    return value if isinstance(value, bool) else LABEL_STRINGS.get(str(value).strip().lower())


# ---------------------------------------------------------------- column mapping (COLUMN_MAP / --map)
def parse_column_map(spec: str | dict | None, where: str = "COLUMN_MAP") -> dict[str, str]:
    """'question=prompt,answer=completion' -> {'question': 'prompt', 'answer': 'completion'}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    out: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        src, eq, dst = (s.strip() for s in part.partition("="))
        if part and (not eq or not src or not dst):
            raise UserError(f"{where}={spec!r}: '{part}' is not old=new; write pairs like question=prompt,answer=completion")
        if src in out:
            raise UserError(f"{where}={spec!r}: column '{src}' is mapped twice")
        if part:
            out[src] = dst
    targets = list(out.values())
    twice = next((t for t in targets if targets.count(t) > 1), None)
    if twice:
        raise UserError(f"{where}={spec!r}: two columns are mapped to '{twice}'; map only one")
    return out


def rename(row: Any, mapping: dict[str, str]) -> tuple[Any, str | None]:
    """Apply the mapping to one row (all renames at once, so a=b,b=a swaps); (row, clash message)."""
    if not mapping or not isinstance(row, dict):
        return row, None
    out = {}
    for key, value in row.items():
        new = mapping.get(key, key)
        if new in out or (new != key and new in row and new not in mapping):
            return row, (f"has both '{key}' and '{new}', so mapping {key}={new} would overwrite '{new}'; "
                         "drop one of the columns or map it to another name")
        out[new] = value
    return out, None


# ---------------------------------------------------------------- verdicts and mapping suggestions
def _rank(column: str, target: str) -> int | None:
    names = ALIASES.get(target, ())
    low = column.lower()
    if low in names:
        return names.index(low)
    words = [w for w in re.split(r"[^a-z0-9]+", low) if w in names]
    return 100 + min(names.index(w) for w in words) if words else None


def suggest_map(columns: list[str], need: tuple[str, ...]) -> dict[str, str] | None:
    """{source: target} renames that give `columns` every name in `need`, or None when no name fits."""
    renames: dict[str, str] = {}
    for target in need:
        if target in columns:
            continue
        ranked = sorted((r, i, c) for i, c in enumerate(columns)
                        if c not in need and c not in renames and (r := _rank(c, target)) is not None)
        if not ranked:
            return None
        renames[ranked[0][2]] = target
    return renames


def map_flags(renames: dict[str, str]) -> str:
    pairs = list(renames.items())
    return " ".join(f"--map {a}={b}" for a, b in pairs) + f" (or COLUMN_MAP={','.join(f'{a}={b}' for a, b in pairs)})"


def _form(method: str, need: tuple[str, ...], first: dict) -> str:
    chat = any(isinstance(first.get(c), list) for c in need)
    if need == ("messages",):
        return "chat messages (assistant turns trained)"
    if need == ("text",):
        return "plain text (every token trained)"
    name = "chosen/rejected, implicit prompt" if need == ("chosen", "rejected") else "/".join(need)
    return ("conversational " if chat else "") + name


def verdict(method: str, columns: list[str], first: dict) -> dict:
    """ready / needs mapping (with the suggested renames) / incompatible (with the reason)."""
    for need in FORMS[method]:
        if all(c in columns for c in need):
            out = {"status": "ready", "form": _form(method, need, first), "map": {}, "uses": list(need)}
            if method == "grpo":
                rewards = [c for c in columns if c in REWARD_COLUMNS]
                out["reward_columns"] = rewards
                out["note"] = (f"reward functions can read {', '.join(rewards)}" if rewards
                               else "no answer column: only reference-free rewards can score completions")
            return out
    for need in FORMS[method]:
        renames = suggest_map(columns, need)
        if renames:
            return {"status": "needs mapping", "form": "/".join(need), "map": renames,
                    "reason": f"rename columns: {map_flags(renames)}"}
    wanted = " or ".join("+".join(need) for need in FORMS[method])
    hint = "; paired preference data fits dpo/orpo instead" if method == "kto" and "chosen" in columns else ""
    return {"status": "incompatible", "form": "", "map": {},
            "reason": f"needs columns {wanted}; found {', '.join(columns) or 'none'}{hint}"}
