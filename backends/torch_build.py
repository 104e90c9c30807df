"""How the torch backend builds what it trains: from_pretrained's arguments (dtype, device, 4-bit), the PEFT model
with LoRA / DoRA, and the optimizer. Plain builder functions (torchtune's style); TorchSession and the Unsloth backend
call them, and their CPU-testable config logic is unit-tested (tests/test_torch_backend.py)."""
from __future__ import annotations

import os


def _torch():
    import torch  # heavy: only when this backend actually runs

    return torch


def compute_dtype(plan):
    torch = _torch()
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.dtype]


def model_load_kwargs(plan) -> dict:
    """from_pretrained kwargs: frozen weights in fp32 on the CPU (autocast does the bf16 math; the residual
    stream stays fp32), in the compute dtype on GPUs, and NF4 4-bit (QLoRA) on CUDA when planned."""
    torch = _torch()
    dtype = compute_dtype(plan)
    kwargs = {"dtype": torch.float32 if plan.device == "cpu" else dtype,
              "attn_implementation": getattr(plan, "attention", "sdpa")}
    # FSDP: onto the host first, and fully_shard moves each process's shard to its GPU (a whole copy on every GPU is
    # what sharding is there to avoid)
    if (plan.device == "cuda" and not getattr(plan, "fsdp", False)) or plan.quantize == "4bit":
        # Straight onto the device, shard by shard: a 16-bit model never passes through host RAM whole on CUDA,
        # and bitsandbytes places the quantized weights itself (on the CPU too, when 4-bit is asked for there).
        # (one GPU per process: torchrun's LOCAL_RANK, the device torch_dist.join selected; 0 alone)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0)) if plan.device == "cuda" else plan.device}
    if plan.quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return kwargs


def lora_kwargs(cfg) -> dict:
    return {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "use_rslora": cfg.lora_scaling == "rslora", "use_dora": cfg.lora_type == "dora",
            "target_modules": "all-linear", "task_type": "CAUSAL_LM"}


def optimizer_kwargs(plan) -> dict:
    """Fused AdamW where PyTorch has it (CUDA, and CPU since 2.4), else the foreach kernels."""
    return {"fused": True} if plan.device in ("cuda", "cpu") else {"foreach": True}


def build_peft_model(cfg, plan, model, adapter: str | None):
    """The base model with LoRA/DoRA attached (or ADAPTER loaded, trainable), as this backend trains it."""
    torch = _torch()
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise in the run's log
    kwargs = model_load_kwargs(plan)
    base = AutoModelForCausalLM.from_pretrained(model.path, **kwargs)
    if "device_map" not in kwargs and not getattr(plan, "fsdp", False):  # (FSDP: torch_dist.shard places it)
        base.to(plan.device)
    if plan.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=plan.gradient_checkpointing)
    if adapter:  # continue training an existing adapter (its own rank/alpha/targets)
        peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    else:
        peft_model = get_peft_model(base, LoraConfig(**lora_kwargs(cfg)))
    # Not for 4-bit (its layers are nn.Linear subclasses whose weight must stay packed), nor FSDP (it gathers one
    # dtype per unit, and sharding on a CPU is for testing, not speed).
    if plan.device == "cpu" and compute_dtype(plan) == torch.bfloat16 and cfg.lora_type == "lora" \
            and plan.quantize != "4bit" and not getattr(plan, "fsdp", False):
        cast_frozen_linears(peft_model, torch.bfloat16)
    if plan.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    return peft_model


def make_optimizer(params, cfg, plan):
    """AdamW on the LoRA parameters; bitsandbytes' paged 8-bit AdamW when the planner says memory is tight."""
    torch = _torch()
    if getattr(plan, "optimizer", "adamw") == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.learning_rate, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, **optimizer_kwargs(plan))


def repage_optimizer_state(optimizer) -> int:
    """bitsandbytes' load_state_dict brings a paged optimizer's state back as ordinary device tensors, so a resumed
    run would hold in VRAM what the planner chose to page. Re-allocate each parameter-sized state tensor through the
    optimizer's own paged buffer and copy it in; returns how many were moved."""
    if not getattr(optimizer, "is_paged", False):
        return 0
    moved = 0
    for param, values in optimizer.state.items():
        for key, value in list(values.items()):
            if getattr(value, "shape", None) == param.shape and not getattr(value, "is_paged", False):
                buffer = optimizer.get_state_buffer(param, dtype=value.dtype)
                buffer.copy_(value)
                values[key] = buffer
                moved += 1
    return moved


def cast_frozen_linears(model, dtype) -> None:
    """Store the frozen weight of every LoRA-wrapped linear layer in `dtype`; autocast then uses it as is."""
    torch = _torch()
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear):
            base.to(dtype)
