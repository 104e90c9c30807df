"""The tensor operations the methods' losses are written in, in MLX (the torch twin: backends/torch_ops.py).
MLX compiles per shape, so a micro-batch's gathered tokens are padded to a bucket: the losses get per-token
`weights` (0 for padding) and must weight every token sum by them."""
from __future__ import annotations

from backends.mlx_blas import use_openblas

use_openblas()  # noqa: E402 - before libmlx.so loads (backends/mlx_blas.py)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402


def per_sequence(values, rows, n_rows: int):
    return mx.zeros((n_rows,), dtype=mx.float32).at[rows].add(values)


log_sigmoid = nn.log_sigmoid
exp = mx.exp
minimum = mx.minimum
clip = mx.clip
stop_gradient = mx.stop_gradient


def to_float(x):
    return x.astype(mx.float32)
