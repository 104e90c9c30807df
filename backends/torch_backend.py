"""PyTorch backend: TRL SFTTrainer + PEFT LoRA on CUDA (optionally 4-bit bitsandbytes), MPS or CPU.

Rows arrive already tokenized with their loss mask (finetune.template), so TRL's own dataset
preparation is skipped: the mask is computed in one place for every backend.
"""
from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
import warnings
from typing import Callable

from backends import TrainResult
from finetune.template import IGNORE, pad_batch

SUPPORTED_METHODS = ("sft",)
# TRL/PEFT still call transformers' renamed `*gradient_checkpointing*` APIs; the warning is theirs, not the user's.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated and will be removed in v6",
                        category=FutureWarning)


def _torch():
    import torch  # heavy: only when this backend actually runs

    return torch


class TorchBackend:
    name = "torch"

    def available(self, hw) -> str | None:
        return None if "torch" in hw.packages else "PyTorch is not installed (run ./setup_environment.sh)"

    def supports(self, model, method: str) -> str | None:
        return None if method in SUPPORTED_METHODS else f"method '{method}' is not implemented by the torch backend"

    def device(self, hw) -> str:
        return "cuda" if hw.cuda_devices else "mps" if hw.mps_available else "cpu"

    def load(self, cfg, plan, model, tokenizer) -> "TorchSession":
        return TorchSession(cfg, plan, model, tokenizer)


BACKEND = TorchBackend()


def process_peak_gb() -> float:
    """Peak resident memory of this process (the CPU path's measured peak; includes Python + torch)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)  # bytes on macOS, KiB on Linux


def model_load_kwargs(plan) -> dict:
    """from_pretrained kwargs for the plan: dtype of the frozen base, and NF4 4-bit (QLoRA) on CUDA."""
    torch = _torch()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.dtype]
    kwargs = {"dtype": dtype}
    if plan.quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0}  # bitsandbytes places the quantized weights itself
    return kwargs


def lora_kwargs(cfg) -> dict:
    return {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "use_dora": cfg.lora_type == "dora", "target_modules": "all-linear", "task_type": "CAUSAL_LM"}


def trainer_kwargs(cfg, plan) -> dict:
    """SFTConfig for the plan. Rows come pre-tokenized with labels, so TRL's preparation is skipped."""
    return dict(
        output_dir=tempfile.mkdtemp(prefix="finetune-trainer-"),  # no checkpoints are written
        per_device_train_batch_size=plan.batch_size, per_device_eval_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum, max_steps=plan.max_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=int(cfg.warmup_ratio * plan.max_steps),
        logging_steps=cfg.logging_steps, eval_strategy="steps", eval_steps=plan.eval_steps,
        save_strategy="no", report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        run_name=cfg.run_name, project="finetune", trackio_static_space_id=False,  # Trackio: local only
        seed=cfg.seed, data_seed=cfg.seed, bf16=plan.dtype == "bf16", fp16=plan.dtype == "fp16",
        use_cpu=plan.device == "cpu", activation_checkpointing=plan.gradient_checkpointing,  # transformers 5 name
        max_length=plan.max_seq_length, dataset_kwargs={"skip_prepare_dataset": True},
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False,
    )


class TorchSession:
    def __init__(self, cfg, plan, model, tokenizer):
        torch = _torch()
        from transformers import AutoModelForCausalLM

        self.cfg, self.plan, self.tokenizer = cfg, plan, tokenizer
        kwargs = model_load_kwargs(plan)
        torch.manual_seed(cfg.seed)
        self.model = AutoModelForCausalLM.from_pretrained(model.path, **kwargs)
        if "device_map" not in kwargs:
            self.model.to(plan.device)
        self.model.eval()
        self._mps_peak = 0.0

    # ---------------------------------------------------------------- evaluation
    def _batches(self, rows, size):
        torch = _torch()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for i in range(0, len(rows), size):
            yield tuple(torch.from_numpy(a).to(self.plan.device) for a in pad_batch(rows[i:i + size], pad))

    def eval_loss(self, rows) -> float:
        """Mean cross-entropy per trained token (the same tokens the training loss uses)."""
        torch = _torch()
        total, count = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for ids, labels, mask in self._batches(rows, self.plan.batch_size):
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                target = labels[:, 1:]
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum").item()
                count += int((target != IGNORE).sum())
        return total / max(count, 1)

    def generate(self, prompts, max_new_tokens: int) -> list[list[int]]:
        torch = _torch()
        self.model.eval()
        out = []
        with torch.no_grad():
            for prompt in prompts:  # one at a time: no padding side effects, eval sets are small
                ids = torch.tensor([prompt], device=self.plan.device)
                gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=max_new_tokens, temperature=None, top_p=None, top_k=None,
                                          pad_token_id=self.tokenizer.pad_token_id,
                                          eos_token_id=self.tokenizer.eos_token_id)
                out.append(gen[0, len(prompt):].tolist())
        return out

    # ---------------------------------------------------------------- training
    def peak_memory_gb(self) -> float:
        torch = _torch()
        if self.plan.device == "cuda":
            return torch.cuda.max_memory_reserved() / 1024 ** 3
        if self.plan.device == "mps":
            self._mps_peak = max(self._mps_peak, torch.mps.driver_allocated_memory() / 1024 ** 3)
            return self._mps_peak
        return process_peak_gb()

    def train(self, train_rows, eval_rows, on_log: Callable[[dict], None]) -> TrainResult:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer

        cfg, plan, session = self.cfg, self.plan, self
        as_ds = lambda rows: Dataset.from_list([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])  # noqa: E731

        class Relay(TrainerCallback):
            """Forwards Trainer events to the shared progress display / metrics log."""

            def on_step_end(self, args, state, control, **kw):
                on_log({"event": "step", "step": state.global_step, "tokens": state.num_input_tokens_seen,
                        "memory_gb": session.peak_memory_gb()})

            def on_log(self, args, state, control, logs=None, **kw):
                logs = logs or {}
                record = {"step": state.global_step, "tokens": state.num_input_tokens_seen}
                for src, dst in (("loss", "loss"), ("eval_loss", "eval_loss"), ("learning_rate", "lr"),
                                 ("grad_norm", "grad_norm")):
                    if src in logs:
                        record[dst] = float(logs[src])
                if "loss" in record or "eval_loss" in record:
                    on_log({"event": "log", **record})

        args = SFTConfig(**trainer_kwargs(cfg, plan))
        peft_config = LoraConfig(**lora_kwargs(cfg))
        trainer = SFTTrainer(model=self.model, args=args, train_dataset=as_ds(train_rows),
                             eval_dataset=as_ds(eval_rows), processing_class=self.tokenizer,
                             peft_config=peft_config, callbacks=[Relay()])
        trainer.remove_callback(_printer_callback())
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
        self.model = trainer.model
        self.model.eval()
        tokens = int(trainer.state.num_input_tokens_seen)
        return TrainResult(train_seconds=seconds, steps=trainer.state.global_step, tokens_seen=tokens,
                           tokens_per_s=tokens / seconds if seconds else 0.0,
                           final_train_loss=float(output.training_loss), peak_memory_gb=self.peak_memory_gb(),
                           extra={"trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad)})

    def save_adapter(self, run_dir: str) -> list[str]:
        self.model.save_pretrained(run_dir)
        self.tokenizer.save_pretrained(run_dir)
        return [os.path.join(run_dir, n) for n in ("adapter_model.safetensors", "adapter_config.json")]


def _printer_callback():
    from transformers.trainer_callback import PrinterCallback

    return PrinterCallback  # its raw dict printing would duplicate our progress line
