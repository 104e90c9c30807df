"""Datasets in, one canonical row shape out; every problem names its file and line.

The four SFT shapes (same names as TRL's dataset formats) become one `Example`:
    {"text": ...}                                 -> Example(text=...)            every token trained
    {"prompt": str, "completion": str}            -> Example(prompt, completion)  completion + EOS trained
    {"messages": [...]}                           -> Example(messages)            assistant turns trained
    {"prompt": [msgs], "completion": [msgs]}      -> Example(messages, train_from=len(prompt))
Local files are parsed here (not by `datasets`) so a bad row can be reported as file:line. Reading
and row checks collect every problem instead of stopping at the first, so `finetune check-data` and
`train` share them: check-data prints them all, `load` raises them (capped) as one DataError.
COLUMN_MAP ("question=prompt,answer=completion") renames columns before any shape is detected.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

from finetune import forms
from finetune.errors import UserError, first_line
from finetune.shapes import (FORMS, ROLES, Problem, has_assistant, kind, map_flags, messages,  # noqa: F401 (re-exports)
                             parse_column_map, rename, suggest_map, text)

FILE_EXTS = (".jsonl", ".json", ".csv", ".parquet")
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")
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


# ---------------------------------------------------------------- reading rows
def iter_rows(path: str) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (where, row, None) per row, or (where, None, message) for what cannot be read. A bad
    line of a .jsonl/.csv does not stop reading, so every one can be reported; a file-level problem
    (empty, UTF-16, broken .json) is yielded with where = the path and ends the file."""
    if path.startswith("hf:"):
        yield from _hub_rows(path[3:])
        return
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_EXTS:
        yield path, None, f"unsupported file type '{ext}'; use one of {', '.join(FILE_EXTS)}"
        return
    if os.path.getsize(path) == 0:
        yield path, None, "the file is empty"
        return
    if ext == ".parquet":
        yield from _parquet(path)
        return
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        yield path, None, "the file is UTF-16 text; re-save it as UTF-8"
        return
    if ext == ".jsonl":
        yield from _jsonl(path, raw)
        return
    try:
        decoded = raw.decode("utf-8-sig")  # -sig: a byte-order mark from Windows editors is harmless
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        yield f"{path}:{line}", None, f"not UTF-8 text (byte {err.start}); re-save the file as UTF-8"
        return
    yield from (_json(path, decoded) if ext == ".json" else _csv(path, decoded))


def _jsonl(path: str, raw: bytes) -> Iterator[tuple[str, Any, str | None]]:
    for n, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{n}"
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield where, None, f"not UTF-8 text (byte {err.start} of the line); re-save the file as UTF-8"
            continue
        s = s.lstrip("\ufeff") if n == 1 else s
        if not s.strip():
            continue
        try:
            yield where, json.loads(s), None
        except json.JSONDecodeError as err:
            if n == 1 and s.strip() in ("[", "{"):  # one pretty-printed document: every later line would fail too
                yield where, None, ("not valid JSON: the file looks like one JSON document over many lines; "
                                    "a .jsonl file needs one object per line (or name a JSON list .json)")
                return
            yield where, None, f"not valid JSON ({err.msg} at column {err.colno})"


def _json(path: str, decoded: str) -> Iterator[tuple[str, Any, str | None]]:
    try:
        data = json.loads(decoded)
    except json.JSONDecodeError as err:
        yield (f"{path}:{err.lineno}", None, f"not valid JSON ({err.msg} at column {err.colno}); a .json file "
               "must hold one list of rows (use .jsonl for one row per line)")
        return
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list) \
            and all(isinstance(r, dict) for r in next(iter(data.values()))):
        data = next(iter(data.values()))  # {"train": [...]} / {"data": [...]}
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()) \
            and len({len(v) for v in data.values()}) == 1:
        data = [dict(zip(data, values)) for values in zip(*data.values())]  # columnar {"prompt": [...], ...}
    if not isinstance(data, list):
        yield path, None, f"a .json file must hold a list of rows, got {kind(data)}"
        return
    for i, row in enumerate(data):
        yield f"{path}: row {i + 1}", row, None


