"""Datasets in, one canonical row shape out; every problem names its file and line.

The four SFT shapes (same names as TRL's dataset formats) become one `Example`:
    {"text": ...}                                 -> Example(text=...)            every token trained
    {"prompt": str, "completion": str}            -> Example(prompt, completion)  completion + EOS trained
    {"messages": [...]}                           -> Example(messages)            assistant turns trained
    {"prompt": [msgs], "completion": [msgs]}      -> Example(messages, train_from=len(prompt))
Local files are parsed here (not by `datasets`) so a bad row can be reported as file:line.
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

from finetune.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
FILE_EXTS = (".jsonl", ".json", ".csv", ".parquet")
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")


@dataclass
class Example:
    messages: list[dict] | None = None   # chat rows: role/content dicts
    train_from: int = 0                  # first message index whose assistant turns carry loss
    prompt: str | None = None            # plain prompt/completion rows
    completion: str | None = None
    text: str | None = None              # plain language-modelling rows
    where: str = ""                      # "file:line", for messages about this row

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
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading rows
def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) for each row of a local file; malformed input raises UserError at its line."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_EXTS:
        raise UserError(f"{path}: unsupported file type '{ext}'; use one of {', '.join(FILE_EXTS)}")
    try:
        if ext == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield f"{path}:{n}", json.loads(line)
                        except json.JSONDecodeError as err:
                            raise UserError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None
        elif ext == ".json":
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); "
                                "a .json file must hold one list of rows (use .jsonl for one row per line)") from None
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"train": [...]} / {"data": [...]}
            if not isinstance(data, list):
                raise UserError(f"{path}: a .json file must hold a list of rows, got {type(data).__name__}")
            for i, row in enumerate(data):
                yield f"{path}: row {i + 1}", row
        elif ext == ".csv":
            with open(path, encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                for row in reader:
                    if None in row:
                        raise UserError(f"{path}:{reader.line_num}: more fields than the header has columns")
                    yield f"{path}:{reader.line_num}", dict(row)
        else:
            import pyarrow.parquet as pq  # ships with `datasets`

            try:
                table = pq.read_table(path)
            except Exception as err:  # pyarrow raises many types for corrupt files
                raise UserError(f"{path}: not a readable Parquet file ({err})") from None
            for i, row in enumerate(table.to_pylist()):
                yield f"{path}: row {i + 1}", row
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); re-save the file as UTF-8") from None


# ---------------------------------------------------------------- row -> Example
def _messages(value: Any, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{key}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise UserError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise UserError(f"{where}: {key}[{i}].role {msg['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str):
            raise UserError(f"{where}: {key}[{i}].content must be a string, got {type(msg['content']).__name__}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in row else ("empty" if isinstance(value, str) else type(value).__name__)
        raise UserError(f"{where}: '{key}' must be a non-empty string (got {got})")
    return value


def to_example(row: Any, where: str) -> Example:
    """Validate one row in any of the four SFT shapes and convert it to an Example."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: each row must be an object, got {type(row).__name__}")
    if "messages" in row:
        msgs = _messages(row["messages"], where, "messages")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise UserError(f"{where}: 'messages' has no non-empty assistant turn to learn from")
        return Example(messages=msgs, where=where)
    if "prompt" in row and "completion" in row:
        if isinstance(row["prompt"], list) or isinstance(row["completion"], list):
            prompt = _messages(row["prompt"], where, "prompt")
            completion = _messages(row["completion"], where, "completion")
            if not any(m["role"] == "assistant" for m in completion):
                raise UserError(f"{where}: 'completion' must contain an assistant message")
            return Example(messages=prompt + completion, train_from=len(prompt), where=where)
        return Example(prompt=_string(row, "prompt", where), completion=_string(row, "completion", where), where=where)
    if "text" in row:
        return Example(text=_string(row, "text", where), where=where)
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise UserError(f"{where}: unknown row shape (columns: {keys}); expected 'messages', 'prompt'+'completion' "
                    "or 'text' (rename columns, e.g. instruction->prompt, output->completion)")


def load_file(path: str) -> list[Example]:
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: the file is empty")
    rows = [to_example(row, where) for where, row in read_rows(path)]
    if not rows:
        raise UserError(f"{path}: no rows found")
    shapes = {r.shape for r in rows}
    if len(shapes) > 1:
        first = next(r for r in rows if r.shape != rows[0].shape)
        raise UserError(f"{first.where}: row shape '{first.shape}' differs from the first row's '{rows[0].shape}'; "
                        "use one shape per file")
    return rows


# ---------------------------------------------------------------- dataset spec -> splits
def _split_files(directory: str) -> tuple[str | None, str | None]:
    names = sorted(os.listdir(directory))
    pick = lambda stems: next((os.path.join(directory, n) for n in names  # noqa: E731
                               if os.path.splitext(n)[0] in stems and n.endswith(FILE_EXTS)), None)
    return pick(("train",)), pick(("validation", "valid", "val", "eval", "test"))


def load(spec: str, val_split: float, seed: int) -> Splits:
    """`spec` is 'sample', a file, a directory with train.* (+ validation.*), or a Hugging Face dataset id."""
    directory = SAMPLE_DIR if spec == "sample" else spec
    if os.path.isdir(directory):
        train_path, val_path = _split_files(directory)
        if train_path is None:
            raise UserError(f"DATASET={spec}: directory has no train.jsonl/.json/.csv/.parquet")
        train = load_file(train_path)
        val = load_file(val_path) if val_path else None
        source = directory
    elif os.path.isfile(spec):
        train, val, source = load_file(spec), None, spec
    elif os.path.splitext(spec)[1].lower() in FILE_EXTS or spec.startswith((".", "/", "~")):
        raise UserError(f"DATASET={spec}: file not found")
    else:
        train, val, source = _load_hub(spec), None, f"hf:{spec}"
    if val is not None:
        if train[0].shape != val[0].shape:
            raise UserError(f"{val[0].where}: validation shape '{val[0].shape}' differs from train '{train[0].shape}'")
        return Splits(train, val, source, train[0].shape)
    if len(train) < 2:
        raise UserError(f"DATASET={spec}: needs at least 2 rows to hold one out for evaluation, found {len(train)}")
    rows = list(train)
    random.Random(seed).shuffle(rows)
    n_val = max(1, min(len(rows) - 1, round(len(rows) * val_split)))
    return Splits(rows[n_val:], rows[:n_val], source, rows[0].shape,
                  validation_source=f"carved {n_val} rows ({val_split:.0%}, seed {seed})")


def _load_hub(name: str) -> list[Example]:
    """A Hugging Face dataset id through `datasets` (uses its cache; HF_HUB_OFFLINE=1 reads the cache only)."""
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # network, missing dataset, offline cache miss: all end the same way for the user
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(f"DATASET={name}: not a local path and could not be loaded from the Hugging Face Hub "
                        f"({reason}); pass a local .jsonl/.json/.csv/.parquet file") from None
    return [to_example(row, f"{name}: row {i + 1}") for i, row in enumerate(ds)]
