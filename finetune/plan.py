"""Memory-tuned defaults: batch size, grad accumulation, checkpointing, dtype and 4-bit, chosen from
this machine's memory and the model's sizes, with one line of "why" per decision.

Pure arithmetic over dataclasses: no torch import, so `finetune train --dry-run` stays instant.
Sizes are GB of 2**30 bytes, the unit hardware.py reports (a "24 GB" RTX 4090 is 24 GiB).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from finetune.config import Config
from finetune.errors import UserError
from finetune.hardware import GB, Hardware
from finetune import models
from finetune.models import ModelInfo
from finetune.progress import hms


# ---- Constants, in one place. Rough by design; run.json records the measured peak and speed. ----
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.5625      # bitsandbytes NF4: 4 bits/weight + one fp32 absmax per 64-weight block;
#                         MLX affine 4-bit, group 64: 4 bits + a 16-bit scale and bias per group, the same 0.5625
QUANT_DEVICES = {"cuda": "bitsandbytes NF4", "mlx": "MLX affine, group 64"}  # where QLoRA exists
LORA_BYTES = 4          # PEFT keeps adapter weights in fp32
ADAM_BYTES = 12         # per trainable param: fp32 grad + AdamW exp_avg + exp_avg_sq
# Saved activations per token per layer, in "activation elements": norms/residuals/q/o/attn-out ~8h,
# MLP gate/up/act/product ~4I, k and v 2*kv_dim.
ACT_H, ACT_I, ACT_KV = 8, 4, 2
# Bytes per activation element / per hidden element kept by checkpointing / per vocab entry of a trained
# token's logits (logits, log-softmax and their gradients, fp32; logits exist only at trained positions).
# CPU values: fitted by bench/planner.py on SmolLM2-135M (2026-11-23): 23 cells of batch 1/4/16 x rows of
# 88/438 tokens x checkpointing x fp32/bf16, every one within +-10% of the measured peak RSS. bf16 means
# autocast with fp32 norms/residual/LoRA, so it is not half of fp32. GPU/MLX: the compute dtype's size
# (unmeasured here: no GPU was available; MLX reports its own peak in run.json).
CPU_ACT_BYTES = {"fp32": 5.9, "bf16": 3.25}
CPU_CKPT_BYTES = {"fp32": 27.5, "bf16": 2.8}
LOGIT_BYTES = {"cpu": 33, "cuda": 10}  # CUDA: bf16 logits + fp32 log-softmax + fp32 gradient
# CUDA: fitted on one H200 (bench/prove_cuda.sh, 2026-11-30: a 1.1B Llama shape and SmolLM2-135M, batch 16 of
# ~100-token rows, bf16 / 4-bit x checkpointing) against torch's allocator peak (max_memory_allocated). 16-bit
# keeps ~1.2x the compute dtype's bytes per activation element; 4-bit adds the fp32 residual stream.
CUDA_ACT_BYTES = {"16bit": 2.45, "4bit": 3.6}
EAGER_SCORE_BYTES = 8   # eager attention keeps scores + probabilities (heads x seq x seq) for backward
# Fixed runtime inside the measured peak: python + torch + transformers (CPU: fitted, 0.49 GB); CUDA: cuBLAS
# workspaces and small buffers in torch's allocator (fitted, H200); the Metal/MLX runtime.
OVERHEAD_GB = {"cpu": 0.49, "cuda": 0.12, "mps": 0.6, "mlx": 0.3}
# The CUDA context (kernels, cuBLAS handles) lives outside torch's allocator, so outside the measured peak: it is
# taken off the VRAM budget instead. torch 2.11 + cu130 on an H200.
CUDA_CONTEXT_GB = 0.6

# Budgets: the share of memory a plan may use.
APPLE_SHARE, APPLE_OS_RESERVE_GB = 0.70, 3.0  # macOS caps GPU-wired memory at ~75% of RAM by default,
#                                               and the OS + apps need ~3 GB on an 8 GB Mac
CUDA_SHARE = 0.90                              # allocator fragmentation + cuBLAS workspaces
CPU_TOTAL_SHARE, CPU_AVAILABLE_SHARE = 0.75, 0.90

KIND_LABEL = {"unified": "unified memory", "vram": "VRAM", "ram": "RAM"}
TIGHT_SHARE = 0.85        # CUDA: above this share of the budget, page the optimizer state (8-bit, bitsandbytes)
PAGED_8BIT_FACTOR = 6 / 12  # per trainable param: fp32 grad + two 8-bit moments (+ blockwise scales) vs 12 bytes
TARGET_EFFECTIVE_BATCH = 16
BATCH_CANDIDATES = (1, 2, 4, 8, 16)

# Peak 16-bit dense FLOP/s (tensor cores). Matched on the device name; order matters only for clarity.
# Dense bf16/fp16 tensor-core peaks from NVIDIA's datasheets; EFFICIENCY_GPU below was checked on an H200 only.
CUDA_PEAK = ((r"H200", 989e12), (r"H100", 989e12), (r"A100", 312e12), (r"L40S", 362e12), (r"\bL4\b", 121e12),
             (r"A10G", 125e12), (r"4090", 165e12), (r"\bT4\b", 65e12))
CUDA_PEAK_FALLBACK = 50e12
CUDA_FP32_FACTOR = 0.25       # fp32 skips the tensor cores (unless TF32 is on)
APPLE_PEAK = 10e12            # an M-series Max GPU; scaled by tier below
APPLE_TIER = (("Ultra", 2.0), ("Max", 1.0), ("Pro", 0.5))
APPLE_TIER_BASE = 0.3
# Per-core dense matmul rates measured on 2-core VMs (best of many trials): AMX bf16 ~457 G (913 on 2 cores),
# AVX-512-bf16 ~207 G, fp32 on either ~95-103 G. mlx[cpu] 0.32 with its bundled reference BLAS: 1024^3 fp32 at
# 5 GFLOP/s on 2 cores (with the system OpenBLAS it gets the fp32 rates: backends/mlx_blas.py).
CPU_PEAK_PER_CORE = {"amx": 0.45e12, "avx512_bf16": 0.2e12, "fp32_avx512": 0.095e12, "fp32": 0.05e12,
                     "mlx_cpu": 2.5e9}
# bench/cpu_dtype.py (AVX-512-bf16, no AMX, 2 cores): LoRA training bf16/fp32 = 0.84x at 0.9M params,
# 1.36x at 4.7M, 1.38x at 17M, 1.48x at 39M, 1.62x at 91M. Below this size fp32 is faster.
CPU_BF16_MIN_PARAMS = 4_000_000
# Per micro-batch overhead, seconds (CPU: bench/planner.py's batch-1 cells; MPS/MLX: unmeasured guesses).
STEP_OVERHEAD_S = {"cpu": 0.3, "cuda": 0.0, "mps": 0.05, "mlx": 0.05}
# CUDA: eager PyTorch dispatches every op of every layer from Python (LoRA adds ~3 per linear), so a small model's
# step is launch-bound, by layer count rather than size. Measured on an H200 (bench/prove_cuda.sh, 2026-11-30):
# 0.23-0.28 s per micro-batch of 16 for SmolLM2 (30 layers), 0.18 s for a 1.1B Llama shape (16 layers), with the
# matmuls themselves ~0.02 s: ~0.0095 s per layer and micro-batch (tests/test_plan.py holds the 8 runs, all +-30 %).
CUDA_LAYER_OVERHEAD_S = 0.0095
# The first step also pays for allocating (page-faulting) the activation memory and creating the matmul kernels:
# on the CPU it costs ~2.5 ordinary steps (bench/planner.py: 5-step cells vs 30-step bench/speed.py runs).
WARMUP_STEPS = {"cpu": 1.5}
# Checkpointing also costs a fixed ~0.3 s per micro-batch on the CPU (per-layer save/restore bookkeeping):
# at batch 1 it made steps 1.65x slower, not the 1.25x of recomputing the forward (bench/planner.py).
CKPT_STEP_OVERHEAD_S = {"cpu": 0.3}
# Achieved share of the matmul peak, per token of (4N + attention) FLOPs. CPU: measured against the peak the run
# itself measures (hardware.measure_cpu_peak, best trial). fp32: 0.55 with the 0.5 s probe until 2026-12-02
# (bench/planner.py, 2026-11-30), now 0.58 (with the 2 s probe; the fit is at EFFICIENCY_CPU below). bf16 was fitted
# under load at 0.47 eager / 0.37 flash: on a quiet machine the default run then took 200 s for 279 s predicted, under
# load 279 s; x1.19 puts the estimate between the two (+17 % quiet, -16 % busy). GPU: 0.35; on the H200 the one run
# with real compute in it (1.1B shape, 16 x 404-token rows) spent ~1.5 s beyond the launch overhead on 4.7e14 FLOPs:
# 0.31 of the datasheet peak (the measured bf16 matmul peak there: 783 TFLOP/s). Other GPUs: unmeasured.
EFFICIENCY_GPU = 0.35
# Other processes' load (hardware.measure_cpu_busy) from which a low CPU probe is the machine's state, not a blip.
BUSY_CORES_MIN = 0.5
# All_reduce of a step's LoRA gradients: (latency s, bytes/s). gloo between processes on one CPU: bench/distributed.py
# on the 2-core VM, 2026-12-01: 0.21 ms for one float, 19.5 MB (SmolLM2 r16) at 1.48 GB/s quiet, 0.68 under load;
# NCCL: NVLink-class bandwidth, unmeasured (issue 24's GPU was a single H200); MLX ring: unmeasured.
ALLREDUCE = {"cpu": (2e-4, 1.0e9), "cuda": (5e-5, 50e9), "mps": (2e-4, 1.0e9), "mlx": (5e-4, 1.0e9)}
# FSDP's weight gathers (all_gather, bytes received): gloo on the same VM (bench/distributed.py, 2026-12-01), one
# SmolLM2 layer (14.2 MB) from two halves in 9.7-10.5 ms = 0.68-0.73 GB/s; NCCL as above, unmeasured.
ALLGATHER = {"cpu": (2e-4, 0.7e9), "cuda": (5e-5, 50e9)}
# fp32 refitted 2026-12-02 with the 2 s probe on the demo (bench/demo_estimate.py, README "The demo's estimate"):
# a neighbour on one of two cores slows the step 2.6x but the probe 2x, so no constant fits quiet and busy alike.
# 0.58 puts the six whole-demo / 20-step runs of 12-01 and 12-02 at -28 % to +22 % (a seventh, new, at +27 %).
# bf16 is still the 0.5 s probe's fit (a 2 s probe reads higher, so its estimates may now run up to ~15 % short).
EFFICIENCY_CPU = {("bf16", "eager"): 0.56, ("bf16", "sdpa"): 0.44, ("fp32", "eager"): 0.58, ("fp32", "sdpa"): 0.58}
CKPT_TIME_FACTOR = {"cpu": 1.25}  # recomputing the forward: measured 1.19-1.32x on the CPU; 1.5x elsewhere
DECODE_STEP_S = {"cpu": 0.03, "cuda": 0.01, "mps": 0.02, "mlx": 0.03}  # per generated token (GRPO sampling)
# CPU lanes (backends/torch_lanes.py) pay up to this many tokens per micro-batch; above it one thread team's matmuls
# keep every core busy (SmolLM2, 2 cores, paired steps: 1.16-1.18x at 196-784 tokens, 1.03x at 1,568).
LANES_MAX_TOKENS = 1024
# A run in lanes takes this much less time (whole runs, bench/cpu_processes.py and bench/quality.py's multiturn cell,
# 2026-12-02: 1.08-1.33x; paired steps 1.16-1.18x).
LANES_SPEEDUP = 1.15
# torch on the CPU: eager attention is faster than the CPU flash kernel for short rows (bench: +17% at ~90 tokens),
# but keeps the heads x seq x seq scores for backward, so only below this length.
EAGER_MAX_TOKENS = 256


@dataclass
class Plan:
    backend: str
    device: str
    method: str
    batch_size: int
    grad_accum: int
    max_seq_length: int
    max_steps: int
    eval_steps: int
    save_steps: int
    gradient_checkpointing: bool
    dtype: str
    quantize: str
    memory_kind: str
    memory_total_gb: float
    budget_gb: float
    predicted_peak_gb: float
    breakdown_gb: dict[str, float] = field(default_factory=dict)
    est_seconds: float = 0.0
    est_tokens_per_s: float = 0.0
    reasons: list[str] = field(default_factory=list)
    sequences_per_item: int = 1   # DPO: chosen + rejected; GRPO: completions are the items
    attention: str = "sdpa"       # torch: "eager" for short rows on the CPU (faster there), else "sdpa"
    optimizer: str = "adamw"      # "paged_adamw_8bit" (bitsandbytes) on CUDA when memory is tight
    world_size: int = 1           # processes training together (NPROC); each takes its share of every step
    fsdp: bool = False            # the frozen base weights sharded over those processes (torch FSDP, FSDP=auto|on|off)
    lanes: int = 1                # CPU: threads training a step's rows side by side (CPU_LANES; _pick_lanes)
    micro_overhead_tokens: float | None = None  # fixed cost of a micro-batch in tokens of compute (None: never cut
    #                                             a step into more micro-batches than batch size asks; see
    #                                             methods.micro_batches)

    @property
    def accum_per_process(self) -> int:
        """Micro-batches each process runs per step: the step's GRAD_ACCUM shared by the processes."""
        return math.ceil(self.grad_accum / self.world_size)

    def to_dict(self) -> dict:
        # Rounded for run.json / printing; the planner compares the unrounded values.
        def rnd(v):
            if isinstance(v, float):
                return round(v, 3)
            if isinstance(v, dict):
                return {k: rnd(x) for k, x in v.items()}
            return v
        return {k: rnd(v) for k, v in asdict(self).items()}


