"""One-shot GPU probe: what breaks in the CUDA path, and real GPU numbers. Started by bench/prove_cuda.sh
(which installs the carried wheels and reassembles the GGUF); see that file's header for how to run it.

Every part runs in its own subprocess (own process group) under its own timeout, inside a global deadline;
a part that fails or times out is recorded (last 40 lines of its output) and the next one runs. Results go to
$OUT/summary.json (rewritten after every part, so a kill still leaves what was done), $OUT/runs_full.json
(every run.json in full) and a markdown table on stdout at the end.

Models: random-init (NOT trained) bf16 models built from the SmolLM2-135M-Instruct config/tokenizer carried
in .gpu/smollm2-tok: `smollm2-135m-shape` (same config) and `llama-1.1b-shape` (hidden 2048, 16 layers,
MLP 8192, 32 heads / 8 kv heads, tied embeddings). Their losses mean nothing; memory and speed do. The real
SmolLM2 runs only when the GGUF was reassembled (FINETUNE_OFFLINE_GGUF set by prove_cuda.sh).

GPU_PROBE_CPU=1: a local dry mode that exercises this file's own logic on the CPU with the 135M shape, 2 steps.
Internal sub-commands (run by the orchestrator itself): --env, --build, --variant trl|plain.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CPU = os.environ.get("GPU_PROBE_CPU") == "1"
OUT = os.environ.get("OUT") or os.path.join(ROOT, "outputs", "gpu_probe_out")
WORK = os.environ.get("GPU_PROBE_WORK", "/tmp/gpu_probe")
T0 = float(os.environ.get("GPU_PROBE_T0") or time.time())
BUDGET = float(os.environ.get("GPU_PROBE_BUDGET") or 420)
RESERVE = 12  # seconds kept back for the summary
TOK_DIR = os.path.join(ROOT, ".gpu", "smollm2-tok")
MODELS = os.path.join(WORK, "models")
SMALL, BIG = os.path.join(MODELS, "smollm2-135m-shape"), os.path.join(MODELS, "llama-1.1b-shape")
TINY = os.path.join(MODELS, "smollm2-tiny-shape")  # CPU dry mode only: stands in for both shapes in the runs
PY = sys.executable
PACKAGES = ["torch", "transformers", "peft", "trl", "datasets", "accelerate", "huggingface_hub", "tokenizers",
            "safetensors", "bitsandbytes", "gguf", "pyarrow", "dill", "multiprocess", "fsspec", "hf_xet", "httpx2",
            "typer", "click", "numpy", "regex"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")
SPEED = {"steps": 2 if CPU else 20, "batch": 2 if CPU else 16, "lr": 2e-4}
SUMMARY: dict = {"mode": "cpu-dry" if CPU else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "notes": ["models other than the real SmolLM2 are RANDOM-INIT weights: their losses are "
                           "meaningless, their memory and speed are real"], "parts": {}}
FULL: dict = {}


# ------------------------------------------------------------------------------------------------ plumbing
def remaining() -> float:
    return T0 + BUDGET - RESERVE - time.time()


def save() -> None:
    os.makedirs(OUT, exist_ok=True)
    SUMMARY["elapsed_s"] = round(time.time() - T0, 1)
    for name, data in (("summary.json", SUMMARY), ("runs_full.json", FULL)):
        tmp = os.path.join(OUT, name + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, default=str)
        os.replace(tmp, os.path.join(OUT, name))


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def run_cmd(name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run in its own process group; on timeout kill the whole group. Output is echoed (for log.txt)."""
    t = time.time()
    log_path = os.path.join(WORK, "logs", name + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"\n===== [{name}] {' '.join(cmd)} (timeout {timeout:.0f}s, {remaining():.0f}s left overall)", flush=True)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
        except OSError as err:
            return {"status": "failed", "rc": None, "seconds": 0.0, "tail": f"could not start: {err}"}
        status = "ok"
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            status = "timeout"
            for sig, grace in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except OSError:
                    pass
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    with open(log_path, errors="replace") as fh:
        text = fh.read()
    sys.stdout.write(text if len(text) < 60000 else text[:20000] + "\n[... cut ...]\n" + text[-40000:])
    sys.stdout.flush()
    if status == "ok" and rc != 0:
        status = "failed"
    out = {"status": status, "rc": rc, "seconds": round(time.time() - t, 1), "output": text}
    print(f"===== [{name}] {status} rc={rc} in {out['seconds']}s", flush=True)
    return out


