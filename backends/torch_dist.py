"""torch.distributed for a run started by torchrun: the process group (gloo on the CPU, NCCL on CUDA) and the two
collectives the run needs: finetune.world's sum, and the step's gradient sum.

Why not DistributedDataParallel: DDP reduces gradients from hooks armed by its own forward(), and our fast step
calls the decoder and the output projection directly (logits only at trained positions, backends/torch_backend.py),
so DDP's forward never runs. The LoRA gradients are a few MB, so one all_reduce over one flat buffer per optimizer
step (what DDP does per bucket) costs little and keeps the fast step as it is.
"""
from __future__ import annotations

import contextlib
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
        raise _lost(err) from None


def _lost(err: BaseException) -> Lost:
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).splitlines()[0])  # gloo's source-file prefix
    return Lost(text.split(". ")[0][:160])


@contextlib.contextmanager
def as_lost():
    """Around FSDP's forwards: a gather that failed because a process is gone raises Lost, as the step's sum does."""
    try:
        yield
    except Exception as err:
        lost = lost_in(err)
        if lost is None:
            raise
        raise lost from None


def lost_in(err: BaseException) -> Lost | None:
    """A failure inside FSDP's weight gathering that means another process is gone, as Lost (else None)."""
    import torch.distributed as dist

    gone = isinstance(err, (dist.DistError,)) or (isinstance(err, RuntimeError) and re.search(
        r"Connection (closed|reset)|[Bb]roken pipe|ProcessGroup|NCCL", str(err)))
    return _lost(err) if gone else None


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


def shard(peft_model) -> None:
    """FSDP (torch's fully_shard, FSDP2) over the run's processes: every decoder layer, then the decoder itself, keep
    1/N of their frozen weights and gather them for their own forward and backward. The LoRA parameters are left out
    (`ignored_params`): they stay whole and equal on every process, so sum_gradients, the optimizer, checkpoints
    and the saved adapter are the data-parallel ones, unchanged. lm_head stays whole outside the decoder: the fast
    step calls it after the decoder (a tied one keeps its own copy, as it is frozen).

    The decoder, not the whole model, is the root unit because the fast step calls the decoder and lm_head apart.
    Every process must then run the same forwards and backwards in the same order (TorchSession.train_step and the
    evaluation see to it): each one gathers from all of them."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = peft_model.get_base_model()
    decoder = base.get_decoder()
    kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
    device = torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(kind, (dist.get_world_size(),))
    lora = {p for p in peft_model.parameters() if p.requires_grad}
    # The model was loaded on the host (torch_build): fully_shard moves what it shards to the device; the rest goes
    # whole. A tied lm_head gets its own copy: its weight would otherwise be the embeddings' shard after sharding.
    head = base.get_output_embeddings()
    inside = {id(p) for p in decoder.parameters()} - {id(p) for p in lora}
    if id(head.weight) in inside:
        head.weight = torch.nn.Parameter(head.weight.detach().to(device, copy=True), requires_grad=False)
    for p in peft_model.parameters():
        if id(p) not in inside:
            p.data = p.data.to(device)
    for module in peft_model.modules():  # every buffer: fully_shard would move its units' own, this covers the rest too
        for name, buf in module.named_buffers(recurse=False):
            if buf.device != device:
                setattr(module, name, buf.to(device))
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, ignored_params=lora)
    # reshard_after_forward for the root too (FSDP keeps a root gathered by default): rank 0 alone saves the adapter,
    # and state_dict() reshards a gathered unit, after which its next forward would gather where the others' do not
    fully_shard(decoder, mesh=mesh, ignored_params=lora, reshard_after_forward=True)


def held_share(model) -> float:
    """The share of the sharded weights this process holds (1/N each, when the shards are even)."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    return sum(p.to_local().numel() for p in sharded) / max(1, sum(p.numel() for p in sharded))


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
