"""KTO: learn from thumbs-up / thumbs-down rows (prompt, completion, label), no pairs needed (Ethayarajh et al. 2024).

Each row's implied reward is r = log pi(y|x) - log pi_ref(y|x) (sequence sums; the reference is the policy as
training starts, as for DPO). A desirable row's loss is 1 - sigmoid(beta (r - z0)), an undesirable one's
1 - sigmoid(beta (z0 - r)), where z0 = max(0, mean of r over mismatched rows: each prompt with another row's
completion), detached -- TRL's KTOTrainer (loss_type "kto", both weights 1). The mismatched pairing is fixed when
the data is encoded (row i's prompt with row i+1's completion) and its reference log-probs are computed up front.
RPO_ALPHA (auto 1.0 here, 0 = TRL's plain KTO) adds the thumbs-up completions' mean token NLL, as RPO does for DPO.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from finetune import data, evaluate
from finetune.data import Example
from finetune.errors import UserError
from finetune.methods import Batch, EvalResult, Prepared, Rows, reference
from finetune.methods.sft import check_template, dataset_spec
from finetune.sample_data import DATA_DIR
from finetune.shapes import label_value, row_problems
from finetune.template import Encoded, encode_kept

NAME = "kto"
EVAL_LOSS_LABEL = "eval loss (KTO, per row)"
SAMPLE_DIR = os.path.join(DATA_DIR, "sample_kto")  # the preference sample's answers, labelled and shuffled
DEFAULT_BETA = 0.1  # TRL's KTOConfig.beta
# LEARNING_RATE unset: DPO's. Measured (SmolLM2, 3 SFT steps then 15 x 8 rows of sample_kto): 5e-5 ranked 90.6 % of
# held-out rows right and took valid_format 75 -> 50 %; 2e-5 ranked 96.9 % and kept more of it (75 -> 62.5 %).
LEARNING_RATE = 2e-5
# RPO_ALPHA for KTO: the weight of the thumbs-up completions' token NLL added to the loss, as RPO adds the chosen
# answers' to DPO's. KTO alone raised the ranking but cost the answers' format (valid_format 75 -> 62.5 %, above).
DEFAULT_NLL_WEIGHT = 1.0


@dataclass
class LabelledRow:
    example: Example       # prompt + completion
    mismatched: Example    # this prompt with the next row's completion (the z0 estimate)
    desirable: bool
    where: str


@dataclass
class Item:
    seq: Encoded
    kl_seq: Encoded
    desirable: bool
    example: Example
    ref: float = 0.0       # reference log-prob of the completion
    kl_ref: float = 0.0    # ... and of the mismatched completion

    @property
    def length(self) -> int:  # what the loop orders and plans by: the trained sequence
        return self.seq.length


def defaults(cfg, prepared: Prepared) -> dict:
    out = {"beta": DEFAULT_BETA} if cfg.beta is None else {}
    if cfg.rpo_alpha is None:
        out["rpo_alpha"] = DEFAULT_NLL_WEIGHT
    return out


def _row(row, where: str):
    problems = row_problems(row, where, NAME)
    if any(p.level == "error" for p in problems):
        return None, problems
    ex, found = data.check_row({"prompt": row["prompt"], "completion": row["completion"]}, where)
    problems += found
    if ex is None or any(p.level == "error" for p in problems):
        return None, problems
    return ({"prompt": row["prompt"], "completion": row["completion"], "label": label_value(row["label"]),
             "where": where, "example": ex}, problems)


def _labelled(rows: list[dict]) -> list[LabelledRow]:
    out = []
    for i, r in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        mismatched, _ = data.check_row({"prompt": r["prompt"], "completion": other["completion"]}, r["where"])
        if mismatched is None:  # a text prompt beside a message-list completion: the rows mix two forms
            raise UserError(f"{other['where']}: this row's form (text or messages) differs from {r['where']}'s; "
                            "KTO pairs each prompt with another row's completion, so use one form per file")
        out.append(LabelledRow(r["example"], mismatched, r["label"], r["where"]))
    return out


def read(cfg) -> Rows:
    train, val, source, val_source, warnings = data.load_items(
        dataset_spec(cfg.dataset, SAMPLE_DIR), cfg.val_split, cfg.seed, cfg.column_map, f"DATASET={cfg.dataset}", _row)
    train, val = _labelled(train), _labelled(val)
    if train and len({r.desirable for r in train}) < 2:
        warnings.append("every training row has the same label: KTO learns from both thumbs-up and thumbs-down rows")
    shape = train[0].example.shape if train else "rows"
    return Rows(train, val, source, f"labelled completions ({shape})", val_source, warnings)


def prepare(rows: Rows, tokenizer, cfg) -> Prepared:
    check_template(cfg, rows.train[0].example.shape, tokenizer)
    warnings: list[str] = []

    def encode_rows(items: list[LabelledRow]) -> list[Item]:
        kept, dropped = encode_kept(items, lambda r: (r.example, r.mismatched), tokenizer, cfg.max_seq_length)
        if dropped:
            warnings.append(f"{dropped} rows lost every completion token to MAX_SEQ_LENGTH={cfg.max_seq_length} "
                            "and were dropped")
        return [Item(seq, kl, r.desirable, r.example) for r, seq, kl in kept]

    train, val = encode_rows(rows.train), encode_rows(rows.validation[: cfg.eval_rows])
    if not train or not val:
        raise UserError(f"DATASET={cfg.dataset}: no row keeps a completion token within MAX_SEQ_LENGTH={cfg.max_seq_length}")
    lengths = [i.seq.length for i in train]
    return Prepared(train=train, eval=val, eval_examples=[i.example for i in val if i.desirable][: cfg.eval_generations],
                    mean_tokens=sum(lengths) / len(lengths), longest=max(lengths + [i.seq.length for i in val]),
                    trained_share=sum(i.seq.n_trained for i in train) / sum(lengths), warnings=warnings)


def items_per_draw(cfg) -> int:
    return 1


def draws_per_step(batch_size: int, grad_accum: int, cfg) -> int:
    return batch_size * grad_accum


def _sums(session, seqs: list[Encoded]) -> np.ndarray:
    return np.array([lp.sum() for lp in session.token_logps(seqs)], dtype=np.float64)


def start(session, prepared: Prepared, cfg) -> None:
    """Reference log-probs of every completion and mismatched completion, from the model before the first update."""
    print(f"Computing reference log-probs for {len(prepared.train) + len(prepared.eval)} rows ...", flush=True)
    for items in (prepared.train, prepared.eval):
        ref, kl = _sums(session, [i.seq for i in items]), _sums(session, [i.kl_seq for i in items])
        for item, r, k in zip(items, ref, kl):
            item.ref, item.kl_ref = float(r), float(k)


def kl_estimate(session, items: list[Item]) -> float:
    """z0: max(0, mean over the items of log pi - log pi_ref on their mismatched completions), no gradient."""
    policy = _sums(session, [i.kl_seq for i in items])
    return max(0.0, float(np.mean(policy - np.array([i.kl_ref for i in items]))))


def make_batch(session, items: list[Item], cfg, rng) -> Batch:
    z0 = kl_estimate(session, items)
    # NLL weight per sequence: RPO_ALPHA / the step's desirable tokens for a thumbs-up row, 0 for a thumbs-down one,
    # so the term is a mean over the step however it is split into micro-batches (as DPO's RPO term)
    good_tokens = sum(i.seq.n_trained for i in items if i.desirable)
    per_token = (cfg.rpo_alpha or 0.0) / good_tokens if good_tokens else 0.0
    return Batch(NAME, [i.seq for i in items], denominator=float(len(items)),
                 per_sequence={"ref": [i.ref for i in items], "sign": [1.0 if i.desirable else -1.0 for i in items],
                               "z0": [z0] * len(items), "nll": [per_token if i.desirable else 0.0 for i in items]})


def needs_reference_tokens(cfg) -> bool:
    return False  # reference sequence log-probs are computed once, in start(), and travel in the batch


def loss(ops, logps, weights, rows, n_rows: int, extra: dict, ref_tokens, cfg, denominator):
    """Sum over rows of 1 - sigmoid(beta * sign * (r - z0)), sign +1 for desirable and -1 for undesirable rows,
    / rows in the step; plus RPO_ALPHA x the desirable completions' mean token NLL over the step (extra["nll"])."""
    reward = ops.per_sequence(logps * weights, rows, n_rows) - extra["ref"]
    x = extra["sign"] * (reward - extra["z0"])
    value = (1.0 - ops.exp(ops.log_sigmoid(cfg.beta * x))).sum() / denominator
    if cfg.rpo_alpha and "nll" in extra:
        value = value - (logps * weights * extra["nll"][rows]).sum()
    return value, {"kl": extra["z0"].sum() / denominator, "label_accuracy": ops.to_float(x > 0).sum() / denominator}


