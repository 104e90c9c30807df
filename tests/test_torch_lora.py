"""One autograd node per LoRA layer (backends/torch_lora.py): the torch backend's CPU step trains what PEFT's layers
train (loss and gradients to fp32 rounding, under bf16 autocast too), leaves every other kind of layer and call to
PEFT, and steps aside for CPU lanes."""
from __future__ import annotations

import pytest

from tests.test_lanes import captured_step
from tests.test_nonfinite import session, sft_batch


def counting(monkeypatch):
    from backends import torch_lora

    calls = []
    real = torch_lora._FN.apply
    monkeypatch.setattr(torch_lora._FN, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def test_one_node_layers_train_what_peft_layers_train(tiny_model, tokenizer, monkeypatch):
    import torch

    fused, peft = session(tiny_model, tokenizer), session(tiny_model, tokenizer)
    peft._one_node.on = False
    calls = counting(monkeypatch)
    for _ in range(3):  # later steps start from what the first changed: B is no longer zero
        out_f, grads_f = captured_step(fused, sft_batch(tokenizer))
        n = len(calls)
        out_p, grads_p = captured_step(peft, sft_batch(tokenizer))
        assert n > 0 and len(calls) == n  # the first session ran the one-node layers, the second none
        calls.clear()
        assert out_f["tokens"] == out_p["tokens"] and out_f["loss"] == pytest.approx(out_p["loss"], rel=1e-5)
        for a, b in zip(grads_f, grads_p):
            assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(fused.params, peft.params):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def peft_layer(**lora):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Linear(24, 16, bias=False))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"], **lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as after some training: B = 0 would hide A's gradient and the B path
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("autocast", [False, True])
def test_a_layer_matches_peft_in_fp32_and_under_bf16_autocast(autocast, monkeypatch):
    import torch

    from backends.torch_lora import fuse_lora_layers

    model, x = peft_layer(), torch.randn(3, 5, 32)
    switch, results = fuse_lora_layers(model), []
    assert fuse_lora_layers(model) is switch  # taking over twice changes nothing
    calls, ran = counting(monkeypatch), []
    for on in (False, True):
        switch.on = on
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        y.float().square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        ran.append(len(calls))
    (y_peft, g_peft), (y_one, g_one) = results
    assert ran == [0, 2]  # PEFT's layers, then both layers as one node each
    assert y_one.dtype == y_peft.dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = 1e-2 if autocast else 1e-6  # bf16 keeps 8 bits: the two round their products in different places

    def close(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm()) < tol

    assert close(y_one, y_peft)
    for a, b in zip(g_one, g_peft):
        assert a.dtype == torch.float32 and close(a, b)


def test_other_layers_and_calls_stay_with_peft(monkeypatch):
    import torch

    from backends import torch_lora

    for kind in (dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True)):
        model = peft_layer(**kind)
        torch_lora.fuse_lora_layers(model)
        assert not any(hasattr(m, "_one_node") for m in model.modules()), kind
    model, x = peft_layer(), torch.randn(2, 32)
    torch_lora.fuse_lora_layers(model)
    calls = counting(monkeypatch)
    with model.disable_adapter():  # DPO / GRPO reference passes: the base model
        base = model(x)
    assert not calls
    plain = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Linear(24, 16, bias=False))
    plain.load_state_dict({k.replace("base_model.model.", "").replace(".base_layer", ""): v
                           for k, v in model.state_dict().items() if "lora_" not in k})
    assert torch.allclose(base, plain(x))
    model(x)
    assert len(calls) == 2  # both layers, adapters on


def test_steps_in_cpu_lanes_use_pefts_layers_and_switch_back(tiny_model, tokenizer, monkeypatch):
    from finetune.methods import sft

    s = session(tiny_model, tokenizer, lanes=2)
    if s._lanes(sft_batch(tokenizer), 4, sft) is None:
        pytest.skip("lanes share out the cores: this machine has one")
    calls = counting(monkeypatch)
    s.train_step(sft_batch(tokenizer), 4, 1e-2)
    assert not calls and s._one_node.on  # PEFT's C++ backward in lanes; the one-node layers back for what follows
    s.train_step(sft_batch(tokenizer), 1, 1e-2)  # one row at a time: one thread team
    assert calls
