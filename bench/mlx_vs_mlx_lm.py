"""Tokens/s and peak memory: our MLX backend vs `mlx_lm.lora` with its defaults, same tiny workload, one run.

Run:  python bench/mlx_vs_mlx_lm.py [ROWS]     (ROWS default 160; about 2-3 minutes on 2 cores with mlx[cpu])

Workload: the first ROWS training rows of the shipped sample dataset (chat rows), one pass, on the offline
tiny Qwen2 model. Variants:
  mlx_lm.lora defaults       mlx_lm.lora's own train_model() with CONFIG_DEFAULTS (batch 4, rank 8, scale 20,
                             dropout 0, Adam 1e-5, loss on every token); num_layers=-1 because the default 16
                             exceeds the tiny model's 4 layers
  finetune mlx (planned)     our backend with everything left to the planner (batch, accumulation, dtype)
  finetune mlx (mlx_lm recipe)  our backend at mlx_lm's batch/rank/scale/dropout/lr: the backend's own cost
Each variant runs in a fresh subprocess, so mx.get_peak_memory() is that variant's training peak (reset just
before training; the resident weights count). tokens/s = non-padding tokens trained / wall time of the
training call, compilation included; neither side validates inside it. Variants run back to back: on a
shared machine, run twice and compare.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SAMPLE = os.path.join(ROOT, "data", "sample")
VARIANTS = ("mlx_lm.lora defaults", "finetune mlx (planned)", "finetune mlx (mlx_lm recipe)")
MLX_LM_RECIPE = dict(batch_size=4, grad_accum=1, lora_r=8, lora_alpha=160.0, lora_dropout=0.0, learning_rate=1e-5)


def run_mlx_lm(rows: int) -> dict:
    from backends.mlx_blas import use_openblas

    use_openblas()  # as our backend does (backends/mlx_blas.py), so both sides get the same BLAS
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.datasets import ChatDataset
    from mlx_lm.tuner.trainer import TrainingCallback

    from finetune import tiny

    path = tiny.ensure()
    with open(os.path.join(SAMPLE, "train.jsonl")) as fh:
        data = [json.loads(line) for line in fh][:rows]
    model, tokenizer = load(path)  # what `mlx_lm.lora --model` does
    steps = rows // CONFIG_DEFAULTS["batch_size"]
    seen = {}

    class Count(TrainingCallback):
        def on_train_loss_report(self, info):
            seen.update(tokens=info["trained_tokens"], loss=info["train_loss"])

    with tempfile.TemporaryDirectory() as adapters:
        args = types.SimpleNamespace(**{**CONFIG_DEFAULTS, "model": path, "data": f"sample[:{rows}]", "train": True,
                                        "iters": steps, "num_layers": -1, "adapter_path": adapters})
        mx.reset_peak_memory()
        start = time.perf_counter()
        # an empty validation set: mlx-lm then skips validation, as our side does
        train_model(args, model, ChatDataset(data, tokenizer), ChatDataset([], tokenizer), Count())
        seconds = time.perf_counter() - start
    return {"batch": CONFIG_DEFAULTS["batch_size"], "accum": 1, "steps": steps, "rank": 8, "dtype": "fp32 (as saved)",
            "tokens": int(seen["tokens"]), "seconds": seconds, "peak_bytes": mx.get_peak_memory(),
            "final_loss": seen["loss"]}


def run_ours(rows: int, recipe: dict) -> dict:
    from backends.mlx_blas import use_openblas

    use_openblas()  # what backends.mlx_backend does on import; mlx.core is imported first here
    import mlx.core as mx

    from backends.mlx_backend import BACKEND
    from finetune import data, hardware, models, plan as planner, tiny
    from finetune.config import Config
    from finetune.template import encode_all

    # eval_steps past the end: no validation during training (as on the mlx_lm side)
    cfg = Config(model=tiny.TINY_MODEL_NAME, backend="mlx", eval_steps=10**6, **recipe)
    info, _ = models.resolve(cfg.model, user_named_it=True)
    tokenizer = models.load_tokenizer(info)
    encoded, _ = encode_all(data.load(SAMPLE, cfg.val_split, cfg.seed).train[:rows], tokenizer, cfg.max_seq_length)
    hw = hardware.detect()
    mean = sum(len(r.input_ids) for r in encoded) / len(encoded)
    plan = planner.make(cfg, hw, info, "mlx", BACKEND.device(hw), len(encoded), mean)
    session = BACKEND.load(cfg, plan, info, tokenizer)
    result = session.train(encoded, encoded[:1], lambda event: None)  # resets the peak at its start
    return {"batch": plan.batch_size, "accum": plan.grad_accum, "steps": plan.max_steps, "rank": cfg.lora_r,
            "dtype": plan.dtype, "tokens": result.tokens_seen, "seconds": result.train_seconds,
            "peak_bytes": mx.get_peak_memory(), "final_loss": result.final_train_loss}


def child(variant: str, rows: int) -> None:
    if variant == VARIANTS[0]:
        out = run_mlx_lm(rows)
    else:
        out = run_ours(rows, MLX_LM_RECIPE if variant == VARIANTS[2] else {})
    print("RESULT " + json.dumps(out))


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 160
    import mlx.core as mx

    print(f"MLX {mx.__version__} on {mx.default_device()}, {os.cpu_count()} cores; tiny Qwen2, first {rows} sample rows")
    results = {}
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--child", variant, str(rows)], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(line[len("RESULT "):])
    header = f"| {'variant':<30} | batch x accum | steps | rank | tokens | seconds | tokens/s | peak memory |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for variant, r in results.items():
        print(f"| {variant:<30} | {r['batch']:>5} x {r['accum']:<5} | {r['steps']:>5} | {r['rank']:>4} | {r['tokens']:>6} "
              f"| {r['seconds']:>7.1f} | {r['tokens'] / r['seconds']:>8.0f} | {r['peak_bytes'] / 2**20:>7.1f} MiB |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