def row_metrics(session, items: list[Item], beta: float) -> dict:
    reward = _sums(session, [i.seq for i in items]) - np.array([i.ref for i in items])
    z0 = kl_estimate(session, items)
    good = np.array([i.desirable for i in items])
    losses = reference.kto_losses(reward, good, z0, beta)
    margin = (reward[good].mean() if good.any() else 0.0) - (reward[~good].mean() if (~good).any() else 0.0)
    sign = np.where(good, 1.0, -1.0)
    return {"eval_loss": float(losses.mean()), "label_accuracy": float((sign * (reward - z0) > 0).mean()),
            "reward_margin": float(beta * margin), "kl": z0}


def evaluate_model(session, prepared: Prepared, cfg) -> EvalResult:
    """Label accuracy (a thumbs-up row's reward above z0, a thumbs-down row's below), beta x the gap between the
    mean rewards of desirable and undesirable rows, the KTO loss, and the generation checks on desirable rows."""
    return evaluate.with_generations(session, prepared, cfg, row_metrics(session, prepared.eval, cfg.beta))


def periodic_eval(session, prepared: Prepared, cfg) -> dict:
    m = row_metrics(session, prepared.eval, cfg.beta)
    return {"eval_loss": m["eval_loss"], "eval_label_accuracy": m["label_accuracy"]}

