"""OpenBLAS for mlx[cpu] on Linux.

The mlx[cpu] wheels link the netlib *reference* BLAS they bundle (mlx_cpu.libs/libblas-*.so): fp32 matmuls run
at 4.5-6 GFLOP/s on a 2-core EPYC that OpenBLAS drives at 100-175; a real-model training step gets 17x faster
(bench/mlx_blas.py). Loading the system's OpenBLAS with RTLD_GLOBAL *before* libmlx.so is loaded makes the
dynamic linker bind libmlx's cblas_* calls to it: a dlopen'ed library's symbols are looked up in the global
scope first, its own dependencies second. Same math, other rounding. Apple's MLX (Metal / Accelerate) is left
alone. Nothing here imports mlx.

torch is loaded first, on purpose. libtorch_cpu exports its own BLAS/LAPACK (sgemm_, ...) with default visibility,
so if OpenBLAS is already in the global scope when torch loads, the linker binds torch's calls to OpenBLAS instead
(LD_DEBUG: 102 symbols) and torch training ran 2.3x slower (OpenBLAS's threads inside torch's). Python loads
extensions with RTLD_NOW: once torch is loaded its bindings are fixed. `backends.select` imports this module for
BACKEND=auto even when torch then trains, so the default run paid that until 2026-12-01.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

from finetune.hardware import find_openblas

_loaded: str | None = None


def use_openblas() -> str | None:
    """Load OpenBLAS into the global symbol scope, once, if there is one; returns what was loaded. Call before
    the first `import mlx.core`: after that, libmlx's BLAS symbols may already be bound."""
    global _loaded
    if _loaded is None and "mlx.core" not in sys.modules and (path := find_openblas()):
        if importlib.util.find_spec("torch") is not None:
            import torch  # noqa: F401  -- binds torch's BLAS to its own before OpenBLAS joins the global scope
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            _loaded = path
        except OSError:
            return None
    return _loaded
