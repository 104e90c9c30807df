"""Rendering rows to token ids and the loss mask: the one place that decides which tokens train.

Chat rows are rendered with the tokenizer's own chat template. The assistant spans are found by
rendering growing prefixes of the conversation (with and without the generation prompt) and
mapping those character spans onto the tokens of the full rendering. That works for any template
that renders earlier turns unchanged, needs no `{% generation %}` markers, and trains the template's
end-of-turn token (e.g. <|im_end|>) because it belongs to the assistant's rendered turn.
"""
from __future__ import annotations

from dataclasses import dataclass

from finetune.data import Example
from finetune.errors import UserError

IGNORE = -100  # label value the loss skips (PyTorch / transformers convention)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]          # IGNORE where no loss
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_spans(tokenizer, ex: Example, full: str) -> list[tuple[int, int]]:
    spans = []
    for i, msg in enumerate(ex.messages):
        if msg["role"] != "assistant" or i < ex.train_from:
            continue
        start = len(chat_text(tokenizer, ex.messages[:i], add_generation_prompt=True))
        through = chat_text(tokenizer, ex.messages[: i + 1])
        if not full.startswith(through) or start > len(through):
            raise UserError(f"{ex.where}: the model's chat template renders earlier turns differently once later "
                            "turns are added, so assistant-only loss cannot be computed; split the conversation")
        end = len(through)
        while end > start and through[end - 1].isspace():  # the newline after end-of-turn is not the model's output
            end -= 1
        spans.append((start, end))
    return spans


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def encode(ex: Example, tokenizer, max_len: int) -> Encoded:
    """Token ids and labels for one row, truncated to `max_len` (keep the start, as TRL does)."""
    eos = tokenizer.eos_token_id
    if ex.text is not None:
        ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"] + [eos]
        labels = list(ids)
    elif ex.prompt is not None:
        # TRL's "standard" prompt/completion: plain concatenation, no chat template
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        ids = tokenizer(ex.prompt + ex.completion, add_special_tokens=True)["input_ids"] + [eos]
        labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids):]
    else:
        full = chat_text(tokenizer, ex.messages)
        spans = _assistant_spans(tokenizer, ex, full)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [tok if any(s <= a < e for s, e in spans) else IGNORE
                  for tok, (a, _) in zip(ids, enc["offset_mapping"])]
        # A template with no end-of-turn token would teach the model never to stop: add EOS and train it.
        trained = [t for t in labels if t != IGNORE]
        if trained and trained[-1] not in _special_ids(tokenizer) and full[spans[-1][1]:].strip() == "":
            ids, labels = ids + [eos], labels + [eos]
    truncated = len(ids) > max_len
    return Encoded(ids[:max_len], labels[:max_len], truncated)


def pad_batch(rows: list[Encoded], pad_id: int, width: int | None = None):
    """Right-padded numpy arrays (input_ids, labels, attention_mask) for a batch of rows, shared by the
    backends so padding never carries loss: padded labels are IGNORE and the mask is 0 there."""
    import numpy as np

    width = width or max(len(r.input_ids) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    labels = np.full((len(rows), width), IGNORE, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for j, r in enumerate(rows):
        n = len(r.input_ids)
        ids[j, :n], labels[j, :n], mask[j, :n] = r.input_ids, r.labels, 1
    return ids, labels, mask


def generation_prompt(ex: Example, tokenizer) -> tuple[list[int], str] | None:
    """(prompt ids, expected answer) for the last assistant turn; None for plain-text rows."""
    if ex.text is not None:
        return None
    if ex.prompt is not None:
        return tokenizer(ex.prompt, add_special_tokens=True)["input_ids"], ex.completion
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    text = chat_text(tokenizer, ex.messages[:last], add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"], ex.messages[last]["content"]


def encode_all(rows: list[Example], tokenizer, max_len: int) -> tuple[list[Encoded], list[str]]:
    """Encode rows; drop those whose trained tokens were all cut by truncation (they teach nothing)."""
    out, dropped, truncated = [], 0, 0
    for ex in rows:
        enc = encode(ex, tokenizer, max_len)
        truncated += enc.truncated
        if enc.n_trained == 0:
            dropped += 1
            continue
        out.append(enc)
    warnings = []
    if truncated:
        warnings.append(f"{truncated} of {len(rows)} rows are longer than MAX_SEQ_LENGTH={max_len} and were truncated")
    if dropped:
        warnings.append(f"{dropped} rows had every trained token cut by truncation and were dropped")
    return out, warnings
