"""Token-level checks for `finetune check-data` and `train`: lengths, truncation, trained share, the
end-of-turn check and the preview. Everything here goes through template.encode, the one place the
loss mask is computed, so what is measured and shown is exactly what trains.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from finetune.data import Example
from finetune.errors import UserError, first_line
from finetune.shapes import Problem
from finetune.template import IGNORE, chat_text, check_tools, clip, encode

FULL = 1024               # tokens of a row the end-of-turn check looks at (the template's property, not the row's)
OPEN, CLOSE = "[[", "]]"  # preview markers around tokens that carry loss
TEMPLATE_ROWS = 50        # rows train re-encodes for the end-of-turn check (it is a property of the template)


def _stop_problem(encoded: list[tuple[str, Any]], tokenizer) -> Problem | None:
    """A trained run that ends on an ordinary token means the model never learns to end its reply there."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    bad = [where for where, enc in encoded
           if any(lab != IGNORE and (i + 1 == len(enc.labels) or enc.labels[i + 1] == IGNORE) and enc.input_ids[i] not in special
                  for i, lab in enumerate(enc.labels))]
    if not bad:
        return None
    return Problem(bad[0], f"{len(bad)} of {len(encoded)} rows have an assistant turn whose trained tokens end without "
                           "an end-of-turn token (the chat template has none), so the model may not learn to stop; "
                           "use a model whose template ends turns with a special token", "warning")


def template_warnings(rows: list[Example], tokenizer) -> list[str]:
    """For train: the end-of-turn check on the shortest rows, whole (untruncated); it is a property of the
    template, and a row cut short does not end where its turn ends."""
    shortest = [ex for ex in sorted(rows, key=chars)[:TEMPLATE_ROWS] if not clip(ex, FULL)[1]]
    encoded = [(ex.where, enc) for ex in shortest if not (enc := encode(ex, tokenizer, FULL)).truncated]
    problem = _stop_problem(encoded, tokenizer)
    return [str(problem)] if problem else []


def chars(ex: Example) -> int:
    if ex.messages is not None:
        return sum(len(m["content"]) for m in ex.messages)
    return len(ex.text if ex.text is not None else ex.prompt + ex.completion)


