"""Quality and speed on workloads nobody tuned for: TRL defaults vs a plain fp32 PEFT loop vs finetune (torch), and
mlx_lm.lora defaults vs finetune (MLX), every adapter scored by one held-out evaluator.

Grid: the workloads of bench/workloads.py (mixed tasks, long rows, multi-turn, plain text, short rows; 20-200 steps)
x learning rates (1e-4, 1e-3). Model: SmolLM2-135M-Instruct (the offline model). LoRA r16 alpha 32 dropout 0 on all
linear layers for every torch variant; training seed 42 (`--seeds 1,2,42` repeats each cell; the table shows the
mean and the spread; the held-out split is always drawn with seed 42).
  trl-defaults   SFTTrainer(model=path, SFTConfig(max_steps, batch, lr, max_length, use_cpu)) on the raw rows
                 (single-turn chats as conversational prompt/completion, multi-turn as messages, text as text):
                 all else TRL's defaults (linear decay, no warmup, bf16 autocast, gradient checkpointing)
  plain-fp32     ~30 lines: PEFT model in fp32, no autocast, AdamW constant lr, a seeded shuffle each epoch,
                 the model's own loss (mean over the batch's trained tokens, our assistant-only labels)
  finetune       `python -m finetune train` with only steps/batch/lr/rank/alpha/max length set: our defaults
  finetune+K=V   the same with setting K=V (an ablation, e.g. finetune+DTYPE=fp32, finetune+GROUP_BY_LENGTH=true);
                 a dotted K sets a module constant instead (finetune+schedule.WSD_DECAY_SHARE=0.1)
  mlx_lm.lora    mlx-lm's trainer as `mlx_lm.lora --train --iters N --batch-size B --learning-rate LR` runs it: its
                 defaults for the rest (rank 8, scale 20, last 16 layers, Adam, constant lr, prompt not masked);
                 on mlx[cpu] the weights are cast to fp32, as our backend trains there (no bf16 BLAS on the CPU)
  finetune-mlx   `finetune train` with BACKEND=mlx
The evaluator: base model in fp32 + the variant's adapter as PEFT (MLX adapters converted by finetune.interop), mean
cross-entropy per trained token (assistant tokens; every token for text rows) of the workload's 200 held-out rows,
no autocast. tokens/s = non-padding input tokens / training seconds (loading and evaluation excluded).
Every run is its own process; results are appended to --results (JSONL), so a grid can be extended or re-printed.

Run:  python bench/quality.py                        (torch grid: 5 workloads x 2 lrs x 3 variants, ~70 min on 2 cores)
      python bench/quality.py --backend mlx --lrs 1e-3
      python bench/quality.py --workloads mixed --lrs 1e-3 --variants finetune,finetune+GROUP_BY_LENGTH=true
      python bench/quality.py --workloads mixed --lrs 1e-3 --seeds 1,2,42 --variants trl-defaults,finetune
      python bench/quality.py --backend mlx --lrs default   (each side at its own default learning rate)
      python bench/quality.py --print                 (the table of what --results holds)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)
import workloads  # noqa: E402

MODEL, SEED, RANK, ALPHA = "smollm2-135m-offline", 42, 16, 32
TORCH_VARIANTS, MLX_VARIANTS = ["trl-defaults", "plain-fp32", "finetune"], ["mlx_lm.lora", "finetune-mlx"]
DATA_ROOT = os.path.join(tempfile.gettempdir(), "finetune-quality-data")


def load_rows(name: str):
    from finetune import data

    splits = data.load(os.path.join(DATA_ROOT, name), 0.1, SEED)
    return splits


def encoded(name: str, tok, split: str):
    from finetune import template

    splits = load_rows(name)
    rows = splits.train if split == "train" else splits.validation
    return template.encode_all(rows, tok, workloads.SPECS[name][2])[0]


def heldout_loss(model, held, pad_id: int) -> float:
    """Mean cross-entropy per trained token over the held-out rows, fp32, no autocast: one yardstick for all."""
    import torch

    from finetune.template import IGNORE, pad_batch

    model.eval().float()
    decoder, head = model.get_decoder(), model.get_output_embeddings()  # SmolLM2: logits = lm_head(decoder(x))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), 16):
            ids, labels, mask = (torch.from_numpy(a) for a in pad_batch(held[i:i + 16], pad_id))
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
            target = labels[:, 1:]
            where = target != IGNORE  # the vocabulary projection only where a token is scored (exact, far cheaper)
            logits = head(hidden[where]).float()
            total += torch.nn.functional.cross_entropy(logits, target[where], reduction="sum").item()
            count += int(where.sum())
    return total / count


def score(model_info, tok, name: str, adapter_dir: str | None) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_info.path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir else base
    return heldout_loss(model, encoded(name, tok, "validation"), tok.pad_token_id)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def run_trl(a, info, tok) -> dict:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    def as_trl(ex):
        if ex.text is not None:
            return {"text": ex.text}
        if len(ex.messages) == 2:
            return {"prompt": ex.messages[:1], "completion": ex.messages[1:]}
        return {"messages": ex.messages}

    ds = Dataset.from_list([as_trl(ex) for ex in load_rows(a.workload).train])
    out = tempfile.mkdtemp(prefix="bench-trl-")
    # TRL's bf16 default means bf16 autocast on the CPU too; on a CPU without bf16 instructions (AVX2 only) that
    # runs emulated at <1 GFLOP/s (60x slower than fp32), so there a user has to turn it off, and so do we.
    from finetune import hardware

    bf16 = {} if hardware.detect().cpu_bf16 else {"bf16": False}
    lr = {} if a.lr is None else {"learning_rate": a.lr}  # --lrs default: SFTConfig's own
    cfg = SFTConfig(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch, **lr,
                    max_length=a.max_len, use_cpu=True, save_strategy="no", report_to=[], disable_tqdm=True,
                    include_num_input_tokens_seen="non_padding", seed=a.seed, **bf16)
    trainer = SFTTrainer(model=info.path, args=cfg, train_dataset=ds, peft_config=lora())
    trainer.remove_callback(PrinterCallback)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    trainer.model.save_pretrained(out)
    return {"seconds": seconds, "tokens": int(trainer.state.num_input_tokens_seen), "adapter": out,
            "notes": f"lr {cfg.learning_rate:g}, ckpt {cfg.gradient_checkpointing}, bf16 {cfg.bf16}, {cfg.lr_scheduler_type}"}


def run_plain(a, info, tok) -> dict:
    import numpy as np
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.template import pad_batch

    if a.lr is None:
        raise SystemExit("plain-fp32 has no default learning rate: give --lrs numbers")
    torch.manual_seed(a.seed)
    rows = encoded(a.workload, tok, "train")
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32), lora())
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    m.train()
    order = np.concatenate([np.random.default_rng([a.seed, e]).permutation(len(rows)) for e in range(50)])
    tokens, t = 0, time.perf_counter()
    for step in range(a.steps):
        batch = [rows[i] for i in order[step * a.batch:(step + 1) * a.batch]]
        ids, labels, mask = (torch.from_numpy(x) for x in pad_batch(batch, tok.pad_token_id))
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        tokens += int(mask.sum())
    seconds = time.perf_counter() - t
    out = tempfile.mkdtemp(prefix="bench-plain-")
    m.save_pretrained(out)
    return {"seconds": seconds, "tokens": tokens, "adapter": out}


def run_finetune(a, info, tok) -> dict:
    out = os.path.join(tempfile.mkdtemp(prefix="bench-ft-"), "run")
    env = {**os.environ, "MODEL": MODEL, "DATASET": os.path.join(DATA_ROOT, a.workload), "MAX_STEPS": str(a.steps),
           "BATCH_SIZE": str(a.batch), "GRAD_ACCUM": "1", "LORA_R": str(RANK),
           "LORA_ALPHA": str(ALPHA), "MAX_SEQ_LENGTH": str(a.max_len), "SEED": str(a.seed), "EVAL_GENERATIONS": "0",
           "EVAL_ROWS": "8", "EVAL_STEPS": str(10 ** 6), "SAVE_STEPS": str(10 ** 6), "OUTPUT_DIR": out,
           "BACKEND": "mlx" if a.variant.split("+")[0] == "finetune-mlx" else "torch"}
    if a.lr is not None:  # --lrs default: LEARNING_RATE unset, so train.py takes the method's own
        env["LEARNING_RATE"] = str(a.lr)
    else:
        env.pop("LEARNING_RATE", None)
    patches = []  # module.CONSTANT=value: an ablation of a constant that is not a setting (e.g. schedule.PLATEAU_RATIO)
    for setting in a.variant.split("+")[1:]:
        key, _, value = setting.partition("=")
        if "." in key:
            module, _, name = key.rpartition(".")
            patches.append(f"import finetune.{module} as m; m.{name} = {float(value)!r}")
        else:
            env[key] = value
    cmd = ["-c", "; ".join(patches + ["from finetune.cli import main", "raise SystemExit(main(['train']))"])] if patches else [
        "-m", "finetune", "train"]
    done = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    run = json.load(open(os.path.join(out, "run.json")))
    r, plan = run["result"], run["plan"]
    return {"seconds": r["train_seconds"], "tokens": r["tokens_seen"], "adapter": out,
            "predicted_seconds": plan.get("est_seconds"),
            "notes": f"lr {run['config']['learning_rate']:g}, {plan['dtype']}, ckpt {plan['gradient_checkpointing']}, "
                     f"{run['config']['lr_scheduler']}"}


def run_mlx_lm(a, info, tok) -> dict:
    """mlx-lm's own trainer with the CLI's defaults (mlx_lm/lora.py CONFIG_DEFAULTS) but our steps/batch/lr."""
    from backends.mlx_blas import use_openblas

    use_openblas()  # the BLAS our MLX backend gets too
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.tuner import trainer as mt
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset, TextDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from finetune import interop

    import mlx.core as mx
    import numpy as np

    np.random.seed(a.seed)  # what mlx_lm.lora's main does with --seed
    mx.random.seed(a.seed)
    model, mtok = load(info.path)
    if mx.default_device() == mx.cpu:  # mlx[cpu] has no bf16 BLAS: the stored bf16 weights ran ~30x slower (a
        model.set_dtype(mx.float32)    # 20-step run took > 25 min); our MLX backend trains fp32 on a CPU too
    model.freeze()
    params = {"rank": 8, "scale": 20.0, "dropout": 0.0}
    linear_to_lora_layers(model, 16, params)
    rows = load_rows(a.workload).train
    if rows[0].text is not None:
        ds = TextDataset([{"text": ex.text} for ex in rows], mtok)
    else:
        ds = ChatDataset([{"messages": ex.messages} for ex in rows], mtok, mask_prompt=False)
    seen, clock = {"tokens": 0}, []

    def counting(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        for batch, lengths in mt.iterate_batches(dataset, batch_size, max_seq_length, loop, seed, comm_group):
            seen["tokens"] += int(lengths[:, 1].sum())
            yield batch, lengths

    class Clock(mt.TrainingCallback):
        def on_train_loss_report(self, info):
            clock.append((time.perf_counter(), seen["tokens"]))

    work = tempfile.mkdtemp(prefix="bench-mlxlm-")
    adapter = os.path.join(work, "adapters.safetensors")
    targs = mt.TrainingArgs(batch_size=a.batch, iters=a.steps, steps_per_report=1, steps_per_eval=10 ** 6,
                            steps_per_save=10 ** 6, max_seq_length=a.max_len, adapter_file=adapter)
    t = time.perf_counter()
    lr = CONFIG_DEFAULTS["learning_rate"] if a.lr is None else a.lr  # --lrs default: mlx_lm.lora's own
    mt.train(model, optim.Adam(learning_rate=lr), CacheDataset(ds), None, targs, iterate_batches=counting,
             training_callback=Clock())
    seconds = time.perf_counter() - t
    with open(os.path.join(work, "adapter_config.json"), "w") as fh:
        json.dump({"fine_tune_type": "lora", "num_layers": 16, "lora_parameters": params}, fh)
    peft_dir = os.path.join(work, "peft")
    interop.mlx_to_peft(work, peft_dir, info.path)
    return {"seconds": seconds, "tokens": seen["tokens"], "adapter": peft_dir, "notes": f"lr {lr:g}, rank 8, scale 20, 16 layers"}


RUNNERS = {"trl-defaults": run_trl, "plain-fp32": run_plain, "mlx_lm.lora": run_mlx_lm}


def one(a) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from _timing import setup_torch

    setup_torch()
    from finetune import models

    info, _ = models.resolve(MODEL, user_named_it=True)
    tok = models.load_tokenizer(info)
    runner = RUNNERS.get(a.variant, run_finetune)
    out = runner(a, info, tok)
    out["eval_loss"] = score(info, tok, a.workload, out["adapter"])
    print("RESULT " + json.dumps(out))


def baseline(name: str) -> float:
    """The untrained model's held-out loss (same evaluator)."""
    from finetune import models

    info, _ = models.resolve(MODEL, user_named_it=True)
    return score(info, models.load_tokenizer(info), name, None)


