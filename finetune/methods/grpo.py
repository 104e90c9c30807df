"""GRPO: sample a group of G completions per prompt, score them with reward functions, and push the policy
towards the completions that beat their group's mean (group-normalised advantages, clipped ratio, optional KL
to the reference = the model with the adapter disabled, weight `beta`, 0 = off as in TRL).

One policy update per batch of samples (TRL's default num_iterations=1): the sampling policy is the one being
updated, so the ratio is 1 in value and the clip inactive, but the gradient is the policy gradient. The loss is
averaged over every completion token of the step. Rewards: finetune/rewards.py (built-ins or file.py:function).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from finetune import data, rewards
from finetune.errors import UserError
from finetune.methods import Batch, EvalResult, Prepared, Rows, reference
from finetune.methods.sft import check_template, dataset_spec
from finetune.sample_data import GRPO_DIR
from finetune.shapes import Problem, row_problems
from finetune.template import IGNORE, Encoded

NAME = "grpo"
SAMPLE_DIR = GRPO_DIR
# LEARNING_RATE unset: a quarter of SFT's; measured on the sample task after SFT (16 steps x 16 completions):
# mean reward 1.81 -> 1.88 at 5e-5.
LEARNING_RATE = 5e-5
LOSS_SHOWS_PROGRESS = False  # a policy-gradient surrogate, ~0 by design: LR_SCHEDULER=auto stays constant


@dataclass
class PromptRow:
    prompt: object                   # a string, or a list of messages
    columns: dict                    # every other column (answers for the rewards)
    where: str
    ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.ids)


def to_prompt(row, where: str) -> tuple[PromptRow | None, list[Problem]]:
    problems = row_problems(row, where, "grpo")
    if any(p.level == "error" for p in problems):
        return None, problems
    return PromptRow(row["prompt"], {k: v for k, v in row.items() if k != "prompt"}, where), problems


def reward_spec(cfg, columns: set[str], first: dict) -> str:
    """REWARD, or from the data: JSON answers -> json_format,exact_match; other answers -> exact_match."""
    if cfg.reward:
        return cfg.reward
    answer = next((c for c in rewards.ANSWER_COLUMNS if c in columns), None)
    if answer is None:
        raise UserError("METHOD=grpo needs REWARD (built-ins: json_format, exact_match, contains_answer; or "
                        "file.py:function): the data has no answer column to choose one from")
    from finetune.evaluate import json_object

    return "json_format,exact_match" if json_object(str(first.get(answer, ""))) is not None else "exact_match"


def read(cfg) -> Rows:
    train, val, source, val_source, warnings = data.load_items(
        dataset_spec(cfg.dataset, SAMPLE_DIR), cfg.val_split, cfg.seed, cfg.column_map, f"DATASET={cfg.dataset}", to_prompt)
    shape = "conversational prompts" if isinstance(train[0].prompt, list) else "prompts"
    rows = Rows(train, val, source, shape, val_source, warnings)
    spec = reward_spec(cfg, set(train[0].columns), train[0].columns)
    funcs = rewards.load(spec)
    sample = val[:2]  # call every reward once now, so a broken one fails before any weights load
    for name, fn in funcs:
        rewards.call(name, fn, [p.prompt for p in sample], [_completion(p.prompt, "") for p in sample], _columns(sample))
    return rows


def defaults(cfg, prepared: Prepared) -> dict:
    out = {"reward": prepared.extra["reward"]}
    if cfg.beta is None:
        out["beta"] = 0.0
    return out


def _completion(prompt, text: str):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _columns(items: list[PromptRow]) -> dict:
    keys = {k for p in items for k in p.columns}
    return {k: [p.columns.get(k) for p in items] for k in keys}


def prepare(rows: Rows, tokenizer, cfg) -> Prepared:
    check_template(cfg, "conversational" if isinstance(rows.train[0].prompt, list) else "prompts", tokenizer)
    for p in rows.train + rows.validation:
        if isinstance(p.prompt, list):
            text = tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True)
            p.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            p.ids = tokenizer(p.prompt, add_special_tokens=True)["input_ids"]
    limit = cfg.max_seq_length - cfg.max_new_tokens
    train = [p for p in rows.train if p.length <= limit]
    warnings = [] if len(train) == len(rows.train) else [
        f"{len(rows.train) - len(train)} prompts leave no room for MAX_NEW_TOKENS={cfg.max_new_tokens} within "
        f"MAX_SEQ_LENGTH={cfg.max_seq_length} and were dropped"]
    val = [p for p in rows.validation if p.length <= limit][: max(cfg.eval_rows, cfg.eval_generations)]
    if not train or not val:
        raise UserError(f"DATASET={cfg.dataset}: no prompt fits MAX_SEQ_LENGTH={cfg.max_seq_length} with "
                        f"MAX_NEW_TOKENS={cfg.max_new_tokens}")
    completion = cfg.max_new_tokens / 2  # sampled completions stop at EOS; half the budget is a fair guess
    mean = sum(p.length for p in train) / len(train) + completion
    return Prepared(train=train, eval=val, eval_examples=val[: cfg.eval_generations], mean_tokens=mean,
                    longest=max(p.length for p in train + val) + cfg.max_new_tokens, trained_share=completion / mean,
                    sampled_per_item=cfg.max_new_tokens, warnings=warnings,
                    extra={"reward": reward_spec(cfg, set(train[0].columns), train[0].columns)})


def items_per_draw(cfg) -> int:
    return cfg.num_generations


def draws_per_step(batch_size: int, grad_accum: int, cfg) -> int:
    """Prompts per optimizer step: the step trains batch x accumulation completions, G per prompt."""
    return max(1, batch_size * grad_accum // cfg.num_generations)


def start(session, prepared: Prepared, cfg) -> None:
    """Nothing to precompute: the reference (adapter disabled) is evaluated on each step's samples."""


