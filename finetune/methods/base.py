"""What a training method is: the `Method` protocol every module in finetune/methods/ implements (sft, dpo, grpo).

A method is one file. It reads and checks its rows, encodes them, builds each optimizer step's Batch, and owns its
loss, written once over a small ops namespace that each backend supplies (backends/torch_ops.py, mlx_ops.py):
per_sequence, log_sigmoid, exp, minimum, clip, stop_gradient, to_float, plus the arithmetic, slicing, indexing and
.sum() that torch tensors and MLX arrays share. Backends run forward, backward and the optimizer and never branch on
the method; methods import neither torch nor mlx. reference.py holds the formulas again in numpy, the independent
check every loss is tested against (on both backends).
"""
from __future__ import annotations

from typing import Any, Protocol

from finetune.methods import Batch, EvalResult, Prepared, Rows


class Method(Protocol):
    NAME: str          # the METHOD value
    SAMPLE_DIR: str    # the shipped sample data (DATASET=sample)
    # Optional: LEARNING_RATE -- this method's default when LEARNING_RATE is not set (preference losses need a far
    # smaller one than SFT); `defaults(cfg, prepared) -> dict` -- other auto settings it decides (beta, rpo_alpha);
    # EVAL_LOSS_LABEL -- what its eval loss is, for the report; LOSS_SHOWS_PROGRESS = False -- its training loss
    # does not fall as it learns (GRPO), so LR_SCHEDULER=auto keeps the rate constant. Metrics named "*accuracy" are
    # shown as percents.

    def read(self, cfg) -> Rows: ...                                 # read + validate every row, before any weights
    def prepare(self, rows: Rows, tokenizer, cfg) -> Prepared: ...   # token ids and loss masks (finetune.template);
    #                                                                  each train item has a `.length` (tokens)
    def items_per_draw(self, cfg) -> int: ...                        # data rows one item of a step consumes
    def draws_per_step(self, batch_size: int, grad_accum: int, cfg) -> int: ...
    def start(self, session, prepared: Prepared, cfg) -> None: ...   # before step 1 (DPO: reference log-probs)
    def make_batch(self, session, items: list, cfg, rng) -> Batch: ...  # one optimizer step (GRPO samples here)
    def needs_reference_tokens(self, cfg) -> bool: ...               # the step needs the base model's log-probs of
    #                                                                  every trained token (GRPO's KL term)

    def loss(self, ops, logps, weights, rows, n_rows: int, extra: dict[str, Any], ref_tokens, cfg,
             denominator) -> tuple[Any, dict[str, Any]]:
        """One micro-batch's loss and logged parts. logps: log-prob of every trained token, flattened in sequence
        order; weights: per token (MLX pads the gathered tokens to a bucket: 0 there; torch passes 1.0); rows: each
        token's sequence index (0..n_rows-1); extra: the Batch's per_sequence lists as arrays of this micro-batch;
        ref_tokens: the base model's log-probs of the same tokens when needs_reference_tokens, else None (torch)
        or zeros (MLX). Return a SUM over the micro-batch divided by the whole step's `denominator`, so micro-batches
        of any size add up to the step's loss; the parts are normalised the same way, so they add up too."""
        ...

    def evaluate_model(self, session, prepared: Prepared, cfg) -> EvalResult: ...  # before / after numbers
    def periodic_eval(self, session, prepared: Prepared, cfg) -> dict: ...          # logged every EVAL_STEPS
