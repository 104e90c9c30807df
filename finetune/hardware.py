"""What this machine is: pure data, json-able, detected without importing torch (doctor < 2 s)."""
from __future__ import annotations

import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, fields, replace

import psutil


@dataclass
class CudaDevice:
    name: str
    vram_gb: float
    compute_capability: str  # "8.9"
    bf16: bool               # Ampere (8.0) and newer


@dataclass
class Hardware:
    os: str                  # "Linux", "Darwin", "Windows"
    arch: str                # "x86_64", "arm64"
    chip: str                # CPU brand, e.g. "Apple M2" or "Intel(R) Xeon(R) ..."
    ram_total_gb: float
    ram_available_gb: float
    swap_total_gb: float
    disk_free_gb: float
    cpu_cores: int
    cpu_features: list[str] = field(default_factory=list)  # subset of ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    cuda_devices: list[CudaDevice] = field(default_factory=list)
    mps_available: bool = False
    mlx_available: bool = False
    mlx_device: str | None = None  # "gpu" on Apple Silicon, "cpu" for mlx[cpu] on Linux
    mlx_openblas: bool = False  # mlx[cpu] gets the system OpenBLAS instead of its bundled reference BLAS
    packages: dict[str, str] = field(default_factory=dict)  # installed backend packages -> version
    cpu_peak_gflops: dict[str, float] = field(default_factory=dict)  # this run's matmul probe, "fp32"/"bf16"
    cpu_busy_cores: float | None = None  # cores other processes kept busy just before that probe

    @property
    def apple_silicon(self) -> bool:
        return self.os == "Darwin" and self.arch == "arm64"

    @property
    def cpu_bf16(self) -> bool:
        return "amx_bf16" in self.cpu_features or "avx512_bf16" in self.cpu_features

    def to_dict(self) -> dict:
        return asdict(self)


# Canonical order; these decide whether CPU bf16 training is worth it.
CPU_FEATURES = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]

# Distribution names as importlib.metadata knows them; only installed ones are reported.
PACKAGES = ["torch", "transformers", "peft", "trl", "datasets", "accelerate", "huggingface_hub",
            "bitsandbytes", "mlx", "mlx-lm", "unsloth", "trackio"]

GB = 2**30  # the unit of every *_gb value in finetune (a "24 GB" RTX 4090 is 24 GiB)
OPENBLAS_HINT = "install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0) for ~17x faster MLX training steps"


def _run(cmd: list[str], timeout: float = 2.0) -> str:
    """stdout of a command, or "" if it is missing, fails or hangs (a wedged driver must not hang doctor)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout if out.returncode == 0 else ""


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _has_module(name: str) -> bool:
    # find_spec, never import: importing torch alone costs seconds.
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def parse_cpu_flags(text: str) -> list[str]:
    """Known features present in the first "flags" line of /proc/cpuinfo text."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return [f for f in CPU_FEATURES if f in present]
    return []


def parse_cpu_model(text: str) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return ""


def parse_nvidia_smi(text: str) -> list[CudaDevice]:
    """Lines of `name, memory.total (MiB), compute_cap`; lines that don't parse are skipped."""
    devices = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]  # rsplit: GPU names may contain commas
        if len(parts) != 3 or not parts[0]:
            continue
        name, mem, cap = parts
        try:
            cc = float(cap)
        except ValueError:
            continue
        try:
            vram = round(float(mem) / 1024, 1)
        except ValueError:
            vram = 0.0  # unified-memory parts (e.g. GB10) report "[N/A]"; still a usable GPU
        devices.append(CudaDevice(name=name, vram_gb=vram, compute_capability=cap, bf16=cc >= 8.0))
    return devices


