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
  * AdamW on the LoRA parameters only, fused kernels;
  * on a multi-core CPU, a step's rows in two lanes (threads of half the cores each) instead of one thread team:
    a small model's micro-batch leaves a team's other threads waiting between its big matmuls (torch_lanes.py).
Each method's loss is in its module (finetune/methods/), written over backends/torch_ops.py; the loop, checkpoints
and signals are in finetune/loop.py.
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

from finetune import fsio
from finetune.hardware import GB, keep_freed_memory
from finetune.world import World, torchrun_env
from backends.torch_build import build_peft_model, compute_dtype, make_optimizer, repage_optimizer_state
from backends.torch_lora import Switch, fuse_lora_layers
from finetune.methods import micro_batches
from finetune.template import IGNORE, pad_batch

# Causal LMs whose logits are exactly lm_head(decoder(x)) (plus Gemma's soft-capping, applied below): the
# trained-positions-only fast path is exact for them. Others use the model's own forward.
FAST_PATH_TYPES = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3_text", "smollm3", "olmo2"}
MAX_GRAD_NORM = 1.0
# transformers' own deprecation notices, raised from inside its code, not the user's
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)


def _torch():
    import torch  # heavy: only when this backend actually runs

    return torch


class TorchBackend:
    name = "torch"

    def available(self, hw) -> str | None:
        return None if "torch" in hw.packages else "PyTorch is not installed (run ./setup_environment.sh)"

    def supports(self, model, method: str) -> str | None:
        return None  # every method: its loss is written over torch_ops

    def device(self, hw) -> str:
        return "cuda" if hw.cuda_devices else "mps" if hw.mps_available else "cpu"

    def load(self, cfg, plan, model, tokenizer, adapter: str | None = None) -> "TorchSession":
        return TorchSession(cfg, plan, model, tokenizer, adapter)

    def join(self, hw) -> World:
        from backends import torch_dist

        return torch_dist.join(self.device(hw))


BACKEND = TorchBackend()


