"""Tiny random models of the architectures people fine-tune, built from transformers' own config classes with the
tiny model's tokenizer (a few hundred k parameters, well under a second each): the architecture matrix of
tests/test_architectures.py. Each type gets the few settings its config needs to stay tiny and valid."""
from __future__ import annotations

import os

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
TIED = dict(tie_word_embeddings=True)
TYPES: dict[str, dict] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "phi3": {}, "granite": {}, "olmo2": {}, "smollm3": {},
    "starcoder2": {}, "gemma": TIED, "gemma2": TIED, "cohere": TIED,  # tied, as the real ones
    # two layers: one sliding, one global (mlx-lm reads the pattern from `sliding_window_pattern`, default 6 layers)
    "gemma3_text": dict(**TIED, layer_types=["sliding_attention", "full_attention"], sliding_window_pattern=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "mixtral": MOE,
    "gpt_oss": dict(**MOE, layer_types=["sliding_attention", "full_attention"]),
    "lfm2": dict(**TIED, layer_types=["conv", "full_attention"], block_ff_dim=128, block_auto_adjust_ff_dim=False),
}
MOE_TYPES = {"qwen3_moe", "mixtral", "gpt_oss"}


def build(model_type: str, tokenizer_dir: str, out: str) -> str:
    """Save a tiny random `model_type` model with the tokenizer of `tokenizer_dir` into `out` (once)."""
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    config = AutoConfig.for_model(model_type, **{**COMMON, **ids, **TYPES[model_type]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
