"""torch.distributed for a run started by torchrun: the process group (gloo on the CPU, NCCL on CUDA) and the two
collectives the run needs: finetune.world's sum, and the step's gradient sum.

Why not DistributedDataParallel: DDP reduces gradients from hooks armed by its own forward(), and our fast step
calls the decoder and the output projection directly (logits only at trained positions, backends/torch_backend.py),
so DDP's forward never runs. The LoRA gradients are a few MB, so one all_reduce over one flat buffer per optimizer
step (what DDP does per bucket) costs little and keeps the fast step as it is.
"""
from __future__ import annotations

import datetime
import os
import re

import numpy as np

from finetune.world import Lost, World, torchrun_env

# A collective waits this long: rank 0 evaluates (generations included) while the others wait. A dead process is
# noticed sooner: gloo fails at once, and torchrun stops the others (SIGTERM, then SIGKILL) when one dies.
TIMEOUT_MIN = 6 * 60


def join(device: str) -> World:
    import torch
    import torch.distributed as dist

    rank, size, local_size = torchrun_env()
    engine = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(engine, timeout=datetime.timedelta(minutes=TIMEOUT_MIN))
    where = torch.device("cuda", torch.cuda.current_device()) if engine == "nccl" else torch.device("cpu")

    def all_sum(values: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(where)
        _all_reduce(tensor)
        return tensor.cpu().numpy()

    return World(rank=rank, size=size, local_size=local_size, engine=engine, all_sum=all_sum)


def _all_reduce(tensor) -> None:
    import torch.distributed as dist

    try:
        dist.all_reduce(tensor)
    except RuntimeError as err:  # gloo: "Connection closed by peer"; NCCL: DistBackendError (a RuntimeError)
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).splitlines()[0])  # gloo's source-file prefix
        raise Lost(text.split(". ")[0][:160]) from None


def sum_gradients(params, values: list[float]) -> list[float]:
    """Sum every trainable parameter's gradient over the processes, and `values` (the step's loss parts) with them,
    in one all_reduce. A process whose share of the step was empty contributes zeros."""
    import torch

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor(values, dtype=torch.float32,
                                                                            device=grads[0].device)])
    _all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
    return flat[offset:].tolist()


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
