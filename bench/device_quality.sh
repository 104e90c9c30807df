#!/usr/bin/env bash
# bench/quality.py on the lent GPU machine's 16-core CPU (bf16-capable, unlike the AVX2-only dev VM), GPU hidden:
# measures the bf16 CPU path (autocast + bf16 frozen linears) against fp32, the plain fp32 loop and TRL's
# defaults on the real SmolLM2. Carry as for bench/prove_cuda.sh call 2 (after call 1 left part1 in /tmp).
# Env: QUALITY_ARGS (default: the grid at lr 1e-3 with the bf16 ablation), QUALITY_BUDGET (s, default 330).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/prove_cuda.sh
export OUT="${OUT:-$PWD/outputs/device_quality}"
mkdir -p "$OUT"
{
  grep -m1 "model name" /proc/cpuinfo; grep -o -m1 -w "amx_bf16\|avx512_bf16" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
  install_stack
  assemble_gguf
  export CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  timeout -k 5 "${QUALITY_BUDGET:-330}" "$PY" bench/quality.py --results "$OUT/quality.jsonl" \
    ${QUALITY_ARGS:---lrs 1e-3 --variants finetune,finetune+DTYPE=fp32,plain-fp32,trl-defaults}
  echo "quality.py exit $?"
  "$PY" bench/quality.py --results "$OUT/quality.jsonl" --print
} 2>&1 | tee "$OUT/log.txt"
