"""`finetune check-data`: which methods a dataset fits, every problem with its file:line, token
statistics and a preview of exactly what trains, before any model weights load.

One validator: the row checks live in data.py (SFT) and shapes.py (other methods), the dataset-wide
checks (`dataset_problems`) here, the token checks in check_tokens.py. `train` runs the same ones
(data.load, then `check_splits` and `template_warnings`), so check-data and train never disagree
about a row. Token counts and the preview come from template.encode, the one loss-mask implementation.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from finetune import data, forms
from finetune.check_tokens import measure, plan_steps, preview
from finetune.data import Example
from finetune.dataset_checks import MAX_PRINTED, dataset_problems  # shared with train (methods.sft)
from finetune.errors import UserError
from finetune.methods import NAMES as TRAINABLE
from finetune.shapes import ALIASES, METHODS, REWARD_COLUMNS, Problem, label_value, row_problems, verdict

MAX_JSON = 1000


@dataclass
class Report:
    source: str
    method: str
    files: list[str]
    rows: int = 0
    columns: list[str] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)
    verdicts: dict[str, dict] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    preview: list[str] = field(default_factory=list)
    model: str | None = None
    examples: list[Example] = field(default_factory=list)   # the chosen method's rows, as the template sees them
    prompts: list[Any] = field(default_factory=list)        # GRPO prompts (nothing trains, lengths only)
    train_rows: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    def to_dict(self) -> dict:
        listed = self.errors + self.warnings
        return {"ok": not self.errors, "source": self.source, "method": self.method, "files": self.files,
                "rows": self.rows, "columns": self.columns, "ignored_columns": self.ignored_columns,
                "verdicts": self.verdicts, "counts": {"errors": len(self.errors), "warnings": len(self.warnings)},
                "problems": [p.to_dict() for p in listed[:MAX_JSON]], "problems_omitted": max(0, len(listed) - MAX_JSON),
                "stats": self.stats, "preview": self.preview, "model": self.model}


# ---------------------------------------------------------------- rows per method
def _as_examples(method: str, row: dict, where: str) -> list[Example]:
    """DPO/ORPO/KTO rows as the SFT-shaped sequences the template can measure (chosen and rejected each)."""
    if method == "kto":
        return [data.check_row({"prompt": row["prompt"], "completion": row["completion"]}, where)[0]]
    out = []
    for answer in ("chosen", "rejected"):
        if "prompt" in row:
            sub = {"prompt": row["prompt"], "completion": row[answer]}
        else:
            sub = {"messages": row[answer]} if isinstance(row[answer], list) else {"text": row[answer]}
        out.append(data.check_row(sub, where)[0])
    return [ex for ex in out if ex is not None]


def _method_rows(method: str, files: dict[str, list]) -> tuple[list[Example], list[Any], list[Problem]]:
    """(examples to measure, GRPO prompts, problems) for every row of every file."""
    examples, prompts, problems = [], [], []
    for rows in files.values():
        if method == "sft":
            found, file_problems = data.examples_from(rows)
            if examples and found and found[0].shape != examples[0].shape:
                file_problems.append(Problem(found[0].where, f"validation shape '{found[0].shape}' differs from "
                                                             f"train '{examples[0].shape}'"))
            examples += found
            problems += file_problems
            continue
        for where, row in rows:
            found = row_problems(row, where, method)
            problems += found
            if any(p.level == "error" for p in found):
                continue
            if method == "grpo":
                prompts.append(row["prompt"])
            else:
                examples += _as_examples(method, row, where)
    if method == "kto":
        labels = {label_value(r.get("label")) for rows in files.values() for _, r in rows if isinstance(r, dict)}
        if len(labels - {None}) == 1:
            problems.append(Problem(next(iter(files)), f"every 'label' is {labels.pop()}; KTO needs both desirable "
                                                       "(true) and undesirable (false) examples", "warning"))
    return examples, prompts, problems


def _unused_text(files: dict[str, list], ignored: list[str], method: str) -> list[Problem]:
    """Alpaca's 'input' and friends: text the method never sees, which silently changes the task."""
    out = []
    for col in (c for c in ignored if c.lower() in ALIASES["prompt"] + ALIASES["completion"]):
        filled = [w for rows in files.values() for w, r in rows if isinstance(r, dict) and str(r.get(col) or "").strip()]
        if filled:
            out.append(Problem(filled[0], f"column '{col}' has text in {len(filled)} of {sum(map(len, files.values()))} "
                                          f"rows, but {method} does not use it; "
                                          "merge it into the prompt (or --map it) so the model sees it", "warning"))
    return out