def table(results: list[dict]) -> str:
    """One row per (workload, lr), variants side by side: eval loss (tokens/s). A cell run with several seeds shows
    the mean eval loss, its range and n; a seed run twice counts once (the latest)."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    runs: dict = {}
    for r in results:
        if "error" not in r:
            runs.setdefault((r["workload"], r["lr"]), {}).setdefault(r["variant"], {})[r.get("seed", SEED)] = r
    cells: dict = {}
    for key, row in runs.items():
        for v, by_seed in row.items():
            xs = list(by_seed.values())
            losses = [x["eval_loss"] for x in xs]
            cells.setdefault(key, {})[v] = {**xs[-1], "eval_loss": sum(losses) / len(losses), "n": len(xs),
                                            "spread": (min(losses), max(losses)),
                                            "tokens": sum(x["tokens"] for x in xs),
                                            "seconds": sum(x["seconds"] for x in xs)}
    lines = ["| workload (steps x rows) | lr | untrained | " + " | ".join(variants) + " |",
             "|---|---:|---:|" + "---:|" * len(variants)]
    for (w, lr), row in cells.items():
        steps, batch, _ = workloads.SPECS[w]
        base = next((x.get("untrained") for x in row.values() if x.get("untrained") is not None), None)
        vals = []
        for v in variants:
            x = row.get(v)
            if x is None:
                vals.append("-")
                continue
            n = f", n={x['n']} {x['spread'][0]:.3f}-{x['spread'][1]:.3f}" if x["n"] > 1 else ""
            vals.append(f"{x['eval_loss']:.3f} ({x['tokens'] / x['seconds']:,.0f} t/s{n})")
        lines.append(f"| {w} ({steps}x{batch}) | {lr if isinstance(lr, str) else f'{lr:g}'} | {'-' if base is None else f'{base:.3f}'} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default=",".join(workloads.GRID))
    p.add_argument("--lrs", default="1e-4,1e-3", help="comma-separated; 'default': each variant's own default rate "
                   "(mlx_lm.lora 1e-5 at scale 20, finetune's with LEARNING_RATE unset, SFTConfig's)")
    p.add_argument("--backend", choices=("torch", "mlx"), default="torch")
    p.add_argument("--variants", help="comma-separated; default: the backend's three/two variants")
    p.add_argument("--results", default=os.path.join(BENCH, "quality_results.jsonl"))
    p.add_argument("--seeds", default=str(SEED), help="comma-separated training seeds (default 42)")
    p.add_argument("--print", action="store_true", help="only print the table of --results")
    for name in ("variant", "workload", "steps", "batch", "max-len", "lr", "seed"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        a.steps, a.batch, a.max_len = int(a.steps), int(a.batch), int(a.max_len)
        a.lr = None if a.lr == "default" else float(a.lr)
        a.seed = int(a.seed or SEED)
        return one(a)
    done = [json.loads(x) for x in open(a.results)] if os.path.exists(a.results) else []
    if a.print:
        print(table(done))
        return
    variants = (a.variants or ",".join(TORCH_VARIANTS if a.backend == "torch" else MLX_VARIANTS)).split(",")
    untrained = {r["workload"]: r["untrained"] for r in done if r.get("untrained") is not None}  # scored once
    for name in a.workloads.split(","):
        workloads.write(name, DATA_ROOT)
        steps, batch, max_len = workloads.SPECS[name]
        for lr in (x if x == "default" else float(x) for x in a.lrs.split(",")):
            for v, seed in ((v, int(s)) for v in variants for s in a.seeds.split(",")):
                cmd = [sys.executable, __file__, "--variant", v, "--workload", name, "--steps", str(steps), "--batch",
                       str(batch), "--max-len", str(max_len), "--lr", str(lr), "--seed", str(seed)]
                t = time.time()
                run = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCH)
                line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
                if name not in untrained:
                    untrained[name] = baseline(name)
                rec = {"workload": name, "lr": lr, "variant": v, "seed": seed, "untrained": untrained[name],
                       "wall": time.time() - t, "ended": time.strftime("%Y-%m-%d %H:%M")}  # to pair runs of one session
                rec.update(json.loads(line[0][7:]) if line else {"error": (run.stdout + run.stderr)[-1500:]})
                done.append(rec)
                with open(a.results, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                shown = {k: rec[k] for k in ("eval_loss", "seconds", "tokens", "notes", "error") if k in rec}
                print(f"  {name} lr {lr} {v} seed {seed}: {shown}", flush=True)
    print(table([r for r in done if r["variant"] in variants]))


if __name__ == "__main__":
    main()
