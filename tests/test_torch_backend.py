"""Torch backend config logic, unit-tested on CPU; the CUDA paths themselves are marked `gpu`."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from backends import select
from backends.torch_backend import BACKEND
from backends.torch_build import lora_kwargs, model_load_kwargs, optimizer_kwargs
from finetune.config import Config
from finetune.hardware import CudaDevice, Hardware
from finetune.models import info_from_config
from finetune.plan import Plan

HAS_CUDA = subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0 if any(
    os.access(os.path.join(p, "nvidia-smi"), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep)) else False


def hw(**kw) -> Hardware:
    base = dict(os="Linux", arch="x86_64", chip="cpu", ram_total_gb=32, ram_available_gb=30, swap_total_gb=0,
                disk_free_gb=100, cpu_cores=8, packages={"torch": "2.13.0"})
    return Hardware(**{**base, **kw})


def plan(**kw) -> Plan:
    base = dict(backend="torch", device="cpu", method="sft", batch_size=4, grad_accum=4, max_seq_length=512,
                max_steps=100, eval_steps=20, save_steps=10, gradient_checkpointing=False, dtype="fp32", quantize="none",
                memory_kind="ram", memory_total_gb=32, budget_gb=24, predicted_peak_gb=2)
    return Plan(**{**base, **kw})


def test_device_follows_hardware():
    assert BACKEND.device(hw()) == "cpu"
    assert BACKEND.device(hw(os="Darwin", arch="arm64", mps_available=True)) == "mps"
    assert BACKEND.device(hw(cuda_devices=[CudaDevice("NVIDIA L4", 22, "8.9", True)])) == "cuda"


def test_unavailable_without_torch_and_auto_skips_it():
    assert "not installed" in BACKEND.available(hw(packages={}))
    with pytest.raises(Exception, match="no backend can run here"):
        select("auto", hw(packages={}), None, "sft")


def test_apple_without_mlx_falls_back_to_torch_mps():
    apple = hw(os="Darwin", arch="arm64", chip="Apple M2", mps_available=True, mlx_available=False)
    model = info_from_config("m", None, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              vocab_size=100, model_type="qwen2"))
    backend, why = select("auto", apple, model, "sft")
    assert backend.name == "torch" and backend.device(apple) == "mps"
    assert why[-1].startswith("torch: chosen")


def test_4bit_plan_builds_nf4_quantization_config():
    import torch

    kwargs = model_load_kwargs(plan(device="cuda", dtype="bf16", quantize="4bit"))
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["device_map"] == {"": 0}
    assert model_load_kwargs(plan(device="cuda", dtype="fp16"))["dtype"] == torch.float16


def test_cpu_loads_fp32_and_the_plan_picks_attention():
    """On the CPU the base loads in fp32 (norms, embeddings and the residual stream stay fp32; the LoRA-wrapped
    linear weights are cast to bf16 afterwards), and eager attention is used when the planner chose it."""
    import torch

    assert model_load_kwargs(plan(dtype="bf16")) == {"dtype": torch.float32, "attn_implementation": "sdpa"}
    assert model_load_kwargs(plan(dtype="fp32", attention="eager"))["attn_implementation"] == "eager"


def test_bf16_on_the_cpu_stores_only_the_frozen_linear_weights_in_bf16(tiny_model, tokenizer):
    import torch

    from backends.torch_backend import TorchSession
    from finetune.models import info_from_config
    from finetune.models import _read_config

    info = info_from_config("finetune/tiny-qwen2", tiny_model, _read_config(tiny_model), is_tiny=True)
    s = TorchSession(Config(), plan(dtype="bf16", max_seq_length=256), info, tokenizer)
    dtypes = {n: p.dtype for n, p in s.model.named_parameters()}
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n.endswith("base_layer.weight"))
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "norm" in n or "embed" in n)


def test_optimizer_uses_fused_kernels_where_torch_has_them():
    assert optimizer_kwargs(plan(device="cpu")) == {"fused": True}
    assert optimizer_kwargs(plan(device="cuda")) == {"fused": True}
    assert optimizer_kwargs(plan(device="mps")) == {"foreach": True}


def test_lora_kwargs_and_dora():
    assert lora_kwargs(Config(lora_r=8, lora_alpha=16, lora_type="dora", lora_dropout=0.05)) == {
        "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "use_rslora": False, "use_dora": True,
        "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    assert lora_kwargs(Config(lora_scaling="rslora"))["use_rslora"] is True


@pytest.mark.parametrize("scaling, scale", [("rslora", 32 / 4), ("standard", 32 / 16)])
def test_the_peft_model_scales_the_update_as_lora_scale_says(scaling, scale, tiny_model, tokenizer):
    """One formula (config.lora_scale) for both backends and the report: PEFT's own scaling must agree with it,
    or an MLX run and a torch run of the same settings would train different models."""
    from backends.mlx_backend import lora_parameters
    from backends.torch_backend import TorchSession
    from finetune.config import lora_scale
    from finetune.models import _read_config

    info = info_from_config("finetune/tiny-qwen2", tiny_model, _read_config(tiny_model), is_tiny=True)
    cfg = Config(lora_r=16, lora_alpha=32, lora_scaling=scaling)
    s = TorchSession(cfg, plan(max_seq_length=256), info, tokenizer)
    scales = {m.scaling["default"] for m in s.model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert len(scales) == 1 and scales.pop() == pytest.approx(scale) and lora_scale(cfg) == pytest.approx(scale)
    assert lora_parameters(cfg)["scale"] == pytest.approx(scale)  # what the MLX backend's LoRA layers are built with


def test_dora_trains_on_cpu(run_env, tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "dora"
    result = run_cli([], {**run_env, "MODEL": "finetune/tiny-qwen2", "LORA_TYPE": "dora", "MAX_STEPS": "3",
                          "EVAL_GENERATIONS": "0", "EVAL_ROWS": "4", "OUTPUT_DIR": str(out)})
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "np") as fh:
        assert any("lora_magnitude_vector" in k for k in fh.keys())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_qlora_4bit_trains_on_cuda(run_env, tmp_path):
    from tests.conftest import run_cli

    result = run_cli([], {**run_env, "MODEL": "finetune/tiny-qwen2", "QUANTIZE": "4bit", "MAX_STEPS": "3",
                          "EVAL_GENERATIONS": "1", "OUTPUT_DIR": str(tmp_path / "q")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "q" / "adapter_model.safetensors").exists()


def test_16bit_cuda_loads_straight_onto_the_gpu(monkeypatch):
    """device_map puts each shard on the GPU as it loads: a 16-bit model never sits whole in host RAM first; under
    torchrun, on this process's own GPU."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert model_load_kwargs(plan(device="cuda", dtype="bf16"))["device_map"] == {"": 0}
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert model_load_kwargs(plan(device="cuda", dtype="bf16"))["device_map"] == {"": 3}
    monkeypatch.delenv("LOCAL_RANK")
    assert model_load_kwargs(plan(device="cpu", dtype="fp32", quantize="4bit"))["device_map"] == {"": "cpu"}
    # FSDP: on the host, not whole on every GPU; torch_dist.shard moves each process's shard there
    import torch

    sharded = model_load_kwargs(plan(device="cuda", dtype="bf16", world_size=4, fsdp=True))
    assert "device_map" not in sharded and sharded["dtype"] == torch.bfloat16


