"""The tensor operations the methods' losses are written in (finetune/methods/*.loss), in PyTorch: only what the
formulas need. A method's loss is written once over this namespace and MLX's (backends/mlx_ops.py); the numpy
formulas in finetune/methods/reference.py are the independent check of both."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sequence(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum of per-token values per sequence (rows: each token's sequence index)."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


log_sigmoid = F.logsigmoid
exp = torch.exp
minimum = torch.minimum
clip = torch.clamp


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)
