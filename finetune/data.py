"""Datasets in, one canonical row shape out; every problem names its file and line.

The four SFT shapes (same names as TRL's dataset formats) become one `Example`:
    {"text": ...}                                 -> Example(text=...)            every token trained
    {"prompt": str, "completion": str}            -> Example(prompt, completion)  completion + EOS trained
    {"messages": [...]}                           -> Example(messages)            assistant turns trained
    {"prompt": [msgs], "completion": [msgs]}      -> Example(messages, train_from=len(prompt))
Local files are parsed by finetune/readers.py (not by `datasets`) so a bad row can be reported as file:line. Reading
and row checks collect every problem instead of stopping at the first, so `finetune check-data` and
`train` share them: check-data prints them all, `load` raises them (capped) as one DataError.
COLUMN_MAP ("question=prompt,answer=completion") renames columns before any shape is detected.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

from finetune import forms, fsio
from finetune.errors import UserError
from finetune.readers import FILE_EXTS, columns, iter_rows, read_file  # noqa: F401 (data.read_file etc. stay importable)
from finetune.shapes import (FORMS, ROLES, Problem, has_assistant, kind, map_flags, messages,  # noqa: F401 (re-exports)
                             parse_column_map, suggest_map, text, tools_column)

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")
RAM_PER_FILE_BYTE = 8  # a local file is read whole and parsed: bytes, text and Python objects take ~8x its size


def max_file_bytes() -> int:
    """The largest local data file this machine can parse in memory (RAM / RAM_PER_FILE_BYTE)."""
    import psutil

    return psutil.virtual_memory().total // RAM_PER_FILE_BYTE
MAX_LISTED = 20           # problems listed in one error message; check-data --json has them all
UNKNOWN_SHAPE = "unknown row shape"


@dataclass
class Example:
    messages: list[dict] | None = None   # chat rows: role/content dicts
    train_from: int = 0                  # first message index whose assistant turns carry loss
    prompt: str | None = None            # plain prompt/completion rows
    completion: str | None = None
    text: str | None = None              # plain language-modelling rows
    where: str = ""                      # "file:line", for messages about this row
    form: str | None = None              # a community form it was read from (finetune/forms.py: alpaca, sharegpt)
    tools: list | None = None            # function schemas for the chat template (tool-calling rows)

    @property
    def shape(self) -> str:
        if self.text is not None:
            return "text"
        if self.prompt is not None:
            return "prompt_completion"
        return "conversational_prompt_completion" if self.train_from else "messages"


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    source: str                                   # what was loaded, for the record
    shape: str                                    # shape of the first row
    validation_source: str = "file"               # "file" or "carved N% (seed S)"
    warnings: list[Problem] = field(default_factory=list)   # row-level warnings found while loading
    rows: list[Example] = field(default_factory=list)       # every row in file order (train file, then validation)


class DataError(UserError):
    """All error-level problems of a dataset. The message is the first problem on the first line,
    then up to MAX_LISTED more, one per line: the CLI prints it after 'error: '."""

    def __init__(self, problems: list[Problem], hint: str = ""):
        self.problems = problems
        lines = [str(p) for p in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            lines.append(f"... and {len(problems) - MAX_LISTED} more errors")
        if len(problems) > 1 and hint:
            lines.append(hint)
        super().__init__("\n  ".join(lines))


# ---------------------------------------------------------------- row -> Example
def _unknown_shape(row: dict) -> str:
    cols = [str(k) for k in row]
    base = (f"{UNKNOWN_SHAPE} (columns: {', '.join(sorted(cols)) or 'none'}); expected 'messages', "
            "'prompt'+'completion' or 'text'")
    for need in FORMS["sft"]:
        renames = suggest_map(cols, need)
        if renames:
            return f"{base}; map the columns: {map_flags(renames)}"
    return base + " (rename columns, e.g. instruction->prompt, output->completion)"


def check_row(row: Any, where: str) -> tuple[Example | None, list[Problem]]:
    """Every problem of one row in any of the four SFT shapes (or Alpaca / ShareGPT); the Example when it has no
    error."""
    if not isinstance(row, dict):
        return None, [Problem(where, f"each row must be an object, got {kind(row)}")]
    problems: list[Problem] = []
    ex = None
    form = forms.detect(row)
    if form:  # Alpaca / ShareGPT: checked in their own columns' terms, then trained as messages
        msgs = forms.to_messages(form, row, where, problems)
        if msgs is not None and not has_assistant(msgs):
            problems.append(Problem(where, "the row has no non-empty assistant turn to learn from"))
        ex = Example(messages=msgs, where=where, form=form) if msgs else None
    elif "messages" in row:
        msgs = messages(row["messages"], where, "messages", problems)
        tools = tools_column(row, where, problems)
        if msgs is not None and not has_assistant(msgs):
            problems.append(Problem(where, "'messages' has no non-empty assistant turn to learn from"))
        elif msgs and msgs[-1]["role"] != "assistant":
            problems.append(Problem(where, f"the last turn is '{msgs[-1]['role']}', not assistant, so it teaches "
                                           "nothing; drop it", "warning"))
        calls = tools or any(m.get("tool_calls") for m in msgs or [])
        ex = Example(messages=msgs, where=where, tools=tools, form="tool-calling" if calls else None) if msgs else None
    elif ("prompt" in row and "completion" in row) or ("text" not in row and ("prompt" in row or "completion" in row)):
        ex = _prompt_completion(row, where, problems)
    elif "text" in row:
        value = text(row, "text", where, problems)
        ex = Example(text=value, where=where) if value else None
    else:
        return None, [Problem(where, _unknown_shape(row))]
    return (None if any(p.level == "error" for p in problems) else ex), problems


def _prompt_completion(row: dict, where: str, problems: list[Problem]) -> Example | None:
    lists = [isinstance(row.get(k), list) for k in ("prompt", "completion")]
    if lists[0] != lists[1] and all(isinstance(row.get(k), (str, list)) for k in ("prompt", "completion")):
        problems.append(Problem(where, "one of 'prompt'/'completion' is a list of messages and the other is text; "
                                       "use two strings or two message lists"))
        return None
    if not any(lists):
        prompt, completion = text(row, "prompt", where, problems), text(row, "completion", where, problems)
        return Example(prompt=prompt, completion=completion, where=where) if prompt and completion else None
    prompt = messages(row.get("prompt"), where, "prompt", problems, train_from=10**9)  # prompt turns never train
    completion = messages(row.get("completion"), where, "completion", problems)
    if completion is not None and not has_assistant(completion):
        problems.append(Problem(where, "'completion' must contain a non-empty assistant message"))
    return Example(messages=prompt + completion, train_from=len(prompt), where=where) if prompt and completion else None


def to_example(row: Any, where: str) -> Example:
    """Validate one row in any of the four SFT shapes and convert it to an Example (first error raises)."""
    ex, problems = check_row(row, where)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise UserError(str(errors[0]))
    return ex


def examples_from(rows: list[tuple[str, Any]]) -> tuple[list[Example], list[Problem]]:
    """Check every row; a file whose first row has no SFT shape gets one problem, not one per row."""
    examples, problems = [], []
    for i, (where, row) in enumerate(rows):
        ex, found = check_row(row, where)
        if i == 0 and ex is None and found and found[0].message.startswith(UNKNOWN_SHAPE):
            return [], found[:1]
        problems += found
        if ex is not None:
            examples.append(ex)
    odd = [e for e in examples if e.shape != examples[0].shape] if examples else []
    if odd:
        count = f" ({len(odd)} rows differ)" if len(odd) > 1 else ""
        problems.append(Problem(odd[0].where, f"row shape '{odd[0].shape}' differs from the first row's "
                                              f"'{examples[0].shape}'{count}; use one shape per file"))
    return examples, problems


def load_file(path: str, mapping: dict[str, str] | None = None) -> tuple[list[Example], list[Problem]]:
    """(examples, problems) of one file; problems include errors, which `load` raises together."""
    rows, problems = read_file(path, mapping)
    examples, row_problems = examples_from(rows)
    used = forms.USED[examples[0].form] if examples and examples[0].form else forms.TRL_COLUMNS
    unused = [c for c in columns(rows) if c not in used]
    if examples and unused:  # e.g. 'images': a text model never sees them, and nobody should think it did
        row_problems.append(Problem(path, f"column{'s' if len(unused) > 1 else ''} {', '.join(unused[:8])} "
                                          f"{'are' if len(unused) > 1 else 'is'} not used by training (ignored)", "warning"))
    return examples, problems + row_problems


# ---------------------------------------------------------------- dataset spec -> splits
VALIDATION_STEMS = ("validation", "valid", "val", "eval", "test")


def _split_files(directory: str, label: str) -> tuple[str | None, str | None]:
    """train.* and the validation file of a dataset folder; two candidates for either is an error, since picking
    one would silently drop the other."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as err:
        raise UserError(f"{label}: the folder cannot be read ({err.strerror})") from None

    def pick(stems: tuple[str, ...], role: str) -> str | None:
        found = [n for n in names if os.path.splitext(n)[0] in stems and n.endswith(FILE_EXTS)]
        if len(found) > 1:
            raise UserError(f"{label}: the folder has {len(found)} {role} files ({', '.join(found)}); keep one "
                            "(or move the others out)")
        return os.path.join(directory, found[0]) if found else None

    return pick(("train",), "training"), pick(VALIDATION_STEMS, "validation")


