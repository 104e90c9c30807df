"""MLX backend: mlx-lm's LoRA / DoRA tuner, on the Apple GPU (Metal) or on the CPU with mlx[cpu] on Linux.

Config, plan, data, the loss mask (finetune.template), evaluation, progress and outputs are shared with every
backend. What is MLX-specific lives here: loading with mlx-lm, 4-bit quantization of the base (QLoRA), MLX's
memory limits, mlx-lm's trainer driven with our batches and our masked loss, and saving the adapter in
mlx-lm's format plus a PEFT copy converted from it (finetune.interop).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from backends import TrainResult
from finetune import interop
from finetune.errors import UserError
from finetune.template import IGNORE, pad_batch

SUPPORTED_METHODS = ("sft",)
FALLBACK = "use BACKEND=torch (PyTorch MPS)"
GB = 2**30
PAD_TO = 32                      # pad widths to multiples of 32, as mlx-lm does: the compiled step sees few shapes
QUANT_GROUP, QUANT_BITS = 64, 4  # mlx-lm's `convert -q` defaults (affine): layers whose width 64 does not divide stay 16-bit


def _mx():
    import mlx.core as mx  # heavy: only when this backend actually runs

    return mx


def mlx_model_type(model) -> str | None:
    """The mlx_lm.models module that would build this model (resolved as mlx_lm.utils._get_classes does), or None."""
    from mlx_lm.utils import MODEL_ARCHITECTURE_REMAPPING, MODEL_REMAPPING

    name = (MODEL_ARCHITECTURE_REMAPPING.get((model.model_type, model.architecture))
            or MODEL_REMAPPING.get(model.model_type, model.model_type))
    try:
        return name if importlib.util.find_spec(f"mlx_lm.models.{name}") else None
    except (ImportError, ValueError):
        return None


def model_config_overrides(model_path: str) -> dict:
    """config.json keys mlx-lm must be told explicitly. transformers >= 5 writes rope_theta (and any rope
    scaling) inside `rope_parameters`; mlx-lm 0.32 reads only the older top-level keys and otherwise falls
    back to its own default theta (1e6 for Qwen2): a different model from the one PyTorch runs."""
    with open(os.path.join(model_path, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return {}
    out = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


class MLXBackend:
    name = "mlx"

    def available(self, hw) -> str | None:
        if not hw.mlx_available:
            return "MLX is not installed (./setup_environment.sh installs mlx + mlx-lm)"
        if "mlx-lm" not in hw.packages:
            return "mlx-lm is not installed (pip install mlx-lm)"
        return None

    def auto_skip(self, hw) -> str | None:
        """MLX is the default on Apple silicon only; elsewhere it runs when asked for (BACKEND=mlx)."""
        if hw.apple_silicon:
            return None
        return (f"not the default off Apple silicon (MLX would run on the {hw.mlx_device or 'cpu'} here, "
                "where PyTorch is faster); BACKEND=mlx uses it anyway")

    def supports(self, model, method: str) -> str | None:
        if method not in SUPPORTED_METHODS:
            return f"method '{method}' is not implemented by the mlx backend"
        if mlx_model_type(model) is None:
            from importlib.metadata import version

            return (f"model type '{model.model_type}' ({model.architecture}) is not supported by mlx-lm "
                    f"{version('mlx-lm')}; {FALLBACK}")
        return None

    def device(self, hw) -> str:
        return "mlx"

    def load(self, cfg, plan, model, tokenizer) -> "MLXSession":
        return MLXSession(cfg, plan, model, tokenizer)


BACKEND = MLXBackend()


def set_memory_limits(budget_gb: float) -> dict:
    """Keep MLX inside the plan's budget. On Metal also wire that much, so macOS does not page the
    weights out mid-step (mlx-lm's trainer may raise the wired limit to the device's recommended size).
    Returns the limits set, in GB, for run.json."""
    mx = _mx()
    limit, wired = int(budget_gb * GB), None
    if limit <= 0:
        return {"memory_limit_gb": None, "wired_limit_gb": None}
    mx.set_memory_limit(limit)
    if mx.metal.is_available():  # wired memory is a Metal notion; mlx[cpu] has none
        wired = min(limit, mx.device_info().get("max_recommended_working_set_size", limit))
        mx.set_wired_limit(wired)
    return {"memory_limit_gb": limit / GB, "wired_limit_gb": wired / GB if wired else None}


def masked_loss(model, ids, labels):
    """Mean cross-entropy over trained tokens, and their count (the (loss, ntoks) pair mlx-lm's trainer expects).
    Uses our labels, not mlx-lm's prompt-offset mask: a multi-turn chat trains several assistant spans."""
    import mlx.nn as nn

    mx = _mx()
    logits = model(ids[:, :-1]).astype(mx.float32)  # fp32 loss, as the torch path and the planner assume
    targets = labels[:, 1:]
    mask = targets != IGNORE
    ce = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0)) * mask
    ntoks = mask.sum()
    return ce.sum() / ntoks, ntoks