def _linear_params(model: ModelInfo) -> int:
    h, i, kv = model.hidden_size, model.intermediate_size, model.num_kv_heads * model.head_dim
    return model.num_layers * (2 * h * h + 2 * h * kv + 3 * h * i)


def _lora_params(model: ModelInfo, lora_r: int) -> int:
    """LoRA on q,k,v,o,gate,up,down: r*(in+out) each."""
    h, inter, kv = model.hidden_size, model.intermediate_size, model.num_kv_heads * model.head_dim
    return model.num_layers * lora_r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter))


def allreduce_seconds(model: ModelInfo, lora_r: int, world_size: int, device: str) -> float:
    """One step's gradient sum over the processes (a ring all_reduce of the fp32 LoRA gradients) plus the step's
    small collectives (the stop check)."""
    if world_size == 1:
        return 0.0
    latency, rate = ALLREDUCE[device if device in ALLREDUCE else "cpu"]
    moved = 2 * (world_size - 1) / world_size * _lora_params(model, lora_r) * 4
    return 2 * latency + moved / rate


def allgather_seconds(model: ModelInfo, dtype: str, world_size: int, device: str) -> float:
    """FSDP, per micro-batch: every decoder layer's frozen weights gathered from the other processes' shards, once
    for the forward and once again for the backward (they are freed in between)."""
    latency, rate = ALLGATHER[device if device in ALLGATHER else "cpu"]
    moved = (world_size - 1) / world_size * _linear_params(model) * (4 if device == "cpu" else DTYPE_BYTES[dtype])
    return 2 * (model.num_layers * latency + moved / rate)


