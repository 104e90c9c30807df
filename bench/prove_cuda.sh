#!/usr/bin/env bash
# One-shot GPU probe for the CUDA path (H200, offline, ~7 min). Run from the repo root:  bash bench/prove_cuda.sh
# Writes $OUT/summary.json, $OUT/runs_full.json, $OUT/log.txt and prints a markdown summary at the end.
# The parts, their timeouts and the global deadline are in bench/prove_cuda.py (its docstring says what runs).
#
# What must be carried (git-excluded via .git/info/exclude: /.whl/ and /.gpu/; each call's tree <= 64 MiB):
#   .gpu/smollm2-tok            config + tokenizer of SmolLM2-135M-Instruct (3.5 MB): the random-init models'
#                               shapes and tokenizer (REQUIRED)
#   .gpu/site.tar.xz            the project's pinned stack (transformers 5.23.0, peft 0.21.2, huggingface_hub 2.4.0,
#                               trl 1.16.0, datasets 5.2.0, gguf 0.19.0, bitsandbytes 0.50.2 slimmed to its CUDA
#                               13.0/13.2 + CPU libraries, and their missing deps) as the unpacked contents of the
#     or .whl                   wheels in .whl/, xz-compressed: 20.8 MB instead of 35 MB of wheels.
#                               .whl/ holds the same wheels for `pip install --target` (used when carried).
#   .gpu/smollm2.gguf.part2     second 33.8 MiB of the real SmolLM2 GGUF (optional)
#   The first 60 MiB (.gpu/smollm2.gguf.part1) cannot travel with the rest (64 MiB limit), so an EARLIER call
#   carries it and copies it to /tmp/smollm2.gguf.part1; the probe call must follow within the warm window
#   (~30 s), else /tmp is gone and the probe falls back to the random 135M shape (and says so).
#   Call 1: carry [".gpu/smollm2.gguf.part1"]  command: cp .gpu/smollm2.gguf.part1 /tmp/ && <quick env probe>
#   Call 2: carry [".gpu/site.tar.xz", ".gpu/smollm2-tok", ".gpu/smollm2.gguf.part2"]  (~58.5 MiB with the repo)
#           command: bash bench/prove_cuda.sh          (run timeout_s 480; GPU_PROBE_BUDGET=420 by default)
#   Without the GGUF: carry [".whl", ".gpu/smollm2-tok"] (~35 MiB) or [".gpu/site.tar.xz", ".gpu/smollm2-tok"].
# GPU_PROBE_SET=calibrate: instead of the default set, the planner checked on rows it was not fitted on (long,
#   multiturn) + a bf16-vs-fp16 step profile (~4 min; needs no GGUF: carry [".gpu/site.tar.xz", ".gpu/smollm2-tok"]).
# Bring back at most 8 files from $OUT (the device tool's limit): summary.json, runs_full.json and log.txt hold all;
#   per-part logs are in $GPU_PROBE_WORK/logs (tar them into one file if wanted).
# Env: OUT (result folder), PYTHON (default python3), GPU_PROBE_BUDGET (s, default 420, counted from the start of
# this script), GPU_PROBE_CPU=1 (local dry mode: no install, CPU, 135M shape, 2 steps).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export GPU_PROBE_T0="${GPU_PROBE_T0:-$(date +%s)}"
export GPU_PROBE_BUDGET="${GPU_PROBE_BUDGET:-420}"
export OUT="${OUT:-$PWD/outputs/gpu_probe_out}"
export GPU_PROBE_WORK="${GPU_PROBE_WORK:-/tmp/gpu_probe}"
PY="${PYTHON:-python3}"
SITE=/tmp/site
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$OUT" "$GPU_PROBE_WORK"

