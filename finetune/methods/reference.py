"""The methods' formulas in plain numpy: what the torch and MLX losses are tested against, and what the
evaluation uses (it needs no gradients). Written from the papers, not from either framework's code:
DPO (Rafailov et al. 2023, sigmoid loss), GRPO (Shao et al. 2024, group-normalised advantages, clipped
ratio, k3 KL estimator), ORPO (Hong et al. 2024, odds ratio of mean token probabilities) and KTO (Ethayarajh et al.
2024, prospect-theory loss on labelled single completions)."""
from __future__ import annotations

import numpy as np


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> np.ndarray:
    """Per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), from sequence log-probs."""
    margin = (np.asarray(policy_chosen) - ref_chosen) - (np.asarray(policy_rejected) - ref_rejected)
    return -log_sigmoid(beta * margin)


def rpo_step_loss(chosen_token_logps: list, rejected_token_logps: list, ref_chosen, ref_rejected, beta: float,
                  alpha: float) -> float:
    """One step over n pairs given per-token log-probs: mean DPO loss over the pairs + alpha x the chosen answers'
    NLL per token over the step (RPO; TRL's rpo_alpha). alpha = 0 is plain DPO."""
    pc = [float(np.sum(t)) for t in chosen_token_logps]
    pr = [float(np.sum(t)) for t in rejected_token_logps]
    nll = -sum(pc) / sum(len(t) for t in chosen_token_logps)
    return float(dpo_losses(pc, pr, ref_chosen, ref_rejected, beta).mean() + alpha * nll)


def orpo_losses(mean_chosen, mean_rejected, beta: float) -> np.ndarray:
    """Per pair: -beta * log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p) with
    p = exp(mean token log-prob of the answer)."""
    def log_odds(m):
        m = np.minimum(np.asarray(m, np.float64), -1e-4)
        return m - np.log(1.0 - np.exp(m))
    return -beta * log_sigmoid(log_odds(mean_chosen) - log_odds(mean_rejected))


def orpo_step_loss(chosen_token_logps: list, rejected_token_logps: list, beta: float) -> float:
    """One step over n pairs: the chosen answers' NLL per token over the step + the mean odds-ratio loss."""
    nll = -sum(float(np.sum(t)) for t in chosen_token_logps) / sum(len(t) for t in chosen_token_logps)
    mc = [float(np.mean(t)) for t in chosen_token_logps]
    mr = [float(np.mean(t)) for t in rejected_token_logps]
    return float(nll + orpo_losses(mc, mr, beta).mean())


def kto_losses(rewards, desirable, z0: float, beta: float) -> np.ndarray:
    """Per row: 1 - sigmoid(beta (r - z0)) for a desirable row, 1 - sigmoid(beta (z0 - r)) for an undesirable one;
    r = log pi(y|x) - log pi_ref(y|x), z0 the (detached, >= 0) KL estimate."""
    r = np.asarray(rewards, np.float64)
    x = np.where(np.asarray(desirable, bool), r - z0, z0 - r)
    return 1.0 - 1.0 / (1.0 + np.exp(-beta * x))


def kto_step_loss(token_logps: list, ref, desirable, z0: float, beta: float, alpha: float) -> float:
    """One step over rows given per-token log-probs: mean KTO loss over the rows + alpha x the desirable completions'
    NLL per token over the step. alpha = 0 is TRL's plain KTO."""
    good = np.asarray(desirable, bool)
    seq = np.array([float(np.sum(t)) for t in token_logps])
    good_tokens = [t for t, g in zip(token_logps, good) if g]
    nll = -sum(float(np.sum(t)) for t in good_tokens) / sum(len(t) for t in good_tokens) if good_tokens else 0.0
    return float(kto_losses(seq - np.asarray(ref), good, z0, beta).mean() + alpha * nll)


def group_advantages(rewards, group: int, eps: float = 1e-4) -> np.ndarray:
    """(r - mean of its group) / (std of its group + eps); groups are consecutive runs of `group` completions.
    Standard deviation with Bessel's correction, as TRL computes it."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group)
    std = r.std(axis=1, ddof=1, keepdims=True) if group > 1 else np.zeros((len(r), 1))
    return ((r - r.mean(axis=1, keepdims=True)) / (std + eps)).reshape(-1)


def grpo_loss(logps, old_logps, ref_logps, token_rows, advantages, beta: float, epsilon: float,
              denominator: float) -> float:
    """Sum over completion tokens of -min(ratio * A, clip(ratio) * A) + beta * KL_k3, / denominator."""
    logps, old = np.asarray(logps, np.float64), np.asarray(old_logps, np.float64)
    ratio = np.exp(logps - old)
    adv = np.asarray(advantages, np.float64)[np.asarray(token_rows)]
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 1 - epsilon, 1 + epsilon) * adv)
    if ref_logps is not None and beta > 0:
        d = np.asarray(ref_logps, np.float64) - logps
        per_token = per_token + beta * (np.exp(d) - d - 1)
    return float(per_token.sum() / denominator)
