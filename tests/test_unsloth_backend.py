"""The Unsloth backend's choice and configuration, unit-tested on the CPU; training itself needs a GPU (marked)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import backends
import backends.unsloth_backend as unsloth_backend
from backends.unsloth_backend import BACKEND, linear_targets, unsloth_kwargs
from finetune.config import Config
from finetune.hardware import CudaDevice, Hardware
from finetune.models import info_from_config
from finetune.plan import Plan

QWEN2 = info_from_config("m", "/models/m", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                vocab_size=100, model_type="qwen2"))
GPU = CudaDevice("NVIDIA A10G", 22.0, "8.6", True)
HAS_CUDA = shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def hw(**kw) -> Hardware:
    base = dict(os="Linux", arch="x86_64", chip="x", ram_total_gb=64, ram_available_gb=60, swap_total_gb=0,
                disk_free_gb=100, cpu_cores=8, cuda_devices=[GPU], packages={"torch": "2.13.0"})
    return Hardware(**{**base, **kw})


def test_needs_cuda_and_the_package(monkeypatch):
    assert "needs an NVIDIA GPU" in BACKEND.available(hw(cuda_devices=[]))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "unsloth is not installed" in BACKEND.available(hw())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(unsloth_backend, "_IMPORT", {"result": None})  # as if `import unsloth` worked
    assert BACKEND.available(hw()) is None and BACKEND.device(hw()) == "cuda"


def test_a_broken_install_does_not_win_auto_selection(tmp_path, monkeypatch):
    """A spec that exists is not enough: `import unsloth` must work (here it raises as on a machine without a driver)."""
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text("raise NotImplementedError('Unsloth cannot find any torch accelerator')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(unsloth_backend, "_IMPORT", {})
    why = BACKEND.available(hw())
    assert why.startswith("unsloth is installed but does not import (NotImplementedError: Unsloth cannot find")
    chosen, reasons = backends.select("auto", hw(), QWEN2, "sft")
    assert chosen.name == "torch" and any(r.startswith("unsloth: skipped, unsloth is installed but") for r in reasons)


def test_targets_are_the_layers_peft_all_linear_picks(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    targets = linear_targets(model)
    peft = get_peft_model(model, LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"))
    assert targets == sorted({n.rsplit(".", 1)[-1] for n in peft.targeted_module_names})
    assert "lm_head" not in targets and "q_proj" in targets


def test_generation_switches_modes_and_training_restores_them(tiny_model, tokenizer):
    """Unsloth's generate turns checkpointing off until for_training: the session calls its two switches."""
    from tests.test_nonfinite import sft_batch
    from backends.torch_backend import TorchSession
    from finetune.models import _read_config, info_from_config
    from tests.test_torch_backend import plan

    calls = []
    info = info_from_config("finetune/tiny-qwen2", tiny_model, _read_config(tiny_model), is_tiny=True)
    s = TorchSession(Config(), plan(max_seq_length=128), info, tokenizer,
                     modes=(lambda m: calls.append("train"), lambda m: calls.append("infer")))
    s.generate([[1, 2, 3]], 2)
    s.generate([[1, 2, 3]], 2)
    s.train_step(sft_batch(tokenizer), 2, 1e-3)
    s.train_step(sft_batch(tokenizer), 2, 1e-3)
    s.generate([[1, 2, 3]], 2)
    assert calls == ["infer", "train", "infer"]