def estimate_memory(model: ModelInfo, batch: int, seq: int, grad_ckpt: bool, dtype: str, quantize: str,
                    lora_r: int, device: str, trained_share: float = 0.3, attention: str = "sdpa",
                    shards: int = 1) -> dict[str, float]:
    """Predicted training peak in GB per component, plus "total". `shards` > 1: FSDP over that many processes."""
    h, inter, layers = model.hidden_size, model.intermediate_size, model.num_layers
    kv = model.num_kv_heads * model.head_dim
    nbytes = DTYPE_BYTES[dtype]
    linear = _linear_params(model)
    rest = max(0, model.num_params - linear)  # embeddings, lm_head, norms: never quantized
    if quantize == "4bit":  # prepare_model_for_kbit_training upcasts what is not quantized to fp32
        weights = linear * NF4_BYTES + rest * 4
    elif device == "cpu":  # loaded in fp32; in bf16 runs the linear weights get bf16 copies (the peak keeps both)
        weights = model.num_params * 4 + (linear * 2 if dtype == "bf16" and shards == 1 else 0)
    else:
        weights = model.num_params * nbytes
    if shards > 1:  # FSDP (backends/torch_dist.shard): each process keeps 1/N of the decoder layers' weights and
        # gathers them a layer at a time (two at once with prefetch); embeddings and norms are gathered for the whole
        # forward (the root unit), and lm_head stays whole beside them (a tied one as its own copy)
        outer = rest * (4 if device == "cpu" else nbytes)
        layers_w = weights - outer
        weights = layers_w / shards + 2 * layers_w / layers + outer * (2 if model.tie_word_embeddings else 1)
    lora_params = _lora_params(model, lora_r)
    tokens = batch * seq
    elements = ACT_H * h + ACT_I * inter + ACT_KV * kv
    # 4-bit on a GPU is the CPU's mix: bf16/fp16 matmuls under autocast, an fp32 residual stream and norms (kbit prep)
    if device == "cuda" and dtype != "fp32":
        act_bytes = CUDA_ACT_BYTES["4bit" if quantize == "4bit" else "16bit"]
    elif device == "cpu" or quantize == "4bit":
        act_bytes = CPU_ACT_BYTES["fp32" if dtype == "fp32" else "bf16"]
    else:
        act_bytes = nbytes
    one_layer = tokens * elements * act_bytes
    if device == "mps" or attention == "eager":  # the heads*seq*seq scores are kept for backward
        one_layer += batch * model.num_heads * seq * seq * (EAGER_SCORE_BYTES if device == "cpu" else nbytes)
    if grad_ckpt:  # keep each layer's input; recompute one layer at a time in backward
        kept = CPU_CKPT_BYTES["fp32" if dtype == "fp32" else "bf16"] if device == "cpu" else 4 if quantize == "4bit" else nbytes
        activations = layers * tokens * h * kept + one_layer
    else:
        activations = layers * one_layer
    parts = {
        "weights": weights / GB,
        "lora": lora_params * LORA_BYTES / GB,
        "optimizer": lora_params * ADAM_BYTES / GB,
        "activations": activations / GB,
        "logits": tokens * trained_share * model.vocab_size * LOGIT_BYTES.get(device, LOGIT_BYTES["cpu"]) / GB,
        "overhead": OVERHEAD_GB.get(device, OVERHEAD_GB["cpu"]),
    }
    parts["total"] = sum(parts.values())
    return parts


