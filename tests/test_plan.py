"""The memory planner on described machines and real Qwen2.5 sizes: pure arithmetic, no torch."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from finetune import plan
from finetune.config import Config
from finetune.progress import hms
from finetune.errors import UserError
from finetune.hardware import CudaDevice, Hardware
from finetune.models import info_from_config


def mac(chip: str, ram: float, mlx: bool = False) -> Hardware:
    return Hardware(os="Darwin", arch="arm64", chip=chip, ram_total_gb=ram, ram_available_gb=ram * 0.5,
                    swap_total_gb=0, disk_free_gb=200, cpu_cores=8, mps_available=True, mlx_available=mlx,
                    mlx_device="gpu" if mlx else None)


def linux(ram: float, cores: int = 8, features=(), gpus=(), available: float | None = None) -> Hardware:
    return Hardware(os="Linux", arch="x86_64", chip="Intel(R) Xeon(R)", ram_total_gb=ram,
                    ram_available_gb=ram * 0.9 if available is None else available, swap_total_gb=0,
                    disk_free_gb=200, cpu_cores=cores, cpu_features=list(features), cuda_devices=list(gpus))


RTX4090 = CudaDevice("NVIDIA GeForce RTX 4090", 24, "8.9", True)
T4 = CudaDevice("Tesla T4", 15.0, "7.5", False)

# name -> (hardware, device)
MACHINES = {
    "m1-8": (mac("Apple M1", 8), "mps"),
    "m2-16": (mac("Apple M2", 16), "mps"),
    "m3max-64": (mac("Apple M3 Max", 64), "mps"),
    "m1-8-mlx": (mac("Apple M1", 8, mlx=True), "mlx"),
    "m2-16-mlx": (mac("Apple M2", 16, mlx=True), "mlx"),
    "m3max-64-mlx": (mac("Apple M3 Max", 64, mlx=True), "mlx"),
    "rtx4090-24": (linux(64, gpus=[RTX4090]), "cuda"),
    "t4-16": (linux(16, gpus=[T4]), "cuda"),
    "cpu-8": (linux(8, cores=4, available=6), "cpu"),
    "this-machine": (linux(24, cores=2, features=["avx2", "avx512f", "avx512_bf16"], available=22), "cpu"),
}


def qwen(h, layers, inter, heads, kv, vocab, tied, name):
    return info_from_config(name, None, {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h,
        "num_hidden_layers": layers, "intermediate_size": inter, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied})


MODELS = {  # real config.json values of Qwen/Qwen2.5-*-Instruct
    "0.5B": qwen(896, 24, 4864, 14, 2, 151936, True, "Qwen/Qwen2.5-0.5B-Instruct"),
    "1.5B": qwen(1536, 28, 8960, 12, 2, 151936, True, "Qwen/Qwen2.5-1.5B-Instruct"),
    "3B": qwen(2048, 36, 11008, 16, 2, 151936, True, "Qwen/Qwen2.5-3B-Instruct"),
    "7B": qwen(3584, 28, 18944, 28, 4, 152064, False, "Qwen/Qwen2.5-7B-Instruct"),
}

ROWS, MEAN_TOKENS = 1000, 300


def make(machine: str, model: str, **cfg):
    hw, device = MACHINES[machine]
    backend = "mlx" if device == "mlx" else "torch"
    return plan.make(Config(**cfg), hw, MODELS[model], backend, device, ROWS, MEAN_TOKENS)


def outcome(machine, model, **cfg):
    try:
        return make(machine, model, **cfg)
    except UserError as err:
        return err


ALL = [(m, k) for m in MACHINES for k in MODELS]


def test_model_sizes_are_the_real_ones():
    # Sanity: the presets are the advertised sizes (Qwen2.5 ignores ~0.1% biases).
    sizes = {k: m.num_params / 1e9 for k, m in MODELS.items()}
    assert 0.45 < sizes["0.5B"] < 0.52 and 1.5 < sizes["1.5B"] < 1.6
    assert 3.0 < sizes["3B"] < 3.1 and 7.5 < sizes["7B"] < 7.7


@pytest.mark.parametrize("machine,model", ALL)
def test_every_combo_plans_within_budget_or_fails_in_one_line(machine, model):
    result = outcome(machine, model)
    if isinstance(result, UserError):
        msg = str(result)
        assert "\n" not in msg and "MAX_SEQ_LENGTH" in msg and "GB" in msg
        assert MODELS[model].name in msg
    else:
        assert result.predicted_peak_gb <= result.budget_gb
        assert not any(r.startswith("warning") for r in result.reasons)
        assert math.isclose(sum(result.breakdown_gb.values()), result.predicted_peak_gb)
        assert result.batch_size in plan.BATCH_CANDIDATES
        assert result.batch_size * result.grad_accum == 16
        assert result.max_seq_length == 1024


def test_small_model_fits_everywhere():
    for machine in MACHINES:
        assert isinstance(make(machine, "0.5B"), plan.Plan), machine


@pytest.mark.parametrize("machine", ["m1-8", "cpu-8"])
def test_7b_does_not_fit_on_8gb(machine):
    with pytest.raises(UserError, match="MAX_SEQ_LENGTH"):
        make(machine, "7B")


def test_7b_on_cuda_quantizes_only_when_needed():
    t4 = make("t4-16", "7B")
    assert t4.quantize == "4bit" and t4.dtype == "fp16"
    assert any(r.startswith("quantize 4bit") for r in t4.reasons)
    rtx = make("rtx4090-24", "7B")
    assert rtx.quantize == "none" and rtx.dtype == "bf16"
    assert make("t4-16", "0.5B").quantize == "none"


def test_4bit_only_chosen_on_cuda_and_mlx():
    for machine, model in ALL:
        result = outcome(machine, model)
        if isinstance(result, plan.Plan) and result.device not in ("cuda", "mlx"):
            assert result.quantize == "none"


def test_dtypes():
    assert make("t4-16", "0.5B").dtype == "fp16"
    assert make("rtx4090-24", "0.5B").dtype == "bf16"
    assert make("m1-8", "0.5B").dtype == "fp32"
    assert make("m2-16", "0.5B").dtype == "bf16"
    assert make("this-machine", "0.5B").dtype == "bf16"
    assert make("cpu-8", "0.5B").dtype == "fp32"
    assert plan.pick_dtype(mac("Apple M4", 16), "mlx", "auto")[0] == "bf16"
    assert plan.pick_dtype(MACHINES["m1-8"][0], "mps", "fp16") == ("fp16", "dtype fp16: set by you")


def test_memory_budgets():
    assert plan.memory_budget(mac("Apple M1", 8), "mps") == ("unified", 8, 5.0)  # OS reserve binds
    kind, total, budget = plan.memory_budget(mac("Apple M3 Max", 64), "mlx")
    assert kind == "unified" and budget == pytest.approx(64 * 0.70)
    assert plan.memory_budget(linux(64, gpus=[RTX4090]), "cuda") == ("vram", 24, pytest.approx(24 * 0.9 - 0.6))  # less the CUDA context
    assert plan.memory_budget(linux(32, available=8), "cpu") == ("ram", 32, pytest.approx(7.2))
    assert plan.memory_budget(linux(32, available=0), "cpu") == ("ram", 32, pytest.approx(24.0))
    # mlx[cpu] on Linux shares ordinary RAM, not unified memory
    assert plan.memory_budget(linux(32, available=30), "mlx")[0] == "ram"


@pytest.mark.parametrize("model", list(MODELS))
def test_monotonic_in_ram(model):
    last_batch = 0
    for ram in range(2, 257, 2):
        hw = linux(ram)
        if not _fits(hw, model, "cpu"):
            assert last_batch == 0, f"{model} fit with less than {ram} GB RAM but not with {ram}"
            continue
        batch = plan.make(Config(), hw, MODELS[model], "torch", "cpu", ROWS, MEAN_TOKENS).batch_size
        assert batch >= last_batch, f"{model}: batch dropped at {ram} GB"
        last_batch = batch
    assert last_batch == 16  # enough memory reaches the target batch


def _fits(hw, model, device, **cfg) -> bool:
    try:
        plan.make(Config(**cfg), hw, MODELS[model], "torch", device, ROWS, MEAN_TOKENS)
        return True
    except UserError:
        return False


@pytest.mark.parametrize("model", list(MODELS))
def test_monotonic_in_vram(model):
    # At fixed quantization the batch never drops as VRAM grows; with quantize auto the plan moves
    # from 4-bit to 16-bit at the point 16-bit fits at batch 1, and never back.
    for quantize in ("none", "4bit"):
        last = 0
        for vram in range(4, 97, 2):
            hw = linux(128, gpus=[CudaDevice("NVIDIA A100", vram, "8.0", True)])
            if not _fits(hw, model, "cuda", quantize=quantize):
                assert last == 0, f"{model} {quantize}: fit below {vram} GB VRAM but not at it"
                continue
            batch = plan.make(Config(quantize=quantize), hw, MODELS[model], "torch", "cuda", ROWS,
                              MEAN_TOKENS).batch_size
            assert batch >= last
            last = batch
        assert last == 16
    quants = []
    for vram in range(4, 97, 2):
        hw = linux(128, gpus=[CudaDevice("NVIDIA A100", vram, "8.0", True)])
        if _fits(hw, model, "cuda"):
            quants.append(plan.make(Config(), hw, MODELS[model], "torch", "cuda", ROWS, MEAN_TOKENS).quantize)
    assert quants == sorted(quants)  # "4bit" < "none": once 16-bit, always 16-bit
    assert quants[-1] == "none"


@pytest.mark.parametrize("machine,model", ALL)
def test_checkpointing_only_when_needed(machine, model):
    result = outcome(machine, model)
    if isinstance(result, UserError):
        return
    no_ckpt = plan.estimate_memory(MODELS[model], result.batch_size, result.max_seq_length, False,
                                   result.dtype, result.quantize, 16, result.device)["total"]
    assert result.gradient_checkpointing == (no_ckpt > result.budget_gb)


def test_checkpointing_is_used_somewhere_and_skipped_somewhere():
    # Guard against the previous test passing vacuously.
    flags = {r.gradient_checkpointing for r in (outcome(m, k) for m, k in ALL) if isinstance(r, plan.Plan)}
    assert flags == {True, False}


def test_user_values_are_kept():
    p = make("m2-16", "1.5B", batch_size=3, grad_accum=2, gradient_checkpointing="on", dtype="fp32",
             quantize="none")
    assert (p.batch_size, p.grad_accum, p.gradient_checkpointing, p.dtype, p.quantize) == (3, 2, True, "fp32", "none")
    assert sum("set by you" in r for r in p.reasons) == 5
    # a fixed batch sets grad accum towards the effective target
    assert make("m2-16", "0.5B", batch_size=4).grad_accum == 4
    assert make("m2-16", "0.5B", batch_size=32).grad_accum == 1


def test_user_batch_over_budget_is_kept_with_a_warning():
    p = make("m1-8", "1.5B", batch_size=16)
    assert p.batch_size == 16 and p.predicted_peak_gb > p.budget_gb
    warning = [r for r in p.reasons if r.startswith("warning")]
    assert len(warning) == 1 and f"{p.budget_gb:.1f} GB" in warning[0] and "exceeds budget" in warning[0]
    # even a model that cannot fit at all: no error when the user chose the batch
    assert make("m1-8", "7B", batch_size=1).batch_size == 1


def test_user_fixed_settings_that_cannot_fit_fail_and_say_which():
    with pytest.raises(UserError, match="QUANTIZE"):
        make("t4-16", "7B", quantize="none")
    with pytest.raises(UserError, match="MAX_SEQ_LENGTH"):
        make("m2-16", "7B")


def test_max_steps_and_eval_steps():
    p = make("rtx4090-24", "0.5B", epochs=2.0)
    assert p.max_steps == math.ceil(2 * ROWS / 16) == 125 and p.eval_steps == 25
    assert make("rtx4090-24", "0.5B", max_steps=7, eval_steps=3).max_steps == 7
    hw, _ = MACHINES["rtx4090-24"]
    tiny = plan.make(Config(), hw, MODELS["0.5B"], "torch", "cuda", 3, 50)
    assert tiny.batch_size == 2 and tiny.max_steps == 1 and tiny.eval_steps == 1  # batch capped at rows
    assert any("training rows" in r for r in tiny.reasons)
    assert plan.make(Config(), hw, MODELS["0.5B"], "torch", "cuda", 0, 0).batch_size == 1


def test_estimate_memory_components():
    m = MODELS["1.5B"]
    base = plan.estimate_memory(m, 2, 512, False, "bf16", "none", 16, "cuda")
    assert set(base) == {"weights", "lora", "optimizer", "activations", "logits", "overhead", "total"}
    assert base["total"] == pytest.approx(sum(v for k, v in base.items() if k != "total"))
    assert base["weights"] == pytest.approx(m.num_params * 2 / 2**30)
    assert base["optimizer"] == pytest.approx(base["lora"] * 3)
    bigger_batch = plan.estimate_memory(m, 4, 512, False, "bf16", "none", 16, "cuda")
    longer = plan.estimate_memory(m, 2, 1024, False, "bf16", "none", 16, "cuda")
    for grown in (bigger_batch, longer):
        assert grown["activations"] > base["activations"] and grown["logits"] > base["logits"]
        assert grown["total"] > base["total"] and grown["weights"] == base["weights"]
    ckpt = plan.estimate_memory(m, 2, 512, True, "bf16", "none", 16, "cuda")
    assert ckpt["activations"] < base["activations"] / 4
    q4 = plan.estimate_memory(m, 2, 512, False, "bf16", "4bit", 16, "cuda")
    assert q4["weights"] < base["weights"] * 0.6 and q4["lora"] == base["lora"]  # embeddings stay fp32 (kbit prep)
    fp32 = plan.estimate_memory(m, 2, 512, False, "fp32", "none", 16, "cuda")
    assert fp32["weights"] == pytest.approx(2 * base["weights"])
    assert plan.estimate_memory(m, 2, 512, False, "bf16", "none", 32, "cuda")["lora"] == pytest.approx(2 * base["lora"])
    # MPS keeps the attention matrix, which grows with seq^2
    mps = plan.estimate_memory(m, 2, 1024, False, "bf16", "none", 16, "mps")
    assert mps["activations"] > longer["activations"]
    assert plan.estimate_memory(m, 2, 1024, True, "bf16", "none", 16, "mps")["activations"] < mps["activations"]


def test_time_estimate():
    gpu, cpu = make("rtx4090-24", "0.5B"), make("this-machine", "0.5B")
    for p in (gpu, cpu):
        tokens = p.max_steps * p.batch_size * p.grad_accum * MEAN_TOKENS
        assert p.est_seconds > 0 and p.est_tokens_per_s == pytest.approx(tokens / p.est_seconds)
    assert gpu.est_tokens_per_s > 20 * cpu.est_tokens_per_s
    assert make("rtx4090-24", "7B").est_tokens_per_s < gpu.est_tokens_per_s
    # rows longer than max_seq_length are truncated, so time stops growing with mean_tokens
    hw, _ = MACHINES["rtx4090-24"]
    long_rows = [plan.make(Config(max_seq_length=256), hw, MODELS["0.5B"], "torch", "cuda", ROWS, n)
                 for n in (200, 256, 5000)]
    assert long_rows[0].est_seconds < long_rows[1].est_seconds == long_rows[2].est_seconds


def test_plan_to_dict_and_format():
    p = make("t4-16", "7B")
    d = p.to_dict()
    assert d["quantize"] == "4bit" and set(d["breakdown_gb"]) == set(p.breakdown_gb)
    assert d["predicted_peak_gb"] == round(p.predicted_peak_gb, 3)
    text = plan.format_plan(p)
    for needle in ("torch / cuda", f"{p.batch_size} x {p.grad_accum} = 16 effective", "1024", "4bit",
                   "fp16", "vram", f"{p.budget_gb:.1f} GB", "weights", "logits", "tokens/s", p.reasons[0]):
        assert needle in text, needle
    assert hms(3725) == "1:02:05"


def test_plan_module_is_import_light():
    code = "import sys, finetune.plan; print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plan_is_a_dataclass_with_the_agreed_fields():
    names = [f.name for f in dataclasses.fields(plan.Plan)]
    assert names == ["backend", "device", "method", "batch_size", "grad_accum", "max_seq_length", "max_steps",
                     "eval_steps", "save_steps", "gradient_checkpointing", "dtype", "quantize", "memory_kind",
                     "memory_total_gb", "budget_gb", "predicted_peak_gb", "breakdown_gb", "est_seconds",
                     "est_tokens_per_s", "reasons", "sequences_per_item", "attention", "optimizer", "world_size",
                     "fsdp", "lanes", "micro_overhead_tokens"]


# ---- MLX: unified memory on Apple silicon, 4-bit QLoRA with MLX's own quantization, fp32 on mlx[cpu]
def test_mlx_on_apple_budgets_unified_memory_like_mps():
    for machine in ("m1-8", "m2-16", "m3max-64"):
        assert plan.memory_budget(*MACHINES[machine + "-mlx"]) == plan.memory_budget(*MACHINES[machine])
    p = make("m2-16-mlx", "0.5B")
    assert (p.backend, p.device, p.memory_kind, p.dtype) == ("mlx", "mlx", "unified", "bf16")
    assert p.breakdown_gb["overhead"] == plan.OVERHEAD_GB["mlx"]


@pytest.mark.parametrize("model", list(MODELS))
def test_mlx_quantizes_exactly_when_16bit_does_not_fit(model):
    for machine in ("m1-8-mlx", "m2-16-mlx", "m3max-64-mlx"):
        result = outcome(machine, model)
        if isinstance(result, UserError):
            continue
        needs = plan.estimate_memory(MODELS[model], 1, 1024, True, result.dtype, "none", 16, "mlx")["total"]
        assert (result.quantize == "4bit") == (needs > result.budget_gb), (machine, model)
        if result.quantize == "4bit":
            assert any(r.startswith("quantize 4bit (MLX affine") for r in result.reasons)


def test_mlx_4bit_fits_what_16bit_cannot():
    # 7B on a 16 GB Mac: 16-bit does not fit (mps fails), MLX plans QLoRA instead
    assert isinstance(outcome("m2-16", "7B"), UserError)
    p = make("m2-16-mlx", "7B")
    assert p.quantize == "4bit" and p.predicted_peak_gb <= p.budget_gb
    assert make("m3max-64-mlx", "7B").quantize == "none"
    assert make("m2-16-mlx", "0.5B").quantize == "none"


def test_mlx_plan_is_monotonic_in_unified_memory():
    quants, last = [], 0
    for ram in range(8, 193, 8):
        hw = mac("Apple M2 Max", ram, mlx=True)
        try:
            p = plan.make(Config(), hw, MODELS["7B"], "mlx", "mlx", ROWS, MEAN_TOKENS)
        except UserError:
            assert not quants, f"7B fit with less than {ram} GB but not with {ram}"
            continue
        quants.append(p.quantize)
        if len(quants) > 1 and quants[-2] == p.quantize:
            assert p.batch_size >= last
        last = p.batch_size
    assert quants == sorted(quants) and quants[0] == "4bit" and quants[-1] == "none"


def test_user_4bit_is_no_warning_on_mlx_but_is_elsewhere():
    p = make("m2-16-mlx", "0.5B", quantize="4bit")
    assert p.quantize == "4bit" and not any(r.startswith("warning") for r in p.reasons)
    cpu = make("cpu-8", "0.5B", quantize="4bit")  # allowed when asked (bitsandbytes' CPU kernels), said to be for testing
    assert any(r.startswith("note: 4-bit on the CPU runs bitsandbytes' CPU kernels: for testing") for r in cpu.reasons)
    assert make("cpu-8", "0.5B").quantize == "none"  # ... and never chosen there
    mps = plan.make(Config(quantize="4bit"), mac("Apple M2", 16), MODELS["0.5B"], "torch", "mps", ROWS, MEAN_TOKENS)
    assert any(r.startswith("warning: 4-bit needs CUDA (bitsandbytes) or MLX") for r in mps.reasons)


def test_mlx_dtype_bf16_on_the_gpu_fp32_on_mlx_cpu():
    assert plan.pick_dtype(mac("Apple M1", 8, mlx=True), "mlx", "auto")[0] == "bf16"
    mlx_cpu = dataclasses.replace(linux(24), mlx_available=True, mlx_device="cpu")
    dtype, why = plan.pick_dtype(mlx_cpu, "mlx", "auto")
    assert dtype == "fp32" and "mlx[cpu]" in why and "no faster" in why
    mlx_cuda = dataclasses.replace(linux(64, gpus=[RTX4090]), mlx_available=True, mlx_device="gpu")
    assert plan.pick_dtype(mlx_cuda, "mlx", "auto")[0] == "bf16"
    assert plan.pick_dtype(mlx_cpu, "mlx", "bf16") == ("bf16", "dtype bf16: set by you")


def test_mlx_cpu_time_estimate_uses_its_slower_matmul():
    hw = dataclasses.replace(MACHINES["this-machine"][0], mlx_available=True, mlx_device="cpu")
    mlx_cpu = plan.make(Config(), hw, MODELS["0.5B"], "mlx", "mlx", ROWS, MEAN_TOKENS)
    torch_cpu = plan.make(Config(), hw, MODELS["0.5B"], "torch", "cpu", ROWS, MEAN_TOKENS)
    assert mlx_cpu.est_tokens_per_s < torch_cpu.est_tokens_per_s / 10
    # with the system OpenBLAS (backends/mlx_blas.py) mlx[cpu] gets the CPU's fp32 rate
    fast = plan.make(Config(), dataclasses.replace(hw, mlx_openblas=True), MODELS["0.5B"], "mlx", "mlx", ROWS,
                     MEAN_TOKENS)
    assert fast.est_tokens_per_s > 10 * mlx_cpu.est_tokens_per_s
    fp32_torch = plan.make(Config(dtype="fp32"), hw, MODELS["0.5B"], "torch", "cpu", ROWS, MEAN_TOKENS)
    assert fast.est_tokens_per_s <= 1.05 * fp32_torch.est_tokens_per_s
    bf16 = plan.make(Config(dtype="bf16"), dataclasses.replace(hw, mlx_openblas=True), MODELS["0.5B"], "mlx", "mlx",
                     ROWS, MEAN_TOKENS)
    assert bf16.est_tokens_per_s < fast.est_tokens_per_s / 10  # 16-bit matmuls never reach the BLAS


def test_memory_is_planned_for_the_longest_row_not_max_seq_length():
    hw, device = MACHINES["m2-16"]
    full = plan.make(Config(), hw, MODELS["3B"], "torch", device, ROWS, MEAN_TOKENS)
    short = plan.make(Config(), hw, MODELS["3B"], "torch", device, ROWS, MEAN_TOKENS, max_tokens=256)
    assert short.predicted_peak_gb < full.predicted_peak_gb and short.batch_size >= full.batch_size
    assert short.max_seq_length == 1024  # truncation length is unchanged
    assert any("longest row, 256 tokens" in r for r in short.reasons)
    longer = plan.make(Config(), hw, MODELS["3B"], "torch", device, ROWS, MEAN_TOKENS, max_tokens=4096)
    assert longer.predicted_peak_gb == full.predicted_peak_gb  # never planned beyond MAX_SEQ_LENGTH


def test_cpu_dtype_fp32_only_for_tiny_models():
    hw = MACHINES["this-machine"][0]
    assert plan.pick_dtype(hw, "cpu", "auto", num_params=900_000)[0] == "fp32"
    assert plan.pick_dtype(hw, "cpu", "auto", num_params=17_000_000)[0] == "bf16"
    assert plan.pick_dtype(hw, "cpu", "auto", num_params=None)[0] == "bf16"
    assert plan.pick_dtype(hw, "cpu", "bf16", num_params=900_000)[0] == "bf16"  # the user's word stands
    no_bf16 = linux(24, cores=2, features=["avx2"])
    assert plan.pick_dtype(no_bf16, "cpu", "auto", num_params=17_000_000)[0] == "fp32"


# What one H200 measured (bench/results/gpu_probe_h200_issue19.json, bench/prove_cuda.sh): model, steps, rows
# (mean tokens, longest, trained share), checkpointing, quantize, torch's allocator peak (GB), training seconds.
# The CUDA constants were fitted on the sample rows; long/multiturn rows are work they were not fitted on.
SAMPLE, LONG, MULTITURN = (88.4, 101, 0.2749), (342.3, 404, 0.0365), (97.2, 106, 0.2898)
H200_RUNS = [
    ("1.1B", 20, SAMPLE, "off", "none", 5.458, 3.68),
    ("1.1B", 20, SAMPLE, "on", "none", 2.579, 5.33),
    ("1.1B", 20, SAMPLE, "on", "4bit", 1.648, 6.93),
    ("1.1B", 20, SAMPLE, "off", "4bit", 5.532, 3.68),
    ("135M", 40, SAMPLE, "off", "none", 1.919, 9.29),
    ("1.1B", 20, LONG, "off", "none", 14.518, 4.56),  # the first run on that machine took 9.9 s; its reruns 4.6-4.9
    ("1.1B", 20, LONG, "on", "4bit", 3.324, 7.88),
    ("1.1B", 20, MULTITURN, "on", "none", 2.599, 4.80),
]


@pytest.mark.parametrize("shape,steps,rows,ckpt,quantize,peak_gb,seconds", H200_RUNS)
def test_cuda_plan_matches_what_an_h200_measured(shape, steps, rows, ckpt, quantize, peak_gb, seconds):
    """Memory within +-20% of torch's allocator peak and time within +-30% of the measured training seconds.
    The step of a small model is launch-bound (per layer), which the old per-step constant put at 1.3 s."""
    h200 = linux(126, cores=16, gpus=[CudaDevice("NVIDIA H200", 140.4, "9.0", True)])
    dims = {"135M": (576, 30, 1536, 9, 3), "1.1B": (2048, 16, 8192, 32, 8)}[shape]
    model = info_from_config("m", None, dict(zip(
        ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads"), dims),
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, tie_word_embeddings=True))
    mean, longest, trained = rows
    cfg = Config(max_steps=steps, batch_size=16, grad_accum=1, lora_r=16, gradient_checkpointing=ckpt,
                 quantize=quantize, max_seq_length=512)
    p = plan.make(cfg, h200, model, "torch", "cuda", 1000, mean, max_tokens=longest, trained_share=trained)
    assert p.device == "cuda" and p.dtype == "bf16" and p.quantize == quantize
    assert abs(p.predicted_peak_gb - peak_gb) <= 0.2 * peak_gb, (p.predicted_peak_gb, peak_gb)
    assert 0.7 <= p.est_seconds / seconds <= 1.3, (p.est_seconds, seconds)


def test_cuda_budget_leaves_the_context_out():
    """The CUDA context (0.60 GB measured on the H200) is outside torch's allocator, so outside the predicted peak:
    the budget, not the prediction, makes room for it."""
    kind, total, budget = plan.memory_budget(linux(64, gpus=[CudaDevice("NVIDIA L4", 22.5, "8.9", True)]), "cuda")
    assert kind == "vram" and budget == pytest.approx(22.5 * plan.CUDA_SHARE - plan.CUDA_CONTEXT_GB)


def test_attention_follows_what_the_model_class_supports():
    """transformers raises for sdpa on Gemma-2 (soft-capping): the plan picks eager there, says so, counts its scores."""
    gemma2 = info_from_config("google/gemma-2-2b-it", None, {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 2304, "num_hidden_layers": 26,
        "intermediate_size": 9216, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "vocab_size": 256000, "tie_word_embeddings": True})
    hw, device = MACHINES["rtx4090-24"]
    p = plan.make(Config(), hw, gemma2, "torch", device, ROWS, MEAN_TOKENS)
    assert p.attention == "eager" and any("Gemma2ForCausalLM does not support sdpa" in r for r in p.reasons)
    assert "attention" in plan.format_plan(p) and "eager" in plan.format_plan(p)
    assert make("rtx4090-24", "1.5B").attention == "sdpa"  # Qwen2 supports it
    assert plan.make(Config(), *MACHINES["m2-16-mlx"][:1], gemma2, "mlx", "mlx", ROWS, MEAN_TOKENS).attention == "sdpa"
    # dtype by what the type tolerates: a T4 has no bf16, and Gemma overflows fp16, so fp32 (Qwen2 gets fp16)
    t4_hw, t4_device = MACHINES["t4-16"]
    on_t4 = plan.make(Config(), t4_hw, gemma2, "torch", t4_device, ROWS, MEAN_TOKENS)
    assert on_t4.dtype == "fp32" and any("gemma2 overflows fp16" in r for r in on_t4.reasons)
    assert make("t4-16", "0.5B").dtype == "fp16"


def test_world_size_keeps_the_effective_batch_and_memory_and_splits_the_time():
    """NPROC: each process trains its share of every step with the single-process micro-batch, so memory per process
    is unchanged; GPUs divide the compute (plus the gradient sum), processes on one CPU share its cores."""
    hw, device = MACHINES["rtx4090-24"]
    gpus = linux(64, gpus=[RTX4090] * 4)
    cfg = Config(batch_size=4, grad_accum=4)  # one process: 4 micro-batches a step; four: one each
    one = plan.make(cfg, hw, MODELS["1.5B"], "torch", device, ROWS, MEAN_TOKENS)
    four = plan.make(cfg, gpus, MODELS["1.5B"], "torch", device, ROWS, MEAN_TOKENS, world_size=4)
    assert four.world_size == 4 and one.world_size == 1
    assert (four.batch_size, four.grad_accum, four.max_steps) == (one.batch_size, one.grad_accum, one.max_steps)
    assert four.predicted_peak_gb == one.predicted_peak_gb
    comm = plan.allreduce_seconds(MODELS["1.5B"], 16, 4, "cuda")
    assert comm > 0 and plan.allreduce_seconds(MODELS["1.5B"], 16, 1, "cuda") == 0
    assert 0.25 * one.est_seconds < four.est_seconds < 0.3 * one.est_seconds
    assert any("4 processes (NPROC)" in r for r in four.reasons)
    text = plan.format_plan(four)
    assert "processes" in text and "memory below is per process" in text
    cpu_hw, _ = MACHINES["this-machine"]
    cpu_one = plan.make(Config(), cpu_hw, MODELS["0.5B"], "torch", "cpu", ROWS, MEAN_TOKENS)
    cpu_two = plan.make(Config(), cpu_hw, MODELS["0.5B"], "torch", "cpu", ROWS, MEAN_TOKENS, world_size=2)
    assert cpu_two.est_seconds >= cpu_one.est_seconds * 0.95  # the same cores: no speed-up is promised
    assert math.isclose(cpu_two.budget_gb, cpu_one.budget_gb / 2)  # ... and the same memory, each with a model copy
    with pytest.raises(UserError, match="does not fit"):  # 8 GB: one process fits, two copies do not
        plan.make(Config(), MACHINES["cpu-8"][0], MODELS["0.5B"], "torch", "cpu", ROWS, MEAN_TOKENS, world_size=2)
    with pytest.raises(UserError, match="NPROC=8: a step has only 4 rows"):
        plan.make(Config(batch_size=2, grad_accum=2), hw, MODELS["0.5B"], "torch", device, ROWS, MEAN_TOKENS,
                  world_size=8)


A100_40 = CudaDevice("NVIDIA A100-SXM4-40GB", 40, "8.0", True)
QWEN_32B = qwen(5120, 64, 27648, 40, 8, 152064, False, "Qwen/Qwen2.5-32B-Instruct")


def test_fsdp_auto_shards_only_what_does_not_fit_one_device():
    """32B in bf16 (~65 GB) on 40 GB GPUs: one process must quantize; four shard the 16-bit weights instead (FSDP
    before 4-bit: no quality cost). A model that fits stays data-parallel (no weight gathering)."""
    gpus = linux(256, gpus=[A100_40] * 4)
    alone = plan.make(Config(), gpus, QWEN_32B, "torch", "cuda", ROWS, MEAN_TOKENS)
    four = plan.make(Config(), gpus, QWEN_32B, "torch", "cuda", ROWS, MEAN_TOKENS, world_size=4)
    assert (alone.fsdp, alone.quantize) == (False, "4bit") and (four.fsdp, four.quantize) == (True, "none")
    whole = plan.estimate_memory(QWEN_32B, 1, 1024, True, "bf16", "none", 16, "cuda")["weights"]
    assert whole / 4 < four.breakdown_gb["weights"] < whole / 2  # a quarter, plus gathered layers and the outer ones
    assert four.predicted_peak_gb <= four.budget_gb
    assert any(r.startswith("FSDP on: a whole copy needs") for r in four.reasons)
    assert any("to gather the sharded weights" in r for r in four.reasons)
    assert "base weights sharded (FSDP)" in plan.format_plan(four)
    small = plan.make(Config(), gpus, MODELS["7B"], "torch", "cuda", ROWS, MEAN_TOKENS, world_size=4)
    assert small.fsdp is False
    off = plan.make(Config(fsdp="off"), gpus, QWEN_32B, "torch", "cuda", ROWS, MEAN_TOKENS, world_size=4)
    assert (off.fsdp, off.quantize) == (False, "4bit")
    forced = plan.make(Config(fsdp="on"), gpus, MODELS["7B"], "torch", "cuda", ROWS, MEAN_TOKENS, world_size=4)
    assert forced.fsdp and forced.est_seconds > small.est_seconds  # gathering costs time
    with pytest.raises(UserError, match="does not fit"):  # FSDP=on shards 16-bit weights: never 4-bit underneath
        plan.make(Config(fsdp="on"), linux(256, gpus=[A100_40] * 2), QWEN_32B, "torch", "cuda", ROWS, MEAN_TOKENS,
                  world_size=2)
    resumed_alone = plan.make(Config(fsdp="on"), gpus, MODELS["7B"], "torch", "cuda", ROWS, MEAN_TOKENS)
    assert not resumed_alone.fsdp and "nothing to shard over" in " ".join(resumed_alone.reasons)


@pytest.mark.parametrize("cfg, backend, world, says", [
    ({"fsdp": "on", "quantize": "4bit"}, "torch", 2, r"not 4-bit \(QLoRA\)"),
    ({"fsdp": "on"}, "unsloth", 2, "not the unsloth backend"),
])
def test_fsdp_on_where_it_cannot_shard_is_one_clear_error(cfg, backend, world, says):
    gpus = linux(256, gpus=[A100_40] * 2)
    with pytest.raises(UserError, match=says):
        plan.make(Config(**cfg), gpus, MODELS["0.5B"], backend, "cuda", ROWS, MEAN_TOKENS, world_size=world)


# ---- CPU lanes: a step's rows in side-by-side threads (backends/torch_lanes.py)
def test_cpu_lanes_auto_is_two_on_a_multi_core_cpu_and_off_where_they_cannot_help_or_stay_exact():
    two = make("cpu-8", "0.5B", batch_size=4)
    assert two.lanes == 2 and any(r.startswith("CPU lanes 2") for r in two.reasons)
    assert "lanes" in two.to_dict()
    for machine, cfg in (("cpu-8", dict(batch_size=1)),                 # one row at a time: nothing side by side
                         ("cpu-8", dict(batch_size=4, lora_dropout=0.1)),  # dropout's masks: order-dependent
                         ("cpu-8", dict(batch_size=4, quantize="4bit")),
                         ("rtx4090-24", dict(batch_size=4)), ("m2-16", dict(batch_size=4)),
                         ("m2-16-mlx", dict(batch_size=4))):
        assert make(machine, "0.5B", **cfg).lanes == 1, (machine, cfg)
    one_core = plan.make(Config(batch_size=4), linux(8, cores=1, available=6), MODELS["0.5B"], "torch", "cpu",
                         ROWS, MEAN_TOKENS)
    assert one_core.lanes == 1
    procs = plan.make(Config(batch_size=4), linux(8, cores=4, available=6), MODELS["0.5B"], "torch", "cpu",
                      ROWS, MEAN_TOKENS, world_size=2)
    assert procs.lanes == 1


def test_cpu_lanes_set_by_you_are_kept_on_the_cpu_and_ignored_with_a_reason_elsewhere():
    assert make("cpu-8", "0.5B", batch_size=4, cpu_lanes="1").lanes == 1
    three = make("cpu-8", "0.5B", batch_size=4, cpu_lanes="3")
    assert three.lanes == 3 and any("CPU lanes 3 (set by you)" in r for r in three.reasons)
    gpu = make("rtx4090-24", "0.5B", batch_size=4, cpu_lanes="2")
    assert gpu.lanes == 1 and any(r == "CPU_LANES=2 ignored: not the torch backend on the CPU" for r in gpu.reasons)


@pytest.mark.parametrize("value", ["0", "two", "65", "-1"])
def test_cpu_lanes_must_be_auto_or_a_whole_number(value):
    from finetune.config import resolve

    with pytest.raises(UserError, match=f"CPU_LANES='{value}' is not valid: use auto or a whole number from 1 to 64"):
        resolve({}, env={"CPU_LANES": value})


def test_the_time_estimate_counts_cpu_lanes_only_where_the_backend_uses_them():
    """Lanes shorten a run whose micro-batches have up to LANES_MAX_TOKENS tokens; above that the backend keeps one
    thread team (torch_lanes.pays), so the estimate stays that of one team."""
    def est(batch, mean_tokens, lanes):
        return plan.make(Config(batch_size=batch, cpu_lanes=lanes), MACHINES["cpu-8"][0], MODELS["0.5B"], "torch",
                         "cpu", ROWS, mean_tokens)

    small, small_one = est(2, 100, "auto"), est(2, 100, "1")
    assert small.lanes == 2 and small_one.lanes == 1
    assert small.est_seconds == pytest.approx(small_one.est_seconds / plan.LANES_SPEEDUP)
    assert any(r.startswith("time: / ") and "CPU lanes" in r for r in small.reasons)
    big, big_one = est(8, 400, "auto"), est(8, 400, "1")  # 3,200 tokens a micro-batch
    assert big.lanes == 2 and big.est_seconds == pytest.approx(big_one.est_seconds)
