"""Unsloth backend: Unsloth's FastLanguageModel (its fused kernels, 4-bit loading, gradient checkpointing) on CUDA.

Only the model building differs from the torch backend: FastLanguageModel.from_pretrained (4-bit when the plan
asks) and FastLanguageModel.get_peft_model with the same LoRA settings and layers; its for_training / for_inference
switch around generation. unsloth is imported before transformers (train calls `before_transformers` first).
The result is a PEFT model, so the step, the loss masks, evaluation, checkpoints and the saved PEFT adapter are the torch backend's own code
(TorchSession with this builder). Chosen automatically on CUDA when `unsloth` is importable and knows the model
type; `finetune doctor` says why not otherwise. Installed by `UNSLOTH=1 ./setup_environment.sh` into its own
environment (.venv-unsloth) from requirements-unsloth.txt: Unsloth caps transformers/datasets/torch below this
project's pins.
"""
from __future__ import annotations

import importlib.util

from backends.torch_backend import TorchSession
from backends.torch_build import compute_dtype
from finetune.errors import first_line

# Model types Unsloth's FastLanguageModel patches (its README's list, families this project's template serves).
MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "cohere", "granite"}
_IMPORT: dict[str, str | None] = {}  # the one attempt to import unsloth: None = it works, else why not


def import_unsloth() -> str | None:
    """Import unsloth (once): None when it works, else why not. Proving the import, not only that a spec exists,
    keeps a broken install (wrong torch, no GPU driver) from winning auto-selection."""
    if "result" not in _IMPORT:
        try:
            import unsloth  # noqa: F401  (patches transformers, peft and trl as it loads)

            _IMPORT["result"] = None
        except Exception as err:  # an import of a GPU stack fails in many ways; all mean "not usable"
            _IMPORT["result"] = f"unsloth is installed but does not import ({type(err).__name__}: {first_line(err)})"
    return _IMPORT["result"]


def linear_targets(model) -> list[str]:
    """The names PEFT's "all-linear" picks (every linear layer but the output head), so Unsloth adapts exactly
    the layers the torch backend does, whatever the model calls them (qkv_proj, gate_up_proj, ...)."""
    import torch

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head and "." in name})


def unsloth_kwargs(cfg, plan, model) -> tuple[dict, dict]:
    """(from_pretrained kwargs, get_peft_model kwargs without target_modules) for the plan, testable without a GPU."""
    load = {"model_name": model.path, "max_seq_length": plan.max_seq_length, "dtype": compute_dtype(plan),
            "load_in_4bit": plan.quantize == "4bit"}
    peft = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "bias": "none",
            "use_rslora": cfg.lora_scaling == "rslora", "use_dora": cfg.lora_type == "dora", "random_state": cfg.seed,
            "use_gradient_checkpointing": "unsloth" if plan.gradient_checkpointing else False}
    return load, peft


def build_unsloth_model(cfg, plan, model, adapter: str | None):
    from unsloth import FastLanguageModel  # heavy, CUDA only

    load, peft = unsloth_kwargs(cfg, plan, model)
    if adapter:
        load["model_name"] = adapter  # Unsloth loads a PEFT adapter folder on top of its base_model_name_or_path
        built, _ = FastLanguageModel.from_pretrained(**load)
    else:
        built, _ = FastLanguageModel.from_pretrained(**load)
        built = FastLanguageModel.get_peft_model(built, target_modules=linear_targets(built), **peft)
    return training_mode(plan)(built)  # an ADAPTER run keeps the planned checkpointing too


def training_mode(plan):
    """Unsloth's switch back to training: its generate() turns gradient checkpointing off until this is called."""
    from unsloth import FastLanguageModel

    return lambda m: FastLanguageModel.for_training(m, use_gradient_checkpointing=plan.gradient_checkpointing)


def inference_mode(model):
    from unsloth import FastLanguageModel

    return FastLanguageModel.for_inference(model)


class UnslothBackend:
    name = "unsloth"

    def before_transformers(self, hw) -> None:
        if hw.cuda_devices and importlib.util.find_spec("unsloth") is not None:
            import_unsloth()

    def available(self, hw) -> str | None:
        if not hw.cuda_devices:
            return "Unsloth needs an NVIDIA GPU (CUDA)"
        try:
            found = importlib.util.find_spec("unsloth") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return "unsloth is not installed (UNSLOTH=1 ./setup_environment.sh builds .venv-unsloth)"
        return import_unsloth()

    def supports(self, model, method: str) -> str | None:  # every method: the torch backend's step
        if model.model_type not in MODEL_TYPES:
            return f"Unsloth does not patch model type '{model.model_type}'; the torch backend trains it"
        return None

    def device(self, hw) -> str:
        return "cuda"

    def load(self, cfg, plan, model, tokenizer, adapter: str | None = None) -> TorchSession:
        return TorchSession(cfg, plan, model, tokenizer, adapter, builder=build_unsloth_model,
                            modes=(training_mode(plan), inference_mode))


BACKEND = UnslothBackend()
