"""Adapter conversion mlx-lm <-> PEFT (finetune.interop): the conventions, exact round trips through real
PEFT adapters, and a clear refusal for everything that has no exact equivalent."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from finetune import interop
from finetune.errors import UserError
from tests.conftest import run_cli

RANK, SCALE = 4, 2.5
SHAPES = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (128, 64), "mlp.down_proj": (352, 128)}  # (in, out)


def write_mlx(directory, kind="lora", layers=(0, 1), modules=SHAPES, extra=None, config=None) -> dict:
    """A random mlx-lm adapter on disk (layout of mlx_lm/tuner/lora.py: lora_a (in, r), lora_b (r, out))."""
    rng = np.random.default_rng(0)
    weights = {}
    for i in layers:
        for name, (fan_in, fan_out) in modules.items():
            key = f"model.layers.{i}.{name}"
            weights[f"{key}.lora_a"] = rng.normal(size=(fan_in, RANK)).astype(np.float32)
            weights[f"{key}.lora_b"] = rng.normal(size=(RANK, fan_out)).astype(np.float32)
            if kind == "dora":
                weights[f"{key}.m"] = rng.uniform(0.5, 2, size=(fan_out,)).astype(np.float32)
    weights.update(extra or {})
    os.makedirs(directory, exist_ok=True)
    save_file(weights, os.path.join(directory, "adapters.safetensors"))
    cfg = {"fine_tune_type": kind, "num_layers": len(layers), "model": "some/base",
           "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.1}, **(config or {})}
    with open(os.path.join(directory, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh)
    return weights


def read_config(directory) -> dict:
    with open(os.path.join(directory, "adapter_config.json")) as fh:
        return json.load(fh)


def test_mlx_to_peft_transposes_and_turns_scale_into_alpha(tmp_path):
    mlx = write_mlx(tmp_path / "mlx")
    files = interop.mlx_to_peft(str(tmp_path / "mlx"), str(tmp_path / "peft"))
    assert [os.path.basename(f) for f in files] == ["adapter_model.safetensors", "adapter_config.json"]
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.down_proj"
    np.testing.assert_array_equal(peft[f"{key}.lora_A.weight"], mlx["model.layers.1.mlp.down_proj.lora_a"].T)
    np.testing.assert_array_equal(peft[f"{key}.lora_B.weight"], mlx["model.layers.1.mlp.down_proj.lora_b"].T)
    assert peft[f"{key}.lora_A.weight"].shape == (RANK, 352) and len(peft) == 2 * 2 * len(SHAPES)
    cfg = read_config(tmp_path / "peft")
    assert cfg["lora_alpha"] / cfg["r"] == SCALE and cfg["r"] == RANK  # PEFT's scaling = alpha / r
    assert cfg["target_modules"] == ["down_proj", "k_proj", "q_proj"] and cfg["lora_dropout"] == 0.1
    assert cfg["layers_to_transform"] is None and cfg["use_dora"] is False
    assert cfg["base_model_name_or_path"] == "some/base" and cfg["peft_type"] == "LORA"


def test_mlx_adapter_on_the_last_layers_names_them_for_peft(tmp_path):
    write_mlx(tmp_path / "mlx", layers=(2, 3))  # mlx-lm's num_layers=2 on a 4-layer model
    interop.mlx_to_peft(str(tmp_path / "mlx"), str(tmp_path / "peft"), "other/base")
    cfg = read_config(tmp_path / "peft")
    assert cfg["layers_to_transform"] == [2, 3] and cfg["base_model_name_or_path"] == "other/base"


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_round_trip_is_exact(tmp_path, kind):
    original = write_mlx(tmp_path / "mlx", kind=kind)
    interop.mlx_to_peft(str(tmp_path / "mlx"), str(tmp_path / "peft"))
    interop.peft_to_mlx(str(tmp_path / "peft"), str(tmp_path / "back"))
    back = load_file(str(tmp_path / "back" / "adapters.safetensors"))
    assert set(back) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value)
    cfg = read_config(tmp_path / "back")
    assert cfg["fine_tune_type"] == kind and cfg["lora_parameters"]["scale"] == SCALE
    assert cfg["lora_parameters"]["keys"] == sorted(SHAPES) and cfg["lora_parameters"]["rank"] == RANK
    if kind == "dora":
        peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
        np.testing.assert_array_equal(peft["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"],
                                      original["model.layers.0.self_attn.q_proj.m"])


def _peft_adapter(tiny_model, directory, **lora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    # init_lora_weights=False: random A and B, so the adapter really changes the output
    model = get_peft_model(base, LoraConfig(target_modules="all-linear", init_lora_weights=False, **lora)).eval()
    model.save_pretrained(directory)
    return model


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("lora", [dict(r=8, lora_alpha=16), dict(r=8, lora_alpha=16, use_dora=True),
                                  dict(r=4, lora_alpha=8, use_rslora=True)], ids=["lora", "dora", "rslora"])
def test_real_peft_adapter_survives_peft_mlx_peft(tmp_path, tiny_model, tokenizer, lora):
    """A PEFT adapter (as the torch backend or the Hub makes them) -> mlx-lm -> PEFT computes the same function."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original = _peft_adapter(tiny_model, str(tmp_path / "peft"), **lora)
    interop.peft_to_mlx(str(tmp_path / "peft"), str(tmp_path / "mlx"))
    mlx_cfg = read_config(tmp_path / "mlx")
    expected_scale = lora["lora_alpha"] / (lora["r"] ** 0.5 if lora.get("use_rslora") else lora["r"])
    assert mlx_cfg["lora_parameters"]["scale"] == pytest.approx(expected_scale)
    interop.mlx_to_peft(str(tmp_path / "mlx"), str(tmp_path / "back"), tiny_model)
    restored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tmp_path / "back")).eval()
    ids = tokenizer("Maria Silva, 34, lives in Lisbon.")["input_ids"]
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model), ids)
    before, after = _logits(original, ids), _logits(restored, ids)
    assert (before - base).abs().max() > 0.05  # the adapter matters, so equality below means something
    assert (after - before).abs().max() < 1e-5  # rslora: alpha/sqrt(r) re-expressed as alpha'/r, fp32 rounding


