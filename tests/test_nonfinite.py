"""A step whose loss or gradient is inf/NaN is skipped (never applied) and counted; several in a row stop the run
with the last good weights saved. fp16 trains under dynamic loss scaling (GradScaler). Injected on the CPU."""
from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.config import Config
from tests.test_survive import tiny_env
from tests.test_torch_backend import plan


def session(tiny_model, tokenizer, **plan_kw):
    from backends.torch_backend import TorchSession
    from finetune.models import _read_config, info_from_config

    info = info_from_config("finetune/tiny-qwen2", tiny_model, _read_config(tiny_model), is_tiny=True)
    return TorchSession(Config(), plan(max_seq_length=128, **plan_kw), info, tokenizer)


def sft_batch(tokenizer, n=4):
    from finetune.methods import sft
    from finetune.template import Example, encode

    rows = [encode(Example(messages=[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]),
                   tokenizer, 128) for w in ("one", "two", "three", "four")[:n]]
    return sft.make_batch(None, rows, Config(), None)


def lora_values(s):
    return [p.detach().clone() for p in s.params]


def unchanged(s, before) -> bool:
    return all(bool((a == b).all()) for a, b in zip(before, lora_values(s)))


def test_torch_skips_a_step_with_a_nan_loss_and_applies_the_next(tiny_model, tokenizer, monkeypatch):
    from finetune.methods import sft

    s = session(tiny_model, tokenizer)
    real = sft.loss
    monkeypatch.setattr(sft, "loss", lambda *a: (real(*a)[0] * float("nan"), {}))
    before = lora_values(s)
    out = s.train_step(sft_batch(tokenizer), 2, 1e-2)
    assert out["skipped"] == 1 and unchanged(s, before)
    assert all(p.grad is None for p in s.params)  # nothing carried into the next step
    monkeypatch.setattr(sft, "loss", real)
    out = s.train_step(sft_batch(tokenizer), 2, 1e-2)
    assert "skipped" not in out and np.isfinite(out["loss"]) and not unchanged(s, before)


def test_fp16_scales_the_loss_and_an_overflowing_scale_is_lowered_not_counted(tiny_model, tokenizer):
    import torch

    s = session(tiny_model, tokenizer, dtype="fp16")
    assert s.scaler is not None
    s.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # fp32 LoRA grads overflow at this scale
    before = lora_values(s)
    out = s.train_step(sft_batch(tokenizer), 4, 1e-2)
    assert out["skipped"] == 1 and out["scaler_adjust"] == 1 and unchanged(s, before)
    assert s.scaler.get_scale() == 2.0 ** 99
    s.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    out = s.train_step(sft_batch(tokenizer), 4, 1e-2)
    assert "skipped" not in out and not unchanged(s, before)
    assert session(tiny_model, tokenizer, dtype="bf16").scaler is None  # bf16 has fp32's range: no scaling


def test_a_run_whose_gradients_are_never_finite_stops_failed_with_its_adapter(run_env, tmp_path, monkeypatch, capsys):
    """Steps 4.. are all NaN: the run must not end `completed` having learned nothing."""
    from backends.torch_backend import TorchSession
    from finetune import checkpoint, cli, loop

    original, calls = TorchSession.train_step, {"n": 0}

    def poisoned(self, batch, micro_batch, lr):  # what train_step returns for a step it did not apply
        calls["n"] += 1
        if calls["n"] < 4:
            return original(self, batch, micro_batch, lr)
        return {"tokens": sum(r.length for r in batch.sequences), "loss": float("nan"), "grad_norm": float("inf"),
                "skipped": 1}

    monkeypatch.setattr(TorchSession, "train_step", poisoned)
    out = tmp_path / "run"
    for k, v in tiny_env(run_env, out, MAX_STEPS="20", SAVE_STEPS="100").items():
        monkeypatch.setenv(k, v)
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([x for x in err if x.startswith("error:")]) == 1 and "inf/NaN" in err[-1] and "Traceback" not in err[-1]
    run = json.loads((out / "run.json").read_text())  # strict JSON: no NaN slipped in
    assert run["status"] == "failed" and "5 steps in a row" in run["error"]
    assert run["step_reached"] == 3 + loop.NONFINITE_LIMIT and run["skipped_steps"] == loop.NONFINITE_LIMIT
    assert (out / "adapter_model.safetensors").exists()
    assert checkpoint.whole(str(out))[-1][0] == 3 + loop.NONFINITE_LIMIT
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
