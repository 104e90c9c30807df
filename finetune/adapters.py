"""ADAPTER=...: start training from an existing adapter (a run directory, a PEFT folder or an mlx-lm folder).

Whatever its format, the backend gets the one it loads: PEFT for torch, mlx-lm for MLX, converted exactly
by finetune.interop into a temp folder when needed. The chain (which run it came from) goes into run.json.
"""
from __future__ import annotations

import json
import os
import shutil
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


# Inputs of the projections whose names every Llama-style model shares: enough to tell an adapter made for another
# model before any weights load (the rest would fail as a size mismatch after the run directory exists).
_INPUT_OF = {"q_proj": "hidden_size", "k_proj": "hidden_size", "v_proj": "hidden_size", "gate_proj": "hidden_size",
             "up_proj": "hidden_size", "down_proj": "intermediate_size"}


def check_fits(start: Start, model) -> None:
    """Refuse an adapter whose layer count or projection sizes do not match `model` (a ModelInfo)."""
    import re

    path = os.path.join(start.peft_dir, interop.PEFT_WEIGHTS) if start.peft_dir else \
        os.path.join(start.mlx_dir, interop.MLX_WEIGHTS)
    for name, shape in interop.read_shapes(path).items():
        layer = re.search(r"layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= model.num_layers:
            raise UserError(f"ADAPTER={start.path} was trained on another model: it has layer {layer.group(1)}, "
                            f"{model.name} has {model.num_layers} layers (base named by the adapter: {start.base_model})")
        proj = next((p for p in _INPUT_OF if f".{p}." in name), None)
        lora_in = shape[1] if "lora_A" in name and len(shape) == 2 else \
            shape[0] if name.endswith("lora_a") and len(shape) == 2 else None
        expected = getattr(model, _INPUT_OF[proj]) if proj else None
        if lora_in is not None and expected is not None and lora_in != expected:
            raise UserError(f"ADAPTER={start.path} was trained on another model: its {proj} takes {lora_in} inputs, "
                            f"{model.name} has {_INPUT_OF[proj]} {expected} (base named by the adapter: "
                            f"{start.base_model})")


def for_backend(start: Start, backend: str, base_ref: str) -> str:
    """The folder the backend loads, converting between formats when the needed one is missing."""
    have, fmt = (start.mlx_dir, "mlx") if backend == "mlx" else (start.peft_dir, "peft")
    if have:
        return have
    out = tempfile.mkdtemp(prefix="finetune-adapter-")
    try:
        interop.convert(start.peft_dir or start.mlx_dir, fmt, out, base_ref)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def drop_converted(start: Start | None, adapter_dir: str | None) -> None:
    """Remove the temp folder `for_backend` converted into, once the backend has loaded it."""
    if start and adapter_dir and adapter_dir not in (start.peft_dir, start.mlx_dir):
        shutil.rmtree(adapter_dir, ignore_errors=True)