def test_loss_and_eval_forwards_build_no_kv_cache(tiny_model, tokenizer):
    from tests.test_nonfinite import session, sft_batch

    s = session(tiny_model, tokenizer)
    caches = []
    s.base.get_decoder().register_forward_hook(lambda m, a, out: caches.append(out.past_key_values))
    s.token_logps(sft_batch(tokenizer).sequences)  # eval: model.eval(), where use_cache would default to on
    s.train_step(sft_batch(tokenizer), 2, 1e-3)
    assert caches and all(c is None for c in caches)
    assert s.describe()["attention"] == s.plan.attention  # what run.json records: the kernel actually loaded
    assert s.describe()["malloc_keeps_freed"] is (platform.system() == "Linux")  # a CPU session keeps freed memory


def test_resume_keeps_a_paged_optimizer_paged(monkeypatch):
    """bitsandbytes' load_state_dict returns plain tensors; repage_optimizer_state puts them back in paged buffers
    (the CPU has no paged memory, so the optimizer's buffer factory is marked here; the copying is real)."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    from backends.torch_build import repage_optimizer_state

    p = torch.nn.Parameter(torch.randn(512, 256))
    opt = bnb.optim.PagedAdamW8bit([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    resumed = bnb.optim.PagedAdamW8bit([p], lr=1e-3)
    resumed.load_state_dict(opt.state_dict())
    made = []

    def paged(param, dtype=torch.float32):
        buf = torch.zeros_like(param, dtype=dtype)
        buf.is_paged = True
        made.append(buf)
        return buf

    monkeypatch.setattr(resumed, "get_state_buffer", paged)
    assert repage_optimizer_state(resumed) == 2  # state1 and state2 (the 8-bit moments), not the small qmaps
    for key in ("state1", "state2"):
        assert resumed.state[p][key].is_paged and torch.equal(resumed.state[p][key], opt.state[p][key])
    assert repage_optimizer_state(torch.optim.AdamW([p])) == 0