def _unified(hw: Hardware, device: str) -> bool:
    return device == "mps" or (device == "mlx" and hw.apple_silicon)


def memory_budget(hw: Hardware, device: str) -> tuple[str, float, float]:
    """(memory_kind, total_gb, budget_gb)."""
    if _unified(hw, device):
        total = hw.ram_total_gb
        return "unified", total, max(0.0, min(total * APPLE_SHARE, total - APPLE_OS_RESERVE_GB))
    if device == "cuda":
        total = hw.cuda_devices[0].vram_gb if hw.cuda_devices else 0.0
        return "vram", total, max(0.0, total * CUDA_SHARE - CUDA_CONTEXT_GB)
    # CPU, and mlx[cpu] on Linux: what is free now matters, other programs hold the rest.
    total = hw.ram_total_gb
    budget = total * CPU_TOTAL_SHARE
    if hw.ram_available_gb > 0:
        budget = min(budget, hw.ram_available_gb * CPU_AVAILABLE_SHARE)
    return "ram", total, budget


# Types whose activations overflow fp16's range (Gemma's scaled embeddings and soft-capped logits; their model cards
# say bf16 or fp32): on a GPU without bf16 they train in fp32 rather than in fp16 that turns to inf/NaN.
FP16_OVERFLOWS = {"gemma", "gemma2", "gemma3", "gemma3_text"}


def pick_dtype(hw: Hardware, device: str, cfg_dtype: str, num_params: int | None = None,
               model_type: str | None = None) -> tuple[str, str]:
    """(dtype, reason). `num_params` matters on the CPU only (see CPU_BF16_MIN_PARAMS); `model_type` on GPUs without
    bf16 (FP16_OVERFLOWS)."""
    if cfg_dtype != "auto":
        return cfg_dtype, f"dtype {cfg_dtype}: set by you"
    if device == "cuda":
        gpu = hw.cuda_devices[0] if hw.cuda_devices else None
        if gpu and gpu.bf16:
            return "bf16", f"dtype bf16: {gpu.name} supports bf16 (compute capability {gpu.compute_capability})"
        name = gpu.name if gpu else "this GPU"
        if model_type in FP16_OVERFLOWS:
            return "fp32", f"dtype fp32: {name} has no bf16, and {model_type} overflows fp16 (its cards say bf16/fp32)"
        return "fp16", f"dtype fp16: {name} has no bf16 (compute capability < 8.0)"
    if device == "mps":
        if "M1" in hw.chip:
            return "fp32", f"dtype fp32: {hw.chip} has no native bf16 on the GPU"
        return "bf16", f"dtype bf16: {hw.chip} GPU supports bf16"
    if device == "mlx":
        if hw.apple_silicon or hw.mlx_device == "gpu":
            return "bf16", "dtype bf16: MLX trains in bf16 on the GPU"
        # mlx[cpu] (Linux) has no faster bf16 matmul than fp32 (measured: equal GFLOP/s), so bf16 only costs precision
        return "fp32", "dtype fp32: MLX runs on the CPU here (mlx[cpu]), where bf16 is no faster than fp32"
    if hw.cpu_bf16 and num_params is not None and num_params < CPU_BF16_MIN_PARAMS:
        return "fp32", (f"dtype fp32: the model is tiny ({num_params / 1e6:.1f}M params), where bf16 autocast "
                        "overhead outweighs faster matmuls (bench/cpu_dtype.py)")
    if hw.cpu_bf16:
        return "bf16", "dtype bf16: the CPU has bf16 instructions (AMX or AVX-512-BF16)"
    return "fp32", "dtype fp32: the CPU has no bf16 instructions, so bf16 would be emulated (slow)"