def process_peak_gb() -> float:
    """Peak resident memory of this process (the CPU path's measured peak; includes Python + torch). On Linux the
    kernel's VmHWM: ru_maxrss survives exec, so a run started from a large parent (a test runner, a notebook)
    would report the parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) * 1024 / GB
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * (1 if sys.platform == "darwin" else 1024) / GB  # ru_maxrss: bytes on macOS, KiB on Linux


class TorchSession:
    """A loaded model for training, evaluation and generation. `builder` makes the PEFT model (the Unsloth
    backend passes its own); everything after that is this one path. `modes`: (to training, to inference) callables
    for a builder whose model must be switched around generation (Unsloth), else None."""

    def __init__(self, cfg, plan, model, tokenizer, adapter: str | None = None, builder=build_peft_model, modes=None):
        torch = _torch()
        self.cfg, self.plan, self.info, self.tokenizer = cfg, plan, model, tokenizer
        self.device, self.dtype = plan.device, compute_dtype(plan)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.world = World()  # train sets the run's processes after joining them (finetune/world.py)
        self.malloc_keeps = False
        if plan.device == "cpu":  # processes of a distributed run share this machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // torchrun_env()[2]))
            self.malloc_keeps = keep_freed_memory()  # activations are reused, not page-faulted back each step
        torch.manual_seed(cfg.seed)
        self.model = builder(cfg, plan, model, adapter)
        self.sharded = getattr(plan, "fsdp", False)  # FSDP: every process runs the same forwards (torch_dist.shard)
        if self.sharded:  # the process group exists: train joined it before loading
            from backends.torch_dist import shard

            shard(self.model)
        self.modes, self.generating = modes, False
        self._lane_pool = None  # CPU lanes' threads, made at the first step that uses them (backends/torch_lanes.py)
        # PEFT's LoRA on MoE experts (ParamWrapper) registers a torch parametrization for the length of each forward
        # and removes it after: two lanes would add and remove it under each other. Such models use one thread team.
        self._lanes_ok = not any(type(m).__name__ == "ParamWrapper" for m in self.model.modules())
        # CPU: each plain LoRA layer one autograd node (backends/torch_lora.py); PEFT's own in lanes and elsewhere
        self._one_node = fuse_lora_layers(self.model) if plan.device == "cpu" and not self.sharded else Switch()
        self.model.peft_config["default"].base_model_name_or_path = model.ref
        self.base = self.model.get_base_model()
        self.fast = model.model_type in FAST_PATH_TYPES
        self.lora_targets = sorted({n.rsplit(".", 1)[-1] for n, m in self.model.named_modules()
                                    if hasattr(m, "lora_A")} - {"base_layer"})  # base_layer: PEFT's nesting, not a module
        experts = getattr(self.base.config, "num_local_experts", None) or getattr(self.base.config, "num_experts", None)
        if experts and "experts" not in self.lora_targets:
            print(f"LoRA targets {', '.join(self.lora_targets)}: PEFT cannot wrap this model's MoE experts, so they stay "
                  "frozen")
        self.softcap = getattr(self.base.config, "final_logit_softcapping", None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg, plan)
        # fp16's 5-bit exponent underflows small gradients: dynamic loss scaling, as the HF Trainer does.
        self.scaler = torch.amp.GradScaler(self.device) if self.dtype == torch.float16 else None
        self.model.eval()
        self._mps_peak = 0.0
        self._cuda_runtime_gb = None
        if self.device == "cuda":  # the peak of training, from here: loading's transients are not the run's
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()  # what the device holds beyond torch's allocator: the context
            self._cuda_runtime_gb = max(0.0, (total - free - torch.cuda.memory_reserved()) / GB)

    # ---------------------------------------------------------------- the forward pass that matters
    def _autocast(self):
        torch = _torch()
        # On for 4-bit too (as the HF Trainer does): prepare_model_for_kbit_training leaves embeddings, norms and
        # lm_head in fp32, and without autocast every activation, attention score and logit would be fp32.
        on = self.dtype != torch.float32
        return torch.autocast(self.device if self.device != "mps" else "mps", dtype=self.dtype, enabled=on)

    def _gathering(self):
        if not self.sharded:
            return contextlib.nullcontext()
        from backends.torch_dist import as_lost

        return as_lost()

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
                hidden = self.base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                logits = self.base.get_output_embeddings()(hidden[:, :-1][where]).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
            else:
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][where].float()
        logps = -torch.nn.functional.cross_entropy(logits, target[where], reduction="none")
        rows_idx = torch.arange(len(rows), device=logps.device).unsqueeze(1).expand_as(target)[where]
        return logps, rows_idx

    def token_logps(self, rows, adapter: bool = True) -> list[np.ndarray]:
        """Per row, the log-probs of its trained tokens (no gradient), in batches of the plan's size."""
        torch = _torch()
        self.model.eval()
        out = []
        ctx = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        with torch.no_grad(), ctx, self._gathering():
            for i in range(0, len(rows), self.plan.batch_size):
                chunk = rows[i:i + self.plan.batch_size]
                logps, idx = self.trained_logps(chunk)
                logps, idx = logps.float().cpu().numpy(), idx.cpu().numpy()
                out += [logps[idx == j] for j in range(len(chunk))]
        return out

    # ---------------------------------------------------------------- training
    def train_step(self, batch, micro_batch: int, lr: float) -> dict:
        """One optimizer step of the batch's method: its loss (finetune/methods) over this backend's ops."""
        from backends import torch_ops as ops
        from finetune import methods

        torch = _torch()
        if self.modes and self.generating:
            self.modes[0](self.model)
            self.generating = False
        self.model.train()
        stats: dict = {"tokens": 0}
        total = 0.0
        method = methods.get(batch.method)
        failed = None

        def loss_of(chunk, extra):
            logps, rows = self.trained_logps(chunk)
            extra = {k: torch.tensor(v, dtype=logps.dtype, device=logps.device) for k, v in extra.items()}
            ref = None
            if method.needs_reference_tokens(self.cfg):
                with torch.no_grad(), self.model.disable_adapter():
                    ref = self.trained_logps(chunk)[0].detach()
            return method.loss(ops, logps, 1.0, rows, len(chunk), extra, ref, self.cfg, batch.denominator)

        lanes = self._lanes(batch, micro_batch, method)
        chunks = [] if lanes else list(micro_batches(batch, micro_batch, self.plan.micro_overhead_tokens))
        real = len(chunks)
        if self.sharded:  # each pass gathers weights from every process: all run as many
            chunks += chunks[-1:] * (self.world.most(real) - real)  # (a repeat of the shortest, its loss x 0)
        try:
            if lanes:  # (CPU, one process: backends/torch_lanes.py)
                with self._one_node.off():
                    grads, total, parts, stats["tokens"] = lanes.run(
                        batch, micro_batch, self.plan.micro_overhead_tokens, loss_of, self.params)
                for param, grad in zip(self.params, grads):
                    param.grad = grad
                stats.update(parts)
            for i, (chunk, extra) in enumerate(chunks):
                loss, parts = loss_of(chunk, extra)
                if i >= real:
                    (loss * 0.0).backward()
                    continue
                for k, v in parts.items():  # each part is a sum over the micro-batch / the step: they add up
                    stats[k] = stats.get(k, 0.0) + float(v)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                total += float(loss.detach())
                stats["tokens"] += sum(r.length for r in chunk)
        except Exception as err:  # noqa: BLE001 -- re-raised below, once the other processes know
            if self.world.size == 1:
                raise
            if self.sharded:  # the others wait inside a gather, not in the step's sum: leave now, they see it fail
                from backends.torch_dist import lost_in

                raise lost_in(err) or err
            failed = err
        if self.world.size > 1:  # every process trained its share of the step: sum gradients and loss parts
            from backends.torch_dist import sum_gradients

            failures, total, tokens = sum_gradients(self.params, [float(failed is not None), total, stats.pop("tokens")])
            self.world.settle_step(failed, failures)  # rank 0 then saves the last whole step (loop.PeerLost)
            stats = {"tokens": tokens, **self.world.sum_parts(stats)}
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

    def _lanes(self, batch, micro_batch: int, method):
        """The planned CPU lanes for this step, or None: one lane's worth of rows, micro-batches big enough to keep
        a thread team busy, LoRA on MoE experts (above), a method whose reference pass switches the adapter off for
        the whole model (not per thread), or fp16's loss scaling keep it in one."""
        from backends.torch_lanes import Lanes, pays

        count = min(getattr(self.plan, "lanes", 1), micro_batch, batch.n_items)
        if count < 2 or not self._lanes_ok or self.world.size > 1 or self.scaler \
                or method.needs_reference_tokens(self.cfg) or (self.cfg.cpu_lanes == "auto" and not pays(batch, micro_batch)):
            return None
        if self._lane_pool is None or self._lane_pool.count != count:
            self._lane_pool = Lanes(count, _torch().get_num_threads())
        return self._lane_pool

    # ---------------------------------------------------------------- generation
    def _to_inference(self) -> None:
        self.model.eval()
        if self.modes and not self.generating:
            self.modes[1](self.model)
            self.generating = True  # the next train_step switches back (with the planned checkpointing)

    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, num_return: int = 1) -> list[list[int]]:
        """Completions (token ids, up to and including EOS) for each prompt; `num_return` per prompt, in order.
        Greedy when temperature is 0. Prompts are left-padded into batches of the plan's size."""
        torch = _torch()
        self._to_inference()
        eos = self.tokenizer.eos_token_id
        size = max(1, self.plan.batch_size * max(1, self.plan.grad_accum) // num_return)
        sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = []
        with torch.no_grad(), self._autocast(), self._gathering():
            for i in range(0, len(prompts), size):
                chunk = prompts[i:i + size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, p in enumerate(chunk):
                    ids[j, width - len(p):], mask[j, width - len(p):] = torch.tensor(p), 1
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          max_new_tokens=max_new_tokens, num_return_sequences=num_return,
                                          pad_token_id=self.pad_id, eos_token_id=eos, **sample,
                                          # FSDP: a process whose rows ended early keeps stepping with the others
                                          synced_gpus=self.sharded)
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

        self._to_inference()
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
            try:
                self.model.save_pretrained(tmp)
            except OSError:
                raise
            except Exception as err:  # safetensors / torch report a full disk as RuntimeError
                raise fsio.WriteError(directory, err) from None
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                fsio.move_into(os.path.join(tmp, name), os.path.join(directory, name))
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
        fsio.write_with(os.path.join(directory, "optimizer.pt"), lambda tmp: torch.save(state, tmp))

    def load_state(self, directory: str) -> None:
        torch = _torch()
        state = torch.load(os.path.join(directory, "optimizer.pt"), map_location=str(self.device), weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        repage_optimizer_state(self.optimizer)
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def reseed(self, seed: int) -> None:
        """The loop seeds every step from (SEED, step): dropout and GRPO sampling repeat exactly on resume."""
        _torch().manual_seed(seed)

    # ---------------------------------------------------------------- memory
    def describe(self) -> dict:
        """What run.json records about this session beside the loop's numbers."""
        source = {"cuda": "torch.cuda.max_memory_allocated()", "mps": "torch.mps.driver_allocated_memory()"}
        out = {"trainable_params": sum(p.numel() for p in self.params), "logits": "trained positions only" if self.fast
               else "full (model forward)", "peak_memory_source": source.get(self.device, "process peak RSS"),
               "attention": self.base.config._attn_implementation,
               # PEFT's all-linear; on MoE types it also wraps transformers 5's fused 3-D expert weights ("experts")
               "lora_targets": self.lora_targets}
        if self.device == "cpu":
            out["malloc_keeps_freed"] = self.malloc_keeps
        if self.sharded:
            from backends.torch_dist import held_share

            out["fsdp_weights_held"] = round(held_share(self.model), 4)  # of the decoder's, on rank 0
        if self.device == "cuda":  # what the caching allocator held at most; with the context, what nvidia-smi shows
            out["peak_reserved_gb"] = round(_torch().cuda.max_memory_reserved() / GB, 3)
            out["cuda_runtime_gb"] = round(self._cuda_runtime_gb, 3)
            out["cuda_alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        return out

    def peak_memory_gb(self) -> float:
        torch = _torch()
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / GB
        if self.device == "mps":
            self._mps_peak = max(self._mps_peak, torch.mps.driver_allocated_memory() / GB)
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
