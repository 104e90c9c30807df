"""Training methods: one small module each (sft, dpo, orpo, kto, grpo), over one shared loop and one backend per device.

What a method module provides is written down as the `Method` protocol in finetune/methods/base.py: reading and
checking rows, encoding, the step's Batch, and its loss over a backend's ops namespace (a method is one file; the
backends never branch on it). This module holds the values they exchange (Rows, Prepared, Batch, EvalResult), how a
step is cut into micro-batches, and NAMES: the accepted METHOD values.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any

NAMES = ("sft", "dpo", "orpo", "kto", "grpo")


def get(name: str):
    if name not in NAMES:
        raise ValueError(f"unknown method {name!r}")
    return importlib.import_module(f"finetune.methods.{name}")


@dataclass
class Rows:
    """Validated rows of one dataset, split; items are method-specific (Example, Pair rows, prompts)."""
    train: list
    validation: list
    source: str
    shape: str
    validation_source: str = "file"
    warnings: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """Encoded items for the loop and the numbers the planner needs."""
    train: list
    eval: list
    eval_examples: list              # held-out rows for generation metrics (Example or prompt rows)
    mean_tokens: float               # per sequence
    longest: int                     # longest sequence, tokens (memory is planned for it)
    sequences_per_item: int = 1      # DPO 2 (chosen + rejected)
    trained_share: float = 0.3       # share of tokens that carry loss (the planner's logits term)
    sampled_per_item: int = 0        # GRPO: tokens generated per completion (the planner's sampling time)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """One optimizer step's data: `sequences` are template.Encoded rows; `denominator` normalises the summed
    loss over the whole step (trained tokens for SFT and GRPO, pairs for DPO), so splitting the step into
    micro-batches of any size gives the same loss and gradient."""
    method: str
    sequences: list
    denominator: float
    per_sequence: dict[str, list] = field(default_factory=dict)  # e.g. advantages, reference log-probs
    group: int = 1                   # sequences that must stay in one micro-batch (DPO: a pair = 2)
    stats: dict[str, float] = field(default_factory=dict)        # logged with the step (GRPO rewards)

    @property
    def n_items(self) -> int:
        return len(self.sequences) // self.group

    def longest_first(self) -> tuple[list[int], list[int]]:
        """Item indices, longest first, and each item's length (a DPO pair: its longer sequence)."""
        g = self.group
        lengths = [max(self.sequences[i * g + k].length for k in range(g)) for i in range(self.n_items)]
        return sorted(range(self.n_items), key=lambda i: -lengths[i]), lengths

    def take(self, items: list[int]) -> tuple[list, dict[str, list]]:
        """The sequences of these items (in this order) and their per-sequence values."""
        seqs = [i * self.group + k for i in items for k in range(self.group)]
        return [self.sequences[s] for s in seqs], {key: [v[s] for s in seqs] for key, v in self.per_sequence.items()}


@dataclass
class EvalResult:
    eval_loss: float | None
    metrics: dict[str, float]                               # the before/after numbers
    generations: list[dict] = field(default_factory=list)   # prompt / expected / generated (+ checks)

    def to_dict(self) -> dict:
        return asdict(self)


def micro_batches(batch: Batch, size: int, overhead_tokens: float | None = None):
    """(sequences, their per-sequence extras) in micro-batches of at most `size` items (a DPO item is its pair),
    longest first. Where lengths differ, a step is cut into more micro-batches when that saves more padded
    tokens than the fixed cost of a micro-batch (`overhead_tokens`, in tokens of compute; None: never cut
    further than `size`, as on MLX): each micro-batch has at
    most `size` items no longer than the fixed split's longest, so memory never exceeds the plan, and the step's
    summed loss is the same however it is cut. Both backends split a step the same way."""
    order, lengths = batch.longest_first()
    for start, stop in split_points([lengths[i] for i in order], size, overhead_tokens):
        yield batch.take(order[start:stop])


def split_points(lengths: list[int], size: int, overhead_tokens: float | None) -> list[tuple[int, int]]:
    """Cut items sorted longest first into runs of at most `size` minimising padded tokens (items x the run's
    first length) + overhead_tokens per run: a small dynamic programme over the cut points."""
    n = len(lengths)
    if overhead_tokens is None:
        return [(i, min(i + size, n)) for i in range(0, n, size)]
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for stop in range(1, n + 1):
        for start in range(max(0, stop - size), stop):
            cost = best[start] + (stop - start) * lengths[start] + overhead_tokens
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    runs, stop = [], n
    while stop:
        runs.append((cut[stop], stop))
        stop = cut[stop]
    return runs[::-1]


def shard(batch: Batch, rank: int, size: int) -> Batch:
    """Process `rank`'s share of a step (finetune/world.py): items (a DPO pair stays whole) dealt longest first,
    rank, rank + size, ..., so every process gets a like amount of work. The denominator and stats stay the whole
    step's: the processes' summed losses and gradients are then the single-process step's exactly."""
    if size == 1:
        return batch
    sequences, per_sequence = batch.take(sorted(batch.longest_first()[0][rank::size]))
    return Batch(batch.method, sequences, batch.denominator, per_sequence, batch.group, batch.stats)