def visible_devices(devices: list[CudaDevice], visible: str | None) -> list[CudaDevice]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves to torch (nvidia-smi lists them all): unset = all; "" or "-1" = none;
    "0,2" = those indices. UUIDs or names we cannot map are taken as all (torch resolves them itself)."""
    if visible is None:
        return devices
    picked = []
    for item in (x.strip() for x in visible.split(",")):
        if not item.lstrip("-").isdigit():
            return devices if item else picked
        if int(item) < 0:
            break  # CUDA stops at the first invalid index
        if int(item) < len(devices):
            picked.append(devices[int(item)])
    return picked


# The oldest NVIDIA driver each CUDA major's runtime needs (minor-version compatibility); PyPI's Linux torch wheels are
# CUDA 13 builds, so a driver below 580 sees the GPU in nvidia-smi while torch.cuda.is_available() is False.
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
EXPECT_CUDA = "FINETUNE_EXPECT_CUDA"  # set by an HF Job priced for a GPU: no usable GPU there is an error, not the CPU


def cuda_mismatch(driver: str | None, build: str | None) -> str:
    """Why torch cannot use a GPU that nvidia-smi lists: the wheel vs the driver, in words."""
    if build is None:
        return "the installed torch is a CPU build (rerun ./setup_environment.sh on this machine for a CUDA build)"
    major = int(build.split(".")[0])
    need = MIN_DRIVER.get(major)
    have = int(driver.split(".")[0]) if driver and driver.split(".")[0].isdigit() else None
    if need and have is not None and have < need:
        return (f"NVIDIA driver {driver} is older than torch's CUDA {build} build needs (>= {need}): update the "
                f"driver, or install a torch built for an older CUDA (TORCH_SPEC, see README)")
    return f"torch (CUDA {build}) finds no usable GPU with NVIDIA driver {driver or 'unknown'}"


def confirm_cuda(hw: Hardware) -> tuple[Hardware, str | None]:
    """nvidia-smi alone cannot say torch will use the GPU: ask torch (imports it; train only, never doctor).
    Returns the hardware torch can really use and, when it differs, one line saying why."""
    if not hw.cuda_devices or "torch" not in hw.packages:
        return hw, None
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return hw, None
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], timeout=10).strip()
    why = cuda_mismatch(driver.splitlines()[0] if driver else None, torch.version.cuda)
    return replace(hw, cuda_devices=[]), f"nvidia-smi lists {hw.cuda_devices[0].name} but {why}"


def _arch() -> str:
    arch = platform.machine()
    # Under Rosetta, Python reports x86_64 on an M-series Mac; the hardware is still arm64.
    if platform.system() == "Darwin" and arch == "x86_64" and _run(["sysctl", "-n", "hw.optional.arm64"]).strip() == "1":
        return "arm64"
    return {"aarch64": "arm64", "AMD64": "x86_64"}.get(arch, arch)


def _chip(os_name: str) -> str:
    chip = ""
    if os_name == "Darwin":
        chip = _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
    elif os_name == "Linux":
        chip = parse_cpu_model(_read("/proc/cpuinfo"))
    return chip or platform.processor() or platform.machine() or "unknown"


def _mac_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in platform.mac_ver()[0].split(".") if p)
    except ValueError:
        return ()


def _mlx(os_name: str, arch: str) -> tuple[bool, str | None]:
    if not _has_module("mlx"):
        return False, None
    if os_name == "Darwin":
        return (True, "gpu") if arch == "arm64" else (False, None)
    if os_name == "Linux":
        # Plain `mlx` on Linux ships without libmlx.so; the backend wheels carry it.
        if any(_installed(d) for d in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda", "mlx_cuda")):
            return True, "gpu"
        if any(_installed(d) for d in ("mlx-cpu", "mlx_cpu")):
            return True, "cpu"
    return False, None


# Debian/Ubuntu (libopenblas0) and Fedora/Arch paths, checked before asking ldconfig
OPENBLAS_PATHS = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
                  "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0")


def find_openblas() -> str | None:
    """A system OpenBLAS for mlx[cpu] (backends/mlx_blas.py loads it), or None. Linux only; loads nothing."""
    if platform.system() != "Linux":
        return None
    return next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None) or ctypes.util.find_library("openblas")


# glibc's malloc hands freed memory back to the OS: every block over its mmap threshold is its own mapping, and the
# heap is trimmed once its free top passes 2x that threshold. A training step frees its activations at the end, so
# the next step faults them back in page by page (5-50k minor faults a step on bench/quality.py's multiturn rows,
# each a few microseconds in a VM). Kept instead, the heap stays at the run's high-water mark: the peak the plan
# and the report count anyway. Off for a comparison: bench/quality.py --variants finetune+hardware.KEEP_FREED_MEMORY=0.
KEEP_FREED_MEMORY = True
MALLOPT = ((-1, 1 << 30),   # M_TRIM_THRESHOLD: trim only when 1 GiB lies free at the heap's top
           (-2, 64 << 20),  # M_TOP_PAD: grow the heap 64 MiB at a time
           (-3, 32 << 20))  # M_MMAP_THRESHOLD: blocks under 32 MiB (glibc's maximum) come from the heap


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (MALLOPT above). True when applied; False where the C
    library is not glibc (macOS, musl) or KEEP_FREED_MEMORY is off."""
    if not KEEP_FREED_MEMORY or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in MALLOPT)


