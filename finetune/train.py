"""The one path a training run takes, top to bottom. Every input check happens before the run directory
exists and before model weights load, so bad input leaves nothing behind; once training runs, a stop for
any reason (Ctrl-C, SIGTERM, an error, a full disk) leaves the adapter it trained and a record saying why.

    rows     = method.read(cfg)                      validate the data (all errors at once)
    model    = models.resolve(cfg.model)              config + tokenizer only; offline model if needed
    prepared = method.prepare(rows, tokenizer)       token ids + loss masks (finetune.template)
    plan     = planner.make(...)                     batch, checkpointing, dtype, 4-bit, memory, time
    cfg      = resolved(cfg, plan)                   every auto setting decided, as run.json records it
    session  = backend.load(...)                     weights (+ the ADAPTER it continues)
    before   = method.evaluate_model(session)
    loop.run(session, method, prepared, ...)         steps, logging, eval, checkpoints, signals, OOM
    after    = method.evaluate_model(session); report.md, run.json, loss.png
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import asdict, fields, replace

import backends
from finetune import (__version__, adapters, checkpoint, fsio, hardware, launch, loop, methods, models, outputs, runs,
                      system_prompt, workload, world as worlds)
from finetune import plan as planner
from finetune.config import FIELDS, Config, env_name
from finetune.errors import UserError
from finetune.progress import Progress, hms
from finetune.tracking import Tracker

# Settings a resumed run may change: they do not alter what is trained.
RESUMABLE_CHANGES = {"resume", "output_dir", "report_to", "logging_steps", "save_total", "push_to_hub", "yes",
                     "dry_run", "config", "eval_generations", "remote", "flavor", "remote_max_hours", "nproc",
                     "fsdp", "cpu_lanes"}
# Settings added after a run may have been recorded: the value that reproduces how such a run trained, so
# resuming it keeps its loss (a DPO run from before RPO stays plain DPO, not the new default of 1.0).
ADDED_LATER = {"rpo_alpha": 0.0, "group_by_length": True, "lora_scaling": "standard"}


def resolved(cfg: Config, plan: planner.Plan, method, prepared, sources: dict[str, str] | None = None) -> Config:
    """The config with every auto setting decided: what backends get and what run.json records. A learning
    rate nobody set is the method's own (preference losses need a far smaller one than SFT)."""
    out = replace(cfg, batch_size=plan.batch_size, grad_accum=plan.grad_accum, max_steps=plan.max_steps,
                  eval_steps=plan.eval_steps, save_steps=plan.save_steps, dtype=plan.dtype, quantize=plan.quantize,
                  gradient_checkpointing="on" if plan.gradient_checkpointing else "off")
    if (sources or {}).get("learning_rate") == "default" and hasattr(method, "LEARNING_RATE"):
        out = replace(out, learning_rate=method.LEARNING_RATE)
    return replace(out, **method.defaults(out, prepared)) if hasattr(method, "defaults") else out


def settings_table(cfg: Config, final: Config, sources: dict[str, str]) -> dict[str, dict]:
    """Each setting with its final value and where it came from (cli / env / yaml:<file> / plan / default)."""
    out = {}
    for f in fields(Config):
        if FIELDS[f.name].metadata["cli_only"]:
            continue
        before, after, source = getattr(cfg, f.name), getattr(final, f.name), sources[f.name]
        if before != after and (before is None or before == "auto" or f.name == "learning_rate"):
            source = "plan" if f.name not in ("beta", "rpo_alpha", "reward", "learning_rate") else f"{cfg.method} default"
        out[f.name] = {"value": after, "source": source}
    return out


def format_settings(settings: dict[str, dict]) -> str:
    lines = ["Settings (value  <- source; env var in brackets):"]
    for name, item in settings.items():
        lines.append(f"  {name:<24} {str(item['value']):<32} <- {item['source']:<8} [{env_name(name)}]")
    return "\n".join(lines)


