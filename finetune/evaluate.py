"""Checkable scores for generations, backend-agnostic.

The metric is exact match of the generated answer against the held-out answer; when the answers
are JSON objects (the shipped sample asks for strict JSON) it also reports `valid_format`: the
output parses as a JSON object with the same keys and value types, whatever the values.
"""
from __future__ import annotations

import json

from finetune.template import generation_prompt


def json_object(text) -> dict | None:
    try:
        value = json.loads(text.strip())
    except (AttributeError, ValueError, RecursionError):  # not a string / not JSON / pathological nesting
        return None
    return value if isinstance(value, dict) else None


def score(expected: str, generated: str) -> dict[str, bool]:
    """Checks for one generation. Key order and whitespace are free; types are not (30.0 or "30" is not 30)."""
    want, got = json_object(expected), json_object(generated)
    if want is None:
        same = isinstance(generated, str) and " ".join(expected.split()) == " ".join(generated.split())
        return {"exact_match": same}
    valid = got is not None and set(got) == set(want) and all(type(got[k]) is type(want[k]) for k in want)
    return {"exact_match": valid and got == want, "valid_format": valid}


def generations(session, tokenizer, prompts: list[tuple[list[int], str]], max_new_tokens: int) -> tuple[dict, list]:
    """Greedy answers to (prompt ids, expected answer) pairs -> (share passing each check, one row per prompt)."""
    outputs = session.generate([ids for ids, _ in prompts], max_new_tokens) if prompts else []
    rows, totals = [], {}
    for (ids, expected), out in zip(prompts, outputs):
        text = tokenizer.decode(out, skip_special_tokens=True).strip()
        checks = score(expected, text)
        for k, v in checks.items():
            totals[k] = totals.get(k, 0) + int(v)
        rows.append({"prompt": tokenizer.decode(ids, skip_special_tokens=False), "expected": expected,
                     "generated": text, **checks})
    return ({k: v / len(rows) for k, v in totals.items()} if rows else {}), rows


def example_prompts(examples, tokenizer, n: int) -> list[tuple[list[int], str]]:
    """(prompt ids, expected answer) for the first n held-out rows that have an answer to check."""
    found = (generation_prompt(ex, tokenizer) for ex in examples)
    return [p for p in found if p is not None][:n]


def with_generations(session, prepared, cfg, metrics: dict):
    """A method's EvalResult: `metrics` (its "eval_loss" taken out) plus the generation checks on the held-out
    examples (prepared.eval_examples)."""
    from finetune.methods import EvalResult

    prompts = example_prompts(prepared.eval_examples, session.tokenizer, cfg.eval_generations)
    gen_metrics, rows = generations(session, session.tokenizer, prompts, cfg.max_new_tokens)
    loss = metrics.pop("eval_loss", None)
    return EvalResult(eval_loss=loss, metrics={**metrics, **gen_metrics}, generations=rows)
