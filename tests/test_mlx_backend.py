"""The MLX backend for real (mlx[cpu] on Linux): an end-to-end run, its adapters in mlx-lm and PEFT, parity
with PyTorch both ways, DoRA, 4-bit QLoRA, and the backend choice on described Apple hardware.

Parity tolerance: both sides run fp32 on the CPU, so logits may differ only by summation order (observed
max |diff| < 1e-6 on logits of magnitude ~1). LOGIT_ATOL = 1e-4 leaves 100x headroom for kernel noise,
while any convention error (transposed matrix, alpha/r vs scale, missing DoRA magnitude, wrong rope theta)
moves logits by > 1e-2. Every parity test also checks the adapter moves logits by > ADAPTER_EFFECT, so
agreement is not the trivial agreement of two base models.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import backends
from backends.mlx_backend import BACKEND, model_config_overrides
from finetune import data, hardware, plan as planner
from finetune.config import Config
from finetune.errors import UserError
from finetune.hardware import Hardware
from finetune.models import info_from_config
from finetune.template import encode_all
from tests.conftest import ROOT, eval_loss, fit, run_cli

LOGIT_ATOL, ADAPTER_EFFECT = 1e-4, 0.05
APPLE = hardware.detect().apple_silicon  # these tests run here on mlx[cpu]; on a Mac, on the GPU
AUTO_DTYPE = "bf16" if APPLE else "fp32"
PROMPTS = ["Maria Silva, 34, lives in Lisbon.", "The weather changed again today.",
           "<|im_start|>user\nTom (22) lives in Oslo.<|im_end|>\n<|im_start|>assistant\n"]
STEPS = 12
OUTPUT_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run.json", "metrics.jsonl",
                "training_log.txt", "loss.png", "report.md", "mlx/adapters.safetensors", "mlx/adapter_config.json")


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def rows(tokenizer):
    splits = data.load(os.path.join(ROOT, "data", "sample"), 0.1, 42)
    train, _ = encode_all(splits.train[:48], tokenizer, 256)
    val, _ = encode_all(splits.validation[:8], tokenizer, 256)
    return train, val


def info(tiny_model):
    with open(os.path.join(tiny_model, "config.json")) as fh:
        return info_from_config("finetune/tiny-qwen2", tiny_model, json.load(fh), is_tiny=True)


def session(backend_name, tiny_model, tokenizer, train_rows, **cfg):
    """A loaded backend session on the tiny model with a real plan for this machine."""
    defaults = dict(batch_size=4, grad_accum=1, max_steps=3, eval_steps=3, max_seq_length=256)
    cfg = Config(model="finetune/tiny-qwen2", backend=backend_name, **{**defaults, **cfg})
    backend, model = backends.get(backend_name), info(tiny_model)
    hw = hardware.detect()
    mean = sum(len(r.input_ids) for r in train_rows) / len(train_rows)
    plan = planner.make(cfg, hw, model, backend_name, backend.device(hw), len(train_rows), mean)
    return backend.load(cfg, plan, model, tokenizer), plan


def mlx_model(tiny_model, adapter_dir=None):
    """The model as mlx_lm.load builds it (our loader adds only the transformers-5 rope_theta key)."""
    from mlx_lm import load

    model, _ = load(tiny_model, adapter_path=adapter_dir, model_config=model_config_overrides(tiny_model))
    return model


def peft_model(tiny_model, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter_dir).eval()


def mlx_logits(model, ids):
    import mlx.core as mx

    return np.array(model(mx.array([ids])).astype(mx.float32))


def torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


def mlx_greedy(model, ids, n=16):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return until_eos([int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)])


def torch_greedy(model, ids, n=16):
    import torch

    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, pad_token_id=0)  # stops after EOS (the tiny model's <|im_end|>)
    return until_eos(out[0, len(ids):].tolist())


def until_eos(tokens, eos=2):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def assert_parity(tiny_model, tokenizer, mlx_side, torch_side):
    """Same logits (within LOGIT_ATOL) and the same greedy tokens; the adapter must matter."""
    base = mlx_model(tiny_model)
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        a, b = mlx_logits(mlx_side, ids), torch_logits(torch_side, ids)
        assert np.abs(a - mlx_logits(base, ids)).max() > ADAPTER_EFFECT
        worst = max(worst, float(np.abs(a - b).max()))
        assert mlx_greedy(mlx_side, ids) == torch_greedy(torch_side, ids)
    assert worst < LOGIT_ATOL, worst
    print(f"parity: max |logit diff| {worst:.2e} (tolerance {LOGIT_ATOL:g})")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def mlx_run(tmp_path_factory, cache_dir, tiny_model):
    from finetune.config import FIELDS, env_name

    out = str(tmp_path_factory.mktemp("mlx-runs") / "run")
    clean = {k: v for k, v in os.environ.items() if k not in {env_name(n) for n in FIELDS}}  # as conftest's run_env
    env = {**clean, "FINETUNE_CACHE": cache_dir, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "BACKEND": "mlx", "MODEL": "finetune/tiny-qwen2", "MAX_STEPS": str(STEPS), "BATCH_SIZE": "4",
           "GRAD_ACCUM": "1", "EVAL_STEPS": "6", "LOGGING_STEPS": "3", "EVAL_ROWS": "8", "EVAL_GENERATIONS": "2",
           "MAX_NEW_TOKENS": "12", "LEARNING_RATE": "0.001", "OUTPUT_DIR": out}
    result = run_cli([], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_run_writes_every_output(mlx_run):
    out, _ = mlx_run
    for name in OUTPUT_FILES:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "loss.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_json_eval_loss_drops_and_memory_is_measured(mlx_run):
    out, _ = mlx_run
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["status"] == "completed" and run["backend_choice"] == ["mlx: chosen by you"]
    assert (run["plan"]["backend"], run["plan"]["device"], run["plan"]["dtype"]) == ("mlx", "mlx", AUTO_DTYPE)
    before, after = run["evaluation"]["before"]["eval_loss"], run["evaluation"]["after"]["eval_loss"]
    assert after < before - 0.1
    result = run["result"]
    assert result["steps"] == STEPS and result["tokens_per_s"] > 0 and result["tokens_seen"] > STEPS * 4 * 20
    assert 0 < result["peak_memory_gb"] and result["predicted_peak_gb"] > 0
    assert result["extra"]["peak_memory_source"] == "mx.get_peak_memory()"
    assert result["extra"]["memory_limit_gb"] == pytest.approx(run["plan"]["budget_gb"], abs=1e-3)  # MLX capped at the plan
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [6, 12]
    assert [m["step"] for m in metrics if "loss" in m] == [3, 6, 9, 12] and all(m["lr"] > 0 for m in metrics if "lr" in m)
    # the last in-training eval is the same number the after-evaluation reports (same rows, same loss code)
    assert metrics[-1]["eval_loss"] == pytest.approx(after, abs=1e-6)


def test_log_and_report_match_the_torch_backend_format(mlx_run):
    out, result = mlx_run
    log = open(os.path.join(out, "training_log.txt")).read()
    assert f"step {STEPS}/{STEPS}" in log and "tok/s" in log and "ETA" in log and " GB" in log
    assert "backend / device    mlx / mlx" in result.stdout
    assert ("dtype bf16: MLX trains in bf16 on the GPU" if APPLE else "dtype fp32: MLX runs on the CPU") in result.stdout
    report = open(os.path.join(out, "report.md")).read()
    assert "| metric | base model | with adapter |" in report and "| eval loss (per trained token) |" in report
    assert report.count("Base model:") == 2 and report.count("With adapter:") == 2


def test_mlx_adapter_loads_with_mlx_lm(mlx_run, tiny_model, tokenizer):
    from mlx_lm import load
    from mlx_lm.tuner.lora import LoRALinear

    out, _ = mlx_run
    model, _ = load(tiny_model, adapter_path=os.path.join(out, "mlx"))  # exactly what `mlx_lm.generate --adapter-path` does
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    cfg = json.load(open(os.path.join(out, "mlx", "adapter_config.json")))
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"] == {"rank": 16, "scale": 2.0, "dropout": 0.0}


def test_peft_adapter_from_mlx_run_matches_mlx(mlx_run, tiny_model, tokenizer):
    out, _ = mlx_run
    assert_parity(tiny_model, tokenizer, mlx_model(tiny_model, os.path.join(out, "mlx")), peft_model(tiny_model, out))


def test_torch_trained_adapter_converted_to_mlx_matches_peft(tmp_path, tiny_model, tokenizer, rows):
    from finetune import interop

    train, val = rows
    torch_session, _ = session("torch", tiny_model, tokenizer, train, dtype="fp32", learning_rate=5e-3, max_steps=4)
    fit(torch_session, train, 4, 5e-3)
    torch_session.save_adapter(str(tmp_path / "torch"))
    interop.peft_to_mlx(str(tmp_path / "torch"), str(tmp_path / "mlx"))
    assert_parity(tiny_model, tokenizer, mlx_model(tiny_model, str(tmp_path / "mlx")), peft_model(tiny_model, str(tmp_path / "torch")))


def test_eval_loss_agrees_with_torch_on_the_same_masked_rows(tiny_model, tokenizer, rows):
    """Same labels, same shift, same mean over trained tokens: the base model scores identically in both backends."""
    train, val = rows
    mlx_session, _ = session("mlx", tiny_model, tokenizer, train, dtype="fp32")
    torch_session, _ = session("torch", tiny_model, tokenizer, train, dtype="fp32")
    assert eval_loss(mlx_session, val) == pytest.approx(eval_loss(torch_session, val), abs=1e-4)


# ------------------------------------------------------------------------------------------------ DoRA, QLoRA
def test_dora_with_checkpointing_trains_and_converts_exactly(tmp_path, tiny_model, tokenizer, rows):
    from mlx_lm.tuner.dora import DoRALinear

    train, val = rows
    s, plan = session("mlx", tiny_model, tokenizer, train, lora_type="dora", gradient_checkpointing="on",
                      learning_rate=5e-3, dtype="fp32")  # fp32 on Apple silicon too: compared at LOGIT_ATOL below
    layer_call = type(s.model.model.layers[0]).__call__
    before = eval_loss(s, val)
    losses = fit(s, train, 3, 5e-3)
    assert plan.gradient_checkpointing and type(s.model.model.layers[0]).__call__ is layer_call  # mlx-lm's patch undone
    assert isinstance(s.model.model.layers[0].mlp.down_proj, DoRALinear) and losses[-1] > 0
    assert eval_loss(s, val) < before
    s.save_adapter(str(tmp_path))
    assert json.load(open(tmp_path / "mlx" / "adapter_config.json"))["fine_tune_type"] == "dora"
    assert json.load(open(tmp_path / "adapter_config.json"))["use_dora"] is True
    # DoRA after a few steps at lr 5e-3 moves logits less than LoRA at 12 steps: compare on our session's model
    ids = tokenizer(PROMPTS[0])["input_ids"]
    ours, peft = mlx_logits(s.model, ids), torch_logits(peft_model(tiny_model, str(tmp_path)), ids)
    assert np.abs(ours - mlx_logits(mlx_model(tiny_model), ids)).max() > ADAPTER_EFFECT
    print(f"DoRA parity: max |logit diff| {np.abs(ours - peft).max():.2e} (tolerance {LOGIT_ATOL:g})")
    assert np.abs(ours - peft).max() < LOGIT_ATOL
    assert np.abs(mlx_logits(mlx_model(tiny_model, str(tmp_path / "mlx")), ids) - ours).max() < LOGIT_ATOL


def test_qlora_4bit_trains(tmp_path, tiny_model, tokenizer, rows):
    import mlx.nn as nn
    from mlx_lm import load

    train, val = rows
    s, plan = session("mlx", tiny_model, tokenizer, train, quantize="4bit", learning_rate=5e-3)
    assert plan.quantize == "4bit" and not any(r.startswith("warning") for r in plan.reasons)
    assert isinstance(s.model.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)  # LoRA on the 4-bit base
    before = eval_loss(s, val)
    fit(s, train, 3, 5e-3)
    assert s.describe()["quantized_base"] and eval_loss(s, val) < before
    assert isinstance(s.model.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)  # LoRA on the 4-bit base
    s.save_adapter(str(tmp_path))
    load(tiny_model, adapter_path=str(tmp_path / "mlx"))  # the adapter also applies to the 16-bit base


def test_4bit_on_mlx_passes_the_combination_check(run_env, tmp_path):
    env = {**run_env, "BACKEND": "mlx", "MODEL": "finetune/tiny-qwen2", "QUANTIZE": "4bit"}
    result = run_cli(["--dry-run"], env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "quantize 4bit: set by you" in result.stdout and "warning" not in result.stdout


# ------------------------------------------------------------------------------------------------ backend choice
def apple(mlx: bool, chip: str = "Apple M3") -> Hardware:
    packages = {"torch": "2.13.0", **({"mlx": "0.32.4", "mlx-lm": "0.32.2"} if mlx else {})}
    return Hardware(os="Darwin", arch="arm64", chip=chip, ram_total_gb=32, ram_available_gb=20, swap_total_gb=0,
                    disk_free_gb=100, cpu_cores=10, mps_available=True, mlx_available=mlx,
                    mlx_device="gpu" if mlx else None, packages=packages)


def model_of(model_type: str, arch: str):
    return info_from_config("m", None, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                                             model_type=model_type, architectures=[arch]))


QWEN2 = model_of("qwen2", "Qwen2ForCausalLM")
UNSUPPORTED = model_of("not_in_mlx_lm", "NotInMlxLmForCausalLM")


def test_apple_silicon_with_mlx_picks_mlx():
    backend, why = backends.select("auto", apple(mlx=True), QWEN2, "sft")
    assert backend.name == "mlx" and backend.device(apple(mlx=True)) == "mlx" and why == ["mlx: chosen (first usable of mlx, unsloth, torch)"]
    assert backends.select("auto", apple(mlx=True), model_of("mistral", "MistralForCausalLM"), "sft")[0].name == "mlx"


def test_apple_silicon_without_mlx_falls_back_to_torch_mps():
    backend, why = backends.select("auto", apple(mlx=False), QWEN2, "sft")
    assert backend.name == "torch" and backend.device(apple(mlx=False)) == "mps"
    assert why[0].startswith("mlx: skipped, MLX is not installed")


def test_unsupported_architecture_falls_back_to_torch_mps_and_says_so():
    backend, why = backends.select("auto", apple(mlx=True), UNSUPPORTED, "sft")
    assert backend.name == "torch" and backend.device(apple(mlx=True)) == "mps"
    assert "'not_in_mlx_lm'" in why[0] and "not supported by mlx-lm" in why[0] and "BACKEND=torch (PyTorch MPS)" in why[0]
    with pytest.raises(UserError, match=r"BACKEND=mlx cannot run here: .*not supported by mlx-lm.*BACKEND=torch \(PyTorch MPS\)"):
        backends.select("mlx", apple(mlx=True), UNSUPPORTED, "sft")


def test_linux_runs_mlx_only_when_asked():
    linux = Hardware(os="Linux", arch="x86_64", chip="x", ram_total_gb=32, ram_available_gb=30, swap_total_gb=0,
                     disk_free_gb=100, cpu_cores=2, mlx_available=True, mlx_device="cpu",
                     packages={"torch": "2.13.0", "mlx": "0.32.4", "mlx-lm": "0.32.2"})
    backend, why = backends.select("auto", linux, QWEN2, "sft")
    assert backend.name == "torch" and "not the default off Apple silicon" in why[0]
    assert backends.select("mlx", linux, QWEN2, "sft")[0].name == "mlx"
    assert planner.pick_dtype(linux, "mlx", "auto")[0] == "fp32"
    no_mlx = Hardware(**{**linux.__dict__, "mlx_available": False, "mlx_device": None})
    with pytest.raises(UserError, match="BACKEND=mlx cannot run here: MLX is not installed"):
        backends.select("mlx", no_mlx, QWEN2, "sft")
    assert BACKEND.supports(QWEN2, "dpo") is None and BACKEND.supports(QWEN2, "grpo") is None


def test_doctor_reports_mlx_and_its_device(run_env):
    result = run_cli(["doctor"], run_env, timeout=60)
    assert result.returncode == 0
    device = "gpu" if APPLE else "cpu,"  # mlx[cpu] also says which BLAS it gets (test_mlx_blas.py)
    assert f"MLX: available ({device}" in result.stdout and "mlx (usable)" in result.stdout
    assert ("Would train with: mlx" if APPLE else "mlx: skipped, not the default off Apple silicon") in result.stdout


def test_transformers5_rope_parameters_reach_mlx_lm(tmp_path, tiny_model):
    assert model_config_overrides(tiny_model) == {}  # tiny.py writes the top-level key as well
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}))
    assert model_config_overrides(str(tmp_path)) == {"rope_theta": 1e4}  # what transformers 5 writes
    (tmp_path / "config.json").write_text(json.dumps({"rope_theta": 5e5, "rope_parameters": {"rope_theta": 5e5}}))
    assert model_config_overrides(str(tmp_path)) == {}
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}))
    assert model_config_overrides(str(tmp_path)) == {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}


@pytest.mark.parametrize("backend_name", ["mlx", "torch"])
def test_the_first_update_moves_each_weight_by_the_learning_rate_on_both_backends(backend_name, tiny_model, tokenizer,
                                                                                  rows):
    """Adam's first bias-corrected update is lr * g / (|g| + eps): every adapter weight with a gradient moves by
    the learning rate, whatever the gradient's size. MLX's optimizers skip bias correction unless asked, which made
    the MLX backend's early updates 3-6x larger than torch's and diverged at lr 1e-3."""
    from mlx.utils import tree_flatten

    train, _ = rows
    s, _ = session(backend_name, tiny_model, tokenizer, train, dtype="fp32")

    def weights():
        if backend_name == "mlx":
            return {k: np.array(v) for k, v in tree_flatten(s.model.trainable_parameters())}
        return {n: p.detach().float().numpy().copy() for n, p in s.model.named_parameters() if p.requires_grad}

    before = weights()
    lr = 1e-3
    fit(s, train, steps=1, lr=lr)
    moved = np.concatenate([np.abs(after - before[k]).ravel() for k, after in weights().items()])
    assert moved.max() == pytest.approx(lr, rel=1e-3)   # uncorrected: 3.16 x lr
    assert (moved > 0.5 * lr).sum() > 1000             # the LoRA B matrices, which start at zero, all moved
