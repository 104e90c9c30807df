"""Use the result elsewhere: a merged model folder, GGUF files for llama.cpp / Ollama / LM Studio, a Modelfile.

    merge(run_dir)        PEFT merge_and_unload into the base model's own dtype (DoRA too); a run trained on a
                          4-bit base is merged into the 16-bit weights instead, and says so. MLX runs merge through
                          the PEFT copy of their adapter (converted exactly, tested against mlx-lm), so every
                          run takes the same, tested path.
    gguf(run_dir, quant)  the merged folder through llama.cpp's converter (f16/bf16/q8_0), K-quants through
                          llama.cpp's quantizer (finetune.llamacpp), plus an Ollama Modelfile.
Everything is written under a temp name and renamed: an export is whole or absent.
"""
from __future__ import annotations

import json
import os
import shutil

from finetune import fsio, runs, system_prompt
from finetune.errors import UserError

CONVERTER_TYPES = ("f16", "bf16", "q8_0", "f32")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
QUANTS = CONVERTER_TYPES + K_QUANTS


def load_run(run_dir: str, what: str = "RUN_DIR") -> dict:
    """run.json of a run directory that has an adapter, or a one-line error saying what is missing."""
    record = runs.record_of(run_dir, what)
    if not isinstance(record.get("model"), dict) or not isinstance(record["model"].get("name"), str):
        raise UserError(f"{what}={run_dir}: run.json is damaged (it does not name the base model)")
    missing = [k for k in ("config", "plan") if not isinstance(record.get(k), dict)]
    if missing or not isinstance(record.get("run_name"), str):
        raise UserError(f"{what}={run_dir}: run.json is damaged (no {', '.join(missing) or 'run_name'})")
    if not os.path.isfile(os.path.join(run_dir, "adapter_model.safetensors")):
        raise UserError(f"{what}={run_dir}: has no adapter (adapter_model.safetensors); the run stopped before "
                        f"training anything (status {runs.status(run_dir, record)})")
    return record


def base_path(record: dict) -> str:
    """The base model's folder, resolved as the run resolved it (offline model, cache, Hub)."""
    from finetune import models

    info, _ = models.resolve(record["model"]["name"], user_named_it=True)
    models.fetch_weights(info)
    return info.path


def _stage(final: str, build) -> str:
    if os.path.exists(final) and os.listdir(final):
        raise UserError(f"{final} already exists; remove it or choose another --out (exports are never overwritten)")
    if os.path.isdir(final):
        os.rmdir(final)
    return fsio.build_dir(final, build)


def merge(run_dir: str, out: str | None = None) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    record = load_run(run_dir)
    out = out or os.path.join(run_dir, "merged")
    base = base_path(record)
    dtype = getattr(AutoConfig.from_pretrained(base), "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if record["plan"].get("quantize") == "4bit":
        print(f"The run trained on a 4-bit base; merging into the 16-bit base weights ({dtype}) instead.")

    def build(tmp: str) -> None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        merged = PeftModel.from_pretrained(model, run_dir).merge_and_unload()
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(run_dir).save_pretrained(tmp)
        fsio.write_json(os.path.join(tmp, "finetune_export.json"),
                        {"merged_from": os.path.abspath(run_dir), "base": record["model"]["name"], "dtype": str(dtype)})

    print(f"Merging {run_dir} into {record['model']['name']} ({dtype}) ...", flush=True)
    return _stage(out, build)


def check_quant(quant: str) -> str:
    q = quant.lower()
    if q not in QUANTS:
        raise UserError(f"--gguf {quant}: unknown type; choose one of {', '.join(QUANTS)}")
    return q


def gguf(run_dir: str, quant: str, out: str | None = None) -> list[str]:
    """GGUF of the merged model in `quant`, plus a Modelfile; returns the files written."""
    from finetune import llamacpp

    q = check_quant(quant)
    record = load_run(run_dir)
    out = out or os.path.join(run_dir, "gguf")
    name = f"{record['run_name']}-{q}.gguf"
    if os.path.exists(os.path.join(out, name)):
        raise UserError(f"{os.path.join(out, name)} already exists; remove it first (exports are never overwritten)")
    merged = os.path.join(run_dir, "merged")
    if not os.path.isfile(os.path.join(merged, "config.json")):
        merge(run_dir, merged)
    os.makedirs(out, exist_ok=True)
    target = os.path.join(out, name)
    tmp_dir = fsio.build_dir(os.path.join(out, f".{name}.work"), lambda d: None)
    try:
        if q in CONVERTER_TYPES:
            llamacpp.convert(merged, q, os.path.join(tmp_dir, name))
        else:
            f16 = os.path.join(tmp_dir, "f16.gguf")
            llamacpp.convert(merged, "f16", f16)
            llamacpp.quantize(f16, os.path.join(tmp_dir, name), q)
        fsio.move_into(os.path.join(tmp_dir, name), target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    modelfile = os.path.join(out, f"Modelfile.{q}")
    fsio.write_text(modelfile, ollama_modelfile(name, merged, system_prompt.of_record(record)))
    return [target, modelfile]


# ---------------------------------------------------------------- Ollama
CHATML = ('TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
          '<|im_start|>assistant\n"""')
LLAMA3 = ('TEMPLATE """<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n'
          '{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
          '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"""')


def _default_system(tokenizer) -> str | None:
    """The system prompt the chat template adds when a conversation has none (SmolLM2 and Qwen have one)."""
    marker = "@@USER@@"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 -- a template that cannot render a lone user turn has no default to find
        return None
    for start, end in (("<|im_start|>system\n", "<|im_end|>"), ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")):
        if start in text and text.index(start) < text.index(marker):
            return text.split(start, 1)[1].split(end, 1)[0]
    return None


def ollama_modelfile(gguf_name: str, model_dir: str, system: str | None = None) -> str:
    """A Modelfile with the model's chat template and stop tokens (ChatML and Llama 3 templates are written out;
    for others Ollama reads the template llama.cpp's converter stored in the GGUF). SYSTEM is the training data's
    system prompt when its rows shared one, else the template's own default."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    template = tok.chat_template or ""
    lines = ["# ollama create my-model -f <this file>   then: ollama run my-model", f"FROM ./{gguf_name}"]
    stops = []
    if "<|im_start|>" in template:
        lines.append(CHATML)
        stops = ["<|im_end|>"]
    elif "<|start_header_id|>" in template:
        lines.append(LLAMA3)
        stops = ["<|eot_id|>"]
    else:
        lines.append("# chat template: the one stored in the GGUF (tokenizer.chat_template)")
    if tok.eos_token and tok.eos_token not in stops:
        stops.append(tok.eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    system = system or _default_system(tok)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    gen = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen):
        config = json.load(open(gen, encoding="utf-8"))
        for key, param in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            if key in config:
                lines.append(f"PARAMETER {param} {config[key]}")
    return "\n".join(lines) + "\n"