def _check_combination(cfg: Config, plan: planner.Plan) -> None:
    if plan.dtype == "fp16" and plan.device != "cuda":
        raise UserError(f"DTYPE=fp16 needs a CUDA GPU (this run uses {plan.device}); use DTYPE=bf16 or fp32")
    if plan.quantize == "4bit" and plan.device not in ("cuda", "mlx", "cpu"):
        raise UserError(f"QUANTIZE=4bit needs a CUDA GPU (bitsandbytes) or the MLX backend (this run uses {plan.device}); "
                        "use QUANTIZE=none")
    if plan.quantize == "4bit" and plan.device == "cpu":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("QUANTIZE=4bit on the CPU needs bitsandbytes (>= 0.50 runs NF4 there): "
                            ".venv/bin/pip install bitsandbytes==0.50.2, or use QUANTIZE=none")
    if cfg.report_to == "trackio":
        import importlib.util

        if importlib.util.find_spec("trackio") is None:
            raise UserError("REPORT_TO=trackio needs the trackio package: .venv/bin/pip install trackio")


def run(cfg: Config, sources: dict[str, str], argv: list[str] | None = None) -> int:
    """Train here (REMOTE=none; the CLI sends the rest to finetune.remote, which calls inspect() below). With
    NPROC > 1, check everything in this process, then start the same command under torchrun (finetune.launch)."""
    if argv is not None and not cfg.dry_run and not worlds.launched() and cfg.nproc != "1":
        hw = hardware.detect()
        world_size = launch.processes(cfg.nproc, hw, backends.select(cfg.backend, hw, None, cfg.method)[0].name)
        if world_size > 1:
            with contextlib.redirect_stdout(io.StringIO()):  # the checks only: rank 0 prints the settings and plan
                checked = run(replace(cfg, dry_run=True), sources)
            if checked:
                return checked
            return launch.start(world_size, argv)
    tees = outputs.start_log()
    try:
        if cfg.resume:
            return _resume(cfg, sources, tees)
        return _train(cfg, sources, tees)
    finally:
        outputs.stop_log(tees)


def _resume(cfg: Config, sources: dict[str, str], tees) -> int:
    run_dir = cfg.resume
    record = runs.record_of(run_dir, "RESUME")
    if not all(isinstance(record.get(k), dict) for k in ("config", "sources", "settings")):
        raise UserError(f"RESUME={run_dir}: run.json is damaged (its config is missing); start a new run")
    state = runs.status(run_dir, record)
    if state == "running":
        raise UserError(f"RESUME={run_dir}: that run is still running")
    if state == "completed":
        raise UserError(f"RESUME={run_dir}: that run already completed; start a new one (e.g. ADAPTER={run_dir})")
    if checkpoint.latest(run_dir) is None:
        raise UserError(f"RESUME={run_dir}: it has no whole checkpoint to continue from; start a new run")
    recorded = record["config"] = {**ADDED_LATER, **record["config"]}  # and run.json says so from now on
    for name, source in sources.items():
        if source == "default" or name in RESUMABLE_CHANGES or name not in recorded:
            continue
        if not workload.same_setting(name, getattr(cfg, name), recorded[name]):
            raise UserError(f"RESUME: {env_name(name)}={getattr(cfg, name)!r} differs from the run's {recorded[name]!r}; "
                            "a resumed run keeps its settings (start a new run to change them)")
    kept = {k: v for k, v in recorded.items() if k in FIELDS and not FIELDS[k].metadata["cli_only"]}
    changed = {k: getattr(cfg, k) for k in RESUMABLE_CHANGES if k in kept and sources.get(k, "default") != "default"}
    resumed = replace(Config(**{**kept, **changed}), resume=run_dir, output_dir=run_dir, dry_run=cfg.dry_run)
    workload.check_same_data(resumed, record, run_dir)
    # the model is the one the run used, never a fallback
    return _train(resumed, {**record["sources"], "resume": "cli", "model": "resume"}, tees, record=record)


