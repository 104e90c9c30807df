"""Speed and quality in one run: TRL defaults vs a plain PEFT loop vs finetune, on the real offline model.

Same workload for every variant: SmolLM2-135M-Instruct (MODEL=smollm2-135m-offline), the shipped sample's train
rows, STEPS optimizer steps x BATCH rows, LoRA r=16 alpha=32 dropout 0 on all linear layers, lr LR, seed 42,
loss on the assistant tokens. Each variant runs in its own process (so peak memory is its own), then its adapter
is scored the same way: mean cross-entropy per answer token on 64 held-out rows, fp32, no autocast.
  trl-defaults  a typical TRL script: SFTTrainer(model=path, SFTConfig(max_steps, batch, lr, use_cpu)) on
                conversational prompt/completion rows (loss on the completion, TRL's default for that shape);
                everything else TRL's defaults: gradient checkpointing on, bf16 autocast, the checkpoint's bf16
                weights, linear decay, no warmup
  plain-loop    30 lines: PEFT model, bf16 autocast, full logits, AdamW, constant lr, fixed batches
  finetune      `python -m finetune train` with the same steps/batch/lr/rank; everything else our defaults
Also measured in the same run: the bf16 and fp32 matmul peak (2048^3), so model FLOP/s can be put against it.
MLX (--mlx): mlx-lm's own trainer and compiled step (mlx_lm.tuner.trainer.train with its batching, loss and
Adam; rank/steps/batch/lr set the same, all layers, prompt masked) vs `finetune train` with BACKEND=mlx, on the
tiny model, both with the system OpenBLAS (backends/mlx_blas.py; mlx[cpu] alone links a ~4 GFLOP/s reference
BLAS): mlx[cpu] is not a speed path, so this proves the ratio only. Both count
non-padding input tokens; mlx-lm's first (compiling) step is left out, ours is not.

Run:  python bench/speed.py [--steps 30] [--batch 16] [--lr 2e-4] [--mlx]   (~15 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from backends.torch_backend import process_peak_gb  # noqa: E402  (VmHWM: the same peak a run reports)

EVAL_ROWS, SEED, RANK, ALPHA, DROPOUT = 64, 42, 16, 32, 0.0
MODEL = "smollm2-135m-offline"
TORCH_VARIANTS = ["trl-defaults", "plain-loop", "finetune"]


def matmul_peak() -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        for _ in range(3):
            a @ b
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(5):
                a @ b
            best = max(best, 5 * 2 * 2048 ** 3 / (time.perf_counter() - t))
        out[name] = best
    return out


def workload(model_name: str):
    from finetune import data, models, template

    model, _ = models.resolve(model_name, user_named_it=True)
    tok = models.load_tokenizer(model)
    splits = data.load("sample", 0.1, SEED)
    rows, _ = template.encode_all(splits.train, tok, 1024)
    held, _ = template.encode_all(splits.validation[:EVAL_ROWS], tok, 1024)
    return model, tok, splits, rows, held


def heldout_loss(model, held) -> float:
    """Mean cross-entropy per trained token, fp32, no autocast: the same yardstick for every variant."""
    import torch

    from finetune.template import IGNORE, pad_batch

    model.eval().float()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), 16):
            ids, labels, mask = (torch.from_numpy(a) for a in pad_batch(held[i:i + 16], 0))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                       ignore_index=IGNORE, reduction="sum").item()
            count += int((target != IGNORE).sum())
    return total / count


def lora():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM")


def run_trl(args, model, tok, splits, rows, held) -> dict:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_list([{"prompt": ex.messages[:-1], "completion": ex.messages[-1:]} for ex in splits.train])
    out = tempfile.mkdtemp(prefix="bench-trl-")
    cfg = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                    learning_rate=args.lr, use_cpu=True, save_strategy="no", report_to=[], disable_tqdm=True,
                    include_num_input_tokens_seen="non_padding", seed=SEED)
    trainer = SFTTrainer(model=model.path, args=cfg, train_dataset=ds, peft_config=lora())
    trainer.remove_callback(PrinterCallback)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "tokens": int(trainer.state.num_input_tokens_seen),
            "eval_loss": heldout_loss(trainer.model, held),
            "notes": f"ckpt {trainer.args.gradient_checkpointing}, bf16 {trainer.args.bf16}, "
                     f"weights {next(trainer.model.parameters()).dtype}"}


def run_plain(args, model, tok, splits, rows, held) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.template import pad_batch

    torch.manual_seed(SEED)
    torch.set_num_threads(os.cpu_count() or 1)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32), lora())
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    m.train()
    tokens, t = 0, time.perf_counter()
    for step in range(args.steps):
        start = step * args.batch % len(rows)
        ids, labels, mask = (torch.from_numpy(a) for a in pad_batch(rows[start:start + args.batch], tok.pad_token_id))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(mask.sum())
    return {"seconds": time.perf_counter() - t, "tokens": tokens, "eval_loss": heldout_loss(m, held),
            "notes": "no ckpt, bf16 autocast, fp32 weights, full logits"}


def run_finetune(args, model, tok, splits, rows, held) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = os.path.join(tempfile.mkdtemp(prefix="bench-ft-"), "run")
    env = {**os.environ, "MODEL": args.model, "MAX_STEPS": str(args.steps), "BATCH_SIZE": str(args.batch),
           "GRAD_ACCUM": "1", "LEARNING_RATE": str(args.lr), "LORA_R": str(RANK), "LORA_ALPHA": str(ALPHA),
           "LORA_DROPOUT": str(DROPOUT), "SEED": str(SEED), "EVAL_GENERATIONS": "0", "EVAL_ROWS": "8",
           "EVAL_STEPS": str(10 ** 6), "SAVE_STEPS": str(10 ** 6), "OUTPUT_DIR": out,
           "BACKEND": "mlx" if args.variant == "finetune-mlx" else "torch"}
    result = subprocess.run([sys.executable, "-m", "finetune", "train"], env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])
    run = json.load(open(os.path.join(out, "run.json")))
    import torch

    base = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32)
    r = run["result"]
    return {"seconds": r["train_seconds"], "tokens": r["tokens_seen"], "peak_gb": r["peak_memory_gb"],
            "eval_loss": heldout_loss(PeftModel.from_pretrained(base, out), held),
            "notes": f"{run['plan']['dtype']}, ckpt {run['plan']['gradient_checkpointing']}, {run['config']['lr_scheduler']}"}


def run_mlx_lm(args, model, tok, splits, rows, held) -> dict:
    """mlx-lm's own trainer and compiled step (mlx_lm.tuner.trainer.train with its iterate_batches, default_loss,
    Adam) on the same rows, prompt masked, LoRA on every layer at the same rank; timed from its own reports."""
    from backends.mlx_blas import use_openblas

    use_openblas()  # the BLAS our MLX backend gets too (backends/mlx_blas.py): same footing for both
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner import trainer as mt
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mlx_model, mlx_tok = load(model.path)
    mlx_model.freeze()
    linear_to_lora_layers(mlx_model, len(mlx_model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": DROPOUT})
    dataset = CacheDataset(ChatDataset([{"messages": ex.messages} for ex in splits.train], mlx_tok, mask_prompt=True))
    seen, reports = {"tokens": 0}, []

    def counting(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        for batch, lengths in mt.iterate_batches(dataset, batch_size, max_seq_length, loop, seed, comm_group):
            seen["tokens"] += int(lengths[:, 1].sum())  # non-padding tokens, as the other variants count
            yield batch, lengths

    class Clock(mt.TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append((time.perf_counter(), seen["tokens"]))

    work = tempfile.mkdtemp(prefix="bench-mlxlm-")
    targs = mt.TrainingArgs(batch_size=args.batch, iters=args.steps + 1, steps_per_report=1, steps_per_eval=10 ** 6,
                            steps_per_save=10 ** 6, adapter_file=os.path.join(work, "adapters.safetensors"))
    mt.train(mlx_model, optim.Adam(learning_rate=args.lr), dataset, None, targs, iterate_batches=counting,
             training_callback=Clock())
    (t0, k0), (t1, k1) = reports[0], reports[-1]  # the first step (compilation) is left out, as for ours
    return {"seconds": t1 - t0, "tokens": k1 - k0, "eval_loss": None, "notes": "mlx_lm trainer, compiled step",
            "peak_gb": __import__("mlx.core").core.get_peak_memory() / 2 ** 30}


RUNNERS = {"trl-defaults": run_trl, "plain-loop": run_plain, "finetune": run_finetune,
           "mlx_lm.lora": run_mlx_lm, "finetune-mlx": run_finetune}


def one(args) -> None:
    from _timing import setup_torch

    setup_torch()
    model, tok, splits, rows, held = workload(args.model)
    out = RUNNERS[args.variant](args, model, tok, splits, rows, held)
    out.setdefault("peak_gb", process_peak_gb())
    out.setdefault("tokens_per_s", out["tokens"] / out["seconds"])
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--mlx", action="store_true", help="also mlx_lm.lora vs BACKEND=mlx (tiny model)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", default=MODEL, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return one(args)
    peak = matmul_peak()
    print(f"matmul peak (2048^3, {os.cpu_count()} threads): bf16 {peak['bf16'] / 1e9:,.0f} GFLOP/s, "
          f"fp32 {peak['fp32'] / 1e9:,.0f} GFLOP/s")
    print(f"workload: {MODEL}, sample train rows, {args.steps} steps x batch {args.batch}, LoRA r={RANK} all-linear, "
          f"lr {args.lr:g}; held-out eval loss on {EVAL_ROWS} rows (fp32)")
    plan = [(v, MODEL) for v in TORCH_VARIANTS] + ([(v, "finetune/tiny-qwen2") for v in ("mlx_lm.lora", "finetune-mlx")]
                                                    if args.mlx else [])
    results = {}
    for variant, model in plan:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--lr", str(args.lr)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.join(ROOT, "bench"))
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"{variant} failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
            continue
        results[variant] = json.loads(line[0][7:])
        print(f"  {variant}: {results[variant]}", flush=True)
    flops_per_token = 4 * 134.5e6  # forward + input gradients of a 134.5M model (LoRA: no frozen weight grads)
    print("\n| variant | tokens/s | vs TRL defaults | model FLOP/s (% of bf16 peak) | peak memory GB | held-out eval loss | setup |")
    print("|---|---:|---:|---:|---:|---:|---|")
    base = results.get("trl-defaults", {}).get("tokens_per_s")
    for v, r in results.items():
        tps = r["tokens_per_s"]
        util = f"{tps * flops_per_token / 1e9:,.0f} G ({tps * flops_per_token / peak['bf16']:.0%})" if "mlx" not in v else "-"
        ratio = f"{tps / base:.2f}x" if base and "mlx" not in v else "-"
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
        print(f"| {v} | {tps:,.0f} | {ratio} | {util} | {r['peak_gb']:.2f} | {loss} | {r['notes']} |")
    if "mlx_lm.lora" in results and "finetune-mlx" in results:
        print(f"\nMLX: finetune-mlx / mlx_lm.lora = "
              f"{results['finetune-mlx']['tokens_per_s'] / results['mlx_lm.lora']['tokens_per_s']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
