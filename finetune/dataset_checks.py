"""Checks across a dataset's rows (duplicates, prompt/completion glued together), shared by training (methods.sft)
and the `check-data` command, so that a method does not import a command module."""
from __future__ import annotations

import json
from typing import Any

from finetune import data
from finetune.data import Example
from finetune.shapes import Problem

MAX_PRINTED = 20  # problems printed (train's check and check-data's text report)


def _key(item: Any) -> str:
    if isinstance(item, Example):
        item = (item.messages, item.train_from, item.prompt, item.completion, item.text)
    return json.dumps(item, sort_keys=True, default=str)


def duplicates(items: list[tuple[str, Any]]) -> list[Problem]:
    """A warning for every row identical to an earlier one (rows in file order, as (where, row))."""
    first: dict[str, str] = {}
    out = []
    for where, row in items:
        key = _key(row)
        if key not in first:
            first[key] = where
            continue
        same_file = where.split(":")[0] == first[key].split(":")[0]
        out.append(Problem(where, f"duplicate of {first[key]}; it is trained twice, drop it" if same_file else
                           f"also at {first[key]}: a row in both training and validation data makes the "
                           "evaluation look better than it is; remove it from one", "warning"))
    return out


def dataset_problems(items: list[tuple[str, Any]]) -> list[Problem]:
    """Checks across rows (rows in file order, as (where, row or Example)); train and check-data share them."""
    out = duplicates(items)
    glued = [w for w, e in items if isinstance(e, Example) and e.prompt is not None
             and not e.prompt[-1:].isspace() and not e.completion[:1].isspace()]
    if glued:
        out.append(Problem(glued[0], f"'prompt' and 'completion' meet with no space or newline in {len(glued)} of "
                                     f"{len(items)} rows, so they train as run-on text; end prompts with a newline or "
                                     "start completions with a space", "warning"))
    return out


def check_splits(splits: data.Splits) -> list[str]:
    """`train`'s data check, right after data.load: the row warnings found while loading plus the
    dataset-wide ones, capped for printing. (data.load has already raised every row error.)"""
    problems = list(splits.warnings) + dataset_problems([(e.where, e) for e in splits.rows])
    lines = [str(p) for p in problems[:MAX_PRINTED]]
    if len(problems) > MAX_PRINTED:
        lines.append(f"... and {len(problems) - MAX_PRINTED} more data warnings (`finetune check-data` lists them all)")
    return lines