# ---------------------------------------------------------------- tokens
def _pct(values: list[int], p: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def _examples_list(wheres: list[str], limit: int = 3) -> str:
    wheres = list(dict.fromkeys(wheres))  # chosen and rejected of one row share a where
    return ", ".join(wheres[:limit]) + (f" and {len(wheres) - limit} more" if len(wheres) > limit else "")


def measure(report, tokenizer, max_len: int, model: str = "MODEL") -> None:
    """Token statistics with the model's tokenizer; adds length/truncation/template problems to the report."""
    if tokenizer.eos_token_id is None:
        report.problems.append(Problem(report.files[0], f"the tokenizer of {model} has no EOS token, so no row can "
                                                        "teach the model to stop; use a model that defines one"))
        return
    chat = next((ex.where for ex in report.examples if ex.messages), None) or \
        next((report.files[0] for p in report.prompts if isinstance(p, list)), None)
    if chat and not getattr(tokenizer, "chat_template", None):  # one error, not one per row
        report.problems.append(Problem(chat, f"{model} has no chat template, so chat rows cannot be rendered; use a "
                                             "chat/instruct model or plain prompt/completion rows"))
        return
    tool_rows = [ex for ex in report.examples if ex.form == "tool-calling"]
    if tool_rows:
        try:
            check_tools(tokenizer, model.removeprefix("MODEL="))
        except UserError as err:
            report.problems.append(Problem(tool_rows[0].where, str(err)))
            return
    if report.prompts:  # GRPO: nothing trains here, the prompt lengths are what matter
        lengths = [len(tokenizer(chat_text(tokenizer, p, add_generation_prompt=True) if isinstance(p, list) else p)
                       ["input_ids"]) for p in report.prompts]
        report.stats = {"sequences": len(lengths), "prompt_tokens": _lengths(lengths)}
        return
    encoded, long_rows, cut_rows, trained, kept = [], [], [], 0, 0
    for ex in report.examples:
        try:
            enc = encode(ex, tokenizer, 2 * max_len)  # the length past MAX_SEQ_LENGTH, bounded: see template.clip
        except Exception as err:  # UserError from the mask, or the template's own raise_exception()
            message = first_line(err, 10 ** 6)
            report.problems.append(Problem(ex.where, message.removeprefix(f"{ex.where}: ") if isinstance(err, UserError)
                                           else f"the model's chat template fails on this row ({message})"))
            continue
        encoded.append((ex.where, enc))
        within = enc.labels[:max_len]
        trained += sum(1 for x in within if x != IGNORE)
        kept += len(within)
        if enc.truncated or len(enc.input_ids) > max_len:
            long_rows.append(ex.where)
        if all(x == IGNORE for x in within):
            cut_rows.append(ex.where)
    if not encoded:
        return
    n, lengths = len(encoded), [len(enc.input_ids) for _, enc in encoded]
    if long_rows:
        report.problems.append(Problem(long_rows[0], f"{len(long_rows)} of {n} rows ({len(long_rows) / n:.1%}) are longer "
                                       f"than MAX_SEQ_LENGTH={max_len} after the template and will be truncated "
                                       f"({_examples_list(long_rows)}); raise MAX_SEQ_LENGTH or shorten them", "warning"))
    if cut_rows:
        every = len(cut_rows) == n
        report.problems.append(Problem(cut_rows[0], f"{len(cut_rows)} of {n} rows have every trained token past "
                                       f"MAX_SEQ_LENGTH={max_len}, so they {'leave nothing to train' if every else 'are dropped'} "
                                       f"({_examples_list(cut_rows)}); raise MAX_SEQ_LENGTH or shorten the prompts",
                                       "error" if every else "warning"))
    stop = _stop_problem(encoded, tokenizer)
    if stop:
        report.problems.append(stop)
    suggestion = _suggest(lengths)
    report.stats = {"sequences": n, "tokens": _lengths(lengths), "trained_share": round(trained / max(1, kept), 4),
                    "max_seq_length": max_len, "truncated_rows": len(long_rows), "truncated_share": round(len(long_rows) / n, 4),
                    "dropped_rows": len(cut_rows), "suggested_max_seq_length": suggestion,
                    "mean_tokens_kept": kept / n}


def _lengths(lengths: list[int]) -> dict:
    return {"p50": _pct(lengths, 50), "p90": _pct(lengths, 90), "p95": _pct(lengths, 95), "p99": _pct(lengths, 99),
            "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)}


def _suggest(lengths: list[int]) -> int:
    # Cover every row unless a few outliers would double the length; the planner sizes memory for it.
    p99, top = _pct(lengths, 99), max(lengths)
    target = top if top <= 1.25 * p99 else p99
    return max(64, -(-target // 64) * 64)


def plan_steps(report, cfg, model) -> None:
    """Steps per epoch at the batch the planner would pick for this machine (SFT memory model)."""
    from finetune import hardware, plan as planner
    import backends

    if "sequences" not in report.stats or "tokens" not in report.stats:
        return
    rows = max(1, round(report.train_rows * (1 - report.stats["dropped_rows"] / report.stats["sequences"])))
    try:
        hw = hardware.detect()
        backend, _ = backends.select(cfg.backend, hw, model, "sft")
        plan = planner.make(replace(cfg, method="sft"), hw, model, backend.name, backend.device(hw), rows,
                            report.stats["mean_tokens_kept"])
    except Exception as err:  # no fit, or a broken backend plugin: the data report still stands
        report.stats["plan"] = f"no plan: {first_line(err, 10 ** 6)}"
        return
    per_step = plan.batch_size * plan.grad_accum
    report.stats.update(train_rows=rows, batch_size=plan.batch_size, grad_accum=plan.grad_accum,
                        steps_per_epoch=math.ceil(rows / per_step), planned_steps=plan.max_steps)


# ---------------------------------------------------------------- preview
def render(enc, tokenizer) -> str:
    """The row's tokens as text, with every run of loss-carrying tokens between OPEN and CLOSE."""
    parts, run, state = [], [], None
    for tok, lab in zip(enc.input_ids, enc.labels):
        trained = lab != IGNORE
        if run and trained != state:
            parts.append(_wrap(tokenizer.decode(run), state))
            run = []
        state = trained
        run.append(tok)
    if run:
        parts.append(_wrap(tokenizer.decode(run), state))
    return "".join(parts)


def _wrap(text: str, trained: bool) -> str:
    return f"{OPEN}{text}{CLOSE}" if trained else text


def preview(examples: list[Example], tokenizer, n: int, max_len: int) -> list[str]:
    """Rows exactly as training sees them: the same encode and MAX_SEQ_LENGTH truncation."""
    out = []
    for ex in examples[:n]:
        try:
            enc = encode(ex, tokenizer, max_len)
        except Exception:  # already reported as a problem by `measure`
            continue
        cut = f", truncated at MAX_SEQ_LENGTH={max_len}" if enc.truncated else ""
        out.append(f"--- {ex.where}: {len(enc.input_ids)} tokens, {enc.n_trained} trained "
                   f"(between {OPEN} and {CLOSE}){cut}\n{render(enc, tokenizer)}")
    return out
