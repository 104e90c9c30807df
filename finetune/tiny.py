"""A tiny Qwen2-architecture model the project builds itself: the offline fallback and the test model.

No download is needed: a byte-level BPE tokenizer is trained on the sample dataset plus generated
English, and a ~0.9M-parameter Qwen2ForCausalLM is initialised from a fixed seed. The result is
written once into the cache (versioned directory) and reused. Builds are deterministic, so two
machines (or two cache dirs) hold identical weights and vocabularies.

torch/transformers/tokenizers are imported inside functions so `import finetune.tiny` stays cheap.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile

TINY_MODEL_NAME = "finetune/tiny-qwen2"
VERSION = 2  # bump when anything below changes the built files, so stale caches are not reused
DIR_NAME = f"tiny-qwen2-v{VERSION}"

VOCAB_SIZE = 1024
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2 (trainer puts them first)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2's pre-tokenizer split. AutoTokenizer loads any model_type "qwen2" checkpoint as
# Qwen2Tokenizer, which rebuilds its pipeline with exactly this regex + NFC, so we train with the
# same pipeline: then AutoTokenizer and our own wrapper tokenize identically.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Same behaviour as Qwen2.5's ChatML template for system/user/assistant (tools omitted): a default
# system message when none is given, and an open assistant turn for add_generation_prompt.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

MODEL_CONFIG = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=352, max_position_embeddings=2048, tie_word_embeddings=True)


def cache_dir() -> str:
    """Where built artifacts live: $FINETUNE_CACHE, else ~/.cache/finetune."""
    return os.environ.get("FINETUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finetune")


def _english_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Generic English so the vocabulary is not only names and cities (keeps other prompts tokenizable)."""
    rng = random.Random(seed)
    subjects = ["The model", "A student", "My friend", "The team", "This computer", "Our teacher", "The cat",
                "Everyone", "The old man", "A small bird", "The company", "Your answer", "The weather", "She", "He",
                "We", "They", "I", "You", "The city"]
    verbs = ["wrote", "reads", "found", "needs", "will explain", "has seen", "likes", "built", "answered",
             "is learning", "changed", "opened", "remembers", "tried", "described", "can help with"]
    objects = ["a short story", "the question", "the data", "a new language", "the red door", "every problem",
               "the morning news", "three simple rules", "a long letter", "the best result", "some fresh bread",
               "the training loop", "a quiet place", "the final report", "an open window", "the small garden"]
    tails = ["today", "yesterday", "again", "very quickly", "with great care", "before lunch", "in the evening",
             "without any help", "for the first time", "as expected", "at home", "after the meeting"]
    starts = ["", "", "", "However, ", "Then ", "Of course, ", "Please note: ", "In general, ", "Why? Because "]
    ends = [".", ".", ".", "!", "?", ".", "...", ";"]
    out = []
    for _ in range(n):
        s = f"{rng.choice(starts)}{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}"
        out.append(s[0].upper() + s[1:] + rng.choice(ends))
    return out


def _training_texts() -> list[str]:
    from .sample_data import generate
    texts = [DEFAULT_SYSTEM_PROMPT] * 100
    for row in generate():
        for m in row["messages"]:
            # Role names open every chat turn: counting them once per turn makes each a single token.
            texts += [m["role"] + "\n", m["content"]]
    return texts + _english_sentences()


def build_tokenizer():
    """Train the byte-level BPE (deterministic) and wrap it as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte encodable
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None, bos_token=None,
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=2048,
        padding_side="right")


def build_model(tokenizer):
    """Random-initialised Qwen2ForCausalLM with a fixed seed, sized to the tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    vocab = -(-len(tokenizer) // 64) * 64  # round up: friendlier matmul shapes, room for added tokens
    # Like Qwen2.5: bos is <|endoftext|> in the config, though the tokenizer never prepends it.
    config = Qwen2Config(vocab_size=vocab, bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id,
                         dtype="float32", **MODEL_CONFIG)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    # Generation must stop at the end of the assistant turn, not at <|endoftext|>.
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return model


def _build(directory: str) -> None:
    from transformers.utils import logging as hf_logging

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard progress bar is noise in CLI output and test logs
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)
    _add_legacy_rope_theta(os.path.join(directory, "config.json"))
    # mkdtemp (and the shard writer) create owner-only modes; a shared cache should be readable by all.
    os.chmod(directory, 0o755)
    for f in os.listdir(directory):
        os.chmod(os.path.join(directory, f), 0o644)


def _add_legacy_rope_theta(config_path: str) -> None:
    """transformers 5 writes rope_theta only inside `rope_parameters`; mlx-lm (0.32) reads the top-level
    key and would otherwise use its own default theta, i.e. run a different model than PyTorch does."""
    import json

    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    with open(config_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")


def ensure(cache: str | None = None) -> str:
    """Directory of the built tiny model, building it on first use.

    Built into a temp dir next to the target and renamed into place: the rename is atomic, so a
    reader never sees a half-written model, and if two processes race the loser just discards its copy."""
    root = cache or cache_dir()
    final = os.path.join(root, DIR_NAME)
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{DIR_NAME}.tmp-", dir=root)
    try:
        _build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race (the target exists and is non-empty): use theirs.
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(ensure())
