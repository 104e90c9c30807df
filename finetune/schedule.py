"""The learning-rate schedule, and the plateau test behind the default one (`auto`).

Why `auto`: bench/quality.py found no fixed schedule that is right on every workload. A run still learning (lr 1e-4,
or a short run) wants the full rate to the end: TRL's linear decay from step 1 halves what it learns (held-out loss
1.78 vs 1.30 on *mixed*). A run that has reached the noise floor of a high rate wants the rate annealed: on *text*
at 1e-3 (200 steps of one short row) TRL's linear decay beat a constant rate by 15 %. `auto` keeps the rate constant
after warmup while the training loss still falls, and once it has flattened decays it linearly to zero over the
steps left -- warmup-stable-decay with the decay started by the run itself, as one would by watching the curve.
"""
from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("auto", "constant", "linear", "cosine", "wsd")  # LR_SCHEDULER's values (config.py checks them)
WSD_DECAY_SHARE = 0.2    # wsd: the last fifth of the steps decays linearly
PLATEAU_RATIO = 0.4      # auto: flat = the recent fall per step is under this share of the early fall per step ...
PLATEAU_STDERRS = 2.0    # ... even this many standard errors on the generous side ...
PLATEAU_HOLD = 10        # ... at each of this many steps in a row (one noisy stretch is not a plateau)
PLATEAU_MIN_STEPS = 10   # never judge a curve on fewer losses than this


def learning_rate(update: int, max_steps: int, warmup: int, peak: float, schedule: str,
                  decay_from: int | None = None) -> float:
    """LR for optimizer update number `update` (1-based): linear warmup, then constant / linear / cosine decay, or
    wsd (constant, then linear over the last WSD_DECAY_SHARE of the steps), or auto (constant until the loop found a
    plateau after update `decay_from`, then linear to the end). A decay ends one update past the last, so no update
    is made with a zero learning rate."""
    if warmup and update <= warmup:
        return peak * update / warmup
    if schedule == "constant" or (schedule == "auto" and decay_from is None):
        return peak
    left = max_steps - update + 1  # updates still to make, this one included
    if schedule == "auto":
        return peak * left / (max_steps - decay_from + 1)
    if schedule == "wsd":
        decay = max(1, round(WSD_DECAY_SHARE * max_steps))
        return peak if left > decay else peak * left / (decay + 1)
    progress = (update - warmup - 1) / max(1, max_steps - warmup)
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def plateaued(losses: list[float]) -> bool:
    """Has this training-loss curve (one loss per step, oldest first) flattened? Flat means: the fall per step over
    the recent half of the steps, even PLATEAU_STDERRS standard errors on the generous side, is under PLATEAU_RATIO
    of the fall per step from the first quarter to that half -- and that held at each of the last PLATEAU_HOLD steps.
    Checked at every step, a one-off test would fire on a noisy curve (one row per step) that is still falling
    steadily; the margin and the hold keep that rare (tests/test_loop.py). A curve that never fell (a rate far
    too low or too high) is not a plateau."""
    y = np.asarray(losses, dtype=np.float64)
    needed = PLATEAU_MIN_STEPS + PLATEAU_HOLD - 1  # the first of the held steps is judged on MIN_STEPS losses
    return len(y) >= needed and all(_flat(y[:n]) for n in range(len(y) - PLATEAU_HOLD + 1, len(y) + 1))


def _flat(y: np.ndarray) -> bool:
    n = len(y)
    first, recent = y[: n // 4], y[n // 2:]
    x = np.arange(len(recent), dtype=np.float64)
    x -= x.mean()
    slope = float((x * (recent - recent.mean())).sum() / (x * x).sum())
    resid = recent - recent.mean() - slope * x
    stderr = math.sqrt(float((resid * resid).sum()) / max(1, len(recent) - 2) / float((x * x).sum()))
    early = (first.mean() - recent.mean()) / ((n // 2 + (len(recent) - 1) / 2) - (len(first) - 1) / 2)
    return bool(early > 0 and -slope + PLATEAU_STDERRS * stderr < PLATEAU_RATIO * early)
