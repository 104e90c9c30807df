"""Reading rows from local files (JSONL, JSON, CSV, Parquet) and Hub datasets, one (where, row, problem) at a time:
every line that cannot be read becomes a problem naming its file and line, and reading goes on, so `check-data`
can list them all. Shapes and meaning are finetune/data.py's business; this module only reads."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Iterator

from finetune.errors import UserError, first_line
from finetune.shapes import Problem, kind, rename

FILE_EXTS = (".jsonl", ".json", ".csv", ".parquet")
TOO_DEEP = "not usable JSON: nested too deeply (lists or objects inside each other thousands of levels deep)"


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
        except RecursionError:
            yield where, None, TOO_DEEP
        except json.JSONDecodeError as err:
            if n == 1 and s.strip() in ("[", "{"):  # one pretty-printed document: every later line would fail too
                yield where, None, ("not valid JSON: the file looks like one JSON document over many lines; "
                                    "a .jsonl file needs one object per line (or name a JSON list .json)")
                return
            yield where, None, f"not valid JSON ({err.msg} at column {err.colno})"


def _json(path: str, decoded: str) -> Iterator[tuple[str, Any, str | None]]:
    try:
        data = json.loads(decoded)
    except RecursionError:
        yield path, None, TOO_DEEP
        return
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
    csv.field_size_limit(len(decoded) + 1)  # a long answer is data, not an error (the default cap is 128 KB)
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