def _train(cfg: Config, sources: dict[str, str], tees, record: dict | None = None) -> int:
    t0 = time.perf_counter()
    hw = hardware.detect()
    backends.before_transformers(cfg.backend, hw)  # Unsloth patches transformers: it must load first
    hw, no_gpu = hardware.confirm_cuda(hw)
    if no_gpu and os.environ.get(hardware.EXPECT_CUDA) == "1":  # an HF Job priced for a GPU never trains on its CPU
        raise UserError(f"this job was priced for a GPU, but {no_gpu}; stopping before training")
    if no_gpu:
        print(f"warning: {no_gpu}; planning for the CPU")
    method, rows, start, model, fallback, tokenizer, prepared = workload.inspect(cfg, sources)
    backend, why = backends.select(cfg.backend, hw, model, cfg.method)
    world = launch.join(backend, hw) if worlds.launched() else worlds.World()
    # not started by a launcher: one process, unless this is the check run() makes before starting torchrun
    world_size = world.size if worlds.launched() else launch.processes(cfg.nproc, hw, backend.name) if cfg.dry_run else 1
    launch.check_backend(backend, hw, world_size, worlds.launched())
    if not world.writer:  # rank 0 prints and writes for the run; the others' errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    if backend.device(hw) == "cpu" and world.writer:  # the time estimate uses this machine's measured matmul rate
        hw.cpu_busy_cores = hardware.measure_cpu_busy()
        hw.cpu_peak_gflops = hardware.measure_cpu_peak(hw.cpu_bf16)
    try:
        plan = planner.make(cfg, hw, model, backend.name, backend.device(hw), len(prepared.train), prepared.mean_tokens,
                            prepared.longest, prepared.sequences_per_item, method.items_per_draw(cfg),
                            prepared.trained_share, prepared.sampled_per_item, world_size)
        if world.size > 1:  # every process trains with rank 0's plan (memory probes may differ a little)
            plan = planner.Plan(**json.loads(world.share(json.dumps(asdict(plan)))))
    except UserError as err:
        if cfg.dry_run and "does not fit" in str(err):  # say where it would fit instead
            from finetune import remote

            print(f"Does not fit here: {err}")
            options, source = remote.flavors()
            quotes = remote.quote(cfg, model, prepared, method.items_per_draw(cfg), options)
            fitting = [q for q in quotes if q.plan]
            chosen = remote.pick(quotes, "auto", cfg.remote_max_hours) if fitting else None
            print(remote.format_quotes(quotes, chosen, source))
            print("Run it there with: ./run.sh train --remote hf-jobs (add --yes to skip the question)")
            return 0
        raise
    _check_combination(cfg, plan)
    final = workload.absolute_paths(replace(resolved(cfg, plan, method, prepared, sources), model=model.name))
    settings = settings_table(cfg, final, sources) if record is None else record["settings"]
    print(format_settings(settings))
    print(f"Model: {model.name} ({model.source}: {model.path}, {model.num_params / 1e6:.1f}M parameters)")
    print(f"Backend: {'; '.join(why)}")
    print(f"Data: {rows.source} -> {len(prepared.train)} train / {len(prepared.eval)} held-out items ({rows.shape}), "
          f"validation {rows.validation_source}, mean {prepared.mean_tokens:.0f} tokens/sequence")
    warnings = rows.warnings + prepared.warnings
    for w in warnings:
        print(f"warning: {w}")
    system, distinct = system_prompt.shared(rows.train)
    said = system_prompt.line(system, distinct)
    if said:
        print(said)
    print(planner.format_plan(plan))
    if record is None:
        run_name = cfg.run_name or outputs.default_run_name(model.name, cfg.method)
        run_dir = outputs.check_output_dir(cfg.output_dir, run_name) if world.writer else ""
        if cfg.dry_run:
            print(f"Dry run: nothing trained; the run would write {run_dir}")
            return 0
        models.check_weights(model)
        made_dir = not os.path.isdir(run_dir)  # an empty OUTPUT_DIR the user made stays if the run leaves nothing
        if world.writer:
            run_dir = outputs.create_run_dir(run_dir, named=bool(cfg.output_dir))
        run_dir = world.share(run_dir)
    else:
        run_name, run_dir, made_dir = record["run_name"], cfg.resume, False
        if cfg.dry_run:
            return 0
    if not world.writer:
        return _follow(final, world, run_dir, backend, plan, model, tokenizer, method, prepared, start,
                       resumed="evaluation" in record if record else False)
    with runs.RunLock(run_dir):
        outputs.attach_log(tees, os.path.join(run_dir, "training_log.txt"))
        if record is None:
            record = {"run_name": run_name, "run_dir": os.path.abspath(run_dir), "status": "running",
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings, "sources": sources,
                      "config": asdict(final), "hardware": hw.to_dict(), "versions": _versions(hw),
                      "model": model.to_dict(), "plan": plan.to_dict(), "backend_choice": why,
                      "data": {"source": rows.source, "shape": rows.shape, "train_rows": len(prepared.train),
                               "validation_rows": len(prepared.eval), "validation_source": rows.validation_source,
                               "mean_tokens": prepared.mean_tokens, "fingerprint": workload.fingerprint(final),
                               "system_prompt": system, "system_prompts": distinct},
                      "warnings": warnings, "fallback_banner": fallback, "chain": start.chain() if start else None}
            try:
                tokenizer.save_pretrained(run_dir)
            except Exception as err:  # a full disk raises RuntimeError from the tokenizers library, not OSError
                _remove_contents(run_dir, made_dir)  # nothing trained yet: leave no half-made run behind
                raise fsio.WriteError(run_dir, err) from None
        else:
            record.update(status="running", resumed=record.get("resumed", []) + [time.strftime("%Y-%m-%dT%H:%M:%S%z")],
                          world_sizes=record.get("world_sizes", [record["plan"].get("world_size", 1)]) + [world.size])
        return _session(final, record, run_dir, backend, plan, model, tokenizer, method, prepared, start, t0, made_dir,
                        world)


