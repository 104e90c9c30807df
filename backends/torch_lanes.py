"""CPU lanes: a step's rows trained in side-by-side threads, each with its share of the cores, instead of one
thread team over all of them (the planner's CPU_LANES, finetune/plan.py `_pick_lanes`).

Why: on a CPU a small model's micro-batch does not keep a thread team busy. Between its large matmuls run thousands
of small ops (LoRA's rank-16 matmuls, norms, rotary, the autograd engine's bookkeeping) that one thread does while the
others wait. Two lanes of one core each ran SmolLM2-135M's steps 1.16-1.18x faster than one team of two threads on
micro-batches of 196-784 tokens, 1.03x at 1,568, where the team's matmuls are big enough (2 cores; paired steps in
one process; whole runs: bench/cpu_processes.py). So under CPU_LANES=auto a step uses them when its micro-batches
have up to LANES_MAX_TOKENS (finetune/plan.py, whose time estimate uses it too). PyTorch's ops release the GIL, so
Python threads are enough: no second process, no second copy of the model, no start-up cost (which is what kept
NPROC=2 from paying on a CPU).

The step is the same step: each lane takes a share of the items (dealt longest first, as processes are) in
micro-batches of batch / lanes rows, so no more rows are in flight than the plan allows; each lane's gradients come
from torch.autograd.grad (not .backward(), whose accumulation into the shared .grad would add the lanes in whatever
order they finish) and are summed in lane order, so a run's numbers do not depend on thread timing.
"""
from __future__ import annotations

import concurrent.futures as futures

from finetune.methods import micro_batches, shard
from finetune.plan import LANES_MAX_TOKENS


def pays(batch, micro_batch: int) -> bool:
    """Whether the step's micro-batches are small enough for lanes to be faster than one team."""
    passes = -(-batch.n_items // micro_batch)
    return sum(r.length for r in batch.sequences) / passes <= LANES_MAX_TOKENS


def _torch():
    import torch

    return torch


def _add(a, b):
    return b if a is None else a if b is None else a.add_(b)


class Lanes:
    """A pool of `count` threads; `threads`: the intra-op threads the process has, shared out between the lanes."""

    def __init__(self, count: int, threads: int):
        self.count, self.threads = count, threads
        self.pool = futures.ThreadPoolExecutor(count, thread_name_prefix="finetune-lane")

    def run(self, batch, micro_batch: int, overhead_tokens, loss_of, params) -> tuple[list, float, dict, int]:
        """The step's loss over `count` lanes: (gradient per parameter, summed in lane order; loss total; the
        method's summed parts; tokens). `loss_of(chunk, extra)` -> (loss tensor, parts) is the backend's forward."""
        torch = _torch()
        per_lane = max(1, micro_batch // self.count)
        shares = [s for s in (shard(batch, k, self.count) for k in range(self.count)) if s.sequences]

        def lane(share):
            torch.set_num_threads(max(1, self.threads // self.count))  # this thread's share of the cores
            grads, total, parts, tokens = [None] * len(params), 0.0, {}, 0
            for chunk, extra in micro_batches(share, per_lane, overhead_tokens):
                loss, chunk_parts = loss_of(chunk, extra)
                grads = [_add(a, b) for a, b in zip(grads, torch.autograd.grad(loss, params, allow_unused=True))]
                total += float(loss.detach())
                for k, v in chunk_parts.items():
                    parts[k] = parts.get(k, 0.0) + float(v)
                tokens += sum(r.length for r in chunk)
            return grads, total, parts, tokens

        running = [self.pool.submit(lane, share) for share in shares]
        try:
            futures.wait(running)  # every lane has stopped before a failure is raised (or memory released)
        finally:
            torch.set_num_threads(self.threads)  # the main thread's team again (eval, generation, the next step)
        grads, total, parts, tokens = [None] * len(params), 0.0, {}, 0
        for done in running:  # lane order: the same sums whichever lane finished first
            lane_grads, lane_total, lane_parts, lane_tokens = done.result()  # a lane's error is raised here
            grads = [_add(a, b) for a, b in zip(grads, lane_grads)]
            total += lane_total
            tokens += lane_tokens
            for k, v in lane_parts.items():
                parts[k] = parts.get(k, 0.0) + v
        return grads, total, parts, tokens
