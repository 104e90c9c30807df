"""Community dataset forms, recognised without flags and turned into TRL's conversational form:

    alpaca    {"instruction", "input"?, "output", "system"?}: instruction (+ a blank line + input, when there is
              one) becomes the user turn and output the assistant turn, as the common converters do
    sharegpt  {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}]}; turns already written as
              {role, content} inside "conversations" are taken as they are

A row with any of TRL's own columns (messages, prompt, completion, text) is never reinterpreted. Malformed rows get
the same file:line problems as TRL's forms, naming the row's own columns.
"""
from __future__ import annotations

from typing import Any

from finetune.shapes import Problem, kind, messages, text

TRL_COLUMNS = ("messages", "prompt", "completion", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "bot": "assistant", "chatgpt": "assistant", "function_call": "assistant", "system": "system",
                  "tool": "tool", "function": "tool", "observation": "tool"}
USED = {"alpaca": ("instruction", "input", "output", "system"), "sharegpt": ("conversations",),  # columns read
        "tool-calling": ("messages", "tools")}
DESCRIPTION = {"alpaca": "alpaca: instruction (+ input) -> user turn, output -> assistant turn, system if present",
               "sharegpt": "sharegpt: conversations from/value, human -> user, gpt -> assistant, system, tool",
               "tool-calling": "tool-calling: messages with assistant tool_calls and tool results, 'tools' schemas "
                               "rendered by the chat template; tool calls and answers train, tool results do not"}


def detect(row: dict) -> str | None:
    """The community form of a row, or None (TRL's forms, or nothing known)."""
    if any(k in row for k in TRL_COLUMNS):
        return None
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def to_messages(form: str, row: dict, where: str, problems: list[Problem]) -> list[dict] | None:
    """The row as {role, content} messages, or None with the problems added."""
    return _alpaca(row, where, problems) if form == "alpaca" else _sharegpt(row, where, problems)


def _optional_text(row: dict, key: str, where: str, problems: list[Problem]) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.append(Problem(where, f"'{key}' must be a string (got {kind(value)})"))
        return ""
    return value.strip()


def _alpaca(row: dict, where: str, problems: list[Problem]) -> list[dict] | None:
    before = len(problems)
    instruction, output = text(row, "instruction", where, problems), text(row, "output", where, problems)
    extra, system = _optional_text(row, "input", where, problems), _optional_text(row, "system", where, problems)
    if len(problems) > before:
        return None
    user = f"{instruction.strip()}\n\n{extra}" if extra else instruction.strip()
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _sharegpt(row: dict, where: str, problems: list[Problem]) -> list[dict] | None:
    turns: Any = row["conversations"]
    if not isinstance(turns, list) or not turns:
        problems.append(Problem(where, "'conversations' must be a non-empty list of turns "
                                       f"(got {kind(turns) if turns != [] else 'an empty list'})"))
        return None
    converted, before = [], len(problems)
    for i, turn in enumerate(turns):
        at = f"conversations[{i}]"
        if isinstance(turn, dict) and "from" in turn and "value" in turn:
            role = SHAREGPT_ROLES.get(str(turn["from"]).strip().lower())
            if role is None:
                problems.append(Problem(where, f"{at}.from {turn['from']!r} is not a ShareGPT role "
                                               "(human, gpt, system, tool)"))
            else:
                converted.append({"role": role, "content": turn["value"]})
        elif isinstance(turn, dict) and "role" in turn and "content" in turn:
            converted.append(turn)
        else:
            problems.append(Problem(where, f"{at} must be an object with 'from' and 'value' (ShareGPT) "
                                           "or 'role' and 'content'"))
    if len(problems) > before:
        return None
    return messages(converted, where, "conversations", problems)
