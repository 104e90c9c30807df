"""The training loop every backend and method shares, top to bottom:

    for each optimizer step:
        rows   = the next rows of a seeded shuffle                        (DataOrder: resumable by position)
        batch  = method.make_batch(rows)                                  (GRPO samples completions here)
        stats  = session.train_step(batch, micro_batch, lr(step))        (the backend's loss, grads, update)
        log / evaluate / checkpoint at their cadence; stop cleanly when a signal asked for it

What it owns and the backends need not repeat: data order, the learning-rate schedule, logging and eval
cadence, checkpoints (finetune.checkpoint), Ctrl-C / SIGTERM, and out-of-memory recovery (halve the
micro-batch, double accumulation, continue from the last checkpoint). A checkpoint holds everything the
next step depends on, and every step reseeds its random numbers from (SEED, step), so a resumed run
continues the same computation.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

from finetune import checkpoint, methods, schedule
from finetune.checkpoint import LoopState  # noqa: F401 - train and callers use loop.LoopState too
from finetune.errors import UserError, first_line
from finetune.schedule import learning_rate  # noqa: F401 - tests and callers use loop.learning_rate too
from finetune.world import Lost, World

GROUP_STEPS = 8  # GROUP_BY_LENGTH: rows are sorted by length inside windows of this many steps
STOP_GRACE_S = float(os.environ.get("FINETUNE_STOP_GRACE_S", "120"))  # after a stop signal, the step gets this long
NONFINITE_LIMIT = 5  # steps in a row whose loss or gradient is inf/NaN (each skipped, never applied) before stopping


@dataclass
class LoopResult:
    state: LoopState
    final_train_loss: float | None


class NonFinite(UserError):
    """NONFINITE_LIMIT steps in a row had an inf/NaN loss or gradient; none was applied, so the weights (saved with a
    checkpoint at `step`) are the last good ones."""

    def __init__(self, step: int, in_row: int, skipped: int):
        self.step = step
        super().__init__(f"{in_row} steps in a row (up to step {step}) had an inf/NaN loss or gradient and were skipped "
                         f"({skipped} in all); stopped with the last good weights saved. Lower LEARNING_RATE, or use "
                         "DTYPE=bf16 / fp32 where fp16 overflows")


class Stopped(BaseException):
    """A signal asked the run to stop; a checkpoint and the adapter were saved at `step`. A BaseException, like
    KeyboardInterrupt: raised from the signal handler, it must pass through user code's `except Exception`."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum   # 130 for SIGINT, 143 for SIGTERM, as shells report them


class PeerLost(Stopped):
    """Another process of a distributed run died (killed, out of memory): rank 0 saved a checkpoint of the last whole
    step (the failed one never reached the optimizer) and the adapter, as for a signal."""
    exit_code = 1

    def __init__(self, step: int, why: str):
        self.signum, self.step = None, step
        BaseException.__init__(self, f"another process of this distributed run stopped ({why}); stopped at step {step}")


class StopRequest:
    """SIGINT / SIGTERM stop the run. Inside the training loop (`in_step`) the first one sets a flag the loop checks
    between steps, so a step is never cut in half and a checkpoint is saved; anywhere else (loading, evaluation)
    there is nothing to finish, so it stops at once. A second signal, or STOP_GRACE_S without the step finishing (a
    hanging reward function), raises KeyboardInterrupt: every file is written atomically, so nothing on disk breaks."""

    def __init__(self):
        self.signum: int | None = None
        self.in_step = False
        self._old: dict = {}
        self._timer: threading.Timer | None = None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if not self.in_step:
            raise Stopped(signum, -1)
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and the adapter "
              f"(a second Ctrl-C, or {STOP_GRACE_S:g} s without the step ending, stops at once)", flush=True)
        self._timer = threading.Timer(STOP_GRACE_S, os.kill, (os.getpid(), signal.SIGINT))
        self._timer.daemon = True
        self._timer.start()

    def check(self, step: int, world: World | None = None) -> None:
        """Between phases (after loading, after the first evaluation): stop now if asked to. With `world`, every
        process stops when one was asked to (they are about to run the evaluation's sharded forwards together)."""
        asked = self.signum is not None
        if world is not None:
            asked = world.any(asked)
        if asked:
            raise Stopped(self.signum or signal.SIGTERM, step)

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer:
            self._timer.cancel()
        for sig, old in self._old.items():
            signal.signal(sig, old)