def _load(cfg, backend, plan, model, tokenizer, start, world):
    """The backend session: weights (downloaded if needed), the starting adapter converted for this backend."""
    models.fetch_weights(model)
    adapter_dir = adapters.for_backend(start, backend.name, model.ref) if start else None
    try:
        session = backend.load(cfg, plan, model, tokenizer, adapter_dir)
    finally:
        adapters.drop_converted(start, adapter_dir)
    session.world = world
    return session


def _follow(cfg, world, run_dir, backend, plan, model, tokenizer, method, prepared, start, resumed: bool) -> int:
    """Rank > 0 of a distributed run: train this process's share of every step. Rank 0 evaluates and writes
    everything; this process writes nothing, and reads the checkpoint rank 0 resumes from."""
    try:
        with loop.StopRequest() as stop:
            session = _load(cfg, backend, plan, model, tokenizer, start, world)
            method.start(session, prepared, cfg)
            if plan.fsdp and not resumed:  # sharded weights: rank 0's evaluation needs every process's forwards
                method.evaluate_model(session, prepared, cfg)
            world.barrier()  # rank 0 has evaluated the starting model (or cleaned a resumed run's checkpoints)
            found = checkpoint.latest(run_dir) if resumed else None
            state = checkpoint.load(found, session) if found else loop.LoopState(micro_batch=plan.batch_size,
                                                                                 grad_accum=plan.grad_accum)
            state = loop.run(session, method, prepared, cfg, plan, run_dir, lambda event: None, state, stop).state
            if plan.fsdp:
                stop.check(state.step, world)
                method.evaluate_model(session, prepared, cfg)
    except loop.Stopped as stopped:
        return stopped.exit_code
    except worlds.Lost:  # rank 0 went away before the loop (it reports why)
        return 1
    return 0