def test_bf16_tensors_are_read_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    t = torch.randn(3, 5).to(torch.bfloat16)
    save_torch({"x": t, "y": torch.arange(4, dtype=torch.int64)}, str(tmp_path / "w.safetensors"))
    read = interop.read_safetensors(str(tmp_path / "w.safetensors"))
    np.testing.assert_array_equal(read["x"], t.float().numpy())
    np.testing.assert_array_equal(read["y"], np.arange(4))


@pytest.mark.parametrize("case,message", [
    ("full", "not a LoRA/DoRA adapter"),
    ("embedding", "embedding or MoE-expert"),
    ("switch", "embedding or MoE-expert"),
    ("missing_b", "lacks lora_a or lora_b"),
    ("dora_without_m", "lacks a DoRA magnitude"),
])
def test_mlx_adapters_without_a_peft_equivalent_are_refused(tmp_path, case, message):
    rng = np.random.default_rng(1)
    if case == "full":
        write_mlx(tmp_path / "mlx", config={"fine_tune_type": "full"})
    elif case == "embedding":  # LoRAEmbedding: lora_a is (vocab, r)
        write_mlx(tmp_path / "mlx", extra={"model.embed_tokens.lora_a": rng.normal(size=(100, RANK)).astype(np.float32),
                                           "model.embed_tokens.lora_b": rng.normal(size=(RANK, 8)).astype(np.float32)})
    elif case == "switch":  # LoRASwitchLinear: per-expert 3-D matrices
        write_mlx(tmp_path / "mlx", extra={"model.layers.0.mlp.experts.lora_a": np.zeros((2, RANK, 8), np.float32),
                                           "model.layers.0.mlp.experts.lora_b": np.zeros((2, 8, RANK), np.float32)})
    elif case == "missing_b":
        write_mlx(tmp_path / "mlx", extra={"model.layers.0.mlp.up_proj.lora_a": np.zeros((8, RANK), np.float32)})
    else:
        write_mlx(tmp_path / "mlx", kind="lora", config={"fine_tune_type": "dora"})
    with pytest.raises(UserError, match=message):
        interop.mlx_to_peft(str(tmp_path / "mlx"), str(tmp_path / "peft"))
    assert not (tmp_path / "peft").exists()  # nothing half-written


@pytest.mark.parametrize("change,message", [
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"bias": "all"}, "trained biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "LOHA"}, "is not LoRA"),
])
def test_peft_adapters_without_an_mlx_equivalent_are_refused(tmp_path, change, message):
    write_mlx(tmp_path / "mlx")
    interop.mlx_to_peft(str(tmp_path / "mlx"), str(tmp_path / "peft"))
    cfg = {**read_config(tmp_path / "peft"), **change}
    with open(tmp_path / "peft" / "adapter_config.json", "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(UserError, match=message):
        interop.peft_to_mlx(str(tmp_path / "peft"), str(tmp_path / "out"))


def test_peft_embedding_adapter_is_refused(tmp_path):
    write_mlx(tmp_path / "mlx")
    interop.mlx_to_peft(str(tmp_path / "mlx"), str(tmp_path / "peft"))
    path = str(tmp_path / "peft" / "adapter_model.safetensors")
    save_file({**load_file(path), "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 10), np.float32)}, path)
    with pytest.raises(UserError, match="lora_embedding_A has no mlx-lm equivalent"):
        interop.peft_to_mlx(str(tmp_path / "peft"), str(tmp_path / "out"))


def test_existing_adapter_is_never_overwritten(tmp_path):
    write_mlx(tmp_path / "mlx")
    interop.mlx_to_peft(str(tmp_path / "mlx"), str(tmp_path / "peft"))
    before = (tmp_path / "peft" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        interop.mlx_to_peft(str(tmp_path / "mlx"), str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == before
    with pytest.raises(UserError, match="adapter_config.json is missing"):
        interop.peft_to_mlx(str(tmp_path), str(tmp_path / "x"))


def test_convert_command(tmp_path, run_env):
    original = write_mlx(tmp_path / "mlx", kind="dora")
    result = run_cli(["convert", str(tmp_path / "mlx"), "--to", "peft", "--out", str(tmp_path / "peft"),
                      "--base", "Qwen/Qwen2.5-0.5B-Instruct"], run_env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "adapter_model.safetensors" in result.stdout
    assert read_config(tmp_path / "peft")["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    result = run_cli(["convert", str(tmp_path / "peft"), "--to", "mlx", "--out", str(tmp_path / "back")], run_env, timeout=120)
    assert result.returncode == 0, result.stderr
    back = load_file(str(tmp_path / "back" / "adapters.safetensors"))
    assert all(np.array_equal(back[k], v) for k, v in original.items())
    result = run_cli(["convert", str(tmp_path / "nowhere"), "--to", "mlx", "--out", str(tmp_path / "x")], run_env, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such adapter directory"