def detect() -> Hardware:
    """Describe this machine. Never imports torch/mlx/transformers: doctor must answer in < 2 s."""
    os_name = platform.system()
    arch = _arch()
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    try:
        disk_free = shutil.disk_usage(os.getcwd()).free
    except OSError:
        disk_free = 0
    features = parse_cpu_flags(_read("/proc/cpuinfo")) if os_name == "Linux" else []
    cuda = []
    if shutil.which("nvidia-smi"):
        cuda = visible_devices(parse_nvidia_smi(_run(["nvidia-smi", "--query-gpu=name,memory.total,compute_cap",
                                                      "--format=csv,noheader,nounits"], timeout=10)),
                               os.environ.get("CUDA_VISIBLE_DEVICES"))
    # MPS needs Apple silicon, a torch build and macOS 12.3+.
    mps = os_name == "Darwin" and arch == "arm64" and _has_module("torch") and _mac_version() >= (12, 3)
    mlx_ok, mlx_device = _mlx(os_name, arch)
    packages = {name: v for name in PACKAGES if (v := _installed(name))}
    return Hardware(
        os=os_name, arch=arch, chip=_chip(os_name),
        ram_total_gb=round(vm.total / GB, 1), ram_available_gb=round(vm.available / GB, 1),
        swap_total_gb=round(swap.total / GB, 1), disk_free_gb=round(disk_free / GB, 1),
        cpu_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        cpu_features=features, cuda_devices=cuda, mps_available=mps,
        mlx_available=mlx_ok, mlx_device=mlx_device, packages=packages,
        mlx_openblas=bool(mlx_device == "cpu" and find_openblas()),
    )


def measure_cpu_busy(seconds: float = 0.3) -> float:
    """Cores kept busy by other processes, from the machine's CPU time over `seconds` while this one sleeps: tells
    a busy machine (the probe below then reads its share of the cores, and the run will get about that) from a
    probe that a passing neighbour dipped for a moment."""
    cores = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    return round(psutil.cpu_percent(interval=seconds) / 100 * cores, 1)


def measure_cpu_peak(bf16: bool, seconds: float = 2.0) -> dict[str, float]:
    """The CPU's dense matmul rate (GFLOP/s): the best of 1024^3 trials over ~`seconds` per dtype, with all
    threads. The planner's time estimate uses it, because CPUs differ between machines; the best trial, not
    the mean, because a shared machine's neighbours come and go (the planner also floors it by a table).
    2 s, not 0.5: on the 2-core VM a neighbour held the probe down for over a second at a time (0.5 s windows
    read 82-146 GFLOP/s in one minute, 2 s windows 121-141; 2026-12-02)."""
    import time

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and not bf16:
            continue
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        for _ in range(3):
            a @ b
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            best = max(best, 4 * 2 * 1024 ** 3 / (time.perf_counter() - start))
        out[name] = round(best / 1e9, 1)
    return out


def _bf16_matmul(hw: Hardware) -> str:
    if "amx_bf16" in hw.cpu_features:
        return "yes (AMX)"
    if "avx512_bf16" in hw.cpu_features:
        return "yes (AVX-512-bf16)"
    return "no"


def summary_lines(hw: Hardware) -> list[str]:
    """Human-readable description for `finetune doctor`."""
    lines = [
        f"OS: {hw.os} {hw.arch}, chip: {hw.chip}",
        f"RAM: {hw.ram_total_gb:.1f} GB total, {hw.ram_available_gb:.1f} GB available, swap {hw.swap_total_gb:.1f} GB",
        f"Disk free (cwd): {hw.disk_free_gb:.1f} GB",
        f"CPU: {hw.cpu_cores} cores, features: {', '.join(hw.cpu_features) or 'none'}; bf16 matmul: {_bf16_matmul(hw)}",
    ]
    if hw.cuda_devices:
        for i, d in enumerate(hw.cuda_devices):
            vram = f"{d.vram_gb:.1f} GB" if d.vram_gb else "shared memory"
            lines.append(f"CUDA {i}: {d.name}, {vram}, compute {d.compute_capability}, bf16: {'yes' if d.bf16 else 'no'}")
    else:
        lines.append("CUDA: none")
    lines.append(f"MPS: {'available' if hw.mps_available else 'not available'}")
    if not hw.mlx_available:
        lines.append("MLX: not available")
    elif hw.mlx_device == "cpu":
        lines.append("MLX: available (cpu, OpenBLAS)" if hw.mlx_openblas else
                     f"MLX: available (cpu, its bundled reference BLAS: {OPENBLAS_HINT})")
    else:
        lines.append(f"MLX: available ({hw.mlx_device})")
    pkgs = ", ".join(f"{k} {v}" for k, v in hw.packages.items())
    lines.append(f"Packages: {pkgs or 'none'}")
    return lines


def from_dict(d: dict) -> Hardware:
    """Inverse of Hardware.to_dict(), e.g. reading run.json; unknown keys are dropped so old/new files still load."""
    known = {f.name for f in fields(Hardware)}
    data = {k: v for k, v in d.items() if k in known}
    data["cuda_devices"] = [CudaDevice(**c) if isinstance(c, dict) else c for c in data.get("cuda_devices", [])]
    data["cpu_features"] = list(data.get("cpu_features", []))
    data["packages"] = dict(data.get("packages", {}))
    return Hardware(**data)
