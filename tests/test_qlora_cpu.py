"""QLoRA on the CPU: bitsandbytes 0.50 runs NF4 layers there, so the 4-bit training path is tested for real (the
CUDA run is the same code with another device): bf16 matmuls under autocast (4-bit no longer computes in fp32),
the adapter of a 4-bit run loads in plain PEFT on the un-quantized base, and the planner's 4-bit peak holds."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.test_nonfinite import lora_values, session, sft_batch, unchanged

pytest.importorskip("bitsandbytes", reason="setup_environment.sh installs bitsandbytes on Linux")


def test_4bit_step_runs_bf16_matmuls_on_nf4_weights(tiny_model, tokenizer):
    import bitsandbytes as bnb
    import torch

    s = session(tiny_model, tokenizer, dtype="bf16", quantize="4bit")
    layers = [m for m in s.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    # bitsandbytes returns a 4-bit layer's output in its input's dtype (the fp32 residual stream); what autocast
    # changes is attention and the LoRA matmuls: bf16 now, fp32 when autocast was off for 4-bit
    watched = [m for n, m in s.model.named_modules() if n.endswith(("self_attn", "lora_A.default"))]
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((out[0] if isinstance(out, tuple) else out).dtype))
             for m in watched]
    before = lora_values(s)
    out = s.train_step(sft_batch(tokenizer), 2, 1e-2)
    for h in hooks:
        h.remove()
    assert len(seen) >= len(watched) and set(seen) == {torch.bfloat16}
    assert all(m.compute_dtype == torch.bfloat16 for m in layers)  # the NF4 matmul dequantizes to bf16
    assert "skipped" not in out and out["loss"] > 0 and not unchanged(s, before)
    # kbit preparation keeps what is not quantized in fp32 (what the planner now counts)
    assert s.base.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in s.params)


def test_planner_counts_fp32_for_what_4bit_leaves_unquantized():
    from finetune.models import info_from_config
    from finetune.plan import CUDA_ACT_BYTES, DTYPE_BYTES, GB, NF4_BYTES, _linear_params, estimate_memory

    m = info_from_config("m", None, dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=16, num_key_value_heads=8, vocab_size=128256,
                                         model_type="llama"))
    q = estimate_memory(m, 4, 512, False, "bf16", "4bit", 16, "cuda")
    plain = estimate_memory(m, 4, 512, False, "bf16", "none", 16, "cuda")
    linear = _linear_params(m)
    assert q["weights"] == pytest.approx((linear * NF4_BYTES + (m.num_params - linear) * 4) / GB)
    # fp32 residual stream and norms, not all bf16: 1.5x the bytes per activation element on the H200
    assert q["activations"] == pytest.approx(plain["activations"] * CUDA_ACT_BYTES["4bit"] / CUDA_ACT_BYTES["16bit"])
    assert CUDA_ACT_BYTES["4bit"] > 1.4 * CUDA_ACT_BYTES["16bit"]
    assert DTYPE_BYTES["bf16"] == 2


def test_cpu_4bit_run_trains_the_real_model_and_its_adapter_loads_in_peft(offline_model, run_env, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q4"
    done = run_cli(["train"], {**run_env, "MODEL": offline_model, "QUANTIZE": "4bit", "MAX_STEPS": "2",
                               "BATCH_SIZE": "2", "GRAD_ACCUM": "1", "MAX_SEQ_LENGTH": "128", "LEARNING_RATE": "1e-3",
                               "EVAL_STEPS": "100", "EVAL_ROWS": "4", "EVAL_GENERATIONS": "0",
                               "OUTPUT_DIR": str(out)}, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "4-bit on the CPU runs bitsandbytes' CPU kernels: for testing" in done.stdout
    run = json.load(open(out / "run.json"))
    predicted, measured = run["plan"]["predicted_peak_gb"], run["result"]["peak_memory_gb"]
    assert abs(measured - predicted) <= 0.2 * measured, (predicted, measured)
    base = AutoModelForCausalLM.from_pretrained(offline_model, dtype=torch.float32)  # not quantized
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(out))
        after = tuned(input_ids=ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