def locate(spec: str, label: str | None = None) -> tuple[str, str | None, str]:
    """(train source, validation source or None, description); sources are paths or 'hf:<id>'."""
    label = label or f"DATASET={spec}"
    directory = SAMPLE_DIR if spec == "sample" else spec
    if os.path.isdir(directory):
        train_path, val_path = _split_files(directory, label)
        if train_path is None:
            raise UserError(f"{label}: directory has no train.jsonl/.json/.csv/.parquet")
        for path in (train_path, val_path):
            if path:
                fsio.check_regular_file(path, f"{label}: {os.path.basename(path)}", max_file_bytes())
        return train_path, val_path, directory
    if os.path.lexists(spec) or os.path.splitext(spec)[1].lower() in FILE_EXTS or spec.startswith((".", "/", "~")):
        fsio.check_regular_file(spec, label, max_file_bytes())
        return spec, None, spec
    return f"hf:{spec}", None, f"hf:{spec}"


def load(spec: str, val_split: float, seed: int, column_map: str | dict | None = None,
         label: str | None = None) -> Splits:
    """`spec` is 'sample', a file, a directory with train.* (+ validation.*), or a Hugging Face dataset id.
    Every row is checked; all errors (of both files) are raised together as one DataError."""
    mapping = parse_column_map(column_map)
    label = label or f"DATASET={spec}"
    train_src, val_src, source = locate(spec, label)
    train, problems = load_file(train_src, mapping)
    val = None
    if val_src:
        val, val_problems = load_file(val_src, mapping)
        problems += val_problems
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise DataError(errors, f"(`finetune check-data {spec}` reports every problem)")
    warnings = [p for p in problems if p.level == "warning"]
    if val is not None:
        if train[0].shape != val[0].shape:
            raise UserError(f"{val[0].where}: validation shape '{val[0].shape}' differs from train '{train[0].shape}'")
        return Splits(train, val, source, train[0].shape, warnings=warnings, rows=train + val)
    if len(train) < 2:
        raise UserError(f"{label}: needs at least 2 rows to hold one out for evaluation, found {len(train)}")
    rows = list(train)
    random.Random(seed).shuffle(rows)
    n_val = max(1, min(len(rows) - 1, round(len(rows) * val_split)))
    return Splits(rows[n_val:], rows[:n_val], source, rows[0].shape,
                  validation_source=f"carved {n_val} rows ({val_split:.0%}, seed {seed})", warnings=warnings, rows=train)


