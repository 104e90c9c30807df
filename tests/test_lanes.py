"""CPU lanes (backends/torch_lanes.py): a step's rows in side-by-side threads train what one thread team trains,
the same numbers every time, and leave the process's threads as they were, also when a lane fails."""
from __future__ import annotations

import threading

import pytest

from tests.test_nonfinite import session, sft_batch


def captured_step(s, batch, micro_batch=4, lr=1e-2):
    """Run one step and return (its stats, the gradients it applied)."""
    seen = {}
    zero = s.optimizer.zero_grad

    def capture(set_to_none=True):
        seen["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in s.params]
        zero(set_to_none=set_to_none)

    s.optimizer.zero_grad = capture
    try:
        return s.train_step(batch, micro_batch, lr), seen["grads"]
    finally:
        s.optimizer.zero_grad = zero


def test_two_lanes_train_what_one_thread_team_trains(tiny_model, tokenizer, monkeypatch):
    import torch

    one, two = session(tiny_model, tokenizer, lanes=1), session(tiny_model, tokenizer, lanes=2)
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("lanes share out the cores: this machine has one")
    callers = set()
    real = two.trained_logps
    monkeypatch.setattr(two, "trained_logps", lambda rows: callers.add(threading.get_ident()) or real(rows))
    for step in range(3):  # the second and third steps start from the weights the first updated
        out1, grads1 = captured_step(one, sft_batch(tokenizer))
        out2, grads2 = captured_step(two, sft_batch(tokenizer))
        assert out2["tokens"] == out1["tokens"] and abs(out2["loss"] - out1["loss"]) <= 1e-5 * abs(out1["loss"])
        for a, b in zip(grads1, grads2):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert len(callers) == 2 and threading.get_ident() not in callers  # two lanes, neither the main thread
    assert torch.get_num_threads() == threads  # the main thread's team is back for evaluation and generation


def test_lanes_give_the_same_numbers_every_time(tiny_model, tokenizer):
    """Lanes sum their gradients in lane order, not in the order they finish: two runs are bit-identical."""
    import torch

    runs = [session(tiny_model, tokenizer, lanes=2) for _ in range(2)]
    for _ in range(3):
        grads = [captured_step(s, sft_batch(tokenizer))[1] for s in runs]
        assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert all(torch.equal(a, b) for a, b in zip(runs[0].params, runs[1].params))


def test_a_failing_lane_raises_its_error_after_every_lane_stopped(tiny_model, tokenizer, monkeypatch):
    import torch

    from finetune.methods import sft

    s = session(tiny_model, tokenizer, lanes=2)
    threads = torch.get_num_threads()
    real, calls, finished, lock = sft.loss, [], [], threading.Lock()

    def loss(*args):
        with lock:
            calls.append(threading.get_ident())
            first = len(calls) == 1
        if first:  # the first lane to get here fails...
            raise RuntimeError("can't allocate memory: lane test")
        out = real(*args)
        finished.append(threading.get_ident())  # ...the other finishes its share
        return out

    batch = sft_batch(tokenizer)
    monkeypatch.setattr(sft, "loss", loss)
    with pytest.raises(RuntimeError, match="lane test") as err:
        s.train_step(batch, 4, 1e-2)
    assert s.is_oom(err.value) and finished  # the loop's out-of-memory handling sees the lane's own error
    assert torch.get_num_threads() == threads
    assert all(p.grad is None for p in s.params)  # nothing half-summed is left for the next step


def test_lanes_are_not_used_where_they_cannot_be_exact(tiny_model, tokenizer):
    """One row at a time, one item in the step, a reference pass, or CPU_LANES=1: one thread team."""
    from types import SimpleNamespace

    from finetune.methods import sft

    s = session(tiny_model, tokenizer, lanes=2)
    assert s._lanes(sft_batch(tokenizer), 4, sft) is not None
    assert s._lanes(sft_batch(tokenizer), 1, sft) is None
    assert s._lanes(sft_batch(tokenizer, n=1), 4, sft) is None
    assert session(tiny_model, tokenizer, lanes=1)._lanes(sft_batch(tokenizer), 4, sft) is None
    big = sft_batch(tokenizer)
    big.sequences = [SimpleNamespace(length=400) for _ in big.sequences]  # 1,600 tokens a pass: one team is busy
    assert s._lanes(big, 4, sft) is None and s._lanes(big, 2, sft) is not None  # 800 a pass: lanes
    s.cfg.cpu_lanes = "2"  # set by you: used whatever the size
    assert s._lanes(big, 4, sft) is not None
    s.cfg.cpu_lanes = "auto"
    kl = SimpleNamespace(needs_reference_tokens=lambda cfg: True)  # GRPO's KL: the adapter off for the whole model
    assert s._lanes(sft_batch(tokenizer), 4, kl) is None


def test_lora_on_moe_experts_trains_in_one_thread_team(tiny_model, tokenizer, tmp_path, monkeypatch):
    """PEFT's LoRA on MoE experts (ParamWrapper) adds and removes a parametrization around each forward: two lanes
    would do it under each other (qwen3_moe / mixtral failed that way), so such a model never enters lanes."""
    from backends import torch_lanes
    from backends.torch_backend import TorchSession
    from finetune.config import Config
    from finetune.methods import sft
    from finetune.models import _read_config, info_from_config
    from tests.arch_models import build
    from tests.test_torch_backend import plan

    folder = build("mixtral", tiny_model, str(tmp_path / "mixtral"))
    info = info_from_config(folder, folder, _read_config(folder), source="local")
    s = TorchSession(Config(lora_r=4), plan(max_seq_length=128, lanes=2), info, tokenizer)
    assert any(type(m).__name__ == "ParamWrapper" for m in s.model.modules())  # the experts do carry LoRA
    assert s._lanes(sft_batch(tokenizer), 4, sft) is None
    monkeypatch.setattr(torch_lanes.Lanes, "run", lambda *a, **k: pytest.fail("an MoE-expert step entered lanes"))
    assert s.train_step(sft_batch(tokenizer), 4, 1e-2)["tokens"] > 0