def _session(cfg, record, run_dir, backend, plan, model, tokenizer, method, prepared, start, t0, made_dir,
             world=None) -> int:
    world = world or worlds.World()
    run_json = os.path.join(run_dir, "run.json")
    fsio.write_json(run_json, record)
    state = session = None
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with loop.StopRequest() as stop:
            print(f"Run directory: {run_dir}")
            session = _load(cfg, backend, plan, model, tokenizer, start, world)
            stop.check(0)
            method.start(session, prepared, cfg)  # before any update: DPO's reference is the starting model
            state = loop.LoopState(micro_batch=plan.batch_size, grad_accum=plan.grad_accum)
            if "evaluation" in record:  # resumed: the base was evaluated by the first attempt
                before = methods.EvalResult(**record["evaluation"]["before"])
                checkpoint.clean(run_dir)
                state = checkpoint.load(checkpoint.latest(run_dir), session)
                print(f"Resuming from step {state.step} of {plan.max_steps} ({checkpoint.latest(run_dir)})")
            else:
                print(f"Evaluating {'the starting adapter' if start else 'the base model'} on held-out rows ...")
                before = method.evaluate_model(session, prepared, cfg)
                print(f"  before: {_eval_line(before)}")
                record["evaluation"] = {"before": before.to_dict()}
                fsio.write_json(run_json, record)
            world.barrier()  # the other processes start their steps (and read a resumed run's checkpoint) now
            stop.check(state.step)
            outputs.write_metrics(metrics_path, state.records)
            tracker = Tracker(cfg, record["run_name"], record["config"], resumed=bool(record.get("resumed")))
            progress = Progress(plan.max_steps, metrics_path, tracker=tracker)
            print(f"Training {plan.max_steps - state.step} steps ...")
            result = loop.run(session, method, prepared, cfg, plan, run_dir, progress, state, stop)
            state = result.state
            files = session.save_adapter(run_dir)
            outputs.write_metrics(metrics_path, state.records)
            # Ctrl-C during the last steps: the adapter is saved, skip the evaluation (FSDP: all processes agree)
            stop.check(state.step, world if plan.fsdp else None)
            print("Evaluating with the adapter ...")
            after = method.evaluate_model(session, prepared, cfg)
            print(f"  after: {_eval_line(after)}")
            tracker.finish()
    except (loop.Stopped, worlds.Lost) as stopped:
        if isinstance(stopped, worlds.Lost):  # outside the steps: FSDP's evaluations gather from every process
            stopped = loop.PeerLost(state.step if state else 0, str(stopped))
        if isinstance(stopped, loop.PeerLost):  # torchrun SIGTERMs every process when one dies: finish writing first
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if _nothing_trained(record, run_dir, made_dir):
            return stopped.exit_code
        state = _stopped_state(run_dir, state)
        if session is not None and state.step > 0:
            session.save_adapter(run_dir)
        _finish_early(record, run_json, run_dir, state, "interrupted", str(stopped))
        done = state.step >= cfg.max_steps
        print(f"Interrupted {'during the final evaluation' if done else f'at step {state.step}'}: the adapter "
              f"{'is complete' if done else 'so far is'} in {run_dir}.\nContinue with: {runs.resume_command(run_dir)}")
        return stopped.exit_code
    except loop.NonFinite as err:
        state = _stopped_state(run_dir, None)  # the checkpoint the loop just saved: the last good weights
        session.save_adapter(run_dir)
        record["skipped_steps"] = state.skipped_steps
        _finish_early(record, run_json, run_dir, state, "failed", str(err))
        raise
    except KeyboardInterrupt:
        if _nothing_trained(record, run_dir, made_dir):
            return 130
        _finish_early(record, run_json, run_dir, _stopped_state(run_dir, state), "interrupted",
                      "stopped at once (a second signal, or the step did not end in time)")
        print(f"Stopped at once. Continue from the last checkpoint with: {runs.resume_command(run_dir)}")
        return 130
    except BaseException as err:
        if _nothing_trained(record, run_dir, made_dir, "The run failed before its first checkpoint"):
            raise
        reason = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        _finish_early(record, run_json, run_dir, _stopped_state(run_dir, state), "failed", reason)
        raise
    seconds = state.train_seconds
    result_record = {"train_seconds": seconds, "steps": state.step, "tokens_seen": state.tokens_seen,
                     "tokens_per_s": state.tokens_seen / seconds if seconds else 0.0,
                     "final_train_loss": result.final_train_loss, "peak_memory_gb": session.peak_memory_gb(),
                     "predicted_peak_gb": plan.predicted_peak_gb, "predicted_seconds": plan.est_seconds,
                     "total_seconds": time.perf_counter() - t0, "oom_events": state.oom_events,
                     "skipped_steps": state.skipped_steps, "lr_decay_from": state.decay_from,
                     "extra": session.describe()}
    record.update(status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), result=result_record,
                  step_reached=state.step, evaluation={"before": before.to_dict(), "after": after.to_dict()},
                  adapter_files=[os.path.relpath(f, run_dir) for f in files],
                  mlx_adapter=os.path.isdir(os.path.join(run_dir, "mlx")))
    fsio.write_json(run_json, record)
    outputs.plot_loss(state.records, os.path.join(run_dir, "loss.png"), f"{record['run_name']} ({model.name})")
    outputs.write_report(os.path.join(run_dir, "report.md"), record, before.to_dict(), after.to_dict())
    print(f"Done in {hms(time.perf_counter() - t0)}: {result_record['tokens_per_s']:,.0f} tokens/s, peak memory "
          f"{result_record['peak_memory_gb'] or 0:.2f} GB measured vs {plan.predicted_peak_gb:.2f} GB predicted")
    print(f"{_eval_line(before)} -> {_eval_line(after)}; outputs in {run_dir} (report.md, run.json)")
    if cfg.push_to_hub:
        from finetune import hub

        hub.push_run(run_dir, cfg.push_to_hub, what="adapter", private=True)
    return 0


