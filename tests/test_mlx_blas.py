"""mlx[cpu] gets the system OpenBLAS when there is one (backends/mlx_blas.py): found, reported, and bound."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from finetune import hardware
from finetune.hardware import Hardware, find_openblas, summary_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hw(**kw) -> Hardware:
    base = dict(os="Linux", arch="x86_64", chip="AMD EPYC", ram_total_gb=24, ram_available_gb=22, swap_total_gb=0,
                disk_free_gb=100, cpu_cores=2, mlx_available=True, mlx_device="cpu")
    return Hardware(**{**base, **kw})


def test_find_openblas_linux_only_and_from_known_paths(monkeypatch, tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    monkeypatch.setattr(hardware, "OPENBLAS_PATHS", (str(tmp_path / "missing.so"), str(lib)))
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    assert find_openblas() == str(lib)
    monkeypatch.setattr(hardware.platform, "system", lambda: "Darwin")
    assert find_openblas() is None  # Apple's MLX uses Metal / Accelerate


def test_doctor_says_which_blas_mlx_cpu_uses():
    assert "MLX: available (cpu, OpenBLAS)" in summary_lines(_hw(mlx_openblas=True))
    slow = "\n".join(summary_lines(_hw(mlx_openblas=False)))
    assert "reference BLAS" in slow and "apt-get install libopenblas0" in slow
    assert "MLX: available (gpu)" in summary_lines(_hw(mlx_device="gpu"))


def _bindings(preload: bool) -> str:
    """Which library libmlx.so's cblas_sgemm binds to, as the dynamic linker reports it (LD_DEBUG)."""
    code = ("import sys; sys.path.insert(0, %r)\n" % ROOT
            + ("from backends.mlx_blas import use_openblas; assert use_openblas()\n" if preload else "")
            + "import mlx.core as mx; a = mx.ones((64, 64)); mx.eval(a @ a); assert float((a @ a)[0, 0]) == 64.0\n")
    env = {**os.environ, "LD_DEBUG": "bindings"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return next(line for line in done.stderr.splitlines() if "libmlx.so" in line and "`cblas_sgemm'" in line)


@pytest.mark.skipif(not (hardware.detect().mlx_device == "cpu" and find_openblas()),
                    reason="needs mlx[cpu] and a system OpenBLAS (setup_environment.sh installs it as root)")
def test_mlx_cpu_matmuls_bind_to_openblas_only_when_loaded_first():
    assert "libopenblas" in _bindings(preload=True)
    assert "libopenblas" not in _bindings(preload=False)  # the bundled reference BLAS otherwise