def probe_json(text: str) -> dict | None:
    lines = [x for x in text.splitlines() if x.startswith("PROBE_JSON ")]
    return json.loads(lines[-1][len("PROBE_JSON "):]) if lines else None


def base_env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", FINETUNE_CACHE=os.path.join(WORK, "cache"), TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), ROOT) if p)
    return env


def record(name: str, entry: dict) -> None:
    entry.pop("output", None)
    SUMMARY["parts"][name] = entry
    save()


def part(name: str, need: float, timeout: float):
    """Decide whether a part can run: (timeout to use) or None after recording it as skipped."""
    left = remaining()
    if left < need:
        record(name, {"status": "skipped", "reason": f"global deadline: {left:.0f}s left, part needs ~{need:.0f}s"})
        return None
    return min(timeout, left)


# ------------------------------------------------------------------------------------------------ sub-commands
def cmd_env() -> None:
    import importlib.metadata as md
    import importlib

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                  "pythonpath": os.environ.get("PYTHONPATH", ""), "versions": {}, "imports": {}}
    for p in PACKAGES:
        try:
            info["versions"][p] = md.version(p)
        except md.PackageNotFoundError:
            info["versions"][p] = None
    for mod in ("transformers", "peft", "trl", "datasets", "accelerate", "huggingface_hub", "bitsandbytes", "gguf"):
        t = time.time()
        try:
            m = importlib.import_module(mod)
            info["imports"][mod] = {"ok": True, "version": getattr(m, "__version__", "?"),
                                    "file": getattr(m, "__file__", "?"), "s": round(time.time() - t, 1)}
        except BaseException as err:  # noqa: BLE001 - any import failure is the finding
            info["imports"][mod] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    try:
        from transformers import AutoModelForCausalLM, Trainer  # noqa: F401  (lazy modules: force the real import)
        from peft import LoraConfig, get_peft_model  # noqa: F401
        info["imports"]["transformers+peft classes"] = {"ok": True}
    except BaseException as err:  # noqa: BLE001
        info["imports"]["transformers+peft classes"] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    import torch

    info["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["torch"].update(device=props.name, capability=f"{props.major}.{props.minor}",
                             total_gb=round(props.total_memory / 2 ** 30, 1), bf16=torch.cuda.is_bf16_supported(),
                             flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                             cudnn=torch.backends.cudnn.version())
        # dense matmul peak, to calibrate plan.EFFICIENCY_GPU / CUDA_PEAK
        for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32), ("tf32", None)):
            torch.backends.cuda.matmul.allow_tf32 = dt is None
            n = 8192
            a = torch.randn(n, n, device="cuda", dtype=dt or torch.float32)
            b = torch.randn(n, n, device="cuda", dtype=dt or torch.float32)
            for _ in range(3):
                a @ b
            torch.cuda.synchronize()
            best = 0.0
            for _ in range(3):
                t = time.perf_counter()
                for _ in range(10):
                    a @ b
                torch.cuda.synchronize()
                best = max(best, 10 * 2 * n ** 3 / (time.perf_counter() - t))
            info["torch"][f"matmul_{name}_tflops"] = round(best / 1e12, 1)
            del a, b
        torch.backends.cuda.matmul.allow_tf32 = False
    print("PROBE_JSON " + json.dumps(info))


