"""Supervised fine-tuning: cross-entropy on the trained tokens (assistant turns + end-of-turn), mean over
every trained token of the optimizer step."""
from __future__ import annotations

from finetune import data, dataset_checks, evaluate
from finetune.check_tokens import template_warnings
from finetune.errors import UserError
from finetune.methods import Batch, EvalResult, Prepared, Rows
from finetune.template import check_tools, encode_all

NAME = "sft"
EVAL_LOSS_LABEL = "eval loss (per trained token)"
SAMPLE_DIR = data.SAMPLE_DIR
SEQUENCES_PER_ITEM = 1


def read(cfg) -> Rows:
    splits = data.load(dataset_spec(cfg.dataset, SAMPLE_DIR), cfg.val_split, cfg.seed, column_map=cfg.column_map,
                       label=f"DATASET={cfg.dataset}")
    form = splits.train[0].form if splits.train else None  # alpaca / sharegpt rows train as messages
    return Rows(splits.train, splits.validation, splits.source, f"{splits.shape}, from {form} rows" if form else splits.shape,
                splits.validation_source, dataset_checks.check_splits(splits))


def dataset_spec(spec: str, sample_dir: str) -> str:
    """DATASET=sample means the shipped sample of the method being trained."""
    return sample_dir if spec == "sample" else spec


def check_template(cfg, shape: str, tokenizer) -> None:
    chat = shape in ("messages", "conversational_prompt_completion", "conversational")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"MODEL={cfg.model} has no chat template, so '{shape}' rows cannot be rendered; "
                        "use a chat/instruct model or plain-text rows")


def prepare(rows: Rows, tokenizer, cfg) -> Prepared:
    check_template(cfg, rows.shape, tokenizer)
    if any(ex.form == "tool-calling" for ex in rows.train + rows.validation):
        check_tools(tokenizer, cfg.model)
    train, warnings = encode_all(rows.train, tokenizer, cfg.max_seq_length)
    warnings += template_warnings(rows.train, tokenizer)
    val, val_warnings = encode_all(rows.validation[: cfg.eval_rows], tokenizer, cfg.max_seq_length)
    warnings += [f"validation: {w}" for w in val_warnings]
    if not train or not val:
        raise UserError(f"DATASET={cfg.dataset}: no row keeps a trained token within MAX_SEQ_LENGTH={cfg.max_seq_length}")
    lengths = [len(r.input_ids) for r in train]
    return Prepared(train=train, eval=val, eval_examples=rows.validation[: cfg.eval_generations],
                    mean_tokens=sum(lengths) / len(lengths), longest=max(lengths + [len(r.input_ids) for r in val]),
                    trained_share=sum(r.n_trained for r in train) / sum(lengths), warnings=warnings)


def start(session, prepared: Prepared, cfg) -> None:
    """Nothing to precompute for SFT."""


def items_per_draw(cfg) -> int:
    return 1


def draws_per_step(batch_size: int, grad_accum: int, cfg) -> int:
    return batch_size * grad_accum


def make_batch(session, items: list, cfg, rng) -> Batch:
    return Batch(NAME, list(items), denominator=float(sum(r.n_trained for r in items)))


def needs_reference_tokens(cfg) -> bool:
    return False


def loss(ops, logps, weights, rows, n_rows: int, extra: dict, ref_tokens, cfg, denominator):
    """Cross-entropy summed over the micro-batch's trained tokens / the step's trained tokens (see methods/__init__)."""
    return -(logps * weights).sum() / denominator, {}


def eval_loss(session, rows) -> float:
    """Mean cross-entropy per trained token: the training loss's function on held-out rows."""
    logps = session.token_logps(rows)
    return -float(sum(lp.sum() for lp in logps)) / max(1, sum(len(lp) for lp in logps))


def evaluate_model(session, prepared: Prepared, cfg) -> EvalResult:
    return evaluate.with_generations(session, prepared, cfg, {"eval_loss": eval_loss(session, prepared.eval)})


def periodic_eval(session, prepared: Prepared, cfg) -> dict:
    """What the loop logs every EVAL_STEPS."""
    return {"eval_loss": eval_loss(session, prepared.eval)}
