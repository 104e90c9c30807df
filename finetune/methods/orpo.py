"""ORPO: preference pairs in one stage, no reference model and no SFT first (Hong et al. 2024).

The loss is the chosen answers' NLL (SFT on the preferred answers) plus beta x an odds-ratio term that pushes the
chosen answer's odds above the rejected one's: -log sigmoid(log odds(chosen) - log odds(rejected)), where
odds(y) = p / (1 - p) and p = exp(the answer's mean token log-prob), as TRL's ORPOTrainer computes it (its `beta`
is the paper's lambda). Pairs are read, checked and encoded exactly as DPO's (the same four row forms).
"""
from __future__ import annotations

import numpy as np

from finetune import evaluate
from finetune.methods import Batch, EvalResult, Prepared, dpo, reference
from finetune.methods.dpo import Pair

NAME = "orpo"
EVAL_LOSS_LABEL = "eval loss (ORPO: NLL + beta x odds ratio, per pair)"
SAMPLE_DIR = dpo.SAMPLE_DIR      # the preference sample serves both
DEFAULT_BETA = 0.1               # TRL's ORPOConfig.beta (lambda in the paper)
# LEARNING_RATE unset: ORPO is SFT plus a preference term, so it trains from the base model at an SFT-like rate
# (TRL's 1e-6 default is for full fine-tuning; LoRA recipes use 1e-5 to 1e-4).
LEARNING_RATE = 5e-5
# exp(mean log-prob) of a fully confident answer is 1 and log(1 - 1) = -inf: the mean is kept below this
MAX_MEAN_LOGP = -1e-4

read, prepare = dpo.read, dpo.prepare
items_per_draw, draws_per_step = dpo.items_per_draw, dpo.draws_per_step


def defaults(cfg, prepared: Prepared) -> dict:
    return {"beta": DEFAULT_BETA} if cfg.beta is None else {}


def start(session, prepared: Prepared, cfg) -> None:
    """Nothing: ORPO needs no reference log-probs."""


def needs_reference_tokens(cfg) -> bool:
    return False


def make_batch(session, items: list[Pair], cfg, rng) -> Batch:
    # "nll": 1 / the step's chosen tokens for a chosen answer, 0 for a rejected one (a mean over the whole step
    # however it is split); "n_tokens": each answer's trained tokens, for its mean log-prob
    per_token = 1.0 / sum(p.chosen.n_trained for p in items)
    return Batch(NAME, [s for p in items for s in (p.chosen, p.rejected)], denominator=float(len(items)),
                 per_sequence={"nll": [per_token, 0.0] * len(items),
                               "n_tokens": [float(n) for p in items for n in (p.chosen.n_trained, p.rejected.n_trained)]},
                 group=2)


def _log_odds(ops, mean_logp):
    mean_logp = ops.clip(mean_logp, None, MAX_MEAN_LOGP)
    return mean_logp - (-ops.exp(mean_logp)).log1p()  # log(p / (1 - p)); log1p is a torch and MLX array method


def loss(ops, logps, weights, rows, n_rows: int, extra: dict, ref_tokens, cfg, denominator):
    """NLL of the chosen answers (mean per token over the step) + beta x -log sigmoid(log odds ratio), summed /
    pairs in the step. Sequences alternate chosen, rejected."""
    mean = ops.per_sequence(logps * weights, rows, n_rows) / extra["n_tokens"]
    ratio = _log_odds(ops, mean[0::2]) - _log_odds(ops, mean[1::2])
    odds_term = -ops.log_sigmoid(ratio).sum() * cfg.beta / denominator
    nll = -(logps * weights * extra["nll"][rows]).sum()
    return nll + odds_term, {"nll": nll, "odds_ratio_loss": odds_term,
                             "reward_margin": cfg.beta * (mean[0::2] - mean[1::2]).sum() / denominator,
                             "pref_accuracy": ops.to_float(mean[0::2] > mean[1::2]).sum() / denominator}


def pair_metrics(session, pairs: list[Pair], beta: float) -> dict:
    tokens = session.token_logps([s for p in pairs for s in (p.chosen, p.rejected)])
    chosen, rejected = tokens[0::2], tokens[1::2]
    mean_c, mean_r = np.array([t.mean() for t in chosen]), np.array([t.mean() for t in rejected])
    return {"eval_loss": reference.orpo_step_loss(chosen, rejected, beta),
            "pref_accuracy": float((mean_c > mean_r).mean()), "reward_margin": float((beta * (mean_c - mean_r)).mean())}


def evaluate_model(session, prepared: Prepared, cfg) -> EvalResult:
    """Preference accuracy (the chosen answer's mean token log-prob above the rejected one's), the margin
    beta x (mean_c - mean_r) (TRL's ORPO rewards), the ORPO loss, and the generation checks."""
    return evaluate.with_generations(session, prepared, cfg, pair_metrics(session, prepared.eval, cfg.beta))


def periodic_eval(session, prepared: Prepared, cfg) -> dict:
    m = pair_metrics(session, prepared.eval, cfg.beta)
    return {"eval_loss": m["eval_loss"], "eval_pref_accuracy": m["pref_accuracy"]}
