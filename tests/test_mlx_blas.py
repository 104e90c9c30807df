"""mlx[cpu] is bound to the system OpenBLAS when backends/mlx_blas.py loads it first (finding it and reporting
it: test_hardware.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from finetune import hardware
from finetune.hardware import find_openblas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _linker_bindings(code: str) -> list[str]:
    """The dynamic linker's symbol bindings (LD_DEBUG) while a fresh Python runs `code` from the repository."""
    env = {**os.environ, "LD_DEBUG": "bindings"}
    done = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r)\n" % ROOT + code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr.splitlines()


def _bindings(preload: bool) -> str:
    """Which library libmlx.so's cblas_sgemm binds to, as the dynamic linker reports it (LD_DEBUG)."""
    code = (("from backends.mlx_blas import use_openblas; assert use_openblas()\n" if preload else "")
            + "import mlx.core as mx; a = mx.ones((64, 64)); mx.eval(a @ a); assert float((a @ a)[0, 0]) == 64.0\n")
    return next(line for line in _linker_bindings(code) if "libmlx.so" in line and "`cblas_sgemm'" in line)


@pytest.mark.skipif(not (hardware.detect().mlx_device == "cpu" and find_openblas()),
                    reason="needs mlx[cpu] and a system OpenBLAS (setup_environment.sh installs it as root)")
def test_mlx_cpu_matmuls_bind_to_openblas_only_when_loaded_first():
    assert "libopenblas" in _bindings(preload=True)
    assert "libopenblas" not in _bindings(preload=False)  # the bundled reference BLAS otherwise


def _torch_blas_bindings(code: str) -> list[str]:
    """libtorch_cpu's BLAS symbols the dynamic linker bound to the system OpenBLAS while running `code`."""
    lines = _linker_bindings(code + "\nimport torch; torch.ones(64, 64) @ torch.ones(64, 64)\n")
    return [line for line in lines if "libtorch_cpu.so" in line and "libopenblas" in line.split(" to ")[-1]]


@pytest.mark.skipif(not find_openblas(), reason="needs a system OpenBLAS (setup_environment.sh installs it as root)")
def test_torch_keeps_its_own_blas_when_the_mlx_backend_loads_openblas_first():
    # BACKEND=auto imports the MLX backend (which loads OpenBLAS) before torch trains: torch's sgemm_ bound to
    # OpenBLAS made the default run's steps 2.3x slower. The control shows the check sees such a binding.
    blas = find_openblas()
    assert any("`sgemm_'" in line for line in _torch_blas_bindings(
        f"import ctypes, os; ctypes.CDLL({blas!r}, mode=os.RTLD_GLOBAL)"))
    assert _torch_blas_bindings("import backends; backends.get('mlx')") == []
