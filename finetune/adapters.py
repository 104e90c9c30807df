"""ADAPTER=...: start training from an existing adapter (a run directory, a PEFT folder or an mlx-lm folder).

Whatever its format, the backend gets the one it loads: PEFT for torch, mlx-lm for MLX, converted exactly
by finetune.interop into a temp folder when needed. The chain (which run it came from) goes into run.json.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from finetune import interop, runs
from finetune.errors import UserError, first_line


@dataclass
class Start:
    path: str                 # what the user gave
    peft_dir: str | None      # folder with adapter_model.safetensors + adapter_config.json
    mlx_dir: str | None       # folder with adapters.safetensors + adapter_config.json
    parent: dict | None       # the parent run's run.json, when ADAPTER is a run directory
    base_model: str | None    # base model the adapter names

    def chain(self) -> dict:
        p = self.parent or {}
        return {"from": os.path.abspath(self.path), "from_run": p.get("run_name"),
                "from_method": (p.get("config") or {}).get("method"), "previous": p.get("chain")}


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"ADAPTER: {path} cannot be read ({first_line(err, 100)})") from None
    if not isinstance(config, dict):
        raise UserError(f"ADAPTER: {path} is not an adapter configuration (expected a JSON object)")
    return config


def find(path: str) -> Start:
    if not os.path.isdir(path):
        raise UserError(f"ADAPTER={path}: folder does not exist; give a run directory or an adapter folder")
    peft = path if os.path.isfile(os.path.join(path, interop.PEFT_WEIGHTS)) else None
    mlx = next((d for d in (os.path.join(path, "mlx"), path) if os.path.isfile(os.path.join(d, interop.MLX_WEIGHTS))), None)
    if not peft and not mlx:
        raise UserError(f"ADAPTER={path}: no adapter here (expected {interop.PEFT_WEIGHTS} or {interop.MLX_WEIGHTS}); "
                        "give a finished run directory")
    config = _read_config(os.path.join(peft or mlx, interop.CONFIG))
    base = config.get("base_model_name_or_path") or config.get("base_model") or config.get("model")
    return Start(path, peft, mlx, runs.read_record(path), base)


def for_backend(start: Start, backend: str, base_ref: str) -> str:
    """The folder the backend loads, converting between formats when the needed one is missing."""
    have, fmt = (start.mlx_dir, "mlx") if backend == "mlx" else (start.peft_dir, "peft")
    if have:
        return have
    out = tempfile.mkdtemp(prefix="finetune-adapter-")
    interop.convert(start.peft_dir or start.mlx_dir, fmt, out, base_ref)
    return out
