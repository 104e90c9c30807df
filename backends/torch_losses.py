"""Each method's loss over per-token log-probs, in PyTorch (finetune/methods/reference.py has the same
formulas in numpy; tests hold the two together, and the MLX ones to both).

Inputs are the log-probs of the trained tokens of a micro-batch, flattened in row order, with `rows` giving
each token's sequence index. Every loss returns a SUM over the micro-batch divided by the whole step's
denominator, so micro-batches of any size add up to the same step loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sequence(logps: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum of the trained tokens' log-probs per sequence."""
    return torch.zeros(n_rows, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)


def sft(logps: torch.Tensor, denominator: float) -> torch.Tensor:
    """Cross-entropy summed over trained tokens / trained tokens in the step."""
    return -logps.sum() / denominator


def dpo(logps: torch.Tensor, rows: torch.Tensor, n_rows: int, ref: torch.Tensor, beta: float,
        denominator: float, nll: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Sigmoid DPO. Sequences alternate chosen, rejected; `ref` holds the reference model's sequence log-probs
    in the same order. Loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), summed / pairs in step.
    RPO: `nll` per sequence = rpo_alpha / chosen tokens in the step for chosen answers, 0 for rejected ones, so
    the added term is rpo_alpha x the chosen answers' mean token NLL over the step (TRL's rpo_alpha)."""
    seq = per_sequence(logps, rows, n_rows)
    margin = (seq[0::2] - ref[0::2]) - (seq[1::2] - ref[1::2])
    loss = -F.logsigmoid(beta * margin).sum() / denominator
    if nll is not None:
        loss = loss - (logps * nll[rows]).sum()
    return loss, {"reward_margin": float((beta * margin).mean()), "pref_accuracy": float((margin > 0).float().mean())}


def grpo(logps: torch.Tensor, rows: torch.Tensor, advantages: torch.Tensor, old: torch.Tensor | None,
         ref: torch.Tensor | None, beta: float, epsilon: float, denominator: float) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient objective per completion token with the sequence's group-normalised advantage,
    plus beta * KL(policy || reference) (the k3 estimator); summed over tokens / completion tokens in the step.
    `old` = log-probs of the policy that sampled; None means this very policy (one update per sample batch,
    so the ratio is 1 in value and the clip inactive, exactly as TRL with num_iterations=1)."""
    old = logps.detach() if old is None else old
    ratio = torch.exp(logps - old)
    adv = advantages[rows]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    stats = {}
    if ref is not None and beta > 0:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        per_token = per_token + beta * kl
        stats["kl"] = float(kl.mean())
    return per_token.sum() / denominator, stats
