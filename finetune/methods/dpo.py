"""DPO: learn from preference pairs (prompt, chosen, rejected) with the sigmoid loss and a `beta` setting.

The reference model is the policy as training starts -- the base model, or base + ADAPTER when chaining
after SFT -- and its log-probs are computed once, up front, with the same weights (no second copy of the
model): without ADAPTER that is exactly "the same model with the adapter disabled", and with one it is the
SFT model DPO is meant to stay close to. Rows are rendered with the same chat template and loss-mask code as
SFT, so a pair's log-prob is the sum over exactly the tokens SFT would train on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from finetune import data, evaluate
from finetune.data import Example
from finetune.errors import UserError
from finetune.methods import Batch, EvalResult, Prepared, Rows, reference
from finetune.methods.sft import check_template, dataset_spec
from finetune.sample_data import DPO_DIR
from finetune.shapes import Problem, row_problems
from finetune.template import Encoded, encode_kept

NAME = "dpo"
EVAL_LOSS_LABEL = "eval loss (DPO, per pair)"
SAMPLE_DIR = DPO_DIR
DEFAULT_BETA = 0.1
# RPO_ALPHA unset: the chosen answers' NLL is added at weight 1 (RPO; TRL's rpo_alpha, whose default is off).
# Measured (bench/methods.py, SFT 3 steps -> 20 x 16 pairs at 2e-5): plain DPO took held-out valid_format
# 84% -> 69%, with it 84% -> 94%, for the same preference accuracy (96.9% -> 100%) and margin (0.20 / 0.21).
DEFAULT_RPO_ALPHA = 1.0
# LEARNING_RATE unset: 10x below SFT's. Measured (bench/methods.py, SmolLM2 after 3 SFT steps, 20 x 16 pairs):
# 1e-4 pushed the reward margin to 3.2 but broke generation (valid_format 100% -> 25%); 2e-5 raises preference
# accuracy (96.9% -> 100%) with a smaller cost (84% -> 69%), which RPO (above) then removes.
LEARNING_RATE = 2e-5


@dataclass
class PairRows:
    chosen: Example
    rejected: Example
    where: str


@dataclass
class Pair:
    chosen: Encoded
    rejected: Encoded
    example: Example                   # the chosen row: prompt + expected answer for generation metrics
    ref: list[float] = field(default_factory=lambda: [0.0, 0.0])   # reference log-probs (chosen, rejected)

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)


def defaults(cfg, prepared: Prepared) -> dict:
    out = {"beta": DEFAULT_BETA} if cfg.beta is None else {}
    if cfg.rpo_alpha is None:
        out["rpo_alpha"] = DEFAULT_RPO_ALPHA
    return out


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def to_pair(row, where: str) -> tuple[PairRows | None, list[Problem]]:
    """A preference row (TRL's four forms) as two SFT examples that differ only in the answer."""
    problems = row_problems(row, where, "dpo")
    if any(p.level == "error" for p in problems):
        return None, problems
    out = []
    for answer in ("chosen", "rejected"):
        if "prompt" in row:
            sub = {"prompt": row["prompt"], "completion": row[answer]}
        elif isinstance(row[answer], list):  # implicit prompt: the turns both conversations share
            k = _common_prefix(row["chosen"], row["rejected"])
            sub = {"prompt": row[answer][:k], "completion": row[answer][k:]} if k else {"messages": row[answer]}
        else:
            sub = {"text": row[answer]}
        ex, found = data.check_row(sub, where)
        problems += [Problem(p.where, f"'{answer}': {p.message}", p.level) for p in found]
        out.append(ex)
    if any(p.level == "error" for p in problems) or None in out:
        return None, problems
    return PairRows(out[0], out[1], where), problems


def read(cfg) -> Rows:
    train, val, source, val_source, warnings = data.load_items(
        dataset_spec(cfg.dataset, SAMPLE_DIR), cfg.val_split, cfg.seed, cfg.column_map, f"DATASET={cfg.dataset}", to_pair)
    shape = train[0].chosen.shape if train else "pairs"
    return Rows(train, val, source, f"preference pairs ({shape})", val_source, warnings)


def prepare(rows: Rows, tokenizer, cfg) -> Prepared:
    check_template(cfg, rows.train[0].chosen.shape, tokenizer)
    warnings: list[str] = []

    def encode_pairs(items: list[PairRows]) -> list[Pair]:
        kept, dropped = encode_kept(items, lambda p: (p.chosen, p.rejected), tokenizer, cfg.max_seq_length)
        if dropped:
            warnings.append(f"{dropped} pairs lost every answer token to MAX_SEQ_LENGTH={cfg.max_seq_length} and were dropped")
        return [Pair(c, r, p.chosen) for p, c, r in kept]

    train = encode_pairs(rows.train)
    val = encode_pairs(rows.validation[: cfg.eval_rows])
    if not train or not val:
        raise UserError(f"DATASET={cfg.dataset}: no pair keeps an answer token within MAX_SEQ_LENGTH={cfg.max_seq_length}")
    seqs = [s for p in train for s in (p.chosen, p.rejected)]
    lengths = [s.length for s in seqs]
    return Prepared(train=train, eval=val, eval_examples=[p.example for p in val][: cfg.eval_generations],
                    mean_tokens=sum(lengths) / len(lengths), longest=max(lengths + [p.length for p in val]),
                    sequences_per_item=2, trained_share=sum(s.n_trained for s in seqs) / sum(lengths),
                    warnings=warnings)


def items_per_draw(cfg) -> int:
    return 1


def draws_per_step(batch_size: int, grad_accum: int, cfg) -> int:
    return batch_size * grad_accum


def sequence_logps(session, pairs: list[Pair], adapter: bool = True) -> np.ndarray:
    """(n, 2) summed log-probs of chosen and rejected answers."""
    rows = [s for p in pairs for s in (p.chosen, p.rejected)]
    sums = np.array([lp.sum() for lp in session.token_logps(rows, adapter=adapter)], dtype=np.float64)
    return sums.reshape(-1, 2)


def start(session, prepared: Prepared, cfg) -> None:
    """Reference log-probs of every pair, from the model as it is before the first update."""
    print(f"Computing reference log-probs for {len(prepared.train) + len(prepared.eval)} pairs ...", flush=True)
    for pairs in (prepared.train, prepared.eval):
        for pair, ref in zip(pairs, sequence_logps(session, pairs)):
            pair.ref = [float(ref[0]), float(ref[1])]


def make_batch(session, items: list[Pair], cfg, rng) -> Batch:
    # RPO weight per sequence: rpo_alpha / the step's chosen tokens for a chosen answer, 0 for a rejected one,
    # so the NLL term is a mean over the whole step however it is split into micro-batches
    per_token = (cfg.rpo_alpha or 0.0) / sum(p.chosen.n_trained for p in items)
    return Batch(NAME, [s for p in items for s in (p.chosen, p.rejected)], denominator=float(len(items)),
                 per_sequence={"ref": [x for p in items for x in p.ref], "nll": [per_token, 0.0] * len(items)},
                 group=2)


def needs_reference_tokens(cfg) -> bool:
    return False  # the reference's sequence log-probs are computed once, in start(), and travel in the batch


def loss(ops, logps, weights, rows, n_rows: int, extra: dict, ref_tokens, cfg, denominator):
    """Sigmoid DPO over pairs (sequences alternate chosen, rejected; extra["ref"]: the reference's sequence
    log-probs): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), summed / pairs in the step.
    RPO: extra["nll"] per sequence = rpo_alpha / the step's chosen tokens for chosen answers, 0 for rejected ones,
    so the added term is rpo_alpha x the chosen answers' mean token NLL over the step (TRL's rpo_alpha)."""
    seq = ops.per_sequence(logps * weights, rows, n_rows)
    ref = extra["ref"]
    margin = (seq[0::2] - ref[0::2]) - (seq[1::2] - ref[1::2])
    value = -ops.log_sigmoid(cfg.beta * margin).sum() / denominator
    if cfg.rpo_alpha:
        value = value - (logps * weights * extra["nll"][rows]).sum()
    return value, {"reward_margin": (cfg.beta * margin).sum() / denominator,
                   "pref_accuracy": ops.to_float(margin > 0).sum() / denominator}


def pair_metrics(session, pairs: list[Pair], beta: float) -> dict:
    policy = sequence_logps(session, pairs)
    ref = np.array([p.ref for p in pairs])
    margin = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
    losses = reference.dpo_losses(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta)
    return {"eval_loss": float(losses.mean()), "pref_accuracy": float((policy[:, 0] > policy[:, 1]).mean()),
            "reward_margin": float((beta * margin).mean())}


def evaluate_model(session, prepared: Prepared, cfg) -> EvalResult:
    """Preference accuracy (the chosen answer more likely than the rejected one), the mean implicit reward
    margin beta * ((pi_c - ref_c) - (pi_r - ref_r)), the DPO loss, and the generation checks."""
    return evaluate.with_generations(session, prepared, cfg, pair_metrics(session, prepared.eval, cfg.beta))


def periodic_eval(session, prepared: Prepared, cfg) -> dict:
    m = pair_metrics(session, prepared.eval, cfg.beta)
    return {"eval_loss": m["eval_loss"], "eval_pref_accuracy": m["pref_accuracy"]}