def _csv(path: str, decoded: str) -> Iterator[tuple[str, Any, str | None]]:
    reader = csv.reader(io.StringIO(decoded, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        twice = next((h for h in header if header.count(h) > 1), None)
        if twice is not None:
            yield f"{path}:1", None, f"the header repeats column '{twice}'; rename one of them"
            return
        start = reader.line_num + 1
        for record in reader:
            where, start = f"{path}:{start}", reader.line_num + 1  # a quoted field may span lines
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(header):
                fix = ("more", "quote fields that contain commas") if len(record) > len(header) else \
                    ("fewer", "write an empty value as an empty field")
                yield where, None, f"{len(record)} fields, {fix[0]} than the header's {len(header)} columns ({fix[1]})"
                continue
            yield where, dict(zip(header, record)), None
    except csv.Error as err:
        yield f"{path}:{reader.line_num}", None, f"not valid CSV ({err})"


def _parquet(path: str) -> Iterator[tuple[str, Any, str | None]]:
    import pyarrow.parquet as pq  # ships with `datasets`

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises many types for corrupt files
        yield path, None, f"not a readable Parquet file ({first_line(err)})"
        return
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i + 1}", row, None


def _hub_rows(name: str) -> Iterator[tuple[str, Any, str | None]]:
    """A Hugging Face dataset id through `datasets` (uses its cache; HF_HUB_OFFLINE=1 reads the cache only)."""
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # network, missing dataset, offline cache miss: all end the same way for the user
        reason = first_line(err, 200)
        raise UserError(f"DATASET={name}: not a local path and could not be loaded from the Hugging Face Hub "
                        f"({reason}); pass a local .jsonl/.json/.csv/.parquet file") from None
    for i, row in enumerate(ds):
        yield f"{name}: row {i + 1}", row, None


def read_file(path: str, mapping: dict[str, str] | None = None,
              map_where: str = "COLUMN_MAP") -> tuple[list[tuple[str, Any]], list[Problem]]:
    """Every readable row, renamed by `mapping`, plus a Problem for each line that could not be read."""
    rows, problems, seen = [], [], set()
    for where, row, message in iter_rows(path):
        if message:
            problems.append(Problem(where, message))
            continue
        seen.update(row if isinstance(row, dict) else ())
        row, clash = rename(row, mapping or {})
        if clash:
            problems.append(Problem(where, clash))
            continue
        rows.append((where, row))
    if not rows and not problems:
        problems.append(Problem(path, "no rows found"))
    for src in mapping or {}:
        if rows and src not in seen:
            problems.append(Problem(path, f"{map_where} maps '{src}', but no row has a '{src}' column "
                                          f"(columns: {', '.join(columns(rows))})"))
    return rows, problems


def columns(rows: list[tuple[str, Any]]) -> list[str]:
    """Column names across rows, in first-seen order."""
    out: dict[str, None] = {}
    for _, row in rows:
        out.update(dict.fromkeys(map(str, row)) if isinstance(row, dict) else {})
    return list(out)


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
        if msgs is not None and not has_assistant(msgs):
            problems.append(Problem(where, "'messages' has no non-empty assistant turn to learn from"))
        elif msgs and msgs[-1]["role"] != "assistant":
            problems.append(Problem(where, f"the last turn is '{msgs[-1]['role']}', not assistant, so it teaches "
                                           "nothing; drop it", "warning"))
        ex = Example(messages=msgs, where=where) if msgs else None
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
    return examples, problems + row_problems


# ---------------------------------------------------------------- dataset spec -> splits
def _split_files(directory: str) -> tuple[str | None, str | None]:
    names = sorted(os.listdir(directory))
    pick = lambda stems: next((os.path.join(directory, n) for n in names  # noqa: E731
                               if os.path.splitext(n)[0] in stems and n.endswith(FILE_EXTS)), None)
    return pick(("train",)), pick(("validation", "valid", "val", "eval", "test"))


def locate(spec: str, label: str | None = None) -> tuple[str, str | None, str]:
    """(train source, validation source or None, description); sources are paths or 'hf:<id>'."""
    label = label or f"DATASET={spec}"
    directory = SAMPLE_DIR if spec == "sample" else spec
    if os.path.isdir(directory):
        train_path, val_path = _split_files(directory)
        if train_path is None:
            raise UserError(f"{label}: directory has no train.jsonl/.json/.csv/.parquet")
        return train_path, val_path, directory
    if os.path.isfile(spec):
        return spec, None, spec
    if os.path.splitext(spec)[1].lower() in FILE_EXTS or spec.startswith((".", "/", "~")):
        raise UserError(f"{label}: file not found")
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
