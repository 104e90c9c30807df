"""A LoRA linear layer as one autograd node: the torch backend's CPU step (TorchSession, backends/torch_backend.py).

Why: PEFT computes a LoRA layer as five ops (the frozen linear, A, B, the scale, the add), each a node that autograd
records, walks and frees, and whose backward is as many again. On a CPU, one row per step, that bookkeeping is a
tenth of SmolLM2-135M's step: one node per layer made it 1.10x faster on 30-token rows and 1.05x on 338-token rows
(paired steps in one process, bench/lora_node.py). Here the forward is two matmuls into one output
(y = x W^T + s (x A^T) B^T, the scale folded into the small product), the backward three small ones and one large,
and nothing is kept that PEFT does not keep (x, and the rank-r product x A^T).

Not in CPU lanes (backends/torch_lanes.py): this backward is Python, so it holds the GIL that the other lane needs,
and two lanes ran 0.96x with it; the session switches it off for steps in lanes (`Switch`), where PEFT's C++
backward runs. The same math as PEFT's layer, rounded in a different order (tests/test_torch_lora.py). Only plain
LoRA is taken over: a layer with DoRA, dropout, a LoRA bias, a quantized or transposed (fan_in_fan_out) weight, or
more than one active adapter keeps PEFT's forward, and so does any call while adapters are disabled or merged (the
reference passes of DPO / GRPO) or with extra arguments.
"""
from __future__ import annotations

import contextlib
import types


def _torch():
    import torch

    return torch


def _function():
    torch = _torch()

    class LoraLinear(torch.autograd.Function):
        """y = x W^T + b + scale (x A^T) B^T, computed in `dtype` (autocast's, when it is on: what F.linear gives)."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dtype):
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            xa = x2 @ a.t()
            y = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()
            y.addmm_(xa, b.t(), alpha=scale)
            ctx.save_for_backward(x2, xa, w, a, b)
            ctx.scale, ctx.x_dtype, ctx.lead = scale, x.dtype, lead
            ctx.param_dtypes = (lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
            return y.view(*lead, w.shape[0])

        @staticmethod
        def backward(ctx, grad):
            x2, xa, w, a, b = ctx.saved_tensors
            need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
            g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
            g_xa = (g @ b).mul_(ctx.scale)  # the gradient at x A^T, scale included
            grad_x = grad_a = grad_b = grad_bias = None
            if need_x:
                grad_x = (g @ w).addmm_(g_xa, a).view(*ctx.lead, w.shape[1]).to(ctx.x_dtype)
            if need_a:
                grad_a = (g_xa.t() @ x2).to(ctx.param_dtypes[0])
            if need_b:
                grad_b = (g.t() @ xa).mul_(ctx.scale).to(ctx.param_dtypes[1])
            if need_bias:
                grad_bias = g.sum(0).to(ctx.param_dtypes[2])
            return grad_x, None, grad_bias, grad_a, grad_b, None, None

    return LoraLinear


_FN = None


def _plain(module) -> bool:
    """Whether a PEFT LoRA layer is plain LoRA on an unquantized nn.Linear: the only kind taken over."""
    torch = _torch()
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or type(module.base_layer) is not torch.nn.Linear or module.fan_in_fan_out:
        return False
    if not module.base_layer.weight.is_floating_point() or getattr(module, "lora_variant", {}):
        return False
    return all(isinstance(module.lora_dropout[k], torch.nn.Identity) and module.lora_B[k].bias is None
               for k in module.lora_A)


class Switch:
    """Shared by a model's taken-over layers: `on` False sends them all back to PEFT's forward (steps in lanes)."""

    def __init__(self):
        self.on = True

    @contextlib.contextmanager
    def off(self):
        self.on = False
        try:
            yield
        finally:
            self.on = True


def _forward(self, x, *args, **kwargs):
    torch = _torch()
    active = [k for k in self.active_adapters if k in self.lora_A]
    if not self._one_node.on or args or kwargs or self.disable_adapters or self.merged or len(active) != 1 \
            or self.base_layer.weight.requires_grad:
        return self._peft_forward(x, *args, **kwargs)
    key, device = active[0], x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):  # casts done by hand, once, in the function
        return _FN.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[key].weight,
                         self.lora_B[key].weight, self.scaling[key], dtype)


def fuse_lora_layers(model) -> Switch:
    """Give every plain LoRA layer of `model` the one-node forward; returns the switch they share."""
    global _FN
    if _FN is None:
        _FN = _function()
    switch = next((m._one_node for m in model.modules() if hasattr(m, "_one_node")), None) or Switch()  # (again)
    for module in model.modules():
        if _plain(module) and not hasattr(module, "_peft_forward"):
            module._peft_forward, module._one_node = module.forward, switch
            module.forward = types.MethodType(_forward, module)
    return switch