def scan(spec: str, method: str = "sft", mapping: dict | None = None, map_where: str = "COLUMN_MAP",
         val_split: float = 0.1) -> Report:
    """Everything that needs no tokenizer: read every file, map columns, verdicts, all problems."""
    train_src, val_src, source = data.locate(spec, label=spec)
    report = Report(source=source, method=method, files=[train_src] + ([val_src] if val_src else []))
    files = {}
    for src in report.files:
        rows, problems = data.read_file(src, mapping, map_where)
        files[src], report.problems = rows, report.problems + problems
    report.rows = sum(len(rows) for rows in files.values())
    train = files[train_src]
    report.columns = data.columns(train)
    first = next((row for _, row in train if isinstance(row, dict)), {})
    if train:  # with no readable row there is nothing to judge a method by
        report.verdicts = {m: verdict(m, report.columns, first) for m in METHODS}
        form = forms.detect(first) if isinstance(first, dict) else None
        if form:  # Alpaca / ShareGPT train as SFT messages with no mapping
            uses = [c for c in ("instruction", "input", "output", "system", "conversations") if c in report.columns]
            report.verdicts["sft"] = {"status": "ready", "form": forms.DESCRIPTION[form], "map": {}, "uses": uses}
        elif "messages" in report.columns and ("tools" in report.columns or _has_tool_calls(first)):
            report.verdicts["sft"].update(form=forms.DESCRIPTION["tool-calling"],
                                          uses=[c for c in ("messages", "tools") if c in report.columns])
    n_val = len(files[val_src]) if val_src else max(1, min(len(train) - 1, round(len(train) * val_split)))
    report.train_rows = len(train) if val_src else max(0, len(train) - n_val)
    if not train:
        return report
    for m in METHODS:  # every method that fits gets its row checks, so its verdict can say "has errors"
        v = report.verdicts[m]
        if v["status"] != "ready":
            continue
        examples, prompts, problems = _method_rows(m, files)
        if any(p.level == "error" for p in problems):
            v.update(status="has errors", errors=sum(p.level == "error" for p in problems))
        if m == method:
            report.examples, report.prompts, report.problems = examples, prompts, report.problems + problems
            used = set(v["uses"]) | (set(REWARD_COLUMNS) if m == "grpo" else set())
            report.ignored_columns = [c for c in report.columns if c not in used]
            report.problems += _unused_text(files, report.ignored_columns, method)
    chosen = report.verdicts[method]
    if chosen["status"] in ("needs mapping", "incompatible"):
        report.problems.append(Problem(train[0][0], f"columns {', '.join(report.columns)} do not fit {method}: "
                                                    f"{chosen['reason']}"))
    else:
        items = [(e.where, e) for e in report.examples] if method == "sft" else \
            [item for rows in files.values() for item in rows]
        report.problems += dataset_problems(items)
    order = {src: i for i, src in enumerate(report.files)}
    report.problems.sort(key=lambda p: _position(p.where, order))  # stable: a row's problems keep their order
    return report


def _position(where: str, order: dict[str, int]) -> tuple[int, int]:
    """('file:12' | 'file: row 12' | 'file') -> (file index, line), so problems print in file order."""
    match = re.match(r"^(.*?)(?::(\d+)|: row (\d+))?$", where)
    line = int(match.group(2) or match.group(3) or 0)
    return order.get(match.group(1), len(order)), line


def _has_tool_calls(row: dict) -> bool:
    turns = row.get("messages")
    return isinstance(turns, list) and any(isinstance(m, dict) and m.get("tool_calls") for m in turns)


# ---------------------------------------------------------------- the command
def add_arguments(parser) -> None:
    from finetune.argtypes import at_least

    parser.add_argument("path", help="file, directory with train.* (+ validation.*), 'sample', or a Hugging Face dataset id")
    parser.add_argument("--method", choices=TRAINABLE, default=None, help="method to check for (default METHOD or sft)")
    parser.add_argument("--map", action="append", default=[], metavar="OLD=NEW",
                        help="rename a column before checking (repeatable); same as COLUMN_MAP=old=new,...")
    parser.add_argument("--show", type=at_least(0), default=0, metavar="N", help="render N rows as training sees them")
    parser.add_argument("--json", action="store_true", help="print one JSON object (verdicts, problems, stats)")
    parser.add_argument("--model", default=None, help="model whose tokenizer and template to use (default MODEL)")
    parser.add_argument("--max-seq-length", dest="max_seq_length", default=None, metavar="N",
                        help="tokens per row (default MAX_SEQ_LENGTH)")


def main(args) -> int:
    """Exit 0: ready for the method (warnings allowed); 2: errors, each listed with its file:line."""
    try:
        report = run(args)
    except UserError as err:
        if not args.json:
            raise
        print(json.dumps({"ok": False, "error": str(err)}, indent=2))
        return err.exit_code
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 2 if report.errors else 0