class DataOrder:
    """A stream of item indices: epoch e is a permutation seeded by (seed, e), so every step is a random draw
    (inside a step, methods.micro_batches still puts similar lengths together). With `grouped`
    (GROUP_BY_LENGTH), items are also sorted longest first inside windows of GROUP_STEPS steps: less padding,
    but on data whose tasks differ in length a step (and the end of a run) becomes nearly one task, which
    bench/quality.py measured as a far worse held-out loss. Position n in the stream is the same on every run."""

    def __init__(self, lengths: list[int], per_step: int, seed: int, grouped: bool = False):
        self.lengths, self.per_step, self.seed, self.grouped = np.asarray(lengths), per_step, seed, grouped
        self._epochs: dict[int, np.ndarray] = {}

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._epochs:
            perm = np.random.default_rng([self.seed, e]).permutation(len(self.lengths))
            if self.grouped:
                window = self.per_step * GROUP_STEPS
                chunks = [perm[i:i + window] for i in range(0, len(perm), window)]
                perm = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
            self._epochs[e] = perm
        return self._epochs[e]

    def take(self, position: int, count: int) -> list[int]:
        n, out = len(self.lengths), []
        for p in range(position, position + count):
            out.append(int(self.epoch(p // n)[p % n]))
        return out


def run(session, method, prepared, cfg, plan, run_dir: str, progress, state: LoopState, stop: StopRequest) -> LoopResult:
    """The steps. In a distributed run (session.world) every process runs this same loop on the same rows; each
    trains its share of a step, and only rank 0 saves, evaluates and reports."""
    world = getattr(session, "world", None) or World()
    stop.in_step = True  # from here until the loop ends, a stop signal waits for the step (and its checkpoint)
    try:
        return _steps(session, method, prepared, cfg, plan, run_dir, progress, state, stop, world)
    except Lost as err:  # the failed step never reached the optimizer: what the state says is what was trained
        if world.writer:
            checkpoint.save(run_dir, session, state, cfg.save_total)
        raise PeerLost(state.step, str(err)) from None
    finally:
        stop.in_step = False


def _steps(session, method, prepared, cfg, plan, run_dir, progress, state: LoopState, stop: StopRequest,
           world: World) -> LoopResult:
    per_step = method.draws_per_step(plan.batch_size, plan.grad_accum, cfg)
    order = DataOrder([x.length for x in prepared.train], per_step, cfg.seed, cfg.group_by_length)
    warmup = int(cfg.warmup_ratio * plan.max_steps)
    items, save_every = prepared.train, plan.save_steps
    window: list[float] = []
    final_loss, bad_in_row = None, 0
    # auto: a loss that measures progress decides when the LR decays (GRPO's is a policy-gradient surrogate: it does not)
    watch_plateau = cfg.lr_scheduler == "auto" and getattr(method, "LOSS_SHOWS_PROGRESS", True)
    if world.writer and checkpoint.latest(run_dir) is None:
        checkpoint.save(run_dir, session, state, cfg.save_total)  # step 0: what OOM recovery falls back to
    while state.step < plan.max_steps:
        if world.any(stop.signum is not None):  # every process stops after the same step
            if world.writer:
                checkpoint.save(run_dir, session, state, cfg.save_total)
            raise Stopped(stop.signum or signal.SIGTERM, state.step)
        indices = order.take(state.position, per_step)
        rng = np.random.default_rng([cfg.seed, state.step, 7])
        session.reseed(int(rng.integers(2**31)))  # every random draw of a step depends on (SEED, step) only
        lr = learning_rate(state.step + 1, plan.max_steps, warmup, cfg.learning_rate, cfg.lr_scheduler,
                           state.decay_from)
        started = time.perf_counter()
        try:
            batch = method.make_batch(session, [items[i] for i in indices], cfg, rng)
            if batch.n_items < world.size:  # the same batch everywhere: all stop here
                raise UserError(f"NPROC={world.size}: step {state.step + 1} has only {batch.n_items} items to share "
                                "(GRPO: completions); lower NPROC or raise BATCH_SIZE x GRAD_ACCUM")
            stats = session.train_step(methods.shard(batch, world.rank, world.size), state.micro_batch, lr)
        except Exception as err:  # noqa: BLE001 -- only out-of-memory is handled, anything else re-raised
            if not session.is_oom(err) or isinstance(err, Lost):
                raise
            if world.size > 1:  # the others wait in the step's collective: halving here alone cannot work
                raise UserError(f"out of memory on process {world.rank} ({first_line(err)}); lower BATCH_SIZE "
                                "(GRAD_ACCUM keeps the effective batch) or MAX_SEQ_LENGTH") from None
            state = _recover_from_oom(session, run_dir, state, err)
            continue
        state.train_seconds += time.perf_counter() - started
        state.step += 1
        state.position += per_step
        state.tokens_seen += int(stats["tokens"])
        if stats.pop("skipped", 0):
            state.skipped_steps += 1
            bad_in_row = bad_in_row if stats.pop("scaler_adjust", 0) else bad_in_row + 1
            print(f"step {state.step}: loss {stats['loss']:.4g}, gradient norm {stats['grad_norm']:.4g}: not finite, "
                  "skipped (not applied)", flush=True)
            if bad_in_row >= NONFINITE_LIMIT:
                if world.writer:
                    checkpoint.save(run_dir, session, state, cfg.save_total)
                raise NonFinite(state.step, bad_in_row, state.skipped_steps)
        else:
            bad_in_row = 0
            window.append(stats["loss"])
            final_loss = stats["loss"]
            state.losses.append(float(stats["loss"]))
        if watch_plateau and state.decay_from is None and warmup < state.step < plan.max_steps - 1 and world.any(
                schedule.plateaued(state.losses)):  # any(): every process decays from the same step
            state.decay_from = state.step
            print(f"step {state.step}: the training loss has flattened; the learning rate now decays linearly to zero "
                  f"over the last {plan.max_steps - state.step} steps (LR_SCHEDULER=auto)", flush=True)
        if window and (state.step % cfg.logging_steps == 0 or state.step == plan.max_steps):
            record = {"step": state.step, "tokens": state.tokens_seen, "loss": sum(window) / len(window), "lr": lr,
                      **{k: v for k, v in stats.items() if k not in ("loss", "tokens") and _finite(v)}}
            state.records.append(record)
            progress({"event": "log", **record})
            window.clear()
        progress({"event": "step", "step": state.step, "tokens": state.tokens_seen,
                  "memory_gb": session.peak_memory_gb(), "seconds": state.train_seconds})
        # FSDP: rank 0's forwards gather weights from every process, so all of them evaluate (the others discard it)
        if (world.writer or plan.fsdp) and (state.step % plan.eval_steps == 0 or state.step == plan.max_steps):
            found = method.periodic_eval(session, prepared, cfg)
            if found:
                record = {"step": state.step, "tokens": state.tokens_seen, **found}
                state.records.append(record)
                progress({"event": "log", **record})
        if world.writer and (state.step % save_every == 0 or state.step == plan.max_steps):
            checkpoint.save(run_dir, session, state, cfg.save_total)
    return LoopResult(state, final_loss)


def _finite(value) -> bool:
    """Strict JSON (run.json, metrics.jsonl) has no NaN or Infinity."""
    return not isinstance(value, float) or math.isfinite(value)


def _recover_from_oom(session, run_dir: str, state: LoopState, err: Exception) -> LoopState:
    """Halve the micro-batch, double accumulation (the same rows per optimizer step), and continue from the
    last whole checkpoint, so the optimizer never sees a half-applied step."""
    if state.micro_batch <= 1:
        raise UserError(f"out of memory at micro-batch 1 ({first_line(err)}); lower MAX_SEQ_LENGTH, use a smaller "
                        "MODEL or QUANTIZE=4bit where available") from None
    micro, accum = state.micro_batch // 2, state.grad_accum * 2
    event = {"at_step": state.step + 1, "error": first_line(err), "micro_batch": [state.micro_batch, micro],
             "grad_accum": [state.grad_accum, accum]}
    session.release_memory()
    found = checkpoint.latest(run_dir)
    restored = checkpoint.load(found, session) if found else LoopState()
    restored.micro_batch, restored.grad_accum = micro, accum
    restored.oom_events = state.oom_events + [{**event, "resumed_from_step": restored.step}]
    print(f"out of memory at step {event['at_step']} ({event['error']}): micro-batch {state.micro_batch} -> {micro}, "
          f"grad accumulation {state.grad_accum} -> {accum} (same rows per step); continuing from step {restored.step}",
          flush=True)
    return restored

