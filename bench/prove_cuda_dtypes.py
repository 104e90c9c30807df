"""Part of bench/prove_cuda.py: which dtypes a training step really computes in, per setting, on this device.

For bf16, fp16 and 4-bit (NF4) it builds the torch backend's own session on the model given, hooks every attention
block, LoRA A matmul and the lm_head, runs one real SFT step and prints, as `PROBE_JSON {...}`, the output dtypes
seen, the 4-bit layers' compute dtype, whether a loss scaler is on and the attention kernel loaded. This is the GPU
twin of tests/test_qlora_cpu.py's dtype assertions (issue: 4-bit used to compute in fp32).
    python bench/prove_cuda_dtypes.py MODEL_DIR [cuda|cpu]
    python bench/prove_cuda_dtypes.py --profile MODEL_DIR [cuda|cpu]   bf16 vs fp16 step times and their top ops
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _session(model_dir: str, device: str, dtype: str, quantize: str, batch: int, seq: int):
    """(the torch backend's own session on this model and plan, its tokenizer, seconds to build the session)."""
    from backends.torch_backend import TorchSession
    from finetune import models
    from finetune.config import Config
    from finetune.plan import Plan

    info, _ = models.resolve(model_dir, user_named_it=True)
    tok = models.load_tokenizer(info)
    plan = Plan(backend="torch", device=device, method="sft", batch_size=batch, grad_accum=1, max_seq_length=seq,
                max_steps=1, eval_steps=1, save_steps=1, gradient_checkpointing=False, dtype=dtype, quantize=quantize,
                memory_kind="vram" if device == "cuda" else "ram", memory_total_gb=80, budget_gb=60,
                predicted_peak_gb=1, attention="sdpa")
    t = time.time()
    return TorchSession(Config(), plan, info, tok), tok, time.time() - t


def probe(model_dir: str, device: str, dtype: str, quantize: str) -> dict:
    from finetune.config import Config
    from finetune.methods import sft
    from finetune.template import Example, encode

    s, tok, built = _session(model_dir, device, dtype, quantize, 4, 128)
    t = time.time() - built
    rows = [encode(Example(messages=[{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]),
                   tok, 128) for w in ("one", "two", "three", "four")]
    seen: dict[str, set] = {"attention": set(), "lora_A": set(), "lm_head": set()}

    def hook(kind):
        def fn(mod, args, out):
            seen[kind].add(str((out[0] if isinstance(out, tuple) else out).dtype).replace("torch.", ""))
        return fn

    hooks = []
    for name, mod in s.model.named_modules():
        kind = ("attention" if name.endswith("self_attn") else "lora_A" if name.endswith("lora_A.default")
                else "lm_head" if name.endswith("lm_head") else None)
        if kind:
            hooks.append(mod.register_forward_hook(hook(kind)))
    out = s.train_step(sft.make_batch(None, rows, Config(), None), 4, 1e-3)
    for h in hooks:
        h.remove()
    q = {}
    try:
        import bitsandbytes as bnb
        layers = [m for m in s.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        if layers:
            q = {"linear4bit_layers": len(layers), "compute_dtype": sorted({str(m.compute_dtype) for m in layers}),
                 "quant_type": sorted({m.weight.quant_state.quant_type for m in layers})}
    except ImportError:
        pass
    return {"dtype": dtype, "quantize": quantize, "seen": {k: sorted(v) for k, v in seen.items()},
            "lora_param_dtypes": sorted({str(p.dtype) for p in s.params}), "scaler": s.scaler is not None,
            "attention_impl": s.base.config._attn_implementation, "loss": round(float(out.get("loss", float("nan"))), 4),
            "skipped": bool(out.get("skipped")), "seconds": round(time.time() - t, 1), **q}


def profile(model_dir: str, device: str, dtype: str, steps: int = 6) -> dict:
    """Median step time of batch-16 sample rows, then the ops taking most self time (CPU and device) over 3 steps:
    why fp16 ran 2.7x slower than bf16 on the H200 (twice, unexplained)."""
    import statistics

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from finetune.config import Config
    from finetune.methods import sft
    from finetune.template import Example, encode

    s, tok, _ = _session(model_dir, device, dtype, "none", 16, 512)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "data", "sample", "train.jsonl")) as fh:
        rows = [encode(Example(messages=json.loads(line)["messages"]), tok, 512) for line, _ in zip(fh, range(16))]
    batch = sft.make_batch(None, rows, Config(), None)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(steps):
        sync()
        t = time.perf_counter()
        s.train_step(batch, 16, 2e-4)
        sync()
        times.append(time.perf_counter() - t)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(3):
            s.train_step(batch, 16, 2e-4)
        sync()
    ev = prof.key_averages()
    top_cpu = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    dev_attr = "self_device_time_total" if hasattr(ev[0], "self_device_time_total") else "self_cuda_time_total"
    top_dev = sorted(ev, key=lambda e: getattr(e, dev_attr, 0), reverse=True)[:8]
    return {"dtype": dtype, "step_s": [round(x, 3) for x in times], "median_step_s": round(statistics.median(times[2:]), 4),
            "top_self_cpu_ms": [(e.key[:60], round(e.self_cpu_time_total / 1e3 / 3, 2), e.count // 3) for e in top_cpu],
            "top_self_device_ms": [(e.key[:60], round(getattr(e, dev_attr, 0) / 1e3 / 3, 2), e.count // 3) for e in top_dev],
            "scaler": s.scaler is not None}


def main() -> None:
    if sys.argv[1] == "--profile":
        model_dir, device = sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "cuda")
        out = []
        for dtype in ("bf16", "fp16", "bf16") if device == "cuda" else ("bf16",):
            try:
                out.append(profile(model_dir, device, dtype))
            except Exception as err:
                out.append({"dtype": dtype, "error": f"{type(err).__name__}: {err}"[:400]})
        print("PROBE_JSON " + json.dumps({"device": device, "profile": out}))
        return
    model_dir, device = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "cuda")
    results = []
    for dtype, quantize in (("bf16", "none"), ("bf16", "4bit"), ("fp16", "none"), ("fp16", "4bit")):
        if device == "cpu" and dtype == "fp16":
            continue
        try:
            results.append(probe(model_dir, device, dtype, quantize))
        except Exception as err:  # one setting failing must not hide the others
            results.append({"dtype": dtype, "quantize": quantize, "error": f"{type(err).__name__}: {err}"[:400]})
    print("PROBE_JSON " + json.dumps({"device": device, "runs": results}))


if __name__ == "__main__":
    main()
