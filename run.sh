#!/usr/bin/env bash
# One-click entry point (bash + POSIX tools only: runs on macOS and Linux as shipped).
#   ./run.sh                 fine-tune with defaults (env vars override: BATCH_SIZE=1 MAX_STEPS=50 ./run.sh)
#   ./run.sh test [args]     run the test suite (pytest args pass through)
#   ./run.sh <cmd> [args]    any `finetune` command: doctor, train --dry-run, runs, chat, export, ...
# Relative paths (DATASET, MODEL, OUTPUT_DIR, --config, ...) are relative to where you run it from.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ "${UNSLOTH:-0}" == 1 ]]; then VENV="${VENV:-$ROOT/.venv-unsloth}"; else VENV="${VENV:-$ROOT/.venv}"; fi
[[ "$VENV" = /* ]] || VENV="$ROOT/$VENV"

# (Re)create the environment only when it is missing or what it was built from changed.
stamp_now() { (cd "$ROOT" && cat requirements.txt requirements-unsloth.txt setup_environment.sh pyproject.toml | cksum | cut -d' ' -f1); }
if [[ ! -x "$VENV/bin/python" || ! -f "$VENV/.finetune-stamp" || "$(cat "$VENV/.finetune-stamp")" != "$(stamp_now)" ]]; then
  VENV="$VENV" "$ROOT/setup_environment.sh" >&2  # stdout stays the command's own (e.g. doctor --json)
fi

export HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ "${1:-}" == "test" ]]; then
  shift
  cd "$ROOT"
  exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/python" -m finetune "$@"