class MLXSession:
    def __init__(self, cfg, plan, model, tokenizer):
        mx = _mx()
        from mlx_lm.utils import load_model, quantize_model

        self.cfg, self.plan, self.info, self.tokenizer = cfg, plan, model, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.limits = set_memory_limits(plan.budget_gb)
        mx.random.seed(cfg.seed)
        try:
            self.model, config = load_model(Path(model.path), model_config=model_config_overrides(model.path))
        except ValueError as err:  # "Model type X not supported." and friends
            raise UserError(f"MODEL={model.name}: mlx-lm cannot load it ({err}); {FALLBACK}") from None
        # Casts floating parameters only; already-packed 4-bit weights keep their integer storage.
        self.model.set_dtype({"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}[plan.dtype])
        self.quantized = "quantization" in config  # an mlx-community 4-bit checkpoint is QLoRA-ready as is
        if plan.quantize == "4bit" and not self.quantized:
            self.model, _ = quantize_model(self.model, config, QUANT_GROUP, QUANT_BITS)
            self.quantized = True
        mx.eval(self.model.parameters())
        self.model.eval()
        self.lora: dict | None = None
        self.tokens_seen = 0

    # ---------------------------------------------------------------- batches, evaluation, generation
    def _arrays(self, rows):
        mx = _mx()
        width = 1 + PAD_TO * max(1, math.ceil((max(len(r.input_ids) for r in rows) - 1) / PAD_TO))
        ids, labels, _ = pad_batch(rows, self.pad_id, width)
        return mx.array(ids.astype(np.int32)), mx.array(labels.astype(np.int32))

    def batches(self, dataset, batch_size, max_seq_length=None, loop=False, seed=None, comm_group=None):
        """mlx-lm's iterate_batches contract over our Encoded rows (already truncated by the template).
        loop=False (evaluation): every row once, in order. loop=True (training): seeded shuffles, epochs
        running into each other so every batch is full; counts the tokens the trainer consumes."""
        if not loop:
            for i in range(0, len(dataset), batch_size):
                yield self._arrays(dataset[i:i + batch_size])
            return
        rng, order = np.random.default_rng(self.cfg.seed), []
        while True:
            while len(order) < batch_size:
                order += rng.permutation(len(dataset)).tolist()
            rows, order = [dataset[i] for i in order[:batch_size]], order[batch_size:]
            self.tokens_seen += sum(len(r.input_ids) for r in rows)  # non-padding inputs, as the torch path counts
            yield self._arrays(rows)

    def eval_loss(self, rows) -> float:
        """Mean cross-entropy per trained token (mlx-lm's evaluate weights each batch by its token count)."""
        from mlx_lm.tuner.trainer import evaluate

        return float(evaluate(self.model, rows, batch_size=self.plan.batch_size, num_batches=-1,
                              max_seq_length=self.plan.max_seq_length, loss=masked_loss, iterate_batches=self.batches))

    def generate(self, prompts, max_new_tokens: int) -> list[list[int]]:
        """Greedy (mlx-lm's default sampler is argmax), stopping after the EOS token as the torch path does."""
        mx = _mx()
        generate_step = importlib.import_module("mlx_lm.generate").generate_step
        self.model.eval()
        out = []
        for prompt in prompts:
            tokens = []
            for token, _ in generate_step(mx.array(prompt), self.model, max_tokens=max_new_tokens):
                tokens.append(int(token))
                if tokens[-1] == self.tokenizer.eos_token_id:
                    break
            out.append(tokens)
        return out

    # ---------------------------------------------------------------- training
    def train(self, train_rows, eval_rows, on_log: Callable[[dict], None]) -> TrainResult:
        mx = _mx()
        import mlx.optimizers as optim
        from mlx.utils import tree_flatten
        from mlx_lm.tuner import trainer as mt
        from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers

        cfg, plan, session, accum = self.cfg, self.plan, self, self.plan.grad_accum
        mx.random.seed(cfg.seed)
        self.model.freeze()
        self.lora = {"rank": cfg.lora_r, "scale": cfg.lora_alpha / cfg.lora_r, "dropout": cfg.lora_dropout}
        layers = self.model.layers
        linear_to_lora_layers(self.model, len(layers), self.lora, use_dora=cfg.lora_type == "dora")
        warmup = int(cfg.warmup_ratio * plan.max_steps)
        # Linear warmup then cosine to 0, counted in optimizer updates: the torch path's "cosine" schedule.
        schedule = build_schedule({"name": "cosine_decay", "warmup": warmup,
                                   "arguments": [cfg.learning_rate, max(1, plan.max_steps - warmup), 0.0]})
        optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.0)  # transformers' default: no decay
        window, losses = [], []

        class Relay(mt.TrainingCallback):
            """mlx-lm reports every micro-batch (steps_per_report=1); this turns that into the torch backend's
            events per optimizer step, and runs the eval at plan.eval_steps (mlx-lm's own val pass runs before
            the step it is due at, and on a batch-rounded subset)."""

            def on_train_loss_report(self, info):
                window.append(info["train_loss"])
                losses.append(info["train_loss"])
                if info["iteration"] % accum:
                    return
                step = info["iteration"] // accum
                base = {"step": step, "tokens": session.tokens_seen}
                on_log({"event": "step", **base, "memory_gb": mx.get_peak_memory() / GB})
                if step % cfg.logging_steps == 0 or step == plan.max_steps:
                    on_log({"event": "log", **base, "loss": sum(window) / len(window),
                            "lr": float(info["learning_rate"])})
                    window.clear()
                if step % plan.eval_steps == 0:
                    eval_loss = session.eval_loss(eval_rows)
                    session.model.train()
                    on_log({"event": "log", **base, "eval_loss": eval_loss})

        class QuietUI(mt.TrainUI):
            """mlx-lm's progress display, silenced (a non-zero rank prints nothing): the shared Progress reports."""

            def __init__(self, total_iters, rank=0):
                super().__init__(total_iters, rank=1)

        layer_cls = type(layers[0])
        layer_call, train_ui = layer_cls.__call__, mt.TrainUI
        mt.TrainUI = QuietUI
        self.tokens_seen = 0
        mx.reset_peak_memory()  # the training peak; the weights are already resident, so they count
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="finetune-mlx-") as scratch:  # mlx-lm saves a final copy here
                args = mt.TrainingArgs(
                    batch_size=plan.batch_size, iters=plan.max_steps * accum, steps_per_report=1,
                    steps_per_save=plan.max_steps * accum + 1, max_seq_length=plan.max_seq_length,
                    adapter_file=os.path.join(scratch, interop.MLX_WEIGHTS),
                    grad_checkpoint=plan.gradient_checkpointing, grad_accumulation_steps=accum)
                mt.train(self.model, optimizer, train_rows, val_dataset=None, args=args, loss=masked_loss,
                         iterate_batches=self.batches, training_callback=Relay())
        finally:
            # grad_checkpoint patches the layer *class*; undo it so other models in this process are untouched
            layer_cls.__call__, mt.TrainUI = layer_call, train_ui
        seconds = time.perf_counter() - start
        self.model.eval()
        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        return TrainResult(train_seconds=seconds, steps=plan.max_steps, tokens_seen=self.tokens_seen,
                           tokens_per_s=self.tokens_seen / seconds if seconds else 0.0,
                           final_train_loss=sum(losses) / len(losses) if losses else None,
                           peak_memory_gb=mx.get_peak_memory() / GB,
                           extra={"trainable_params": trainable, "peak_memory_source": "mx.get_peak_memory()",
                                  "mlx_device": str(mx.default_device()), "quantized_base": self.quantized,
                                  **self.limits})

    def save_adapter(self, run_dir: str) -> list[str]:
        """mlx-lm's adapter in run_dir/mlx (for mlx_lm.load(adapter_path=) / mlx_lm.generate --adapter-path),
        the PEFT adapter converted from it in run_dir, and the tokenizer."""
        if self.lora is None:
            raise RuntimeError("save_adapter() before train(): there is no adapter yet")
        mx = _mx()
        from mlx.utils import tree_flatten
        from mlx_lm.utils import save_config

        mlx_dir = os.path.join(run_dir, "mlx")
        os.makedirs(mlx_dir, exist_ok=True)
        weights = os.path.join(mlx_dir, interop.MLX_WEIGHTS)
        mx.save_safetensors(weights, dict(tree_flatten(self.model.trainable_parameters())))
        base = self.info.path if self.info.is_tiny else self.info.name  # the tiny model has no Hub id
        # fine_tune_type, num_layers and lora_parameters are what mlx_lm's load_adapters reads
        save_config({"fine_tune_type": self.cfg.lora_type, "num_layers": len(self.model.layers),
                     "lora_parameters": self.lora, "model": base, "base_model": base,
                     "quantized_base": self.quantized}, os.path.join(mlx_dir, interop.CONFIG))
        files = interop.mlx_to_peft(mlx_dir, run_dir, base)
        self.tokenizer.save_pretrained(run_dir)
        return files + [weights, os.path.join(mlx_dir, interop.CONFIG)]
