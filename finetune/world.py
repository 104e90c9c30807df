"""The processes of one run: which one this is, how many there are, and the one collective the rest is built on
(an elementwise sum over every process, supplied by the backend: torch.distributed's all_reduce on gloo / NCCL,
mlx.distributed's all_sum on its ring). A single-process run is World() and never touches a collective.

Rules every distributed run keeps (finetune/loop.py, finetune/train.py):
  * every process draws the same rows for a step (DataOrder), builds the same Batch, and trains its share
    (methods.shard: items rank, rank + size, ...); the step's loss denominator is the whole step's, so the summed
    gradients are exactly the single-process ones (only the order of float additions differs);
  * only rank 0 writes: the run directory, run.json, logs, checkpoints, the adapter; the others read the same
    checkpoint on resume (their optimizer state is identical: they applied the same summed gradients);
  * a stop (signal, lost process) is agreed on between steps, so every process stops after the same step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

SHARE_LIMIT = 1 << 20  # share(): text longer than this is a bug, not a plan


class Lost(RuntimeError):
    """A collective failed: another process of the run died or was killed."""


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_size: int = 1             # processes on this machine (their share of its CPU threads)
    engine: str = ""                # "gloo", "nccl", "ring": what carries the collectives
    all_sum: Callable[[np.ndarray], np.ndarray] | None = None  # float64 array -> its sum over every process

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def sum(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        return values if self.size == 1 else self.all_sum(values)

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any one (a stop asked for by a signal on one process)."""
        return bool(flag) if self.size == 1 else bool(self.sum([1.0 if flag else 0.0])[0] > 0)

    def most(self, value: int) -> int:
        """The largest of the processes' values."""
        if self.size == 1:
            return value
        mine = np.zeros(self.size)
        mine[self.rank] = value
        return int(self.sum(mine).max())

    def barrier(self) -> None:
        self.sum([0.0])

    def settle_step(self, failed: BaseException | None, failures: float) -> None:
        """After a step's sums (which carried `failures`, the count of processes whose share failed): the process that
        failed re-raises its error, the others raise Lost, so every process stops after the same step."""
        if failed is not None:
            raise failed
        if failures:
            raise Lost("another process failed during this step")

    def sum_parts(self, stats: dict[str, float]) -> dict[str, float]:
        """A step's loss parts summed over the processes (the same keys on each: every process has rows of the step,
        loop.py checks it, and runs the same method)."""
        names = sorted(stats)
        return dict(zip(names, self.sum([stats[k] for k in names]).tolist()))

    def share(self, text: str) -> str:
        """Rank 0's text on every process (the run directory, the plan), over the same sum: the others add zeros."""
        if self.size == 1:
            return text
        data = np.frombuffer(text.encode(), dtype=np.uint8) if self.writer else np.zeros(0, np.uint8)
        n = int(self.sum([len(data)])[0])
        if n > SHARE_LIMIT:
            raise ValueError(f"world.share: {n} bytes")
        values = self.sum(np.pad(data, (0, n - len(data))).astype(np.float64))
        return values.astype(np.uint8).tobytes().decode()


def launched() -> bool:
    """Started by a launcher as one of several processes: torchrun (RANK / WORLD_SIZE) or mlx.launch (MLX_RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or "MLX_RANK" in os.environ


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, processes on this machine) as torchrun sets them."""
    get = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
    size = get("WORLD_SIZE", 1)
    return get("RANK", 0), size, get("LOCAL_WORLD_SIZE", size)
