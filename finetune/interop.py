"""Adapter conversion between mlx-lm and PEFT, both ways: pure safetensors + numpy + json (no torch, no mlx).

The two conventions, read from mlx_lm/tuner/{lora,dora}.py and peft/tuners/lora/{layer,dora}.py:

    mlx-lm  y = W x + scale * (x @ lora_a) @ lora_b    lora_a (in, r)          lora_b (r, out)
    PEFT    y = W x + alpha/r * B(A(x))                 lora_A.weight (r, in)   lora_B.weight (out, r)

so lora_A = lora_a.T, lora_B = lora_b.T and lora_alpha = scale * r (scale * sqrt(r) under use_rslora).
DoRA is the same function in both: the adapted output is rescaled per output row by
magnitude / ||W + scale * B A||_row (norm detached); mlx-lm's `m` (out,) and PEFT's
`lora_magnitude_vector` (out,) are that magnitude and copy over unchanged.

Module paths: mlx-lm builds its models with the Hugging Face module names (model.layers.N.self_attn.q_proj
for Llama/Qwen/Mistral/Gemma...), PEFT prefixes them with base_model.model. Anything without an exact
equivalent (embedding or MoE-expert adapters, per-module ranks, trained biases, modules_to_save) is refused
with the reason instead of being written as a silently different adapter.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct

import numpy as np

from finetune.errors import UserError, first_line

MLX_WEIGHTS, PEFT_WEIGHTS, CONFIG = "adapters.safetensors", "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"^(?P<stack>.*\.layers\.(?P<idx>\d+))\.(?P<rel>.+)$")  # <...>.layers.N.<path in layer>
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$")
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_shapes(path: str) -> dict[str, list[int]]:
    """Tensor name -> shape from a .safetensors header alone (no tensor data is read)."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > min(os.path.getsize(path) - 8, 100 << 20):
                raise ValueError
            header = json.loads(fh.read(size))
        return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, struct.error, ValueError, UnicodeDecodeError, TypeError, KeyError, AttributeError):
        raise UserError(f"{path} is not a whole safetensors file (truncated or corrupt); re-create or re-download it") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy. bf16 (which numpy lacks) is widened to fp32, exactly."""
    bad = UserError(f"{path} is not a whole safetensors file (truncated or corrupt); re-create or re-download it")
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > os.path.getsize(path) - 8:
                raise bad
            header, data = json.loads(fh.read(size)), fh.read()
    except (struct.error, ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad from None
        if not 0 <= start <= end <= len(data):
            raise bad
        if info["dtype"] == "BF16":  # bf16 is the top half of an fp32
            arr = (np.frombuffer(data[start:end], "<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _NUMPY:
            arr = np.frombuffer(data[start:end], _NUMPY[info["dtype"]])
        else:
            raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which cannot be converted")
        out[name] = arr.reshape(info["shape"])
    return out


def _write(out_dir: str, weights_name: str, tensors: dict[str, np.ndarray], config: dict,
           overwrite: bool = False) -> list[str]:
    from safetensors.numpy import save_file

    from finetune import fsio

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file; give a directory for the converted adapter")
    files = [os.path.join(out_dir, weights_name), os.path.join(out_dir, CONFIG)]
    taken = [f for f in files if os.path.exists(f)]
    if taken and not overwrite:  # like run directories: an adapter is never overwritten
        raise UserError(f"{taken[0]} already exists; choose another --out directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out_dir} cannot be created: {fsio.describe_os_error(err)}") from None
    # weights first: a config never points at half-written weights
    fsio.write_with(files[0], lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp))
    fsio.write_text(files[1], json.dumps(config, indent=2, sort_keys=True) + "\n")
    return files


def _read_dir(adapter_dir: str, weights_name: str, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
    paths = [os.path.join(adapter_dir, n) for n in (CONFIG, weights_name)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{adapter_dir} is not {kind} adapter directory: {os.path.basename(missing[0])} is missing")
    try:
        with open(paths[0], encoding="utf-8") as fh:
            config = json.load(fh)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{paths[0]} is not valid JSON ({first_line(err, 80)}); fix or re-create it") from None
    if not isinstance(config, dict):
        raise UserError(f"{paths[0]} is not an adapter configuration (expected a JSON object)")
    return config, read_safetensors(paths[1])


# ------------------------------------------------------------------------------------------- mlx -> PEFT
def mlx_to_peft(mlx_adapter_dir: str, out_dir: str, base_model_name_or_path: str | None = None,
                overwrite: bool = False) -> list[str]:
    """Write the PEFT equivalent (adapter_model.safetensors + adapter_config.json) of an mlx-lm adapter."""
    cfg, weights = _read_dir(mlx_adapter_dir, MLX_WEIGHTS, "an mlx-lm")
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise UserError(f"{mlx_adapter_dir}: fine_tune_type '{kind}' is not a LoRA/DoRA adapter; PEFT cannot load it")
    params = cfg.get("lora_parameters")
    try:
        rank, scale = int(params["rank"]), float(params["scale"])
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{os.path.join(mlx_adapter_dir, CONFIG)} has no usable lora_parameters (rank and scale); "
                        "it is not an mlx-lm LoRA adapter config") from None
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, value in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m"):
            raise UserError(f"{mlx_adapter_dir}: {name} is not a LoRA tensor (lora_a, lora_b, m)")
        modules.setdefault(module, {})[leaf] = value
    tensors, targets, layers = {}, set(), set()
    for module, parts in sorted(modules.items()):
        a, b = parts.get("lora_a"), parts.get("lora_b")
        if a is None or b is None:
            raise UserError(f"{mlx_adapter_dir}: {module} lacks lora_a or lora_b")
        if "embed" in module.rsplit(".", 1)[-1] or a.ndim != 2:
            # LoRAEmbedding (lora_a is vocab x r) and LoRASwitchLinear (per-expert 3-D) have other layouts
            raise UserError(f"{mlx_adapter_dir}: {module} is an embedding or MoE-expert adapter; only linear "
                            "layers convert to PEFT exactly")
        if a.shape[1] != rank or b.shape[0] != rank:
            raise UserError(f"{mlx_adapter_dir}: {module} has rank {a.shape[1]}, the config says {rank}")
        key = PEFT_PREFIX + module
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.T, b.T
        if ("m" in parts) != (kind == "dora"):
            raise UserError(f"{mlx_adapter_dir}: {module} {'lacks' if kind == 'dora' else 'has'} a DoRA magnitude "
                            f"'m' but fine_tune_type is {kind}")
        if kind == "dora":
            tensors[f"{key}.lora_magnitude_vector"] = parts["m"]
        targets.add(module.rsplit(".", 1)[-1])
        if match := _LAYER.match(module):
            layers.add(int(match["idx"]))
    # mlx-lm adapts the last `num_layers` blocks; when that is not all of them PEFT must be told which.
    subset = sorted(layers) if layers and min(layers) > 0 else None
    base = base_model_name_or_path or cfg.get("base_model") or cfg.get("model")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
        "lora_alpha": scale * rank, "lora_dropout": float(params.get("dropout", 0.0)), "use_dora": kind == "dora",
        "use_rslora": False, "target_modules": sorted(targets), "layers_to_transform": subset, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    return _write(out_dir, PEFT_WEIGHTS, tensors, config, overwrite)


# ------------------------------------------------------------------------------------------- PEFT -> mlx
def _refuse_unconvertible(peft_dir: str, cfg: dict) -> None:
    checks = [
        (cfg.get("peft_type", "LORA") != "LORA", f"peft_type {cfg.get('peft_type')} is not LoRA"),
        (bool(cfg.get("rank_pattern")) or bool(cfg.get("alpha_pattern")),
         "per-module rank_pattern/alpha_pattern (mlx-lm has one rank and scale per adapter)"),
        (cfg.get("bias", "none") != "none" or bool(cfg.get("lora_bias")), "trained biases (mlx-lm trains none)"),
        (bool(cfg.get("modules_to_save")), "modules_to_save (fully trained modules are not LoRA)"),
        (bool(cfg.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D layers, e.g. GPT-2)"),
        (bool(cfg.get("target_parameters")), "target_parameters (LoRA on raw parameters, e.g. MoE experts)"),
        (bool(cfg.get("trainable_token_indices")) or bool(cfg.get("layer_replication")),
         "trainable_token_indices / layer_replication"),
        (bool(cfg.get("use_qalora")), "QALoRA"),
    ]
    for bad, what in checks:
        if bad:
            raise UserError(f"{peft_dir}: {what} has no mlx-lm equivalent; this adapter cannot be converted exactly")


def peft_to_mlx(peft_dir: str, out_dir: str) -> list[str]:
    """Write the mlx-lm equivalent (adapters.safetensors + adapter_config.json, for mlx_lm.load(adapter_path=))."""
    cfg, weights = _read_dir(peft_dir, PEFT_WEIGHTS, "a PEFT")
    _refuse_unconvertible(peft_dir, cfg)
    try:
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{os.path.join(peft_dir, CONFIG)} has no usable r / lora_alpha; it is not a PEFT LoRA config") from None
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    dora = bool(cfg.get("use_dora"))
    tensors, keys = {}, set()
    for name, value in weights.items():
        match = _PEFT_KEY.match(name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name)
        if not match:  # lora_embedding_A/B, biases, saved modules...
            raise UserError(f"{peft_dir}: {name} has no mlx-lm equivalent (only linear-layer LoRA/DoRA converts)")
        module, kind = match["module"], match["kind"]
        if kind == "lora_magnitude_vector":
            tensors[f"{module}.m"] = value.reshape(-1)
        elif value.ndim != 2:
            raise UserError(f"{peft_dir}: {name} is not a linear-layer LoRA matrix (shape {value.shape})")
        else:
            tensors[f"{module}.{'lora_a' if kind == 'lora_A' else 'lora_b'}"] = value.T
        layer = _LAYER.match(module)
        # mlx-lm names LoRA targets relative to each block ("self_attn.q_proj"), or by full path outside them
        keys.add(layer["rel"] if layer else module)
    for module in {k.rpartition(".")[0] for k in tensors}:
        if f"{module}.lora_a" not in tensors or f"{module}.lora_b" not in tensors or (dora and f"{module}.m" not in tensors):
            raise UserError(f"{peft_dir}: {module} is missing part of its adapter (lora_A, lora_B"
                            f"{', lora_magnitude_vector' if dora else ''})")
    config = {
        "fine_tune_type": "dora" if dora else "lora",
        # -1 = every block. Blocks PEFT left alone get lora_b = 0 (and m = ||W|| for DoRA): an exact no-op.
        "num_layers": -1,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(cfg.get("lora_dropout", 0.0)),
                            "keys": sorted(keys)},
        "base_model": cfg.get("base_model_name_or_path"), "converted_from": "peft",
    }
    return _write(out_dir, MLX_WEIGHTS, tensors, config)


def convert(adapter_dir: str, to: str, out_dir: str, base: str | None = None) -> list[str]:
    """`finetune convert`: an mlx-lm adapter to PEFT, or a PEFT adapter to mlx-lm."""
    if not os.path.isdir(adapter_dir):
        raise UserError(f"{adapter_dir}: no such adapter directory")
    if to == "peft":
        return mlx_to_peft(adapter_dir, out_dir, base)
    if to == "mlx":
        return peft_to_mlx(adapter_dir, out_dir)
    raise UserError(f"--to {to!r} is not valid: choose one of peft, mlx")
