"""The one path a training run takes, top to bottom. Every input check happens before the run
directory exists and before model weights load, so bad input leaves nothing behind."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, replace

import backends
from finetune import __version__, check_data, data, hardware, models, outputs, plan as planner
from finetune.config import Config, env_name
from finetune.errors import UserError
from finetune.evaluate import evaluate
from finetune.progress import Progress, hms
from finetune.template import encode_all

PLANNED = {"batch_size": "batch_size", "grad_accum": "grad_accum", "max_steps": "max_steps",
           "eval_steps": "eval_steps", "gradient_checkpointing": "gradient_checkpointing",
           "dtype": "dtype", "quantize": "quantize"}


def banner(text: str) -> str:
    width = max(len(line) for line in text.splitlines()) + 4
    rule = "!" * width
    return "\n".join([rule, *(f"! {line:<{width - 4}} !" for line in text.splitlines()), rule])


def resolved_settings(cfg: Config, sources: dict[str, str], plan: planner.Plan) -> dict[str, dict]:
    """Each setting with its final value and where it came from (cli / env / yaml:<file> / plan / default)."""
    out = {}
    for name, value in asdict(cfg).items():
        if name in ("config", "dry_run"):
            continue
        source = sources[name]
        if name in PLANNED and source == "default":
            value, source = getattr(plan, PLANNED[name]), "plan"
        out[name] = {"value": value, "source": source}
    return out


def format_settings(settings: dict[str, dict]) -> str:
    lines = ["Settings (value  <- source; env var in brackets):"]
    for name, item in settings.items():
        lines.append(f"  {name:<24} {str(item['value']):<32} <- {item['source']:<8} [{env_name(name)}]")
    return "\n".join(lines)


def _versions(hw: hardware.Hardware) -> dict[str, str]:
    return {"finetune": __version__, "python": platform.python_version(), **hw.packages}


def _check_template(cfg: Config, splits: data.Splits, tokenizer) -> None:
    chat = splits.shape in ("messages", "conversational_prompt_completion")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"MODEL={cfg.model} has no chat template, so '{splits.shape}' rows cannot be rendered; "
                        "use a chat/instruct model or prompt/completion rows")


def _check_combination(cfg: Config, plan: planner.Plan) -> None:
    if plan.dtype == "fp16" and plan.device != "cuda":
        raise UserError(f"DTYPE=fp16 needs a CUDA GPU (this run uses {plan.device}); use DTYPE=bf16 or fp32")
    if plan.quantize == "4bit" and plan.device not in ("cuda", "mlx"):
        raise UserError(f"QUANTIZE=4bit needs a CUDA GPU (bitsandbytes) or the MLX backend (this run uses {plan.device}); "
                        "use QUANTIZE=none")
    if cfg.report_to == "trackio":
        import importlib.util

        if importlib.util.find_spec("trackio") is None:
            raise UserError("REPORT_TO=trackio needs the trackio package: .venv/bin/pip install trackio")


def run(cfg: Config, sources: dict[str, str]) -> int:
    t0 = time.perf_counter()
    hw = hardware.detect()
    # every row is checked (errors stop here, all listed, before any model loads); same checks as check-data
    splits = data.load(cfg.dataset, cfg.val_split, cfg.seed, column_map=cfg.column_map)
    data_warnings = check_data.check_splits(splits)
    model, fallback = models.resolve(cfg.model, user_named_it=sources["model"] != "default")
    if fallback:
        print(banner(fallback))
    backend, why = backends.select(cfg.backend, hw, model, cfg.method)
    tokenizer = models.load_tokenizer(model)
    _check_template(cfg, splits, tokenizer)
    train_enc, warnings = encode_all(splits.train, tokenizer, cfg.max_seq_length)
    warnings = data_warnings + warnings + check_data.template_warnings(splits.train, tokenizer)
    val_rows = splits.validation[: cfg.eval_rows]
    val_enc, val_warnings = encode_all(val_rows, tokenizer, cfg.max_seq_length)
    warnings += [f"validation: {w}" for w in val_warnings]
    if not train_enc or not val_enc:
        raise UserError(f"DATASET={cfg.dataset}: no row keeps a trained token within MAX_SEQ_LENGTH={cfg.max_seq_length}")
    mean_tokens = sum(len(r.input_ids) for r in train_enc) / len(train_enc)
    longest = max(len(r.input_ids) for r in train_enc + val_enc)
    plan = planner.make(cfg, hw, model, backend.name, backend.device(hw), len(train_enc), mean_tokens, longest)
    _check_combination(cfg, plan)
    settings = resolved_settings(cfg, sources, plan)

    print(format_settings(settings))
    print(f"Backend: {'; '.join(why)}")
    print(f"Data: {splits.source} -> {len(train_enc)} train / {len(val_enc)} eval rows ({splits.shape}), "
          f"validation {splits.validation_source}, mean {mean_tokens:.0f} tokens/row")
    for w in warnings:
        print(f"warning: {w}")
    print(planner.format_plan(plan))
    if cfg.dry_run:
        return 0

    run_name = cfg.run_name or outputs.default_run_name(model.name, cfg.method)
    run_dir = outputs.check_output_dir(cfg.output_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    tees = outputs.start_log(os.path.join(run_dir, "training_log.txt"))
    record = {"run_name": run_name, "run_dir": os.path.abspath(run_dir), "status": "running",
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings,
              "config": {k: v["value"] for k, v in settings.items()}, "hardware": hw.to_dict(),
              "versions": _versions(hw), "model": model.to_dict(), "plan": plan.to_dict(), "backend_choice": why,
              "data": {"source": splits.source, "shape": splits.shape, "train_rows": len(train_enc),
                       "validation_rows": len(val_enc), "validation_source": splits.validation_source,
                       "mean_tokens": mean_tokens}, "warnings": warnings, "fallback_banner": fallback}
    run_json = os.path.join(run_dir, "run.json")
    outputs.write_json(run_json, record)
    try:
        if fallback:
            print(banner(fallback))
        print(f"Run directory: {run_dir}")
        models.fetch_weights(model)
        session = backend.load(replace(cfg, run_name=run_name), plan, model, tokenizer)
        print(f"Evaluating the base model on {len(val_enc)} held-out rows ...")
        before = evaluate(session, tokenizer, val_rows, val_enc, cfg.eval_generations, cfg.max_new_tokens)
        print(f"  base: eval_loss {before.eval_loss:.4f} {before.metrics}")
        print(f"Training {plan.max_steps} steps ...")
        progress = Progress(plan.max_steps, os.path.join(run_dir, "metrics.jsonl"))
        result = session.train(train_enc, val_enc, progress)
        files = session.save_adapter(run_dir)
        print("Evaluating with the adapter ...")
        after = evaluate(session, tokenizer, val_rows, val_enc, cfg.eval_generations, cfg.max_new_tokens)
        print(f"  adapter: eval_loss {after.eval_loss:.4f} {after.metrics}")
    except BaseException as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        outputs.write_json(run_json, record)
        outputs.stop_log(tees)
        raise
    record.update(status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  result={**asdict(result), "predicted_peak_gb": plan.predicted_peak_gb,
                          "predicted_seconds": plan.est_seconds, "total_seconds": time.perf_counter() - t0},
                  evaluation={"before": before.to_dict(), "after": after.to_dict()},
                  adapter_files=[os.path.relpath(f, run_dir) for f in files])
    outputs.write_json(run_json, record)
    outputs.plot_loss(progress.records, os.path.join(run_dir, "loss.png"), f"{run_name} ({model.name})")
    outputs.write_report(os.path.join(run_dir, "report.md"), record, before.to_dict(), after.to_dict())
    print(f"Done in {hms(time.perf_counter() - t0)}: {result.tokens_per_s:,.0f} tokens/s, peak memory "
          f"{result.peak_memory_gb or 0:.2f} GB measured vs {plan.predicted_peak_gb:.2f} GB predicted")
    print(f"eval loss {before.eval_loss:.4f} -> {after.eval_loss:.4f}; outputs in {run_dir} (report.md, run.json)")
    outputs.stop_log(tees)
    return 0