def cmd_build() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = "cuda" if torch.cuda.is_available() and not CPU else "cpu"
    tok = AutoTokenizer.from_pretrained(TOK_DIR)
    shapes = [(SMALL, {})]
    if CPU:
        shapes.append((TINY, dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, vocab_size=len(tok))))
    else:
        shapes.append((BIG, dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, vocab_size=len(tok))))
    made = {}
    for path, changes in shapes:
        t = time.time()
        cfg = AutoConfig.from_pretrained(TOK_DIR)
        for k, v in changes.items():
            setattr(cfg, k, v)
        cfg._name_or_path = os.path.basename(path)
        torch.manual_seed(0)
        where = dev
        try:
            with torch.device(dev):
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except Exception as err:  # noqa: BLE001 - fall back to a CPU init rather than lose every run
            print(f"building on {dev} failed ({type(err).__name__}: {err}); building on the CPU", flush=True)
            where = f"cpu (after {dev} failed: {type(err).__name__})"
            with torch.device("cpu"):
                model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
        model = model.to(torch.bfloat16)
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path)
        for f in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(TOK_DIR, f)) and f != "generation_config.json":
                shutil.copy(os.path.join(TOK_DIR, f), path)
        if not os.path.isfile(os.path.join(path, "generation_config.json")):
            shutil.copy(os.path.join(TOK_DIR, "generation_config.json"), path)
        # config.json: keep a top-level rope_theta like the offline model's folder (mlx-lm reads it)
        with open(os.path.join(path, "config.json")) as fh:
            c = json.load(fh)
        if "rope_parameters" in c and "rope_theta" not in c:
            c["rope_theta"] = c["rope_parameters"].get("rope_theta")
            with open(os.path.join(path, "config.json"), "w") as fh:
                json.dump(c, fh, indent=2)
        n = sum(p.numel() for p in model.parameters())
        made[os.path.basename(path)] = {"params_m": round(n / 1e6, 1), "device": where, "seconds": round(time.time() - t, 1),
                                        "weights": "random init (bf16)"}
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
    print("PROBE_JSON " + json.dumps(made))


