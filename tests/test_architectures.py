"""The architecture matrix (issue 21): a tiny random model of every common type (tests/arch_models.py) trains a few
steps on torch and on MLX with a row longer than 256 tokens, its PEFT adapter loads and changes the logits, the
attention kernel is one the class supports, and where our fast path applies its loss equals the plain forward's.
Where mlx-lm cannot load a type, the MLX run refuses in one line naming torch."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from backends.torch_backend import FAST_PATH_TYPES
from tests.arch_models import MOE_TYPES, TYPES, build

ARCHS = list(TYPES)
MLX_CANNOT_LOAD = {"gpt_oss"}  # mlx-lm 0.32 cannot read transformers 5's gpt_oss weights (fused experts, sinks)
LONG_WORDS = 300


@pytest.fixture(scope="module")
def arch(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return lambda model_type: build(model_type, tiny_model, str(root / model_type))


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> str:
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in "one two three four five six seven eight nine ten eleven".split()]
    rows.append({"messages": [{"role": "user", "content": "repeat"},
                              {"role": "assistant", "content": " ".join(["cat"] * LONG_WORDS)}]})
    path = tmp_path_factory.mktemp("arch-data") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train(folder: str, data: str, out: str, monkeypatch, capsys, **extra) -> tuple[int, str, str]:
    from finetune import cli
    from finetune.config import FIELDS, env_name

    for name in FIELDS:
        monkeypatch.delenv(env_name(name), raising=False)
    env = {"MODEL": folder, "DATASET": data, "MAX_STEPS": "2", "BATCH_SIZE": "2", "GRAD_ACCUM": "1", "VAL_SPLIT": "0.2",
           "EVAL_GENERATIONS": "0", "EVAL_ROWS": "2", "LEARNING_RATE": "0.01", "OUTPUT_DIR": out, **extra}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = cli.main([])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def peft_changes_logits(folder: str, run_dir: str) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 40).unsqueeze(0)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, run_dir).eval()(input_ids=ids).logits
    return float((after - before).abs().max())


@pytest.mark.parametrize("model_type", ARCHS)
def test_torch_trains_every_architecture_and_its_adapter_loads_in_peft(model_type, arch, rows_file, tmp_path,
                                                                      monkeypatch, capsys):
    from finetune.models import supports_sdpa

    folder, out = arch(model_type), str(tmp_path / "run")
    rc, stdout, err = train(folder, rows_file, out, monkeypatch, capsys)
    assert rc == 0, err[-2000:]
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["status"] == "completed" and record["result"]["steps"] == 2
    assert "memory planned for the longest row" in stdout  # the >256-token row is in the data
    extra = record["result"]["extra"]
    architecture = json.load(open(os.path.join(folder, "config.json")))["architectures"][0]
    assert extra["attention"] == ("sdpa" if supports_sdpa(architecture) else "eager")  # long rows: sdpa where allowed
    assert {"q_proj", "qkv_proj"} & set(extra["lora_targets"])  # attention is always trained (phi3: fused qkv)
    # PEFT wraps transformers 5's fused expert weights of Qwen3-MoE and Mixtral; GPT-OSS's it cannot, and says so
    assert ("experts" in extra["lora_targets"]) == (model_type in MOE_TYPES - {"gpt_oss"})
    assert ("stay frozen" in stdout) == (model_type == "gpt_oss")
    assert peft_changes_logits(folder, out) > 1e-6


@pytest.mark.parametrize("model_type", sorted(FAST_PATH_TYPES & set(ARCHS)))
def test_fast_path_loss_equals_the_plain_forward(model_type, arch, tokenizer):
    """Our step computes logits only at trained positions from the decoder's output; it must equal the model's own
    forward (softcapping included) on the same batch, fp32."""
    from backends.torch_backend import TorchSession
    from finetune.config import Config
    from finetune.data import Example
    from finetune.models import _read_config, info_from_config
    from finetune.template import encode
    from tests.test_torch_backend import plan

    folder = arch(model_type)
    info = info_from_config(folder, folder, _read_config(folder), source="local")
    session = TorchSession(Config(lora_r=4), plan(max_seq_length=512, attention="eager"), info, tokenizer)
    rows = [encode(Example(messages=[{"role": "user", "content": f"say {w}"},
                                     {"role": "assistant", "content": " ".join([w] * n)}]), tokenizer, 512)
            for w, n in (("one", 1), ("two", 40), ("three", 290))]
    assert session.fast
    fast = session.trained_logps(rows)[0].detach().numpy()
    session.fast = False
    plain = session.trained_logps(rows)[0].detach().numpy()
    np.testing.assert_allclose(fast, plain, atol=1e-4)


@pytest.mark.mlx
@pytest.mark.parametrize("model_type", ARCHS)
def test_mlx_trains_every_architecture_mlx_lm_can_load(model_type, arch, rows_file, tmp_path, monkeypatch, capsys):
    folder, out = arch(model_type), str(tmp_path / "run")
    rc, _, err = train(folder, rows_file, out, monkeypatch, capsys, BACKEND="mlx")
    if model_type in MLX_CANNOT_LOAD:
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "mlx-lm cannot load it" in lines[0] and "BACKEND=torch" in lines[0]
        assert not os.path.exists(out)
        return
    assert rc == 0, err[-2000:]
    record = json.load(open(os.path.join(out, "run.json")))
    targets = record["result"]["extra"]["lora_targets"]
    assert record["status"] == "completed" and {"q_proj", "qkv_proj"} & set(targets)
    if model_type in MOE_TYPES:  # the experts stay untouched on MLX (no PEFT form for their LoRA), and it says so
        assert not any("expert" in t or "switch" in t for t in targets) and "experts" in open(
            os.path.join(out, "training_log.txt")).read()
    assert peft_changes_logits(folder, out) > 1e-6  # the MLX adapter, converted to PEFT, loads in transformers
