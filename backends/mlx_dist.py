"""mlx.distributed for a run started by mlx.launch (its ring backend over TCP / Thunderbolt between Macs, or local
processes): finetune.world's sum, and the step's gradient sum, both through mx.distributed.all_sum.
The same data-parallel rules as torch (finetune/world.py): every process trains its share of each step; the
summed gradients are the single-process step's."""
from __future__ import annotations

import numpy as np

from finetune.world import Lost, World


def join() -> World:
    import mlx.core as mx

    group = mx.distributed.init(strict=True, backend="any")  # what mlx.launch set up (ring, MPI, ...)

    def all_sum(values: np.ndarray) -> np.ndarray:
        try:
            # float32 on the wire (MLX's CPU collectives have no float64): exact for counts up to 2^24, and
            # share()'s bytes; loss sums lose nothing that matters for logging
            out = mx.distributed.all_sum(mx.array(values.astype(np.float32)), group=group)
            mx.eval(out)
        except RuntimeError as err:
            raise Lost(str(err).splitlines()[0][:160]) from None
        return np.array(out, dtype=np.float64)

    return World(rank=group.rank(), size=group.size(), local_size=1, engine="mlx.distributed", all_sum=all_sum)


def sum_gradients(grads, params):
    """The gradient tree summed over the processes (zeros where this process had no rows of the step)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    if grads is None:
        grads = tree_map(mx.zeros_like, params)
    try:
        grads = tree_map(lambda g: mx.distributed.all_sum(g), grads)
        mx.eval(grads)
    except RuntimeError as err:
        raise Lost(str(err).splitlines()[0][:160]) from None
    return grads


def sum_step(world: World, grads, params, failed, total: float, tokens: int, stats: dict):
    """A step's gradients and loss parts summed over the processes. A process whose share failed (`failed`) still
    joins the sums, then re-raises; the others then raise Lost, so every process stops after the same step."""
    grads = sum_gradients(grads, params)
    failures, total, tokens = world.sum([float(failed is not None), total, tokens])
    world.settle_step(failed, failures)
    return grads, float(total), int(tokens), world.sum_parts(stats)