def _nothing_trained(record: dict, run_dir: str, made_dir: bool, what: str = "Stopped before the first training step") -> bool:
    """A new run stopped before its first checkpoint has nothing to keep or resume: remove its directory (so the same
    OUTPUT_DIR can be used again) and say so. A resumed run's directory is never removed."""
    if record.get("resumed") or checkpoint.latest(run_dir) is not None:
        return False
    _remove_contents(run_dir, made_dir)
    print(f"{what}: nothing was trained, so nothing was kept ({run_dir} removed). Run the same command again to start.")
    return True


def _remove_contents(run_dir: str, made_dir: bool) -> None:
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    if made_dir:
        os.rmdir(run_dir)


def _stopped_state(run_dir: str, state):
    if state is None:
        found = checkpoint.latest(run_dir)
        return loop.LoopState.from_dict(checkpoint.read_state(found)) if found else loop.LoopState()
    return state


def _finish_early(record, run_json, run_dir, state, status, reason) -> None:
    """Record why the run stopped; a full disk here must not hide the original error."""
    record.update(status=status, error=reason, step_reached=state.step, stopped=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        outputs.write_metrics(os.path.join(run_dir, "metrics.jsonl"), state.records)
        fsio.write_json(run_json, record)
    except UserError as err:
        print(f"warning: {err}")


def _eval_line(result) -> str:
    parts = [f"eval_loss {result.eval_loss:.4f}"] if result.eval_loss is not None else []
    parts += [f"{k} {outputs.metric_text(k, v)}" for k, v in result.metrics.items()]
    return ", ".join(parts)


def _versions(hw: hardware.Hardware) -> dict[str, str]:
    return {"finetune": __version__, "python": platform.python_version(), **hw.packages}
