"""Helpers shared by the bench/ scripts: environment line, and telling quiet samples from ones where other
processes used the CPU (with 2 OpenMP threads on 2 cores, one busy neighbour can slow a step 10x or more)."""
from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CORES = os.cpu_count() or 1
HZ = os.sysconf("SC_CLK_TCK")
FOREIGN_MAX = 0.25  # cores used by other processes during a sample above which the sample is dropped


def setup_torch():
    """Threads = cores, quiet logging; returns torch."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(CORES)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    return torch


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(line for line in fh if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return "unknown"
    keep = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"]
    return " ".join(f for f in keep if f in flags) or "none"


def env_line() -> str:
    import torch

    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads on {CORES} cores, cpu flags: {cpu_flags()}, "
            f"oneDNN bf16: {bf16}")


def snap() -> tuple[float, float, float]:
    """(wall s, CPU s used by the whole machine, CPU s used by this process)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return time.perf_counter(), (sum(v) - v[3] - v[4]) / HZ, sum(os.times()[:2])


def sample(a, b, amount: float) -> tuple[float, float]:
    """(amount per second, cores used by other processes) between two snaps."""
    wall = b[0] - a[0]
    return amount / wall, max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / wall


def clean_median(samples, need: int = 3) -> tuple[float, int]:
    """(median rate over the quiet samples, how many were quiet); all samples if fewer than `need` were quiet."""
    kept = [r for r, f in samples if f <= FOREIGN_MAX]
    return statistics.median(kept if len(kept) >= need else [r for r, _ in samples]), len(kept)


def wait_quiet(max_s: float = 20.0, window: float = 1.0) -> float:
    """Sleep until other processes use <= FOREIGN_MAX core over `window` s (at most max_s); returns seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        a = snap()
        time.sleep(window)
        if sample(a, snap(), 0)[1] <= FOREIGN_MAX:
            break
    return time.perf_counter() - start


class Gate:
    """Times samples; before one, waits for quiet only if the previous sample was disturbed by other processes."""

    def __init__(self):
        self.noisy, self.waited = False, 0.0

    def start(self):
        if self.noisy:
            self.waited += wait_quiet(max_s=10.0, window=0.2)
        return snap()

    def stop(self, a, amount: float) -> tuple[float, float]:
        r = sample(a, snap(), amount)
        self.noisy = r[1] > FOREIGN_MAX
        return r