def _peak_flops(hw: Hardware, device: str, dtype: str, attention: str = "sdpa") -> tuple[float, float, str]:
    """(peak FLOP/s, efficiency, where the peak comes from)."""
    if device == "cuda" or (device == "mlx" and hw.mlx_device == "gpu" and hw.cuda_devices):  # + mlx-cuda
        name = hw.cuda_devices[0].name if hw.cuda_devices else ""
        peak = next((p for pat, p in CUDA_PEAK if re.search(pat, name)), CUDA_PEAK_FALLBACK)
        return peak * (CUDA_FP32_FACTOR if dtype == "fp32" else 1.0), EFFICIENCY_GPU, "datasheet"
    if _unified(hw, device):
        tier = next((t for word, t in APPLE_TIER if word in hw.chip), APPLE_TIER_BASE)
        return APPLE_PEAK * tier, EFFICIENCY_GPU, "table"
    eff = EFFICIENCY_CPU[(dtype if dtype in ("bf16", "fp32") else "fp32", attention)]
    if device == "mlx" and not (hw.mlx_openblas and dtype == "fp32"):
        # mlx[cpu] on its bundled reference BLAS; 16-bit matmuls never reach a BLAS (4.6 GFLOP/s with OpenBLAS)
        per_core = CPU_PEAK_PER_CORE["mlx_cpu"]
    elif dtype == "bf16" and "amx_bf16" in hw.cpu_features:
        per_core = CPU_PEAK_PER_CORE["amx"]
    elif dtype == "bf16" and hw.cpu_bf16:
        per_core = CPU_PEAK_PER_CORE["avx512_bf16"]
    elif any(f.startswith("avx512") for f in hw.cpu_features):
        per_core = CPU_PEAK_PER_CORE["fp32_avx512"]
    else:
        per_core = CPU_PEAK_PER_CORE["fp32"]
    table = max(1, hw.cpu_cores) * per_core
    measured = (hw.cpu_peak_gflops or {}).get(dtype)
    if device == "cpu" and measured:
        # This run's own probe, unless it reads below the table for this instruction set while the machine was
        # otherwise idle: a neighbour passing by can halve a probe for seconds (measured: 1 s probes read 112-180 G
        # fp32, 214-415 G bf16 on one host) while a minutes-long run averages it out. When other processes were
        # holding cores as the run started, the low reading is the machine's state, and the run gets about that.
        if measured * 1e9 >= table:
            return measured * 1e9, eff, "measured"
        if (busy := hw.cpu_busy_cores or 0.0) >= BUSY_CORES_MIN:
            return measured * 1e9, eff, f"measured while other processes kept {busy:g} of {hw.cpu_cores} cores busy"
        return table, eff, f"table for this CPU; this run's probe read {measured:.0f} GFLOP/s, below it"
    return table, eff, "table"


def _no_fit(cfg: Config, model: ModelInfo, peak: float, budget: float, kind: str, total: float,
            dtype: str, quant: str, ckpt: bool, seq: int) -> UserError:
    fixed = [n for n, v in (("DTYPE", cfg.dtype), ("QUANTIZE", cfg.quantize),
                            ("GRADIENT_CHECKPOINTING", cfg.gradient_checkpointing), ("FSDP", cfg.fsdp))
             if v != "auto"]
    also = f", or set {'/'.join(fixed)} back to auto" if fixed else ""
    setup = f"{dtype}{', 4-bit' if quant == '4bit' else ''}, checkpointing {'on' if ckpt else 'off'}"
    return UserError(
        f"{model.name} does not fit: predicted {peak:.1f} GB at batch 1 (rows of {seq} tokens, MAX_SEQ_LENGTH={cfg.max_seq_length}, "
        f"{setup}) vs a budget of {budget:.1f} GB of {total:.0f} GB {KIND_LABEL[kind]}; lower MAX_SEQ_LENGTH, "
        f"pick a smaller MODEL, or use a machine with more memory{also}")