def load_items(spec: str, val_split: float, seed: int, column_map, label: str, convert) -> tuple:
    """Rows of another method's shape (DPO pairs, GRPO prompts): every row checked by `convert(row, where) ->
    (item or None, problems)`, all errors raised together, a validation split carved when there is no file.
    Returns (train, validation, source, validation_source, warning lines)."""
    mapping = parse_column_map(column_map)
    train_src, val_src, source = locate(spec, label)
    items, problems = {}, []
    for src in [train_src] + ([val_src] if val_src else []):
        rows, found = read_file(src, mapping)
        problems += found
        items[src] = []
        for where, row in rows:
            item, row_problems = convert(row, where)
            problems += row_problems
            if item is not None:
                items[src].append(item)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise DataError(errors, f"(`finetune check-data {spec}` reports every problem)")
    warnings = [str(p) for p in problems if p.level == "warning"]
    train = items[train_src]
    if val_src:
        return train, items[val_src], source, "file", warnings
    if len(train) < 2:
        raise UserError(f"{label}: needs at least 2 rows to hold one out for evaluation, found {len(train)}")
    rows = list(train)
    random.Random(seed).shuffle(rows)
    n_val = max(1, min(len(rows) - 1, round(len(rows) * val_split)))
    return rows[n_val:], rows[:n_val], source, f"carved {n_val} rows ({val_split:.0%}, seed {seed})", warnings
