"""PEFT's LoRA layers vs one autograd node per layer (backends/torch_lora.py), paired steps in one process.

Two torch sessions on the offline SmolLM2-135M-Instruct, identical but for the LoRA layers' forward, take turns at
the same steps of a bench/workloads.py dataset (so the machine's drift falls on both alike); prints the median step
time of each, their ratio, and the losses (equal to fp32 rounding).

    .venv/bin/python bench/lora_node.py --data text --rows 1 --steps 40
    .venv/bin/python bench/lora_node.py --data long --rows 1 --steps 14
One thread team (steps in CPU lanes use PEFT's layers either way).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def batches(name: str, rows: int, steps: int, tokenizer, max_len: int):
    from bench.workloads import write
    from finetune.config import Config
    from finetune.methods import sft
    from finetune.data import Example
    from finetune.template import encode

    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(write(name, root), "train.jsonl")) as fh:
            data = [json.loads(line) for line in fh][: rows * steps]
    encoded = [encode(Example(messages=d["messages"]) if "messages" in d else Example(text=d["text"]), tokenizer,
                      max_len) for d in data]
    return [sft.make_batch(None, encoded[i:i + rows], Config(), None) for i in range(0, len(encoded), rows)]


def session(info, tokenizer, one_node: bool, rows: int, max_len: int):
    from backends.torch_backend import TorchSession
    from finetune.config import Config
    from finetune.plan import Plan

    plan = Plan(backend="torch", device="cpu", method="sft", batch_size=rows, grad_accum=1, max_seq_length=max_len,
                max_steps=100, eval_steps=100, save_steps=100, gradient_checkpointing=False, dtype="fp32",
                quantize="none", memory_kind="ram", memory_total_gb=24, budget_gb=16, predicted_peak_gb=2,
                lanes=1, attention="eager" if max_len <= 256 else "sdpa")
    s = TorchSession(Config(), plan, info, tokenizer)
    s._one_node.on = one_node  # off: PEFT's forward on every step, as before backends/torch_lora.py
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="multiturn")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--steps", type=int, default=18)
    args = ap.parse_args()
    from bench.workloads import SPECS
    from finetune import models
    from finetune.models import load_tokenizer

    info, _ = models.resolve("smollm2-135m-offline", user_named_it=True)
    models.fetch_weights(info)
    tokenizer = load_tokenizer(info)
    max_len = SPECS[args.data][2]
    work = batches(args.data, args.rows, args.steps + 2, tokenizer, max_len)
    sides = {"peft": session(info, tokenizer, False, args.rows, max_len),
             "one node": session(info, tokenizer, True, args.rows, max_len)}
    times, losses = {k: [] for k in sides}, {k: [] for k in sides}
    for i, batch in enumerate(work):
        for name in (sides if i % 2 else reversed(list(sides))):  # alternate who goes first
            t = time.perf_counter()
            out = sides[name].train_step(batch, args.rows, 1e-3)
            if i >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - t)
            losses[name].append(out["loss"])
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    tokens = sum(r.length for b in work[2:] for r in b.sequences) / len(work[2:])
    print(f"{args.data}: {args.rows} rows/step (~{tokens:.0f} tokens), one thread team, {len(times['peft'])} "
          f"paired steps")
    print("| LoRA layers | median step s | tokens/s | last loss |\n|---|---:|---:|---:|")
    for k in sides:
        print(f"| {k} | {med[k]:.3f} | {tokens / med[k]:.0f} | {losses[k][-1]:.6f} |")
    drift = max(abs(a - b) / abs(a) for a, b in zip(losses["peft"], losses["one node"]))
    print(f"speed-up {med['peft'] / med['one node']:.3f}x; largest relative loss difference {drift:.1e}")


if __name__ == "__main__":
    main()
