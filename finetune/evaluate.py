"""Before/after evaluation, backend-agnostic: held-out loss on trained tokens + a checkable metric.

The metric is exact match of the generated answer against the held-out answer; when the answers
are JSON objects (the shipped sample asks for strict JSON) it also reports `valid_format`: the
output parses as a JSON object with the same keys and value types, whatever the values.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from finetune.data import Example
from finetune.template import Encoded, generation_prompt


@dataclass
class EvalResult:
    eval_loss: float
    metrics: dict[str, float]                   # share of generations that pass each check
    generations: list[dict] = field(default_factory=list)  # prompt / expected / generated

    def to_dict(self) -> dict:
        return asdict(self)


def _json_object(text) -> dict | None:
    try:
        value = json.loads(text.strip())
    except (AttributeError, ValueError, RecursionError):  # not a string / not JSON / pathological nesting
        return None
    return value if isinstance(value, dict) else None


def score(expected: str, generated: str) -> dict[str, bool]:
    """Checks for one generation. Key order and whitespace are free; types are not (30.0 or "30" is not 30)."""
    want, got = _json_object(expected), _json_object(generated)
    if want is None:
        same = isinstance(generated, str) and " ".join(expected.split()) == " ".join(generated.split())
        return {"exact_match": same}
    valid = got is not None and set(got) == set(want) and all(type(got[k]) is type(want[k]) for k in want)
    return {"exact_match": valid and got == want, "valid_format": valid}


def evaluate(session, tokenizer, examples: list[Example], encoded: list[Encoded],
             n_generations: int, max_new_tokens: int) -> EvalResult:
    loss = session.eval_loss(encoded)
    prompts = [p for p in (generation_prompt(ex, tokenizer) for ex in examples) if p is not None][:n_generations]
    outputs = session.generate([ids for ids, _ in prompts], max_new_tokens) if prompts else []
    rows, totals = [], {}
    for (ids, expected), out in zip(prompts, outputs):
        text = tokenizer.decode(out, skip_special_tokens=True).strip()
        checks = score(expected, text)
        for k, v in checks.items():
            totals[k] = totals.get(k, 0) + int(v)
        rows.append({"prompt": tokenizer.decode(ids, skip_special_tokens=False), "expected": expected,
                     "generated": text, **checks})
    metrics = {k: v / len(rows) for k, v in totals.items()} if rows else {}
    return EvalResult(eval_loss=loss, metrics=metrics, generations=rows)