def run(args) -> Report:
    from finetune import models
    from finetune.config import resolve

    given = {"dataset": args.path, "model": args.model, "max_seq_length": args.max_seq_length,
             "column_map": ",".join(args.map) if args.map else None, "method": args.method}
    cfg, sources = resolve({k: v for k, v in given.items() if v is not None})  # METHOD validated as train does
    method = cfg.method
    map_where = {"cli": "--map", "env": "COLUMN_MAP"}.get(sources["column_map"], "column_map")
    from finetune import methods

    spec = methods.get(method).SAMPLE_DIR if args.path == "sample" else args.path  # the method's shipped sample
    report = scan(spec, method, data.parse_column_map(cfg.column_map, map_where), map_where, cfg.val_split)
    if report.errors and not args.show:
        return report  # fail fast: no tokenizer (and no transformers import) for data that cannot train
    model, banner = models.resolve(cfg.model, user_named_it=sources["model"] != "default")
    if banner:
        from finetune.outputs import banner as boxed

        print(boxed(banner), file=sys.stderr if args.json else sys.stdout)
    report.model = model.name
    tokenizer = models.load_tokenizer(model)
    measure(report, tokenizer, cfg.max_seq_length, f"MODEL={model.name}")
    if not report.errors:
        plan_steps(report, cfg, model)
    if args.show > 0:
        report.preview = preview(report.examples, tokenizer, args.show, cfg.max_seq_length)
    return report


def format_report(r: Report) -> str:
    lines = [f"Dataset: {r.source} ({r.rows} rows{', files ' + ', '.join(r.files) if len(r.files) > 1 else ''})",
             f"Columns: {', '.join(r.columns) or 'none'}" + (f" (not used by {r.method}: {', '.join(r.ignored_columns)})"
                                                             if r.ignored_columns else ""), "Methods:" if r.verdicts else "Methods: no readable rows to judge"]
    for m, v in r.verdicts.items():
        detail = v.get("reason") or v["form"] + (f"; {v['errors']} error(s) in rows" if v.get("errors") else "") + \
            (f"; {v['note']}" if v.get("note") else "")
        trainable = "" if m in TRAINABLE else " (format check only: train runs " + "/".join(TRAINABLE) + ")"
        lines.append(f"  {'*' if m == r.method else ' '} {m:<5} {v['status']:<14} {detail}{trainable}")
    listed = r.errors + r.warnings
    lines.append(f"Problems: {_count(r)}" if listed else "Problems: none")
    lines += [f"  {p.level:<7} {p}" for p in listed[:MAX_PRINTED]]
    if len(listed) > MAX_PRINTED:
        lines.append(f"  ... and {len(listed) - MAX_PRINTED} more (--json lists them all)")
    s = r.stats
    if "tokens" in s:
        t = s["tokens"]
        lines += [f"Tokens (tokenizer of {r.model}, MAX_SEQ_LENGTH={s['max_seq_length']}):",
                  f"  per row     p50 {t['p50']}, p90 {t['p90']}, p95 {t['p95']}, p99 {t['p99']}, max {t['max']} "
                  f"(mean {t['mean']:.0f}) over {s['sequences']} sequences",
                  f"  trained     {s['trained_share']:.0%} of tokens carry loss",
                  f"  truncated   {s['truncated_rows']} rows ({s['truncated_share']:.1%}); dropped {s['dropped_rows']}"]
        if "steps_per_epoch" in s:
            lines.append(f"  epoch       {s['train_rows']} train rows / (batch {s['batch_size']} x grad accum "
                         f"{s['grad_accum']}) = {s['steps_per_epoch']} steps")
        elif "plan" in s:
            lines.append(f"  epoch       {s['plan']}")
        lines.append(f"  suggestion  {_length_advice(s)}")
    elif "prompt_tokens" in s:
        t = s["prompt_tokens"]
        lines.append(f"Prompt tokens ({r.model}): p50 {t['p50']}, p95 {t['p95']}, max {t['max']} over {s['sequences']} prompts")
    for block in r.preview:
        lines += ["", block]
    ok = not r.errors
    lines.append(f"\nResult: {'ready' if ok else 'not ready'} for {r.method} ({_count(r)})"
                 f"{'' if ok else '; fix the errors above (each names its file and line)'}")
    return "\n".join(lines)


def _count(r: Report) -> str:
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
    return f"{plural(len(r.errors), 'error')}, {plural(len(r.warnings), 'warning')}"


def _length_advice(s: dict) -> str:
    want, now = s["suggested_max_seq_length"], s["max_seq_length"]
    covers = "every row" if want >= s["tokens"]["max"] else "99% of rows"
    if want > now:
        return f"MAX_SEQ_LENGTH={want} would fit {covers} (now {s['truncated_rows']} rows are truncated)"
    if want * 2 <= now:
        return f"MAX_SEQ_LENGTH={want} fits {covers}; {now} truncates nothing here (memory is planned for the longest row either way)"
    return f"MAX_SEQ_LENGTH={now} fits; {want} would cover {covers}"
