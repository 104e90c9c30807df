"""Unsloth backend: Unsloth's FastLanguageModel (its fused kernels, 4-bit loading, gradient checkpointing) on CUDA.

Only the model building differs from the torch backend: FastLanguageModel.from_pretrained (4-bit when the plan
asks) and FastLanguageModel.get_peft_model with the same LoRA settings. The result is a PEFT model, so the step,
the loss masks, evaluation, checkpoints and the saved PEFT adapter are the torch backend's own code
(TorchSession with this builder). Chosen automatically on CUDA when `unsloth` is importable and knows the model
type; `finetune doctor` says why not otherwise. Installed by `UNSLOTH=1 ./setup_environment.sh` into its own
environment (.venv-unsloth): Unsloth pins transformers/trl below the versions this project pins.
"""
from __future__ import annotations

import importlib.util

from backends.torch_backend import SUPPORTED_METHODS, TorchSession, compute_dtype

# Model types Unsloth's FastLanguageModel patches (its README's list, families this project's template serves).
MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "cohere", "granite"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # PEFT's all-linear here


def unsloth_kwargs(cfg, plan, model) -> tuple[dict, dict]:
    """(from_pretrained kwargs, get_peft_model kwargs) for the plan, testable without a GPU."""
    load = {"model_name": model.path, "max_seq_length": plan.max_seq_length, "dtype": compute_dtype(plan),
            "load_in_4bit": plan.quantize == "4bit"}
    peft = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "bias": "none",
            "target_modules": TARGETS, "use_dora": cfg.lora_type == "dora", "random_state": cfg.seed,
            "use_gradient_checkpointing": "unsloth" if plan.gradient_checkpointing else False}
    return load, peft


def build_unsloth_model(cfg, plan, model, adapter: str | None):
    from unsloth import FastLanguageModel  # heavy, CUDA only

    load, peft = unsloth_kwargs(cfg, plan, model)
    if adapter:
        load["model_name"] = adapter  # Unsloth loads a PEFT adapter folder on top of its base_model_name_or_path
        built, _ = FastLanguageModel.from_pretrained(**load)
        FastLanguageModel.for_training(built)
        return built
    built, _ = FastLanguageModel.from_pretrained(**load)
    return FastLanguageModel.get_peft_model(built, **peft)


class UnslothBackend:
    name = "unsloth"

    def available(self, hw) -> str | None:
        if not hw.cuda_devices:
            return "Unsloth needs an NVIDIA GPU (CUDA)"
        try:
            found = importlib.util.find_spec("unsloth") is not None
        except (ImportError, ValueError):
            found = False
        return None if found else "unsloth is not installed (UNSLOTH=1 ./setup_environment.sh builds .venv-unsloth)"

    def supports(self, model, method: str) -> str | None:
        if method not in SUPPORTED_METHODS:
            return f"method '{method}' is not implemented by the unsloth backend"
        if model.model_type not in MODEL_TYPES:
            return f"Unsloth does not patch model type '{model.model_type}'; the torch backend trains it"
        return None

    def device(self, hw) -> str:
        return "cuda"

    def load(self, cfg, plan, model, tokenizer, adapter: str | None = None) -> TorchSession:
        return TorchSession(cfg, plan, model, tokenizer, adapter, builder=build_unsloth_model)


BACKEND = UnslothBackend()