def score_completions(session, items: list[PromptRow], completions: list[list[int]], group: int, cfg):
    """(total reward per completion, mean per reward function, decoded texts)."""
    texts = [session.tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
    owners = [p for p in items for _ in range(group)]
    shown = [_completion(p.prompt, t) for p, t in zip(owners, texts)]
    total = np.zeros(len(completions))
    per_fn = {}
    for name, fn in rewards.load(cfg.reward):
        values = np.array(rewards.call(name, fn, [p.prompt for p in owners], shown, _columns(owners)))
        total += values
        per_fn[f"reward/{name}"] = float(values.mean())
    return total, per_fn, texts


def make_batch(session, items: list[PromptRow], cfg, rng) -> Batch:
    g = cfg.num_generations
    completions = session.generate([p.ids for p in items], cfg.max_new_tokens, temperature=cfg.temperature, num_return=g)
    total, per_fn, _ = score_completions(session, items, completions, g, cfg)
    advantages = reference.group_advantages(total, g)
    sequences = []
    for i, c in enumerate(completions):
        prompt = items[i // g].ids
        c = c or [session.tokenizer.eos_token_id]  # an empty completion still teaches "do not stop at once"
        sequences.append(Encoded(prompt + c, [IGNORE] * len(prompt) + c))
    stats = {"reward": float(total.mean()), "reward_std": float(total.reshape(-1, g).std(axis=1, ddof=1).mean()),
             "completion_length": float(np.mean([len(c) for c in completions])), **per_fn}
    return Batch(NAME, sequences, denominator=float(sum(len(c) or 1 for c in completions)),
                 per_sequence={"advantage": [float(a) for a in advantages]}, stats=stats)


EPSILON = 0.2  # the ratio clip (TRL's default)


def needs_reference_tokens(cfg) -> bool:
    return bool(cfg.beta)  # the KL term needs the base model's log-prob of every sampled token


def loss(ops, logps, weights, rows, n_rows: int, extra: dict, ref_tokens, cfg, denominator):
    """Clipped policy-gradient objective per completion token with the sequence's group-normalised advantage
    (extra["advantage"]), plus beta * KL(policy || reference) (the k3 estimator); summed / completion tokens in the
    step. The sampling policy is this one (one update per sample batch), so the ratio is 1 in value and the clip
    inactive, exactly as TRL with num_iterations=1."""
    ratio = ops.exp(logps - ops.stop_gradient(logps))
    adv = extra["advantage"][rows]
    per_token = -ops.minimum(ratio * adv, ops.clip(ratio, 1 - EPSILON, 1 + EPSILON) * adv)
    stats = {}
    if cfg.beta and ref_tokens is not None:
        kl = ops.exp(ref_tokens - logps) - (ref_tokens - logps) - 1
        per_token = per_token + cfg.beta * kl
        stats["kl"] = (kl * weights).sum() / denominator
    return (per_token * weights).sum() / denominator, stats


def evaluate_model(session, prepared: Prepared, cfg) -> EvalResult:
    """Mean reward per reward function and mean completion length, on greedy answers to held-out prompts."""
    items = prepared.eval_examples
    if not items:  # EVAL_GENERATIONS=0: GRPO's evaluation is its generations, so there is nothing to score
        return EvalResult(eval_loss=None, metrics={})
    completions = session.generate([p.ids for p in items], cfg.max_new_tokens)
    total, per_fn, texts = score_completions(session, items, completions, 1, cfg)
    metrics = {"reward": float(total.mean()), **per_fn,
               "completion_length": float(np.mean([len(c) for c in completions]))}
    answer = next((c for c in rewards.ANSWER_COLUMNS if items and c in items[0].columns), None)
    rows = [{"prompt": session.tokenizer.decode(p.ids, skip_special_tokens=False),
             "expected": str(p.columns.get(answer)) if answer else None, "generated": t, "reward": float(r)}
            for p, t, r in zip(items, texts, total)]
    return EvalResult(eval_loss=None, metrics=metrics, generations=rows)


def periodic_eval(session, prepared: Prepared, cfg) -> dict:
    """Held-out generation is the expensive part of GRPO; the step's own rewards are logged instead."""
    return {}