install_stack() {
  if [[ "${GPU_PROBE_CPU:-0}" == 1 ]]; then echo "install: skipped (CPU dry mode, local .venv)"; return; fi
  local t=$(date +%s) how=""
  if compgen -G ".whl/*.whl" >/dev/null; then
    if timeout -k 5 150 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl; then
      how="pip --target from .whl ($(ls .whl/*.whl | wc -l) wheels)"
    else
      echo "pip install failed (rc $?); unzipping the wheels instead"
      mkdir -p "$SITE"
      timeout -k 5 120 "$PY" -c 'import sys,zipfile
for w in sys.argv[2:]: zipfile.ZipFile(w).extractall(sys.argv[1])' "$SITE" .whl/*.whl && how="unzipped .whl (pip failed)"
    fi
  elif [[ -f .gpu/site.tar.xz ]]; then
    mkdir -p "$SITE"
    if timeout -k 5 120 tar -xJf .gpu/site.tar.xz -C "$SITE"; then how="unpacked .gpu/site.tar.xz"
    else
      timeout -k 5 150 "$PY" -c 'import sys,tarfile; tarfile.open(sys.argv[2]).extractall(sys.argv[1])' "$SITE" \
        .gpu/site.tar.xz && how="unpacked .gpu/site.tar.xz (python tarfile)"
    fi
  fi
  chmod -R u+rwX,go+rX "$SITE" 2>/dev/null
  # the bitsandbytes wheel was slimmed: its loader picks libbitsandbytes_cuda<torch.version.cuda>.so
  if [[ -n "$how" ]]; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    # the carried stack must not break torch itself; if it does, measure with the machine's packages instead
    if ! err=$(timeout -k 5 90 "$PY" -c 'import torch, transformers, peft; print("import check ok:", torch.__version__, transformers.__version__, peft.__version__)' 2>&1); then
      echo "IMPORT CHECK FAILED with $SITE first on PYTHONPATH:"; echo "$err" | tail -n 15
      export PYTHONPATH="${PYTHONPATH#$SITE}"; export PYTHONPATH="${PYTHONPATH#:}"
      how="$how, BUT torch/transformers/peft failed to import with it: ran on the machine's packages"
    else
      echo "$err" | tail -n 1
    fi
  fi
  export GPU_PROBE_INSTALL="${how:-NOTHING INSTALLED (no .whl, no .gpu/site.tar.xz): machine packages} in $(( $(date +%s) - t ))s"
  echo "install: $GPU_PROBE_INSTALL"
}

assemble_gguf() {
  local p1="" p2="" g=/tmp/smollm2.gguf
  for c in /tmp/smollm2.gguf.part1 .gpu/smollm2.gguf.part1; do [[ -f $c ]] && { p1=$c; break; }; done
  for c in .gpu/smollm2.gguf.part2 /tmp/smollm2.gguf.part2; do [[ -f $c ]] && { p2=$c; break; }; done
  if [[ -n "$p1" && -n "$p2" ]]; then
    cat "$p1" "$p2" > "$g"
    local sha; sha=$(sha256sum "$g" | cut -d' ' -f1)
    if [[ "$sha" == "$GGUF_SHA" ]]; then
      export FINETUNE_OFFLINE_GGUF="$g" GPU_PROBE_GGUF="real SmolLM2 GGUF reassembled from $p1 + $p2"
    else
      export GPU_PROBE_GGUF="GGUF reassembled from $p1 + $p2 has the wrong sha256 ($sha): not used"
    fi
  else
    export GPU_PROBE_GGUF="no real GGUF (part1: ${p1:-missing; carry it in an earlier call to /tmp}, part2: ${p2:-missing})"
  fi
  echo "gguf: $GPU_PROBE_GGUF"
}

main() {
  echo "gpu_probe start $(date -u +%FT%TZ) in $PWD, budget ${GPU_PROBE_BUDGET}s, OUT=$OUT"
  [[ "${GPU_PROBE_CPU:-0}" == 1 ]] || timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  install_stack
  assemble_gguf
  timeout 20 "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|trl|datasets|accelerate|huggingface.hub|tokenizers|bitsandbytes|gguf|pyarrow|dill|multiprocess|fsspec|hf.xet|httpx|typer|click|safetensors) ' || true
  local left=$(( GPU_PROBE_T0 + GPU_PROBE_BUDGET - $(date +%s) ))
  (( left < 30 )) && left=30
  PYTHONUNBUFFERED=1 timeout -k 10 $(( left + 15 )) "$PY" bench/prove_cuda.py
  echo "prove_cuda.py exit $? after $(( $(date +%s) - GPU_PROBE_T0 ))s"
}

[[ "${BASH_SOURCE[0]}" == "$0" ]] && main 2>&1 | tee "$OUT/log.txt"  # sourced by bench/device_quality.sh
