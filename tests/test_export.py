"""Use and share the result, verified rather than assumed, on the real offline model: greedy token ids of fixed
prompts are identical for base + adapter in PEFT, the merged model in transformers, and the f16 GGUF in llama.cpp
(built from the registry's llama-cpp-python sdist); q8_0 and q4_k_m still answer the sample task in valid JSON;
the same chain for an MLX-trained adapter; chat on both backends; every refusal is one line and leaves nothing."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_cli

NEW_TOKENS = 24


@pytest.fixture(scope="session")
def llama_tools():
    from finetune import llamacpp

    return llamacpp.install()  # prebuilt by .ci/run; builds (~5 min) on a machine that lacks it


def held_out_prompts(tokenizer, n: int):
    from finetune import data, evaluate

    splits = data.load("sample", 0.1, 42)
    return evaluate.example_prompts(splits.validation[:n], tokenizer, n)


def peft_greedy(base_dir, adapter_dir, prompts):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    return hf_greedy(model.eval(), prompts)


def hf_greedy(model, prompts):
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=2, eos_token_id=2)
            out.append(gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def exported(real_run, llama_tools):
    out, _, base = real_run
    result = run_cli(["export", out, "--merge", "--gguf", "f16", "--gguf", "q8_0", "--gguf", "q4_k_m"], dict(os.environ))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out, base


def test_greedy_ids_identical_in_peft_merged_and_f16_gguf(exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import llamacpp

    run_dir, base = exported
    tok = AutoTokenizer.from_pretrained(run_dir)
    prompts = [ids for ids, _ in held_out_prompts(tok, 4)]
    peft_ids = peft_greedy(base, run_dir, prompts)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "merged"), dtype=torch.float32)
    assert json.load(open(os.path.join(run_dir, "merged", "config.json")))["dtype"] == "bfloat16"  # the base's dtype
    merged_ids = hf_greedy(merged.eval(), prompts)
    name = json.load(open(os.path.join(run_dir, "run.json")))["run_name"]
    gguf_ids = llamacpp.greedy(os.path.join(run_dir, "gguf", f"{name}-f16.gguf"), prompts, NEW_TOKENS)
    assert peft_ids == merged_ids == gguf_ids
    assert any(2 in ids for ids in peft_ids)  # the answers end (EOS) within the budget


def test_quantized_ggufs_still_answer_in_valid_json(exported):
    from transformers import AutoTokenizer

    from finetune import evaluate, llamacpp

    run_dir, _ = exported
    tok = AutoTokenizer.from_pretrained(run_dir)
    prompts = held_out_prompts(tok, 8)
    name = json.load(open(os.path.join(run_dir, "run.json")))["run_name"]
    shares = {}
    for quant in ("q8_0", "q4_k_m"):
        outs = llamacpp.greedy(os.path.join(run_dir, "gguf", f"{name}-{quant}.gguf"), [p for p, _ in prompts], 48)
        ok = [evaluate.score(want, tok.decode(ids, skip_special_tokens=True).strip())["valid_format"]
              for (_, want), ids in zip(prompts, outs)]
        shares[quant] = sum(ok) / len(ok)
    print(f"valid JSON on 8 held-out prompts: {shares}")
    assert shares["q8_0"] >= 0.75 and shares["q4_k_m"] >= 0.5, shares


def test_modelfile_has_the_chat_template_and_stop_tokens(exported):
    run_dir, _ = exported
    text = open(os.path.join(run_dir, "gguf", "Modelfile.q4_k_m")).read()
    name = json.load(open(os.path.join(run_dir, "run.json")))["run_name"]
    assert f"FROM ./{name}-q4_k_m.gguf" in text and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    # the data's system prompt (every sample row has it), not the template's SmolLM default the model was not taught under
    record = json.load(open(os.path.join(run_dir, "run.json")))
    assert record["data"]["system_prompt"].startswith("Extract the person's name")
    assert f'SYSTEM """{record["data"]["system_prompt"]}"""' in text and "named SmolLM" not in text


def test_refusals_are_one_line_and_leave_no_half_written_export(exported, tiny_model, run_env, tmp_path):
    run_dir, _ = exported
    before = sorted(os.listdir(os.path.join(run_dir, "gguf")))
    for args, needle in ((["export", run_dir, "--gguf", "q3_zz"], "--gguf q3_zz: unknown type"),
                         (["export", str(tmp_path), "--merge"], "not a run directory"),
                         (["export", run_dir, "--gguf", "f16"], "already exists"),
                         (["export", run_dir], "needs a RUN_DIR and --merge and/or --gguf")):
        result = run_cli(args, run_env)
        assert result.returncode == 2 and needle in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert sorted(os.listdir(os.path.join(run_dir, "gguf"))) == before


def test_a_tokenizer_llama_cpp_does_not_know_is_refused_cleanly(run_env, tmp_path, llama_tools):
    out = tmp_path / "tiny"
    assert run_cli([], {**run_env, "MODEL": "finetune/tiny-qwen2", "MAX_STEPS": "1", "EVAL_GENERATIONS": "0",
                        "EVAL_ROWS": "2", "OUTPUT_DIR": str(out)}).returncode == 0
    result = run_cli(["export", str(out), "--gguf", "f16"], run_env)
    assert result.returncode == 2 and "does not recognise this model's tokenizer" in result.stderr, result.stderr
    assert not [f for f in os.listdir(out / "gguf") if not f.startswith("Modelfile")] if (out / "gguf").exists() else True


def test_mlx_trained_adapter_to_merged_to_gguf(offline_model, run_env, tmp_path, llama_tools):
    """An MLX run (one step on the real model: mlx[cpu] is slow here) through merge and f16 GGUF: mlx-lm with the
    adapter, the merged model and llama.cpp give the same greedy tokens."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends.mlx_backend import model_config_overrides
    from finetune import llamacpp

    out = tmp_path / "mlx-run"
    result = run_cli([], {**run_env, "MODEL": "smollm2-135m-offline", "BACKEND": "mlx", "MAX_STEPS": "1",
                          "BATCH_SIZE": "2", "GRAD_ACCUM": "1", "LEARNING_RATE": "0.01", "EVAL_GENERATIONS": "0",
                          "EVAL_ROWS": "2", "DTYPE": "fp32", "OUTPUT_DIR": str(out)})
    assert result.returncode == 0, result.stderr[-2000:]
    exported = run_cli(["export", str(out), "--gguf", "f16"], run_env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    tok = AutoTokenizer.from_pretrained(str(out))
    prompts = [ids for ids, _ in held_out_prompts(tok, 2)]
    model, _ = load(offline_model, adapter_path=str(out / "mlx"), model_config=model_config_overrides(offline_model))
    mlx_ids = []
    for ids in prompts:
        toks = []
        for t, _ in generate_step(mx.array(ids), model, max_tokens=12):
            toks.append(int(t))
            if toks[-1] == 2:
                break
        mlx_ids.append(toks)
    merged = hf_greedy(AutoModelForCausalLM.from_pretrained(str(out / "merged")).float().eval(), prompts)
    name = json.load(open(out / "run.json"))["run_name"]
    gguf = llamacpp.greedy(str(out / "gguf" / f"{name}-f16.gguf"), prompts, NEW_TOKENS)
    assert [m[:12] for m in merged] == [g[:12] for g in gguf] == mlx_ids


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_chat_answers_once_and_keeps_history_interactively(backend, real_run, run_env, tmp_path):
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    out, _, _ = real_run
    run_dir = out
    if backend == "mlx":  # the same adapter as an MLX run directory: chat must use mlx-lm with the mlx adapter
        run_dir = str(tmp_path / "as-mlx")
        shutil.copytree(out, run_dir, ignore=shutil.ignore_patterns("merged", "gguf", "checkpoints"))
        assert run_cli(["convert", out, "--to", "mlx", "--out", os.path.join(run_dir, "mlx")], run_env).returncode == 0
        record = json.load(open(os.path.join(run_dir, "run.json")))
        record["plan"]["backend"], record["plan"]["device"], record["plan"]["dtype"] = "mlx", "mlx", "fp32"
        json.dump(record, open(os.path.join(run_dir, "run.json"), "w"))
    system = "Extract the person's name, city and age from the text. Reply with only a JSON object with keys " \
             '"name", "city", "age".'
    assert json.load(open(os.path.join(run_dir, "run.json")))["data"]["system_prompt"] == system
    once = run_cli(["chat", run_dir, "--prompt", "Maria Silva, 34, lives in Lisbon.", "--max-new-tokens", "32"], run_env)
    assert once.returncode == 0, once.stderr[-1500:]
    assert json.loads(once.stdout.strip())["city"] == "Lisbon"  # the data's system prompt, by default
    dropped = run_cli(["chat", run_dir, "--system", "", "--prompt", "Maria Silva, 34, lives in Lisbon.",
                       "--max-new-tokens", "32"], run_env)
    assert dropped.returncode == 0 and dropped.stdout.strip() != once.stdout.strip()
    session = subprocess.run([sys.executable, "-m", "finetune", "chat", run_dir, "--base", "--max-new-tokens", "8"],
                             input="Hello\n/reset\nHi again\n/exit\n", env=run_env, cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert session.returncode == 0, session.stderr[-1500:]
    assert session.stdout.count("[base model]") == 2 and "(history cleared)" in session.stdout


def test_install_tools_downloads_the_sdist_once(monkeypatch, tmp_path):
    """Converter and runtime come from one download; a second install finds both and downloads nothing."""
    from finetune import llamacpp

    monkeypatch.setenv("FINETUNE_TOOLS", str(tmp_path / "tools"))
    downloads = []

    def fake_sdist(work):
        vendor = os.path.join(work, llamacpp.SDIST, "vendor", "llama.cpp")
        os.makedirs(os.path.join(vendor, "gguf-py"))
        for name in ("convert_hf_to_gguf.py", "LICENSE"):
            open(os.path.join(vendor, name), "w").close()
        downloads.append(work)
        return os.path.join(work, llamacpp.SDIST)

    def fake_pip(args, what, env=None):  # the wheel build and install, as files
        if args[0] == "wheel":
            os.makedirs(args[args.index("-w") + 1])
            open(os.path.join(args[args.index("-w") + 1], "llama_cpp_python.whl"), "w").close()
        elif args[0] == "install":
            os.makedirs(os.path.join(args[args.index("--target") + 1], "llama_cpp"))

    monkeypatch.setattr(llamacpp, "_sdist", fake_sdist)
    monkeypatch.setattr(llamacpp, "_pip", fake_pip)
    script, runtime = llamacpp.install()
    assert len(downloads) == 1
    assert os.path.isfile(script)
    assert os.path.isdir(os.path.join(script.rsplit(os.sep, 1)[0], "gguf-py"))
    assert os.path.isdir(os.path.join(runtime, "llama_cpp"))
    assert llamacpp.install() == [script, runtime] and len(downloads) == 1


def test_chat_uses_the_data_system_prompt_unless_told_otherwise(run_env, tiny_model, tmp_path, monkeypatch, capsys):
    """Rows that share a system prompt: run.json records it, chat sends it by default, --system "" drops it."""
    from finetune import chat, cli

    rows = [{"messages": [{"role": "system", "content": "Reply in capitals."}, {"role": "user", "content": f"w{i}"},
                          {"role": "assistant", "content": f"W{i}"}]} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for k, v in {**run_env, "MODEL": "finetune/tiny-qwen2", "DATASET": str(tmp_path / "d.jsonl"), "MAX_STEPS": "1",
                 "EVAL_GENERATIONS": "0", "EVAL_ROWS": "2", "OUTPUT_DIR": str(tmp_path / "run")}.items():
        monkeypatch.setenv(k, v)
    assert cli.main([]) == 0
    assert "System prompt: every row has the same one" in capsys.readouterr().out
    assert json.load(open(tmp_path / "run" / "run.json"))["data"]["system_prompt"] == "Reply in capitals."
    sent = []
    real = chat._prompt_ids
    monkeypatch.setattr(chat, "_prompt_ids", lambda tok, history: sent.append(list(history)) or real(tok, history))
    for extra in ([], ["--system", ""], ["--system", "Be brief."]):
        assert cli.main(["chat", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "2", *extra]) == 0
    assert [h[0]["content"] if h[0]["role"] == "system" else None for h in sent] == \
        ["Reply in capitals.", None, "Be brief."]
