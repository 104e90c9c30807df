"""PyTorch backend: PEFT LoRA / DoRA on CUDA (optionally 4-bit bitsandbytes), MPS or CPU, with our own step.

The step is ours, not a Trainer's (bench/speed.py measures it against TRL's SFTTrainer and a plain loop).
What makes it fast, each measured on SmolLM2-135M on a 2-core CPU (profiles in README "Measured"):
  * no gradient checkpointing unless memory needs it (the planner decides);
  * logits only where a token is trained: the decoder runs on every position, the vocabulary projection
    (the largest activation, and ~20% of a small model's FLOPs) only on the trained ones;
  * on the CPU, bf16 matmuls through autocast with the frozen linear weights stored in bf16 (no cast per
    step; lossless for checkpoints shipped in bf16) while norms, embeddings, the residual stream and LoRA
    stay fp32; eager attention for short rows, where PyTorch's CPU flash kernel is slower;
  * rows arrive already tokenized with their loss mask (finetune.template); a step's micro-batches take its rows
    longest first (less padding; the step's sum is the same). Steps are random draws: grouping rows by length
    across steps (GROUP_BY_LENGTH) was faster but cost held-out loss on mixed data (bench/quality.py);
  * AdamW on the LoRA parameters only, fused kernels.
The loss of each method is in backends/torch_losses.py; the loop, checkpoints and signals in finetune/loop.py.
"""
from __future__ import annotations

import contextlib
import gc
import math
import warnings
import os
import resource
import sys

import numpy as np

from finetune.methods import micro_batches
from finetune.template import IGNORE, pad_batch

SUPPORTED_METHODS = ("sft", "dpo", "grpo")
# Causal LMs whose logits are exactly lm_head(decoder(x)) (plus Gemma's soft-capping, applied below): the
# trained-positions-only fast path is exact for them. Others use the model's own forward.
FAST_PATH_TYPES = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3_text", "smollm3", "olmo2"}
MAX_GRAD_NORM = 1.0
# transformers' own deprecation notices, raised from inside its code, not the user's
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
GRPO_EPSILON = 0.2


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

    def load(self, cfg, plan, model, tokenizer, adapter: str | None = None) -> "TorchSession":
        return TorchSession(cfg, plan, model, tokenizer, adapter)


BACKEND = TorchBackend()