def make(cfg: Config, hw: Hardware, model: ModelInfo, backend: str, device: str,
         n_train_rows: int, mean_tokens: float, max_tokens: int | None = None, sequences_per_item: int = 1,
         draws_per_item: float = 1.0, trained_share: float = 0.3, sampled_per_item: int = 0,
         world_size: int = 1) -> Plan:
    """Fill the auto fields of `cfg` for this machine; user-set values are kept as given.
    `max_tokens` (the longest encoded row) lets memory be planned for the data actually present:
    batches are padded to their longest row, never to MAX_SEQ_LENGTH. `trained_share` is the share of tokens
    that carry loss (logits exist only there); `sampled_per_item` the tokens GRPO generates per completion."""
    seq = min(cfg.max_seq_length, max_tokens) if max_tokens else cfg.max_seq_length
    dtype, why = pick_dtype(hw, device, cfg.dtype, model.num_params, model.model_type)
    reasons = [why]
    if seq < cfg.max_seq_length:
        reasons.append(f"memory planned for the longest row, {seq} tokens (MAX_SEQ_LENGTH={cfg.max_seq_length} "
                       "only truncates; batches are padded to their longest row)")
    kind, total, budget = memory_budget(hw, device)
    reasons.append(f"memory budget {budget:.1f} GB of {total:.1f} GB {KIND_LABEL[kind]}" + (
        f" (less {CUDA_CONTEXT_GB} GB for the CUDA context, which torch's peak does not count)" if device == "cuda" else ""))
    if world_size > 1 and device != "cuda":  # processes on one machine's memory each hold a copy of the model
        budget /= world_size
        reasons.append(f"memory budget per process {budget:.1f} GB: {world_size} processes share this memory")

    attention = "eager" if device == "cpu" and seq <= EAGER_MAX_TOKENS else "sdpa"
    if attention == "sdpa" and backend != "mlx" and not models.supports_sdpa(model.architecture):
        attention = "eager"
        reasons.append(f"attention eager: {model.architecture} does not support sdpa in transformers "
                       "(eager keeps heads x seq x seq scores: counted in memory)")

    def peak(batch: int, ckpt: bool, quant: str, over: int | None = None) -> float:
        return estimate_memory(model, batch * sequences_per_item, seq, ckpt, dtype, quant, cfg.lora_r, device,
                               trained_share, attention, shards if over is None else over)["total"]

    ckpt_fixed = {"on": True, "off": False}.get(cfg.gradient_checkpointing)
    lean_ckpt = True if ckpt_fixed is None else ckpt_fixed  # the smallest-memory setting allowed
    smallest = cfg.batch_size or 1
    fsdp = _pick_fsdp(cfg, backend, device, world_size, lambda n: peak(smallest, lean_ckpt, "none", n), budget, reasons)
    shards = world_size if fsdp else 1

    # Quantize: 4-bit costs speed and some quality, so only when 16-bit cannot fit at all.
    if cfg.quantize != "auto":
        quant = cfg.quantize
        reasons.append(f"quantize {quant}: set by you")
        if quant == "4bit" and device == "cpu":
            reasons.append("note: 4-bit on the CPU runs bitsandbytes' CPU kernels: for testing the QLoRA path "
                           "(slow; never chosen automatically here)")
        elif quant == "4bit" and device not in QUANT_DEVICES:
            reasons.append(f"warning: 4-bit needs CUDA (bitsandbytes) or MLX; device {device} may reject it")
    elif device in QUANT_DEVICES and peak(smallest, lean_ckpt, "none") > budget and not fsdp:  # (FSDP: 16-bit)
        quant = "4bit"
        reasons.append(f"quantize 4bit ({QUANT_DEVICES[device]}): {dtype} weights need "
                       f"{peak(smallest, lean_ckpt, 'none'):.1f} GB at batch {smallest}, over the {budget:.1f} GB budget")
    else:
        quant = "none"
        reasons.append("quantize none: " + (f"{dtype} weights fit" if device in QUANT_DEVICES else
                                            f"4-bit needs CUDA (bitsandbytes) or MLX; device is {device}"))

    # Batch: largest candidate that fits in the leanest setting. Checkpointing never adds memory,
    # so more memory can only grow the batch (monotonic by construction).
    if cfg.batch_size:
        batch = cfg.batch_size
        reasons.append(f"batch size {batch}: set by you")
    else:
        cap = max(1, min(TARGET_EFFECTIVE_BATCH, n_train_rows))
        fitting = [b for b in BATCH_CANDIDATES if b <= cap and peak(b, lean_ckpt, quant) <= budget]
        if not fitting:
            raise _no_fit(cfg, model, peak(1, lean_ckpt, quant), budget, kind, total, dtype, quant, lean_ckpt, seq)
        batch = fitting[-1]
        bigger = [b for b in BATCH_CANDIDATES if b > batch]
        limit = ("the target" if not bigger else "the training rows" if bigger[0] > cap else "memory")
        reasons.append(f"batch size {batch}: largest of {'/'.join(map(str, BATCH_CANDIDATES))} "
                       f"that fits ({peak(batch, lean_ckpt, quant):.1f} GB"
                       f"{' with checkpointing' if lean_ckpt else ''}), limited by {limit}")

    # Checkpointing only when needed: it recomputes the forward pass (~+33% time).
    if ckpt_fixed is not None:
        ckpt = ckpt_fixed
        reasons.append(f"gradient checkpointing {cfg.gradient_checkpointing}: set by you")
    elif peak(batch, False, quant) <= budget:
        ckpt = False
        reasons.append(f"gradient checkpointing off: batch {batch} fits without it "
                       f"({peak(batch, False, quant):.1f} GB)")
    else:
        ckpt = True
        reasons.append(f"gradient checkpointing on: without it batch {batch} needs "
                       f"{peak(batch, False, quant):.1f} GB")

    grad_accum = cfg.grad_accum or max(1, TARGET_EFFECTIVE_BATCH // batch)
    reasons.append(f"grad accumulation {grad_accum}: " + ("set by you" if cfg.grad_accum else
                   f"effective batch {batch * grad_accum} (target {TARGET_EFFECTIVE_BATCH})"))
    per_process = math.ceil(grad_accum / world_size)  # micro-batches each process runs per step
    if world_size > 1:
        if batch * grad_accum < world_size:
            raise UserError(f"NPROC={world_size}: a step has only {batch * grad_accum} rows (BATCH_SIZE x GRAD_ACCUM), "
                            f"fewer than the processes; raise GRAD_ACCUM to at least {math.ceil(world_size / batch)} "
                            "or lower NPROC")
        reasons.append(f"{world_size} processes (NPROC): the effective batch stays {batch * grad_accum}; each process "
                       f"trains its share, at most {batch} x {per_process} rows of a step (accumulation {grad_accum} -> "
                       f"{per_process} per process); memory is per process")
    lanes = _pick_lanes(cfg, hw, backend, device, world_size, batch, quant, reasons)

    breakdown = estimate_memory(model, batch * sequences_per_item, seq, ckpt, dtype, quant, cfg.lora_r, device,
                                trained_share, attention, shards)
    predicted = breakdown.pop("total")
    optimizer = "adamw"
    if device == "cuda" and predicted > TIGHT_SHARE * budget:
        optimizer = "paged_adamw_8bit"
        breakdown["optimizer"] *= PAGED_8BIT_FACTOR
        predicted = sum(breakdown.values())
        reasons.append(f"optimizer paged 8-bit AdamW (bitsandbytes): predicted {predicted:.1f} GB is over "
                       f"{TIGHT_SHARE:.0%} of the budget, and its state can page to host memory")
    if predicted > budget:  # only reachable when the user fixed something; their call, so warn
        reasons.append(f"warning: predicted {predicted:.1f} GB exceeds budget {budget:.1f} GB; "
                       f"expect swapping or out-of-memory")

    if cfg.max_steps:
        max_steps = cfg.max_steps
        reasons.append(f"max steps {max_steps}: set by you")
    else:
        max_steps = max(1, math.ceil(cfg.epochs * n_train_rows * draws_per_item / (batch * grad_accum)))
        reasons.append(f"max steps {max_steps}: {cfg.epochs:g} epoch(s) x {n_train_rows} rows "
                       f"/ {batch * grad_accum / draws_per_item:g} per step")
    eval_steps = cfg.eval_steps or max(1, max_steps // 5)

    # Time: LoRA training ~ 4N FLOPs/token (forward 2N + activation grads 2N; no weight grads for frozen
    # layers) + attention (12 x layers x seq x hidden), x the recompute factor with checkpointing.
    row_tokens = min(mean_tokens, seq) if mean_tokens > 0 else seq  # unknown length: assume full rows
    tokens = max_steps * batch * grad_accum * sequences_per_item * row_tokens
    peak_flops, eff, peak_source = _peak_flops(hw, device, dtype, attention)
    flops_per_token = 4 * model.num_params + 12 * model.num_layers * row_tokens * model.hidden_size
    compute_s = tokens * flops_per_token * (CKPT_TIME_FACTOR.get(device, 1.5) if ckpt else 1) / (peak_flops * eff)
    # processes on one CPU share its cores (the measured peak is the machine's); GPUs and Macs each bring their own
    compute_s /= world_size if device != "cpu" else 1
    # Fixed cost per micro-batch (batching, autograd bookkeeping, optimizer); dominates small models.
    micro_overhead_s = (STEP_OVERHEAD_S.get(device, 0.05) + (CKPT_STEP_OVERHEAD_S.get(device, 0) if ckpt else 0)
                        + (CUDA_LAYER_OVERHEAD_S * model.num_layers * (CKPT_TIME_FACTOR.get(device, 1.5) if ckpt else 1)
                           if device == "cuda" else 0))  # checkpointing launches the forward twice
    seconds = compute_s * (1 + WARMUP_STEPS.get(device, 0) / max_steps) + max_steps * per_process * micro_overhead_s
    if world_size > 1:
        comm = allreduce_seconds(model, cfg.lora_r, world_size, device)
        seconds += max_steps * comm
        reasons.append(f"time: + {comm * 1e3:.1f} ms per step to sum the LoRA gradients over {world_size} processes"
                       + ("; processes on one CPU share its cores, so they add no compute" if device == "cpu" else ""))
    if fsdp:
        gather = allgather_seconds(model, dtype, world_size, device)
        seconds += max_steps * per_process * gather
        reasons.append(f"time: + {gather * 1e3:,.0f} ms per micro-batch to gather the sharded weights (forward and "
                       "backward)")
    if sampled_per_item:  # GRPO: each step generates its completions together, one token position at a time
        per_position = DECODE_STEP_S.get(device, 0.03) + batch * grad_accum * 2 * model.num_params / (peak_flops * eff)
        if fsdp:  # every generated token's forward gathers the layers again
            per_position += allgather_seconds(model, dtype, world_size, device) / 2
        seconds += max_steps * sampled_per_item * per_position
    micro_tokens = batch * sequences_per_item * row_tokens
    if lanes > 1 and micro_tokens <= LANES_MAX_TOKENS:  # the backend decides per step; this is the typical one
        seconds /= LANES_SPEEDUP
        reasons.append(f"time: / {LANES_SPEEDUP} for CPU lanes (micro-batches of ~{micro_tokens:,.0f} tokens, up to "
                       f"{LANES_MAX_TOKENS:,})")
    tokens_per_s = tokens / seconds
    # torch only: MLX compiles its step per shape, so more, differently shaped micro-batches would cost compiles
    micro_overhead_tokens = micro_overhead_s * tokens / compute_s if backend != "mlx" and compute_s > 0 else None
    reasons.append(f"speed: assumes {peak_flops / 1e12:.2f} TFLOP/s peak ({peak_source}) x {eff:.0%} efficiency "
                   f"(rough table; run.json records the measured tokens/s)")

    save_steps = cfg.save_steps or save_steps_default(max_steps, seconds)
    return Plan(backend=backend, device=device, method=cfg.method, batch_size=batch, grad_accum=grad_accum,
                max_seq_length=cfg.max_seq_length, max_steps=max_steps, eval_steps=eval_steps, save_steps=save_steps,
                gradient_checkpointing=ckpt, sequences_per_item=sequences_per_item, attention=attention,
                optimizer=optimizer, world_size=world_size, fsdp=fsdp, lanes=lanes,
                dtype=dtype, quantize=quant, memory_kind=kind, memory_total_gb=total, budget_gb=budget,
                predicted_peak_gb=predicted, breakdown_gb=breakdown, est_seconds=seconds,
                est_tokens_per_s=tokens_per_s, micro_overhead_tokens=micro_overhead_tokens, reasons=reasons)


def _pick_fsdp(cfg: Config, backend: str, device: str, world_size: int, peak_at, budget: float,
               reasons: list[str]) -> bool:
    """FSDP=auto shards only when one whole copy of the model does not fit a process's budget but a shard does:
    data-parallel is cheaper (no weight gathering) whenever it fits. `peak_at(n)`: the peak with n shards."""
    if cfg.fsdp == "off" or (cfg.fsdp == "auto" and world_size == 1):
        return False
    if cfg.fsdp == "on":
        if world_size == 1:  # e.g. a sharded run resumed on one process: nothing to shard over, not an error
            reasons.append("FSDP on, but one process: nothing to shard over (NPROC=1)")
            return False
        if backend != "torch" or cfg.quantize == "4bit":
            raise UserError(f"FSDP=on: sharding is built for the torch backend's 16/32-bit weights, not "
                            f"{'4-bit (QLoRA)' if cfg.quantize == '4bit' else f'the {backend} backend'}; use one "
                            "or the other")
        reasons.append(f"FSDP on (set by you): each of {world_size} processes keeps 1/{world_size} of the base weights")
        return True
    # auto: CUDA only. Processes on one CPU share its memory, and each loads a whole copy before sharding it.
    if backend != "torch" or device != "cuda" or cfg.quantize == "4bit" or peak_at(1) <= budget:
        return False
    if peak_at(world_size) > budget:
        return False  # 4-bit, or the no-fit error, comes next
    reasons.append(f"FSDP on: a whole copy needs {peak_at(1):.1f} GB per process, over the {budget:.1f} GB budget; "
                   f"sharded over {world_size} processes {peak_at(world_size):.1f} GB")
    return True


def _pick_lanes(cfg: Config, hw: Hardware, backend: str, device: str, world_size: int, batch: int, quant: str,
                reasons: list[str]) -> int:
    """CPU_LANES: a step's rows in side-by-side threads, each on its share of the cores. One thread team over all
    cores scales poorly on a small model's micro-batch (the work between matmuls runs on one thread while the others
    wait): two lanes of one core each ran 1.16-1.18x faster than one team of two on micro-batches of 196-784
    tokens, 1.03x at 1,568 (so the backend uses them up to LANES_MAX_TOKENS; backends/torch_lanes.py,
    bench/cpu_processes.py).
    Rows in flight stay at the batch size: each lane takes batch / lanes of them.
    Torch on the CPU, one process, 16/32-bit weights, no LoRA dropout (two threads drawing dropout masks from one
    generator would make a run's numbers depend on thread timing)."""
    asked = cfg.cpu_lanes
    why_not = ("not the torch backend on the CPU" if backend != "torch" or device != "cpu" else
               "several processes (NPROC) already share the cores" if world_size > 1 else
               "4-bit weights" if quant != "none" else
               "LoRA dropout draws random masks" if cfg.lora_dropout > 0 else None)
    if asked != "auto":
        if int(asked) > 1 and why_not:
            reasons.append(f"CPU_LANES={asked} ignored: {why_not}")
            return 1
        if int(asked) > 1:
            reasons.append(f"CPU lanes {asked} (set by you): each micro-batch's rows in {asked} threads side by side")
        return int(asked)
    if why_not or hw.cpu_cores < 2 or batch < 2:
        return 1
    reasons.append("CPU lanes 2: a micro-batch's rows in 2 threads side by side, half the cores each, when it has "
                   f"up to {LANES_MAX_TOKENS:,} tokens (there one thread team leaves cores waiting; CPU_LANES=1 turns "
                   "it off)")
    return 2


def save_steps_default(max_steps: int, est_seconds: float) -> int:
    """Checkpoint every ~10 minutes or 10% of the run, whichever comes first."""
    per_step = est_seconds / max(1, max_steps)
    by_time = int(600 / per_step) if per_step > 0 else max_steps
    return max(1, min(by_time, math.ceil(max_steps / 10)))


def format_plan(plan: Plan) -> str:
    """The table `finetune train --dry-run` prints."""
    parts = " + ".join(f"{k} {v:.2f}" for k, v in plan.breakdown_gb.items())
    rows = [
        ("backend / device", f"{plan.backend} / {plan.device}"),
        ("method", plan.method),
        ("batch x grad accum", f"{plan.batch_size} x {plan.grad_accum} = "
                               f"{plan.batch_size * plan.grad_accum} effective"),
        *([("processes", f"{plan.world_size} (each: batch {plan.batch_size} x "
                         f"{plan.accum_per_process} of every step; memory below is per process"
                         f"{'; base weights sharded (FSDP)' if plan.fsdp else ''})")]
          if plan.world_size > 1 else []),
        ("max seq length", str(plan.max_seq_length)),
        ("steps", f"{plan.max_steps} (eval every {plan.eval_steps}, checkpoint every {plan.save_steps})"),
        ("grad checkpointing", "on" if plan.gradient_checkpointing else "off"),
        ("dtype", plan.dtype),
        ("quantize", plan.quantize),
        *([("attention", plan.attention)] if plan.backend != "mlx" else []),
        ("memory", f"{plan.memory_kind} {plan.memory_total_gb:.1f} GB, budget {plan.budget_gb:.1f} GB"),
        ("predicted peak", f"{plan.predicted_peak_gb:.2f} GB = {parts}"),
        ("time estimate", f"{hms(plan.est_seconds)} of training steps (~{plan.est_tokens_per_s:,.0f} tokens/s; "
                          "evaluation comes on top)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["Plan"] + [f"  {k:<{width}}  {v}" for k, v in rows] + ["Why"]
    lines += [f"  - {r}" for r in plan.reasons]
    return "\n".join(lines)
