"""MLX backend: LoRA / DoRA with mlx-lm's layers, on the Apple GPU (Metal) or on the CPU with mlx[cpu] on Linux.

Config, plan, data, loss masks, the loop, checkpoints, evaluation and outputs are shared with every backend.
What is MLX-specific lives here: loading with mlx-lm, 4-bit quantization of the base (QLoRA), MLX's memory
limits, and our own compiled step (mlx-lm's trainer saves adapter weights only and computes logits for every
position; ours gathers the trained positions before the vocabulary projection and keeps optimizer state for
checkpoints). Adapters are saved in mlx-lm's format plus a PEFT copy converted exactly (finetune.interop).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from functools import partial
from pathlib import Path

import numpy as np

from backends.mlx_blas import use_openblas
from finetune import interop
from finetune.config import lora_scale
from finetune.errors import UserError, first_line
from finetune.hardware import GB
from finetune.methods import micro_batches
from finetune.template import IGNORE, pad_batch
from finetune.world import World

FALLBACK = "use BACKEND=torch (PyTorch MPS)"
PAD_TO = 32                      # pad widths to multiples of 32, as mlx-lm does: the compiled step sees few shapes
TOKENS_TO = 64                   # gathered trained tokens are padded to a multiple of this, for the same reason
QUANT_GROUP, QUANT_BITS = 64, 4  # mlx-lm's `convert -q` defaults (affine): layers whose width 64 does not divide stay 16-bit
FAST_PATH_TYPES = {"llama", "qwen2", "qwen3", "mistral"}   # logits = lm_head(model.model(x)) exactly
MAX_GRAD_NORM = 1.0

use_openblas()  # before anything imports mlx.core (mlx_model_type imports mlx_lm); see backends/mlx_blas.py


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


# config.json keys transformers 5 renamed or dropped, as mlx-lm 0.32's ModelArgs still names them: {new: old}
RENAMED = {"qwen3_moe": {"num_experts": "num_local_experts"}, "lfm2": {"block_dim": "hidden_size"}}


def model_config_overrides(model_path: str) -> dict:
    """config.json keys mlx-lm must be told explicitly. transformers >= 5 writes rope_theta (and any rope
    scaling) inside `rope_parameters`; mlx-lm 0.32 reads only the older top-level keys and otherwise falls
    back to its own default theta (1e6 for Qwen2): a different model from the one PyTorch runs."""
    with open(os.path.join(model_path, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    out = {new: config[old] for new, old in RENAMED.get(config.get("model_type"), {}).items()
           if new not in config and old in config}
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return out
    out["rope_theta"] = rope["rope_theta"]
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

    def supports(self, model, method: str) -> str | None:  # every method: its loss is written over mlx_ops
        if mlx_model_type(model) is None:
            from importlib.metadata import version

            return (f"model type '{model.model_type}' ({model.architecture}) is not supported by mlx-lm "
                    f"{version('mlx-lm')}; {FALLBACK}")
        return None

    def device(self, hw) -> str:
        return "mlx"

    def load(self, cfg, plan, model, tokenizer, adapter: str | None = None) -> "MLXSession":
        return MLXSession(cfg, plan, model, tokenizer, adapter)

    def join(self, hw):
        from backends import mlx_dist

        return mlx_dist.join()


BACKEND = MLXBackend()


def set_memory_limits(budget_gb: float) -> dict:
    """Keep MLX inside the plan's budget; on Metal also wire that much, so macOS does not page the weights out
    mid-step. Returns the limits set, in GB, for run.json."""
    mx = _mx()
    limit, wired = int(budget_gb * GB), None
    if limit <= 0:
        return {"memory_limit_gb": None, "wired_limit_gb": None}
    mx.set_memory_limit(limit)
    if mx.metal.is_available():  # wired memory is a Metal notion; mlx[cpu] has none
        wired = min(limit, mx.device_info().get("max_recommended_working_set_size", limit))
        mx.set_wired_limit(wired)
    return {"memory_limit_gb": limit / GB, "wired_limit_gb": wired / GB if wired else None}


def lora_parameters(cfg) -> dict:
    return {"rank": cfg.lora_r, "scale": lora_scale(cfg), "dropout": cfg.lora_dropout}


def linear_keys(model) -> tuple[set[str], bool]:
    """The linear layers inside the transformer blocks. mlx-lm's default also wraps MoE experts (SwitchLinear), whose
    LoRA has no PEFT form (PEFT targets transformers 5's fused 3-D expert weights in its own layout), so a run died at
    its first checkpoint; without them every MLX adapter converts. Which modules train is said and recorded."""
    import mlx.nn as nn

    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    keys: set[str] = set()
    experts: set[str] = set()
    for layer in model.layers:
        layer.apply_to_modules(lambda path, m: keys.add(path) if isinstance(m, (nn.Linear, nn.QuantizedLinear)) else
                               experts.add(path) if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)) else None)
    if experts:
        print(f"LoRA on MLX: the MoE experts ({', '.join(sorted(experts))}) are not targeted (their adapter would have "
              "no PEFT form); attention, the router and dense layers are. BACKEND=torch trains the experts too.")
    return keys, bool(experts)


class MLXSession:
    def __init__(self, cfg, plan, model, tokenizer, adapter: str | None = None):
        mx = _mx()
        import mlx.optimizers as optim
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from mlx_lm.utils import load_model, quantize_model

        self.cfg, self.plan, self.info, self.tokenizer = cfg, plan, model, tokenizer
        self.world = World()  # train sets the run's processes after joining them (finetune/world.py)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.limits = set_memory_limits(plan.budget_gb)
        mx.random.seed(cfg.seed)
        try:
            self.model, config = load_model(Path(model.path), model_config=model_config_overrides(model.path))
        except Exception as err:  # noqa: BLE001 -- "Model type X not supported.", a config key its ModelArgs lacks, ...
            raise UserError(f"MODEL={model.name}: mlx-lm cannot load it ({type(err).__name__}: {first_line(err)}); "
                            f"{FALLBACK}") from None
        # Casts floating parameters only; already-packed 4-bit weights keep their integer storage.
        self.model.set_dtype({"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}[plan.dtype])
        self.quantized = "quantization" in config  # an mlx-community 4-bit checkpoint is QLoRA-ready as is
        if plan.quantize == "4bit" and not self.quantized:
            self.model, _ = quantize_model(self.model, config, QUANT_GROUP, QUANT_BITS)
            self.quantized = True
        self.model.freeze()
        self.lora_type, self.lora = cfg.lora_type, lora_parameters(cfg)
        if adapter:  # continue an existing mlx-lm adapter with its own settings
            with open(os.path.join(adapter, interop.CONFIG), encoding="utf-8") as fh:
                saved = json.load(fh)
            self.lora, self.lora_type = saved["lora_parameters"], saved.get("fine_tune_type", "lora")
        keys, has_experts = linear_keys(self.model)
        if has_experts and "keys" not in self.lora:  # only then: a dense model's adapter_config stays mlx-lm's default
            self.lora["keys"] = sorted(keys)
        self.lora_targets = sorted({k.rsplit(".", 1)[-1] for k in self.lora.get("keys", keys)})
        linear_to_lora_layers(self.model, len(self.model.layers), self.lora, use_dora=self.lora_type == "dora")
        if adapter:
            self.model.load_weights(os.path.join(adapter, interop.MLX_WEIGHTS), strict=False)
        self.fast = model.model_type in FAST_PATH_TYPES and hasattr(self.model, "model")
        # As torch's AdamW: no decay, and bias correction, which MLX leaves off by default. Without it the first
        # ~100 updates are 3-6x larger than the learning rate says (1/sqrt(1 - 0.999^t)): at lr 1e-3 on one row per
        # step that diverged (bench/quality.py, *long*: held-out loss 1.18 -> 3.6 where torch reached 0.16).
        self.optimizer = optim.AdamW(learning_rate=cfg.learning_rate, weight_decay=0.0, bias_correction=True)
        mx.eval(self.model.parameters())
        self.model.eval()
        self._steps: dict = {}

    # ---------------------------------------------------------------- the forward pass that matters
    def _head(self, hidden):
        args = getattr(self.model, "args", None)
        if getattr(args, "tie_word_embeddings", False) or not hasattr(self.model, "lm_head"):
            return self.model.model.embed_tokens.as_linear(hidden)
        return self.model.lm_head(hidden)

    def _logps(self, model, ids, b_idx, t_idx, targets):
        """Log-probs of the gathered (row, position) targets; logits only at those positions on the fast path."""
        mx = _mx()
        import mlx.nn as nn

        if self.fast:
            hidden = model.model(ids)
            logits = self._head(hidden[b_idx, t_idx])
        else:
            logits = model(ids)[b_idx, t_idx]
        return -nn.losses.cross_entropy(logits.astype(mx.float32), targets)

    def _arrays(self, rows):
        """ids (B, W) and the trained positions: row index, position, target, weight, padded to a bucket."""
        mx = _mx()
        width = 1 + PAD_TO * max(1, math.ceil((max(r.length for r in rows) - 1) / PAD_TO))
        ids, labels, _ = pad_batch(rows, self.pad_id, width)
        target = labels[:, 1:]
        b_idx, t_idx = np.nonzero(target != IGNORE)
        n = len(b_idx)
        size = TOKENS_TO * max(1, math.ceil(n / TOKENS_TO))
        pad = size - n
        as_i = lambda a: mx.array(np.concatenate([a, np.zeros(pad, a.dtype)]).astype(np.int32))  # noqa: E731
        weights = mx.array(np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]))
        return (mx.array(ids[:, :-1].astype(np.int32)), as_i(b_idx), as_i(t_idx), as_i(target[b_idx, t_idx]),
                weights, n)

    def token_logps(self, rows, adapter: bool = True) -> list[np.ndarray]:
        mx = _mx()
        self.model.eval()
        out = []
        with (contextlib.nullcontext() if adapter else self.adapter_disabled()):
            for i in range(0, len(rows), self.plan.batch_size):
                chunk = rows[i:i + self.plan.batch_size]
                ids, b_idx, t_idx, targets, _, n = self._arrays(chunk)
                logps = self._logps(self.model, ids, b_idx, t_idx, targets)
                mx.eval(logps)
                lp, rows_of = np.array(logps[:n]), np.array(b_idx[:n])
                out += [lp[rows_of == j] for j in range(len(chunk))]
        return out

    @contextlib.contextmanager
    def adapter_disabled(self):
        """The base model: every LoRA/DoRA layer temporarily replaced by the linear it wraps."""
        from mlx.utils import tree_unflatten

        wrapped = [(name, m) for name, m in self.model.named_modules() if hasattr(m, "lora_a")]
        self.model.update_modules(tree_unflatten([(name, m.linear) for name, m in wrapped]))
        try:
            yield
        finally:
            self.model.update_modules(tree_unflatten(wrapped))

    # ---------------------------------------------------------------- training
    @contextlib.contextmanager
    def _checkpointing(self):
        """mlx-lm's grad_checkpoint patches the layer *class*; patch only while our step traces and runs, so
        other models in this process (evaluation, tests) are untouched."""
        if not self.plan.gradient_checkpointing:
            yield
            return
        from mlx_lm.tuner.trainer import grad_checkpoint

        layer_cls = type(self.model.layers[0])
        original = layer_cls.__call__
        grad_checkpoint(self.model.layers[0])
        try:
            yield
        finally:
            layer_cls.__call__ = original

    def _step_fn(self, method_name: str, extra_keys: tuple):
        """value_and_grad of the method's loss, compiled with the model/optimizer/RNG state (as mlx-lm does); one
        per method and set of per-sequence inputs (their names are fixed at trace time)."""
        key = (method_name, extra_keys)
        if key in self._steps:
            return self._steps[key]
        mx = _mx()
        import mlx.nn as nn

        from backends import mlx_ops as ops
        from finetune import methods

        method, cfg = methods.get(method_name), self.cfg

        def loss_fn(model, ids, b_idx, t_idx, targets, weights, denominator, extra, ref_tokens):
            logps = self._logps(model, ids, b_idx, t_idx, targets)
            return method.loss(ops, logps, weights, b_idx, ids.shape[0], dict(zip(extra_keys, extra)),
                               ref_tokens, cfg, denominator)  # (loss, parts): the gradient is of the loss

        value_and_grad = nn.value_and_grad(self.model, loss_fn)
        state = [self.model.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(ids, b_idx, t_idx, targets, weights, denominator, extra, ref_tokens):
            return value_and_grad(self.model, ids, b_idx, t_idx, targets, weights, denominator, extra, ref_tokens)

        self._steps[key] = step
        return step

    def train_step(self, batch, micro_batch: int, lr: float) -> dict:
        """One optimizer step of the batch's method: its loss (finetune/methods) over backends/mlx_ops."""
        mx = _mx()
        import mlx.optimizers as optim
        from mlx.utils import tree_map

        from finetune import methods

        self.model.train()
        keys = tuple(sorted(batch.per_sequence))
        step = self._step_fn(batch.method, keys)
        needs_ref = methods.get(batch.method).needs_reference_tokens(self.cfg)
        grads, total, tokens, stats = None, 0.0, 0, {}
        denominator = mx.array(batch.denominator, dtype=mx.float32)
        failed = None
        try:
            for chunk, extra in micro_batches(batch, micro_batch):
                ids, b_idx, t_idx, targets, weights, n = self._arrays(chunk)
                per_seq = [mx.array(np.asarray(extra[k], np.float32)) for k in keys]
                ref_tokens = mx.zeros_like(weights)  # a fixed input of the compiled step, read only when needed
                if needs_ref:
                    with self.adapter_disabled():
                        ref_tokens = mx.stop_gradient(self._logps(self.model, ids, b_idx, t_idx, targets))
                with self._checkpointing():
                    (loss, parts), g = step(ids, b_idx, t_idx, targets, weights, denominator, per_seq, ref_tokens)
                    grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
                    mx.eval(loss, parts, grads)
                total += float(loss)
                for k, v in parts.items():  # sums over the micro-batch / the step: they add up
                    stats[k] = stats.get(k, 0.0) + float(v)
                tokens += sum(r.length for r in chunk)
        except Exception as err:  # noqa: BLE001 -- re-raised by sum_step, once the other processes know
            if self.world.size == 1:
                raise
            failed = err
        if self.world.size > 1:  # every process trained its share of the step (backends/mlx_dist.py)
            from backends.mlx_dist import sum_step

            grads, total, tokens, stats = sum_step(self.world, grads, self.model.trainable_parameters(), failed,
                                                   total, tokens, stats)
        grads, norm = optim.clip_grad_norm(grads, MAX_GRAD_NORM)
        stats = {**stats, **batch.stats, "loss": total, "tokens": tokens, "grad_norm": float(norm)}
        if not (math.isfinite(total) and math.isfinite(stats["grad_norm"])):
            return {**stats, "skipped": 1}  # never applied: the loop counts it and stops after several in a row
        self.optimizer.learning_rate = lr
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return stats

    # ---------------------------------------------------------------- generation
    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, num_return: int = 1) -> list[list[int]]:
        """Completions (token ids, up to and including EOS), `num_return` per prompt in order; greedy at 0."""
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.sample_utils import make_sampler

        self.model.eval()
        eos = self.tokenizer.eos_token_id
        sampler = make_sampler(temp=temperature) if temperature > 0 else None
        gen = BatchGenerator(self.model, stop_tokens=[[eos]], sampler=sampler, max_tokens=max_new_tokens,
                             completion_batch_size=max(8, self.plan.batch_size))
        expanded = [list(p) for p in prompts for _ in range(num_return)]
        uids = gen.insert(expanded, [max_new_tokens] * len(expanded))
        results = {uid: [] for uid in uids}
        try:
            while responses := gen.next_generated():
                for r in responses:
                    results[r.uid].append(int(r.token) if r.finish_reason != "stop" else eos)
        finally:
            gen.close()
        return [results[uid] for uid in uids]

    def stream(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, adapter: bool = True):
        """Token ids of one completion as they are generated (for chat)."""
        mx = _mx()
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        self.model.eval()
        sampler = make_sampler(temp=temperature) if temperature > 0 else None
        with (contextlib.nullcontext() if adapter else self.adapter_disabled()):
            for token, _ in generate_step(mx.array(prompt), self.model, max_tokens=max_new_tokens, sampler=sampler):
                yield int(token)
                if int(token) == self.tokenizer.eos_token_id:
                    break

    # ---------------------------------------------------------------- files
    def save_adapter(self, directory: str) -> list[str]:
        """mlx-lm's adapter in directory/mlx (mlx_lm.load(adapter_path=) / mlx_lm.generate --adapter-path) and
        the PEFT adapter converted from it in directory."""
        mx = _mx()
        from mlx.utils import tree_flatten

        from finetune import fsio

        mlx_dir = os.path.join(directory, "mlx")
        os.makedirs(mlx_dir, exist_ok=True)
        weights = os.path.join(mlx_dir, interop.MLX_WEIGHTS)
        fsio.write_with(weights, lambda tmp: mx.save_safetensors(tmp, dict(tree_flatten(self.model.trainable_parameters()))))
        base = self.info.ref
        # fine_tune_type, num_layers and lora_parameters are what mlx_lm's load_adapters reads
        fsio.write_json(os.path.join(mlx_dir, interop.CONFIG), {
            "fine_tune_type": self.lora_type, "num_layers": len(self.model.layers), "lora_parameters": self.lora,
            "model": base, "base_model": base, "quantized_base": self.quantized})
        files = interop.mlx_to_peft(mlx_dir, directory, base, overwrite=True)  # our own newer save
        return files + [weights, os.path.join(mlx_dir, interop.CONFIG)]

    def load_adapter_weights(self, directory: str) -> None:
        self.model.load_weights(os.path.join(directory, "mlx", interop.MLX_WEIGHTS), strict=False)

    def save_state(self, directory: str) -> None:
        mx = _mx()
        from mlx.utils import tree_flatten

        mx.save_safetensors(os.path.join(directory, "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))

    def load_state(self, directory: str) -> None:
        mx = _mx()
        from mlx.utils import tree_unflatten

        saved = mx.load(os.path.join(directory, "optimizer.safetensors"))
        self.optimizer.state = tree_unflatten(list(saved.items()))

    def reseed(self, seed: int) -> None:
        """The loop seeds every step from (SEED, step): dropout and GRPO sampling repeat exactly on resume."""
        _mx().random.seed(seed)

    # ---------------------------------------------------------------- memory
    def describe(self) -> dict:
        """What run.json records about this session beside the loop's numbers."""
        mx = _mx()
        from mlx.utils import tree_flatten

        return {"trainable_params": sum(v.size for _, v in tree_flatten(self.model.trainable_parameters())),
                "peak_memory_source": "mx.get_peak_memory()", "mlx_device": str(mx.default_device()),
                "quantized_base": self.quantized, "lora_targets": self.lora_targets,
                **self.limits}

    def peak_memory_gb(self) -> float:
        return _mx().get_peak_memory() / GB

    def is_oom(self, err: BaseException) -> bool:
        text = str(err).lower()
        return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
            "insufficient memory" in text or "unable to allocate" in text or "out of memory" in text))

    def release_memory(self) -> None:
        _mx().clear_cache()
