"""Rendering rows to token ids and the loss mask: the one place that decides which tokens train.

Chat rows are rendered with the tokenizer's own chat template. The assistant spans are found by
rendering growing prefixes of the conversation (with and without the generation prompt) and
mapping those character spans onto the tokens of the full rendering. That works for any template
that renders earlier turns unchanged, needs no `{% generation %}` markers, and trains the template's
end-of-turn token (e.g. <|im_end|>) because it belongs to the assistant's rendered turn.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from finetune.data import Example
from finetune.errors import UserError

IGNORE = -100  # label value the loss skips (PyTorch / transformers convention)
# Text is cut to this many characters per token of MAX_SEQ_LENGTH before tokenizing: a 20 MB row with
# MAX_SEQ_LENGTH=64 would otherwise tokenize all of its 14 M tokens (4 GB) to keep 64. Real tokens average
# 3-5 characters; 32 leaves the kept tokens unchanged for any text but long runs of one repeated character.
CHARS_PER_TOKEN_BOUND = 32


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]          # IGNORE where no loss
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)


TOOL_PROBE = "finetune_tool_probe"


def check_tools(tokenizer, model_name: str) -> None:
    """Refuse tool-calling rows when the chat template drops tools and tool calls (most templates without tool
    support render them as empty turns, which would teach empty replies)."""
    schema = {"type": "function", "function": {"name": TOOL_PROBE, "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}
    turns = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                  "function": {"name": TOOL_PROBE, "arguments": {}}}]}]
    try:
        rendered = chat_text(tokenizer, turns, tools=[schema])
    except Exception:  # noqa: BLE001 -- a template that raises on tools cannot render them either
        rendered = ""
    if rendered.count(TOOL_PROBE) < 2:  # the schema and the call
        raise UserError(f"MODEL={model_name}: its chat template cannot render tools and tool calls, so tool-calling rows "
                        "cannot train; use a model whose template can (e.g. Qwen/Qwen2.5-0.5B-Instruct, "
                        "meta-llama/Llama-3.2-1B-Instruct)")


def _assistant_spans(tokenizer, ex: Example, full: str) -> list[tuple[int, int]]:
    spans = []
    for i, msg in enumerate(ex.messages):
        if msg["role"] != "assistant" or i < ex.train_from:
            continue
        start = len(chat_text(tokenizer, ex.messages[:i], add_generation_prompt=True, tools=ex.tools))
        through = chat_text(tokenizer, ex.messages[: i + 1], tools=ex.tools)
        if not full.startswith(through) or start > len(through):
            raise UserError(f"{ex.where}: the model's chat template renders earlier turns differently once later "
                            "turns are added, so assistant-only loss cannot be computed; split the conversation")
        end = len(through)
        while end > start and through[end - 1].isspace():  # the newline after end-of-turn is not the model's output
            end -= 1
        spans.append((start, end))
    return spans


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def clip(ex: Example, max_len: int) -> tuple[Example, bool]:
    """The row with its text cut to what `max_len` tokens could cover (see CHARS_PER_TOKEN_BOUND), and whether
    anything was cut. Chat rows keep their turns in order until the budget runs out."""
    budget = max_len * CHARS_PER_TOKEN_BOUND
    if ex.text is not None:
        return (ex, False) if len(ex.text) <= budget else (replace(ex, text=ex.text[:budget]), True)
    if ex.prompt is not None:
        if len(ex.prompt) + len(ex.completion) <= budget:
            return ex, False
        prompt = ex.prompt[:budget]
        return replace(ex, prompt=prompt, completion=ex.completion[: max(1, budget - len(prompt))]), True
    if sum(len(m["content"]) for m in ex.messages) <= budget and len(ex.messages) <= max_len // 2:
        return ex, False
    kept, left = [], budget
    for m in ex.messages:
        if left <= 0 or len(kept) >= max_len // 2:  # every template renders a turn to at least two tokens
            break
        kept.append({**m, "content": m["content"][:left]})
        left -= len(m["content"])
    return replace(ex, messages=kept), True


def encode(ex: Example, tokenizer, max_len: int) -> Encoded:
    """Token ids and labels for one row, truncated to `max_len` (keep the start, as TRL does)."""
    ex, clipped = clip(ex, max_len)
    eos = tokenizer.eos_token_id
    if ex.text is not None:
        ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"] + [eos]
        labels = list(ids)
    elif ex.prompt is not None:
        # TRL's "standard" prompt/completion: plain concatenation, no chat template
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        ids = tokenizer(ex.prompt + ex.completion, add_special_tokens=True)["input_ids"] + [eos]
        labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids):]
    else:
        full = chat_text(tokenizer, ex.messages, tools=ex.tools)
        spans = _assistant_spans(tokenizer, ex, full)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels, k = [], 0
        for tok, (a, _) in zip(ids, enc["offset_mapping"]):  # one sweep: spans are in order and do not overlap
            while k < len(spans) and spans[k][1] <= a:
                k += 1
            labels.append(tok if k < len(spans) and spans[k][0] <= a else IGNORE)
        # A template with no end-of-turn token would teach the model never to stop: add EOS and train it.
        trained = [t for t in labels if t != IGNORE]
        if trained and trained[-1] not in _special_ids(tokenizer) and full[spans[-1][1]:].strip() == "":
            ids, labels = ids + [eos], labels + [eos]
    truncated = clipped or len(ids) > max_len
    return Encoded(ids[:max_len], labels[:max_len], truncated)


def pad_batch(rows: list[Encoded], pad_id: int, width: int | None = None):
    """Right-padded numpy arrays (input_ids, labels, attention_mask) for a batch of rows, shared by the
    backends so padding never carries loss: padded labels are IGNORE and the mask is 0 there."""
    import numpy as np

    width = width or max(len(r.input_ids) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    labels = np.full((len(rows), width), IGNORE, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for j, r in enumerate(rows):
        n = len(r.input_ids)
        ids[j, :n], labels[j, :n], mask[j, :n] = r.input_ids, r.labels, 1
    return ids, labels, mask


def generation_prompt(ex: Example, tokenizer) -> tuple[list[int], str] | None:
    """(prompt ids, expected answer) for the last assistant turn; None for plain-text rows."""
    if ex.text is not None:
        return None
    if ex.prompt is not None:
        return tokenizer(ex.prompt, add_special_tokens=True)["input_ids"], ex.completion
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    text = chat_text(tokenizer, ex.messages[:last], add_generation_prompt=True, tools=ex.tools)
    return tokenizer(text, add_special_tokens=False)["input_ids"], ex.messages[last]["content"]


def encode_kept(items: list, examples, tokenizer, max_len: int) -> tuple[list[tuple], int]:
    """For items made of several rows (a DPO pair, a KTO row and its mismatched twin): (item, its rows encoded...)
    for each item whose rows, `examples(item)`, all keep a trained token within `max_len`; and how many were
    dropped because truncation cut every trained token of one of them."""
    kept = []
    for item in items:
        encoded = tuple(encode(ex, tokenizer, max_len) for ex in examples(item))
        if all(e.n_trained for e in encoded):
            kept.append((item, *encoded))
    return kept, len(items) - len(kept)


def encode_all(rows: list[Example], tokenizer, max_len: int) -> tuple[list[Encoded], list[str]]:
    """Encode rows; drop those whose trained tokens were all cut by truncation (they teach nothing)."""
    out, dropped, truncated = [], 0, 0
    for ex in rows:
        enc = encode(ex, tokenizer, max_len)
        truncated += enc.truncated
        if enc.n_trained == 0:
            dropped += 1
            continue
        out.append(enc)
    warnings = []
    if truncated:
        warnings.append(f"{truncated} of {len(rows)} rows are longer than MAX_SEQ_LENGTH={max_len} and were truncated")
    if dropped:
        warnings.append(f"{dropped} rows had every trained token cut by truncation and were dropped")
    return out, warnings