def process_peak_gb() -> float:
    """Peak resident memory of this process (the CPU path's measured peak; includes Python + torch)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)  # bytes on macOS, KiB on Linux


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
    if plan.quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0}  # bitsandbytes places the quantized weights itself
    return kwargs


def lora_kwargs(cfg) -> dict:
    return {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "use_dora": cfg.lora_type == "dora", "target_modules": "all-linear", "task_type": "CAUSAL_LM"}


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
    if "device_map" not in kwargs:
        base.to(plan.device)
    if plan.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=plan.gradient_checkpointing)
    if adapter:  # continue training an existing adapter (its own rank/alpha/targets)
        peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    else:
        peft_model = get_peft_model(base, LoraConfig(**lora_kwargs(cfg)))
    if plan.device == "cpu" and compute_dtype(plan) == torch.bfloat16 and cfg.lora_type == "lora":
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


class TorchSession:
    """A loaded model for training, evaluation and generation. `builder` makes the PEFT model (the Unsloth
    backend passes its own); everything after that is this one path."""

    def __init__(self, cfg, plan, model, tokenizer, adapter: str | None = None, builder=build_peft_model):
        torch = _torch()
        self.cfg, self.plan, self.info, self.tokenizer = cfg, plan, model, tokenizer
        self.device, self.dtype = plan.device, compute_dtype(plan)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if plan.device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(cfg.seed)
        self.model = builder(cfg, plan, model, adapter)
        self.model.peft_config["default"].base_model_name_or_path = model.ref
        self.base = self.model.get_base_model()
        self.fast = model.model_type in FAST_PATH_TYPES
        self.softcap = getattr(self.base.config, "final_logit_softcapping", None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg, plan)
        # fp16's 5-bit exponent underflows small gradients: dynamic loss scaling, as the HF Trainer does.
        self.scaler = torch.amp.GradScaler(self.device) if self.dtype == torch.float16 else None
        self.model.eval()
        self._mps_peak = 0.0

    # ---------------------------------------------------------------- the forward pass that matters
    def _autocast(self):
        torch = _torch()
        on = self.dtype != torch.float32 and self.plan.quantize != "4bit"
        return torch.autocast(self.device if self.device != "mps" else "mps", dtype=self.dtype, enabled=on)

    def _tensors(self, rows):
        torch = _torch()
        ids, labels, mask = pad_batch(rows, self.pad_id)
        full = mask.all()  # no padding: let attention take its causal fast path
        as_t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        return as_t(ids), as_t(labels), (None if full else as_t(mask))

    def trained_logps(self, rows):
        """(log-prob of every trained token, flattened in row order; the row index of each)."""
        torch = _torch()
        ids, labels, mask = self._tensors(rows)
        target = labels[:, 1:]
        where = target != IGNORE
        with self._autocast():
            if self.fast:
                hidden = self.base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = self.base.get_output_embeddings()(hidden[:, :-1][where]).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
            else:
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1][where].float()
        logps = -torch.nn.functional.cross_entropy(logits, target[where], reduction="none")
        rows_idx = torch.arange(len(rows), device=logps.device).unsqueeze(1).expand_as(target)[where]
        return logps, rows_idx

    def token_logps(self, rows, adapter: bool = True) -> list[np.ndarray]:
        """Per row, the log-probs of its trained tokens (no gradient), in batches of the plan's size."""
        torch = _torch()
        self.model.eval()
        out = []
        ctx = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        with torch.no_grad(), ctx:
            for i in range(0, len(rows), self.plan.batch_size):
                chunk = rows[i:i + self.plan.batch_size]
                logps, idx = self.trained_logps(chunk)
                logps, idx = logps.float().cpu().numpy(), idx.cpu().numpy()
                out += [logps[idx == j] for j in range(len(chunk))]
        return out

    # ---------------------------------------------------------------- training
    def train_step(self, batch, micro_batch: int, lr: float) -> dict:
        from backends import torch_losses as losses

        torch = _torch()
        self.model.train()
        stats: dict = {"tokens": 0}
        total = 0.0
        for chunk, extra in micro_batches(batch, micro_batch, self.plan.micro_overhead_tokens):
            logps, rows = self.trained_logps(chunk)
            if batch.method == "sft":
                loss = losses.sft(logps, batch.denominator)
            elif batch.method == "dpo":
                ref = torch.tensor(extra["ref"], dtype=logps.dtype, device=logps.device)
                nll = (torch.tensor(extra["nll"], dtype=logps.dtype, device=logps.device)
                       if self.cfg.rpo_alpha else None)
                loss, s = losses.dpo(logps, rows, len(chunk), ref, self.cfg.beta, batch.denominator, nll)
                _accumulate(stats, s, len(chunk) / 2 / batch.denominator)
            else:
                adv = torch.tensor(extra["advantage"], dtype=logps.dtype, device=logps.device)
                ref = None
                if self.cfg.beta:
                    with torch.no_grad(), self.model.disable_adapter():
                        ref = self.trained_logps(chunk)[0].detach()
                loss, s = losses.grpo(logps, rows, adv, None, ref, self.cfg.beta, GRPO_EPSILON, batch.denominator)
                _accumulate(stats, s, len(logps) / batch.denominator)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
            stats["tokens"] += sum(r.length for r in chunk)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out = {**stats, **batch.stats, "loss": total, "grad_norm": norm}
        finite = math.isfinite(total) and math.isfinite(norm)
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # the scaler itself skips a step whose gradients overflowed
            self.scaler.update()              # ... and lowers its scale
            if not finite and math.isfinite(total) and scale > 1:
                out["scaler_adjust"] = 1      # a loss scale still being found: not counted toward stopping
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out if finite else {**out, "skipped": 1}

    # ---------------------------------------------------------------- generation
    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, num_return: int = 1) -> list[list[int]]:
        """Completions (token ids, up to and including EOS) for each prompt; `num_return` per prompt, in order.
        Greedy when temperature is 0. Prompts are left-padded into batches of the plan's size."""
        torch = _torch()
        self.model.eval()
        eos = self.tokenizer.eos_token_id
        size = max(1, self.plan.batch_size * max(1, self.plan.grad_accum) // num_return)
        sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = []
        with torch.no_grad(), self._autocast():
            for i in range(0, len(prompts), size):
                chunk = prompts[i:i + size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, p in enumerate(chunk):
                    ids[j, width - len(p):], mask[j, width - len(p):] = torch.tensor(p), 1
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          max_new_tokens=max_new_tokens, num_return_sequences=num_return,
                                          pad_token_id=self.pad_id, eos_token_id=eos, **sample)
                for row in gen[:, width:].tolist():
                    out.append(row[: row.index(eos) + 1] if eos in row else row)
        return out

    def stream(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, adapter: bool = True):
        """Token ids of one completion as they are generated (for chat)."""
        import queue
        import threading

        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        torch = _torch()
        tokens: queue.Queue = queue.Queue()
        halt = threading.Event()  # set when the caller stops reading (a stop string, Ctrl-C)

        class Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device)

        class Ids(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() hands the prompt over first
                    self.first = False
                    return
                for t in value.reshape(-1).tolist():
                    tokens.put(t)

            def end(self):
                pass

        sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)

        def run():
            try:
                ctx = contextlib.nullcontext() if adapter else self.model.disable_adapter()
                ids = torch.tensor([prompt], device=self.device)
                with torch.no_grad(), ctx, self._autocast():
                    self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                        pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id,
                                        streamer=Ids(), stopping_criteria=StoppingCriteriaList([Halt()]),
                                        **sample)
            finally:
                tokens.put(None)

        self.model.eval()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            while (token := tokens.get()) is not None:
                yield token
        finally:
            # A generation thread still inside torch when the interpreter exits aborts the process
            # ("terminate called without an active exception"), so stop it and wait.
            halt.set()
            worker.join()

    # ---------------------------------------------------------------- files
    def save_adapter(self, directory: str) -> list[str]:
        """PEFT adapter files into `directory`, each written to a temp name and renamed."""
        import tempfile

        os.makedirs(directory, exist_ok=True)
        files = []
        with tempfile.TemporaryDirectory(dir=directory, prefix=".adapter-") as tmp:
            self.model.save_pretrained(tmp)
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                os.chmod(os.path.join(tmp, name), 0o644)
                os.replace(os.path.join(tmp, name), os.path.join(directory, name))
                files.append(os.path.join(directory, name))
        return files

    def load_adapter_weights(self, directory: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(os.path.join(directory, "adapter_model.safetensors"),
                                                        device=str(self.device)))

    def save_state(self, directory: str) -> None:
        torch = _torch()
        state = {"optimizer": self.optimizer.state_dict()}  # random state: reseeded per step by the loop
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        path = os.path.join(directory, "optimizer.pt")
        torch.save(state, path)
        os.chmod(path, 0o644)

    def load_state(self, directory: str) -> None:
        torch = _torch()
        state = torch.load(os.path.join(directory, "optimizer.pt"), map_location=str(self.device), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def reseed(self, seed: int) -> None:
        """The loop seeds every step from (SEED, step): dropout and GRPO sampling repeat exactly on resume."""
        _torch().manual_seed(seed)

    # ---------------------------------------------------------------- memory
    def describe(self) -> dict:
        """What run.json records about this session beside the loop's numbers."""
        source = {"cuda": "torch.cuda.max_memory_allocated()", "mps": "torch.mps.driver_allocated_memory()"}
        return {"trainable_params": sum(p.numel() for p in self.params), "logits": "trained positions only" if self.fast
                else "full (model forward)", "peak_memory_source": source.get(self.device, "process peak RSS")}

    def peak_memory_gb(self) -> float:
        torch = _torch()
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 1024 ** 3
        if self.device == "mps":
            self._mps_peak = max(self._mps_peak, torch.mps.driver_allocated_memory() / 1024 ** 3)
            return self._mps_peak
        return process_peak_gb()

    def is_oom(self, err: BaseException) -> bool:
        torch = _torch()
        if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
            return True
        text = str(err)
        return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)

    def release_memory(self) -> None:
        torch = _torch()
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        elif self.device == "mps":
            torch.mps.empty_cache()


def cast_frozen_linears(model, dtype) -> None:
    """Store the frozen weight of every LoRA-wrapped linear layer in `dtype`; autocast then uses it as is."""
    torch = _torch()
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, torch.nn.Linear):
            base.to(dtype)


def _accumulate(stats: dict, values: dict, weight: float) -> None:
    for k, v in values.items():
        stats[k] = stats.get(k, 0.0) + v * weight
