import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune import hardware
from finetune.hardware import (CudaDevice, Hardware, detect, find_openblas, from_dict, parse_cpu_flags, parse_nvidia_smi,
                               summary_lines, visible_devices)

ROOT = Path(__file__).resolve().parents[1]

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_tile amx_bf16 amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme
"""


def _hw(**kw) -> Hardware:
    base = dict(os="Linux", arch="x86_64", chip="Test CPU", ram_total_gb=64.0, ram_available_gb=60.0,
                swap_total_gb=8.0, disk_free_gb=500.0, cpu_cores=16)
    base.update(kw)
    return Hardware(**base)


def _run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_detect_sane_on_this_machine():
    hw = detect()
    assert hw.os == platform.system()
    assert hw.arch in ("x86_64", "arm64")
    assert hw.chip and hw.chip != "unknown"
    assert hw.ram_total_gb > 1 and 0 < hw.ram_available_gb <= hw.ram_total_gb
    assert hw.swap_total_gb >= 0
    assert hw.disk_free_gb > 0
    assert hw.cpu_cores >= 1
    assert set(hw.cpu_features) <= set(hardware.CPU_FEATURES)
    assert all(isinstance(d, CudaDevice) for d in hw.cuda_devices)
    if hw.os == "Linux":
        assert not hw.mps_available
        assert hw.mlx_device in (None, "cpu", "gpu")
        # The flags we report must match what the kernel says.
        assert hw.cpu_features == parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    # Only installed packages, each with a real version string.
    assert all(v and v[0].isdigit() for v in hw.packages.values())
    assert ("pytest" not in hw.packages) and set(hw.packages) <= set(hardware.PACKAGES)


def test_detect_reports_installed_torch():
    from importlib.metadata import version
    assert detect().packages.get("torch") == version("torch")


def test_detect_does_not_import_heavy_modules():
    r = _run_py("import sys, json; from finetune.hardware import detect; detect();"
                "print(json.dumps([m for m in ('torch', 'mlx', 'transformers') if m in sys.modules]))")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_detect_is_fast():
    r = _run_py("import time; t = time.perf_counter(); from finetune.hardware import detect; detect();"
                "print(time.perf_counter() - t)")
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip().splitlines()[-1]) < 2.0


def test_parse_cpu_flags():
    assert parse_cpu_flags(CPUINFO) == ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    assert parse_cpu_flags("flags\t: fpu sse2 avx avx2\n") == ["avx2"]
    # Substrings must not count: avx512fp16 is not avx512f.
    assert parse_cpu_flags("flags\t: avx512fp16 amx_bf16x\n") == []
    assert parse_cpu_flags("") == []
    assert parse_cpu_flags("Features\t: fp asimd bf16\n") == []  # arm64 Linux: none of ours


def test_parse_cpu_model():
    assert hardware.parse_cpu_model(CPUINFO) == "Intel(R) Xeon(R) Platinum 8480+"
    assert hardware.parse_cpu_model("processor : 0\n") == ""


def test_parse_nvidia_smi():
    text = ("NVIDIA GeForce RTX 4090, 24564, 8.9\n"
            "Tesla T4, 15360, 7.5\n"
            "garbage line\n"
            "\n"
            "NVIDIA Broken, 1000, notanumber\n"
            "NVIDIA GB10, [N/A], 12.1\n")
    devs = parse_nvidia_smi(text)
    assert [d.name for d in devs] == ["NVIDIA GeForce RTX 4090", "Tesla T4", "NVIDIA GB10"]
    rtx, t4, gb10 = devs
    assert rtx.vram_gb == pytest.approx(24.0, abs=0.1) and rtx.compute_capability == "8.9" and rtx.bf16
    assert t4.vram_gb == pytest.approx(15.0, abs=0.1) and not t4.bf16
    assert gb10.vram_gb == 0.0 and gb10.bf16  # unified memory: no VRAM figure, still a bf16 GPU
    assert parse_nvidia_smi("") == []


def test_parse_nvidia_smi_ampere_boundary():
    (a100,) = parse_nvidia_smi("NVIDIA A100-SXM4-80GB, 81920, 8.0")
    assert a100.bf16 and a100.vram_gb == pytest.approx(80.0)


def test_detect_survives_missing_or_failing_nvidia_smi(monkeypatch):
    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(hardware.subprocess, "run",
                        lambda *a, **k: (_ for _ in ()).throw(subprocess.TimeoutExpired("nvidia-smi", 1.5)))
    assert detect().cuda_devices == []


def test_detect_parses_nvidia_smi_output(monkeypatch):
    def fake_run(cmd, **kw):
        assert cmd[0] == "nvidia-smi"
        return subprocess.CompletedProcess(cmd, 0, stdout="NVIDIA H100 80GB HBM3, 81559, 9.0\n", stderr="")
    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(hardware.subprocess, "run", fake_run)
    if platform.system() != "Linux":
        pytest.skip("chip detection also shells out off Linux")
    (h100,) = detect().cuda_devices
    assert h100.name == "NVIDIA H100 80GB HBM3" and h100.bf16


def test_cuda_visible_devices_hides_what_nvidia_smi_lists(monkeypatch):
    """nvidia-smi lists every GPU; torch sees only CUDA_VISIBLE_DEVICES' (an empty value hides them all: planning
    for a GPU torch cannot see crashed the run)."""
    gpus = [CudaDevice(f"GPU{i}", 80.0, "9.0", True) for i in range(3)]
    assert visible_devices(gpus, None) == gpus
    assert visible_devices(gpus, "") == [] and visible_devices(gpus, "-1") == []
    assert [g.name for g in visible_devices(gpus, "2,0")] == ["GPU2", "GPU0"]
    assert [g.name for g in visible_devices(gpus, "1,-1,2")] == ["GPU1"]   # CUDA stops at an invalid index
    assert visible_devices(gpus, "GPU-5f3e") == gpus                       # UUIDs: torch maps them itself
    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(hardware.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0, stdout="NVIDIA H200, 143771, 9.0\n", stderr=""))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect().cuda_devices == []


def test_summary_lines_describe_cuda_and_amx():
    hw = _hw(cpu_features=["avx2", "avx512f", "amx_bf16"],
             cuda_devices=[CudaDevice("NVIDIA GeForce RTX 4090", 24.0, "8.9", True)],
             packages={"torch": "2.5.0", "peft": "0.13.0"})
    text = "\n".join(summary_lines(hw))
    assert "NVIDIA GeForce RTX 4090" in text and "24.0 GB" in text and "8.9" in text
    assert "bf16 matmul: yes (AMX)" in text
    assert "torch 2.5.0" in text and "peft 0.13.0" in text
    assert "Test CPU" in text and "64.0 GB" in text and "500.0 GB" in text and "16 cores" in text


def test_summary_lines_bf16_variants_and_empty_state():
    text = "\n".join(summary_lines(_hw(cpu_features=["avx2", "avx512f", "avx512_bf16"])))
    assert "bf16 matmul: yes (AVX-512-bf16)" in text
    text = "\n".join(summary_lines(_hw(cpu_features=["avx2"])))
    assert "bf16 matmul: no" in text
    assert "CUDA: none" in text and "MPS: not available" in text and "MLX: not available" in text
    assert "Packages: none" in text


def test_summary_lines_apple():
    hw = _hw(os="Darwin", arch="arm64", chip="Apple M2 Pro", mps_available=True,
             mlx_available=True, mlx_device="gpu")
    text = "\n".join(summary_lines(hw))
    assert "Apple M2 Pro" in text and "MPS: available" in text and "MLX: available (gpu)" in text


def test_dict_round_trip_through_json():
    hw = _hw(cpu_features=["avx2", "amx_bf16"],
             cuda_devices=[CudaDevice("Tesla T4", 15.0, "7.5", False), CudaDevice("NVIDIA A100", 80.0, "8.0", True)],
             mps_available=False, mlx_available=True, mlx_device="cpu", packages={"torch": "2.13.0"})
    back = from_dict(json.loads(json.dumps(hw.to_dict())))
    assert back == hw
    assert isinstance(back.cuda_devices[0], CudaDevice) and back.cuda_devices[1].bf16
    assert back.cpu_bf16


def test_from_dict_tolerates_unknown_keys():
    d = _hw().to_dict() | {"added_in_future": 1}
    assert from_dict(d) == _hw()


def test_detect_round_trip():
    hw = detect()
    assert from_dict(json.loads(json.dumps(hw.to_dict()))) == hw


def test_cpu_peak_probe_feeds_the_time_estimate():
    """The planner times a CPU run with the matmul rate this machine measures now when that beats the table for
    its instruction set; a probe below the table (a busy moment on a shared machine) is named, not trusted."""
    from finetune import hardware, plan
    from finetune.config import Config
    from finetune.models import info_from_config

    hw = hardware.detect()
    peak = hardware.measure_cpu_peak(bf16=False)
    assert set(peak) == {"fp32"} and peak["fp32"] > 1
    model = info_from_config("m", None, dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                             vocab_size=1000, model_type="llama"))
    def planned(gflops, busy_cores=0.0):
        return plan.make(Config(dtype="fp32"), hardware.Hardware(**{**hw.__dict__, "cpu_peak_gflops": {"fp32": gflops},
                                                                     "cpu_busy_cores": busy_cores}),
                         model, "torch", "cpu", 1000, 100, 100)

    fast, faster, blip = planned(5000.0), planned(10000.0), planned(1.0)
    assert faster.est_seconds < fast.est_seconds and any("(measured)" in r for r in fast.reasons)
    assert blip.est_seconds > fast.est_seconds and any("probe read 1 GFLOP/s, below it" in r for r in blip.reasons)
    # other processes held a core as the run started: the low probe is what the run will get, so it is used
    busy = planned(1.0, busy_cores=1.0)
    assert busy.est_seconds > 10 * blip.est_seconds
    assert any(f"measured while other processes kept 1 of {hw.cpu_cores} cores busy" in r for r in busy.reasons)


def test_measure_cpu_busy_sees_a_neighbour_process():
    idle = hardware.measure_cpu_busy(0.5)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = hardware.measure_cpu_busy(0.5)
    finally:
        spin.kill()
    assert busy >= 0.7, (idle, busy)


def test_find_openblas_linux_only_and_from_known_paths(monkeypatch, tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    monkeypatch.setattr(hardware, "OPENBLAS_PATHS", (str(tmp_path / "missing.so"), str(lib)))
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    assert find_openblas() == str(lib)
    monkeypatch.setattr(hardware.platform, "system", lambda: "Darwin")
    assert find_openblas() is None  # Apple's MLX uses Metal / Accelerate


def test_doctor_says_which_blas_mlx_cpu_uses():
    mlx_cpu = dict(mlx_available=True, mlx_device="cpu")
    assert "MLX: available (cpu, OpenBLAS)" in summary_lines(_hw(**mlx_cpu, mlx_openblas=True))
    slow = "\n".join(summary_lines(_hw(**mlx_cpu, mlx_openblas=False)))
    assert "reference BLAS" in slow and "apt-get install libopenblas0" in slow
    assert "MLX: available (gpu)" in summary_lines(_hw(mlx_available=True, mlx_device="gpu"))


def test_cuda_mismatch_names_driver_and_wheel():
    from finetune.hardware import cuda_mismatch

    old = cuda_mismatch("550.54.15", "13.0")
    assert "driver 550.54.15" in old and "CUDA 13.0" in old and ">= 580" in old
    assert ">= " not in cuda_mismatch("580.65", "13.0")  # new enough: some other reason, said as such
    assert "CPU build" in cuda_mismatch("580.65", None)


def test_confirm_cuda_drops_a_gpu_torch_cannot_use():
    """On this machine torch is a CPU build: a GPU described by nvidia-smi is not planned for, and the reason says so."""
    import dataclasses

    from finetune.hardware import CudaDevice, confirm_cuda, detect

    hw = dataclasses.replace(detect(), cuda_devices=[CudaDevice("NVIDIA L4", 22, "8.9", True)])
    import torch

    confirmed, why = confirm_cuda(hw)
    if torch.cuda.is_available():
        assert confirmed.cuda_devices and why is None
    else:
        assert confirmed.cuda_devices == [] and why.startswith("nvidia-smi lists NVIDIA L4 but ")
    assert confirm_cuda(dataclasses.replace(hw, cuda_devices=[])) == (dataclasses.replace(hw, cuda_devices=[]), None)


FAULTS_PROBE = """
import resource, sys
import numpy as np
from finetune import hardware
applied = hardware.keep_freed_memory() if sys.argv[1] == "keep" else False
def step():  # a training step's shape: many mid-sized blocks live at once, all freed at the end
    blocks = [np.ones(1 << 20, dtype=np.float32) for _ in range(40)]  # 40 x 4 MiB
    return sum(float(b[0]) for b in blocks)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc: Linux")
def test_kept_freed_memory_is_reused_without_page_faults():
    """The second and later 'steps' reuse the first one's memory: no faults, where glibc's default trims the heap
    after each step and faults much of the 160 MiB back in (about half of its 40960 pages here)."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.split()
        return out[0], float(out[1])

    applied, kept = faults("keep")
    _, default = faults("default")
    assert applied == "True"
    pages = 40 * (4 << 20) // 4096
    assert default > 0.25 * pages  # the shape that costs: the default gives (here half) the memory back every step
    assert kept < 0.02 * pages


def test_keep_freed_memory_is_a_no_op_off_linux_and_when_switched_off(monkeypatch):
    monkeypatch.setattr(hardware.platform, "system", lambda: "Darwin")
    assert hardware.keep_freed_memory() is False
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hardware, "KEEP_FREED_MEMORY", False)
    assert hardware.keep_freed_memory() is False