def _workload(model_path: str):
    from finetune import data, models, template

    model, _ = models.resolve(model_path, user_named_it=True)
    tok = models.load_tokenizer(model)
    splits = data.load("sample", 0.1, 42)
    rows, _ = template.encode_all(splits.train, tok, 1024)
    return model, tok, splits, rows


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def cmd_variant(args) -> None:
    import torch

    dev = "cuda" if torch.cuda.is_available() and not CPU else "cpu"
    model, tok, splits, rows = _workload(args.model)
    out: dict = {"device": dev}
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.variant == "trl":
        import tempfile

        from datasets import Dataset
        from transformers.trainer_callback import PrinterCallback
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_list([{"prompt": ex.messages[:-1], "completion": ex.messages[-1:]} for ex in splits.train])
        kw = dict(output_dir=tempfile.mkdtemp(prefix="probe-trl-", dir=WORK), max_steps=args.steps,
                  per_device_train_batch_size=args.batch, learning_rate=args.lr, save_strategy="no", report_to=[],
                  disable_tqdm=True, include_num_input_tokens_seen="non_padding", seed=42, logging_steps=5)
        if dev == "cpu":
            kw["use_cpu"] = True
        cfg = SFTConfig(**kw)
        trainer = SFTTrainer(model=model.path, args=cfg, train_dataset=ds, peft_config=_lora())
        trainer.remove_callback(PrinterCallback)
        t = time.perf_counter()
        trainer.train()
        if dev == "cuda":
            torch.cuda.synchronize()
        out.update(seconds=time.perf_counter() - t, tokens=int(trainer.state.num_input_tokens_seen),
                   notes=f"TRL defaults: ckpt {trainer.args.gradient_checkpointing}, bf16 {trainer.args.bf16}, "
                         f"fp16 {trainer.args.fp16}, weights {next(trainer.model.parameters()).dtype}, "
                         f"attn {getattr(trainer.model.config, '_attn_implementation', '?')}, "
                         f"padding_free {getattr(trainer.args, 'padding_free', '?')}")
    else:
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from finetune.template import pad_batch

        torch.manual_seed(42)
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(model.path, dtype=dtype).to(dev), _lora())
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, **({"fused": True} if dev == "cuda" else {}))
        m.train()
        tokens, t = 0, time.perf_counter()
        for step in range(args.steps):
            start = step * args.batch % len(rows)
            ids, labels, mask = (torch.from_numpy(a).to(dev)
                                 for a in pad_batch(rows[start:start + args.batch], tok.pad_token_id))
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
        if dev == "cuda":
            torch.cuda.synchronize()
        out.update(seconds=time.perf_counter() - t, tokens=tokens, final_loss=float(loss),
                   notes=f"plain PEFT loop: {dtype} weights, bf16 autocast, full logits, fused AdamW, no ckpt, sdpa")
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    out["peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30 if dev == "cuda" else None
    print("PROBE_JSON " + json.dumps(out))


# ------------------------------------------------------------------------------------------------ parts
PLAN_KEYS = ("backend", "device", "batch_size", "grad_accum", "dtype", "quantize", "attention", "optimizer",
             "gradient_checkpointing", "predicted_peak_gb", "breakdown_gb", "budget_gb", "est_seconds",
             "est_tokens_per_s", "max_steps")
RESULT_KEYS = ("train_seconds", "steps", "tokens_seen", "tokens_per_s", "final_train_loss", "peak_memory_gb",
               "total_seconds", "oom_events", "skipped_steps", "extra")


def train(name: str, model: str, steps: int, timeout: float, need: float = 40, **settings) -> dict | None:
    t = part(name, need, timeout)
    if t is None:
        return None
    run_dir = os.path.join(WORK, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    env = base_env()
    env.update(MODEL=model, DATASET="sample", MAX_STEPS=str(steps), EVAL_ROWS="8" if CPU else "32",
               EVAL_GENERATIONS="0", OUTPUT_DIR=run_dir, EVAL_STEPS="1000000", SAVE_STEPS="1000000",
               LOGGING_STEPS="1" if CPU else "5", SEED="42")
    if CPU:  # the dry mode only checks this file's logic: keep the 2-core machine light
        env.update(MAX_SEQ_LENGTH="128", BATCH_SIZE="2", GRAD_ACCUM="1", EVAL_ROWS="4")
    env.update({k: str(v) for k, v in settings.items() if not (CPU and k in ("BATCH_SIZE", "EVAL_ROWS"))})
    r = run_cmd(name, [PY, "-m", "finetune", "train"], t, env)
    entry = {"status": r["status"], "rc": r["rc"], "seconds": r["seconds"], "model": model,
             "settings": {k: v for k, v in settings.items()}, "steps_asked": steps}
    path = os.path.join(run_dir, "run.json")
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                run = json.load(fh)
            FULL[name] = run
            entry["run_status"] = run.get("status")
            entry["plan"] = {k: run.get("plan", {}).get(k) for k in PLAN_KEYS}
            entry["result"] = {k: (run.get("result") or {}).get(k) for k in RESULT_KEYS} if run.get("result") else None
            ev = run.get("evaluation") or {}
            entry["eval"] = {w: {"eval_loss": (ev.get(w) or {}).get("eval_loss"), "metrics": (ev.get(w) or {}).get("metrics")}
                             for w in ("before", "after")} if ev else None
            entry["data"] = run.get("data")
            entry["reason"] = run.get("reason") or run.get("error") or run.get("stopped_because")
            entry["model_source"] = (run.get("model") or {}).get("source")
            entry["versions"] = run.get("versions")
            entry["warnings"] = run.get("warnings")
        except (OSError, ValueError) as err:
            entry["run_json_error"] = str(err)
    if r["status"] != "ok" or entry.get("run_status") not in (None, "completed"):
        entry["tail"] = tail(r["output"])
    record(name, entry)
    return entry


def simple(name: str, cmd: list[str], need: float, timeout: float) -> dict | None:
    t = part(name, need, timeout)
    if t is None:
        return None
    r = run_cmd(name, cmd, t, base_env())
    entry = {"status": r["status"], "rc": r["rc"], "seconds": r["seconds"]}
    data = None
    try:
        data = probe_json(r["output"])
    except ValueError:
        pass
    if data is not None:
        entry["data"] = data
    if r["status"] != "ok" or data is None:
        entry["tail"] = tail(r["output"])
    record(name, entry)
    return entry


def doctor() -> None:
    t = part("doctor", 10, 40)
    if t is None:
        return
    r = run_cmd("doctor", [PY, "-m", "finetune", "doctor", "--json"], t, base_env())
    entry = {"status": r["status"], "rc": r["rc"], "seconds": r["seconds"]}
    try:
        text = r["output"]
        d = json.loads(text[text.index("{"):text.rindex("}") + 1])
        hw = d.get("hardware", {})
        entry["cuda_devices"] = hw.get("cuda_devices")
        entry["packages"] = hw.get("packages")
        entry["cpu"] = {"cores": hw.get("cpu_cores"), "features": hw.get("cpu_features"), "ram_gb": hw.get("ram_total_gb")}
        entry["backends"] = d.get("backends")
        entry["choice"] = d.get("choice")
    except ValueError as err:
        entry["parse_error"] = str(err)
        entry["tail"] = tail(r["output"])
    if r["status"] != "ok":
        entry["tail"] = tail(r["output"])
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,compute_cap",
                                "--format=csv"], capture_output=True, text=True, timeout=15)
            entry["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as err:
            entry["nvidia_smi"] = f"failed: {err}"
    else:
        entry["nvidia_smi"] = "not found"
    record("doctor", entry)


def speed_variant(name: str, variant: str, model: str, timeout: float) -> None:
    simple(name, [PY, os.path.abspath(__file__), "--variant", variant, "--model", model, "--steps", str(SPEED["steps"]),
                  "--batch", str(SPEED["batch"]), "--lr", str(SPEED["lr"])], 45, timeout)


def main() -> None:
    os.makedirs(WORK, exist_ok=True)
    SUMMARY["budget_s"] = BUDGET
    SUMMARY["install"] = os.environ.get("GPU_PROBE_INSTALL", "")
    SUMMARY["gguf"] = os.environ.get("GPU_PROBE_GGUF", "")
    SUMMARY["speed_workload"] = dict(SPEED, rank=16, alpha=32, dropout=0.0, data="sample train rows")
    save()
    env = simple("env", [PY, os.path.abspath(__file__), "--env"], 10, 90)
    doctor()
    simple("build_models", [PY, os.path.abspath(__file__), "--build"], 20, 150)
    imports = ((env or {}).get("data") or {}).get("imports", {})
    small = TINY if CPU else SMALL
    if os.environ.get("GPU_PROBE_SET") == "calibrate":
        return calibrate(small, TINY if CPU else BIG)
    # the dtypes each setting really computes in (bf16 / fp16 / 4-bit), one step each; also warms the GPU up
    simple("dtypes", [PY, os.path.join(ROOT, "bench", "prove_cuda_dtypes.py"), small, "cpu" if CPU else "cuda"], 20, 120)
    big = TINY if CPU else BIG if os.path.isdir(BIG) else SMALL
    if big == SMALL:
        SUMMARY["notes"].append("the 1.1B shape was not built: its runs used the 135M shape")
    steps = 2 if CPU else 30
    short = 2 if CPU else 20
    # 2. 16-bit LoRA, everything auto
    train("bf16_auto", big, steps, 150)
    # 3. 4-bit (QLoRA) with checkpointing on
    bnb_ok = (imports.get("bitsandbytes") or {}).get("ok")
    if CPU or not bnb_ok:
        why = ("not run: CPU dry mode" if CPU else
               "not run: bitsandbytes not importable: " + str((imports.get("bitsandbytes") or {}).get("error")))
        for n in ("4bit_ckpt_on", "4bit_ckpt_off"):
            record(n, {"status": "skipped", "reason": why})
    else:
        train("4bit_ckpt_on", big, short, 120, QUANTIZE="4bit", GRADIENT_CHECKPOINTING="on")
    # 5. the real SmolLM2 (eval loss before -> after), else the 135M shape
    gguf = os.environ.get("FINETUNE_OFFLINE_GGUF")
    if gguf and os.path.isfile(gguf) and not CPU:
        train("smollm2_real", "smollm2-135m-offline", 2 if CPU else 40, 150, need=60, EVAL_GENERATIONS="0" if CPU else "8")
    else:
        SUMMARY["notes"].append("real SmolLM2 not run (no reassembled GGUF, or CPU dry mode): the 135M-shape run "
                                "used random weights")
        train("smollm2_shape_random", small, 2 if CPU else 40, 120)
    # 6. speed: TRL defaults vs plain PEFT loop vs finetune, same work
    speed_variant("speed_trl_defaults", "trl", big, 150)
    speed_variant("speed_plain_loop", "plain", big, 120)
    train("speed_finetune", big, SPEED["steps"], 120, BATCH_SIZE=SPEED["batch"], GRAD_ACCUM=1,
          LEARNING_RATE=SPEED["lr"], LORA_R=16, LORA_ALPHA=32, LORA_DROPOUT=0.0, EVAL_ROWS=8)
    # 4. fp16, then the remaining checkpointing variants while time lasts
    if CPU:
        record("fp16", {"status": "skipped", "reason": "not run: CPU dry mode (fp16 needs CUDA)"})
    else:
        train("fp16", big, short, 120, DTYPE="fp16")
    if not CPU and bnb_ok:
        train("4bit_ckpt_off", big, short, 120, QUANTIZE="4bit", GRADIENT_CHECKPOINTING="off")
    unsloth_parts(big, short)
    train("bf16_ckpt_on", big, short, 120, GRADIENT_CHECKPOINTING="on")
    SUMMARY["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    print_table()


def unsloth_parts(big: str, steps: int) -> None:
    """Unsloth 16-bit (the speed workload, so it joins the speed table) and 4-bit, where `import unsloth` works:
    it needs its own stack (requirements-unsloth.txt), which the default carried set does not hold."""
    probe = subprocess.run([PY, "-c", "import unsloth; print(unsloth.__version__)"], capture_output=True, text=True,
                           timeout=120, env=base_env()) if not CPU else None
    if probe is None or probe.returncode != 0:
        why = "CPU dry mode" if probe is None else (probe.stderr.strip().splitlines() or ["?"])[-1][:200]
        for name in ("speed_unsloth", "unsloth_4bit"):
            record(name, {"status": "skipped", "reason": f"not run: unsloth does not import here ({why})"})
        return
    train("speed_unsloth", big, SPEED["steps"], 180, need=60, BACKEND="unsloth", QUANTIZE="none",
          BATCH_SIZE=SPEED["batch"], GRAD_ACCUM=1, LEARNING_RATE=SPEED["lr"], LORA_R=16, LORA_ALPHA=32,
          LORA_DROPOUT=0.0, EVAL_ROWS=8)
    train("unsloth_4bit", big, steps, 180, need=60, BACKEND="unsloth", QUANTIZE="4bit")


def calibrate(small: str, big: str) -> None:
    """GPU_PROBE_SET=calibrate: the planner's CUDA constants, fitted on the default set's runs, checked on work they
    were not fitted on (longer rows, other trained shares, multi-turn), plus why fp16 is slower (a profile)."""
    from bench import workloads

    simple("profile_fp16", [PY, os.path.join(ROOT, "bench", "prove_cuda_dtypes.py"), "--profile", big,
                            "cpu" if CPU else "cuda"], 30, 120)
    folder = os.path.join(WORK, "data")
    long_rows, multiturn = workloads.write("long", folder), workloads.write("multiturn", folder)
    n = 2 if CPU else 20
    train("long_bf16", big, n, 90, DATASET=long_rows, MAX_SEQ_LENGTH="512")
    train("long_4bit_ckpt_on", big, n, 90, DATASET=long_rows, MAX_SEQ_LENGTH="512", QUANTIZE="4bit",
          GRADIENT_CHECKPOINTING="on")
    train("multiturn_bf16_ckpt_on", big, n, 90, DATASET=multiturn, MAX_SEQ_LENGTH="512", GRADIENT_CHECKPOINTING="on")
    train("4bit_ckpt_off", big, n, 90, QUANTIZE="4bit", GRADIENT_CHECKPOINTING="off")
    SUMMARY["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save()
    for r in ((SUMMARY["parts"].get("profile_fp16") or {}).get("data") or {}).get("profile", []):
        print("profile: " + json.dumps(r))
    print_table()


def _f(v, fmt="{:.2f}") -> str:
    if isinstance(v, int) and not isinstance(v, bool) and fmt == "{:.2f}":
        return str(v)
    return "-" if v is None else fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def print_table() -> None:
    p = SUMMARY["parts"]
    print("\n\n## GPU probe summary (" + SUMMARY["mode"] + f", {time.time() - T0:.0f}s)")
    print("install: " + (SUMMARY.get("install") or "-") + " | gguf: " + (SUMMARY.get("gguf") or "-"))
    env = (p.get("env") or {}).get("data") or {}
    tv = env.get("torch", {})
    if tv:
        print(f"torch {tv.get('version')} cuda {tv.get('cuda')} available={tv.get('cuda_available')} "
              f"{tv.get('device', '')} cc {tv.get('capability', '')} {tv.get('total_gb', '')} GB; matmul TFLOP/s "
              f"bf16 {tv.get('matmul_bf16_tflops')} fp16 {tv.get('matmul_fp16_tflops')} "
              f"tf32 {tv.get('matmul_tf32_tflops')} fp32 {tv.get('matmul_fp32_tflops')}")
    if env.get("imports"):
        print("imports: " + "; ".join(f"{k} {v.get('version', '') if v.get('ok') else 'FAIL ' + v.get('error', '')[:120]}"
                                      for k, v in env["imports"].items()))
    d = p.get("doctor") or {}
    if d:
        print(f"doctor: {d.get('status')} cuda_devices={d.get('cuda_devices')} choice={(d.get('choice') or {}).get('backend')}/"
              f"{(d.get('choice') or {}).get('device')} | nvidia-smi: {str(d.get('nvidia_smi', '')).replace(chr(10), ' / ')}")
    b = p.get("build_models") or {}
    print(f"build_models: {b.get('status')} {json.dumps(b.get('data'))}")
    for r in ((p.get("dtypes") or {}).get("data") or {}).get("runs", []):
        print("dtypes: " + json.dumps(r))
    bad = {k: v for k, v in p.items() if v.get("status") not in ("ok",) or
           v.get("run_status") not in (None, "completed")}
    if bad:  # before the tables, so that the tables stay inside the last 12,000 characters shown
        print("\n### not ok (full tails in summary.json / log.txt)")
        for k, v in bad.items():
            print(f"- {k}: {v.get('status')}{'/' + str(v.get('run_status')) if v.get('run_status') else ''} "
                  f"{v.get('reason') or ''}")
            if v.get("tail"):
                lines = [x[:200] for x in tail(v["tail"], 6).splitlines()]
                print("    " + "\n    ".join(lines))
    print("\n| part | status | s | dtype | attn | 4bit | ckpt | optim | batch x ga | tok/s | pred GB | peak GB alloc / reserved | est s | "
          "train s | skipped | eval loss before -> after |")
    print("|---|---|---:|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, e in p.items():
        if name in ("env", "doctor", "build_models", "dtypes") or name.startswith("speed_") and name not in (
                "speed_finetune", "speed_unsloth"):
            continue
        pl, rs, ev = e.get("plan") or {}, e.get("result") or {}, e.get("eval") or {}
        evs = "-"
        if ev:
            evs = f"{_f((ev.get('before') or {}).get('eval_loss'), '{:.3f}')} -> {_f((ev.get('after') or {}).get('eval_loss'), '{:.3f}')}"
        status = e.get("status") + ("" if e.get("run_status") in (None, "completed") else f"/{e.get('run_status')}")
        print(f"| {name} | {status} | {_f(e.get('seconds'), '{:.0f}')} | {_f(pl.get('dtype'))} | {_f(pl.get('attention'))} | "
              f"{_f(pl.get('quantize'))} | {_f(pl.get('gradient_checkpointing'))} | {_f(pl.get('optimizer'))} | "
              f"{_f(pl.get('batch_size'))} x {_f(pl.get('grad_accum'))} | {_f(rs.get('tokens_per_s'), '{:,.0f}')} | "
              f"{_f(pl.get('predicted_peak_gb'))} | {_f(rs.get('peak_memory_gb'))} / {_f((rs.get('extra') or {}).get('peak_reserved_gb'))} | "
              f"{_f(pl.get('est_seconds'), '{:.1f}')} | {_f(rs.get('train_seconds'), '{:.1f}')} | {_f(rs.get('skipped_steps'))} | {evs} |")
    print("\n| speed (same work: %d steps x batch %d, lr %g, r16) | status | tokens/s | vs TRL | peak GB | notes |"
          % (SPEED["steps"], SPEED["batch"], SPEED["lr"]))
    print("|---|---|---:|---:|---:|---|")
    trl_tps = ((p.get("speed_trl_defaults") or {}).get("data") or {}).get("tokens_per_s")
    for name in ("speed_trl_defaults", "speed_plain_loop", "speed_finetune", "speed_unsloth"):
        e = p.get(name) or {}
        if name in ("speed_finetune", "speed_unsloth"):
            rs, pl = e.get("result") or {}, e.get("plan") or {}
            tps, peak = rs.get("tokens_per_s"), rs.get("peak_memory_gb")
            notes = f"finetune train{' BACKEND=unsloth' if name == 'speed_unsloth' else ''}: {pl.get('dtype')}, ckpt {pl.get('gradient_checkpointing')}, attn {pl.get('attention')}"
        else:
            dd = e.get("data") or {}
            tps, peak, notes = dd.get("tokens_per_s"), dd.get("peak_gb"), dd.get("notes", "")
        ratio = f"{tps / trl_tps:.2f}x" if tps and trl_tps else "-"
        print(f"| {name} | {e.get('status', '-')} | {_f(tps, '{:,.0f}')} | {ratio} | {_f(peak)} | {notes} |")
    print("\nnotes: " + " | ".join(SUMMARY["notes"]))
    print(f"files: {OUT}/summary.json, runs_full.json, log.txt")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--env", action="store_true")
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--variant", choices=("trl", "plain"))
    ap.add_argument("--model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    a = ap.parse_args()
    if a.env:
        cmd_env()
    elif a.build:
        cmd_build()
    elif a.variant:
        cmd_variant(a)
    else:
        try:
            main()
        except BaseException as err:  # noqa: BLE001 - the summary must still be written
            SUMMARY["orchestrator_error"] = f"{type(err).__name__}: {err}"
            save()
            print_table()
            raise
