"""Each method's loss in MLX: the same formulas as backends/torch_losses.py (and finetune/methods/reference.py),
over the log-probs of a micro-batch's trained tokens. Padding entries carry weight 0 (MLX compiles per shape,
so the gathered token count is rounded up to a bucket and the extra slots are masked out)."""
from __future__ import annotations

from backends.mlx_blas import use_openblas

use_openblas()  # noqa: E402 - before libmlx.so loads (backends/mlx_blas.py)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402


def per_sequence(logps, weights, rows, n_rows: int):
    return mx.zeros((n_rows,), dtype=mx.float32).at[rows].add(logps * weights)


def sft(logps, weights, denominator):
    return -(logps * weights).sum() / denominator


def dpo(logps, weights, rows, n_rows: int, ref, beta: float, denominator, nll=None):
    seq = per_sequence(logps, weights, rows, n_rows)
    margin = (seq[0::2] - ref[0::2]) - (seq[1::2] - ref[1::2])
    loss = -nn.log_sigmoid(beta * margin).sum() / denominator
    if nll is not None:  # RPO, as in torch_losses.dpo
        loss = loss - (logps * weights * nll[rows]).sum()
    return loss, margin


def grpo(logps, weights, rows, advantages, old, ref, beta: float, epsilon: float, denominator):
    old = mx.stop_gradient(logps) if old is None else old
    ratio = mx.exp(logps - old)
    adv = advantages[rows]
    per_token = -mx.minimum(ratio * adv, mx.clip(ratio, 1 - epsilon, 1 + epsilon) * adv)
    if ref is not None and beta > 0:
        per_token = per_token + beta * (mx.exp(ref - logps) - (ref - logps) - 1)
    return (per_token * weights).sum() / denominator