def test_unsloth_is_imported_before_transformers(tmp_path, run_env):
    """A GPU that nvidia-smi lists, an unsloth that records what was loaded before it, and a CPU torch: train imports
    unsloth first, then finds torch cannot use the GPU, says why (driver vs wheel) and plans for the CPU."""
    import json

    from tests.conftest import ROOT, run_cli

    bin_dir, pkg = tmp_path / "bin", tmp_path / "pkgs" / "unsloth"
    bin_dir.mkdir()
    pkg.mkdir(parents=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *driver_version*) echo 550.54.15;; *) echo "NVIDIA A10G, 23028, 8.6";; esac\n')
    smi.chmod(0o755)
    marker = tmp_path / "seen.json"
    pkg.joinpath("__init__.py").write_text(
        f"import json, sys\njson.dump('transformers' in sys.modules, open({str(marker)!r}, 'w'))\n")
    env = {**run_env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": f"{tmp_path / 'pkgs'}:{ROOT}",
           "MODEL": "finetune/tiny-qwen2", "BACKEND": "unsloth"}
    done = run_cli(["train", "--dry-run"], env)
    assert json.loads(marker.read_text()) is False  # unsloth came first
    assert done.returncode == 2 and "BACKEND=unsloth cannot run here: Unsloth needs an NVIDIA GPU" in done.stderr
    assert "nvidia-smi lists NVIDIA A10G but the installed torch is a CPU build" in done.stdout
    # an HF Job priced for a GPU stops instead (one line, exit 2), never trains on the CPU at GPU prices
    done = run_cli(["train", "--dry-run"], {**env, "BACKEND": "torch", "FINETUNE_EXPECT_CUDA": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "this job was priced for a GPU, but nvidia-smi lists NVIDIA A10G but the installed torch" in done.stderr


def test_auto_prefers_unsloth_on_cuda_and_says_why_not_otherwise(monkeypatch):
    import importlib.util

    monkeypatch.setattr(unsloth_backend, "_IMPORT", {"result": None})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "unsloth" else real(name))
    chosen, why = backends.select("auto", hw(), QWEN2, "sft")
    assert chosen.name == "unsloth" and why[-1].startswith("unsloth: chosen")
    other = info_from_config("m", None, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             vocab_size=100, model_type="opt"))
    chosen, why = backends.select("auto", hw(), other, "sft")
    assert chosen.name == "torch" and any("Unsloth does not patch model type 'opt'" in w for w in why)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "unsloth" else real(name))
    chosen, why = backends.select("auto", hw(), QWEN2, "sft")
    assert chosen.name == "torch" and any("unsloth: skipped, unsloth is not installed" in w for w in why)


def test_kwargs_follow_the_plan():
    import torch

    plan = Plan(backend="unsloth", device="cuda", method="sft", batch_size=4, grad_accum=2, max_seq_length=512,
                max_steps=10, eval_steps=5, save_steps=5, gradient_checkpointing=True, dtype="bf16", quantize="4bit",
                memory_kind="vram", memory_total_gb=24, budget_gb=21, predicted_peak_gb=9)
    load, peft = unsloth_kwargs(Config(lora_r=8, lora_alpha=16, lora_type="dora", lora_scaling="rslora", seed=3), plan,
                                QWEN2)
    assert load == {"model_name": "/models/m", "max_seq_length": 512, "dtype": torch.bfloat16, "load_in_4bit": True}
    assert peft["r"] == 8 and peft["lora_alpha"] == 16 and peft["use_dora"] and peft["random_state"] == 3
    assert peft["use_rslora"]  # the same scale as the torch and MLX backends (config.lora_scale)
    assert peft["use_gradient_checkpointing"] == "unsloth"


def test_tight_cuda_plans_page_the_optimizer_in_8_bit():
    from finetune import plan as planner

    big = info_from_config("Qwen/Qwen2.5-7B", None, dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                                         num_key_value_heads=4, intermediate_size=18944,
                                                         vocab_size=152064, model_type="qwen2"))
    t4 = hw(cuda_devices=[CudaDevice("Tesla T4", 15.0, "7.5", False)])
    p = planner.make(Config(max_seq_length=1024), t4, big, "torch", "cuda", 1000, 900, 1024)
    assert p.quantize == "4bit" and p.dtype == "fp16"
    roomy = planner.make(Config(max_seq_length=256), hw(cuda_devices=[CudaDevice("NVIDIA A100", 80.0, "8.0", True)]),
                         big, "torch", "cuda", 1000, 200, 256)
    assert roomy.optimizer == "adamw"
    tight = [p for p in (planner.make(Config(max_seq_length=n, batch_size=b), t4, big, "torch", "cuda", 1000, n, n)
                         for n, b in ((1024, 4), (2048, 2))) if p.optimizer == "paged_adamw_8bit"]
    assert tight and any("paged 8-bit AdamW" in r for r in tight[0].reasons)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with unsloth installed")
def test_unsloth_trains_4bit_on_cuda(run_env, tmp_path):
    from tests.conftest import run_cli

    result = run_cli([], {**run_env, "BACKEND": "unsloth", "MODEL": "smollm2-135m-offline", "QUANTIZE": "4bit",
                          "MAX_STEPS": "3", "EVAL_GENERATIONS": "2", "OUTPUT_DIR": str(tmp_path / "u")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(tmp_path / "u" / "adapter_model.safetensors")
