"""CPU dtype benchmark: bf16 (bf16 base weights, fp32 LoRA, bf16=True autocast, as our torch backend does)
vs fp32 for LoRA training, eval forward and generate, on random-init Qwen2 models of three sizes.

Run:  python bench/cpu_dtype.py        (about 4-5 minutes on 2 cores)
Variants are interleaved (fp32, bf16, fp32, bf16, ...) and each figure is the median of REPEATS runs.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from finetune import data, template, tiny  # noqa: E402

CORES = os.cpu_count() or 1
torch.set_num_threads(CORES)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

REPEATS, WARMUP, MEASURED, BATCH = 3, 2, 10, 8
EVAL_ROWS, GEN_PROMPTS, GEN_TOKENS = 32, 2, 32
SIZES = {  # name -> Qwen2Config overrides (None = the tiny model as built by finetune.tiny)
    "tiny": None,
    "small": dict(hidden_size=512, num_hidden_layers=6, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2),
    # ~91M (hidden 1024, 8 layers, inter 2816) took ~35 s per fp32 run here: too slow for 3 repeats in 5 min.
    "medium": dict(hidden_size=768, num_hidden_layers=8, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4),
}


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(line for line in fh if line.startswith("flags")).split(":")[1].split()
    except (OSError, StopIteration):
        return "unknown"
    keep = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    return " ".join(f for f in keep if f in flags) or "none"


def build_model(name: str, path: str, tok, dtype):
    if SIZES[name] is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        ref = AutoConfig.from_pretrained(path)
        cfg = Qwen2Config(vocab_size=ref.vocab_size, bos_token_id=ref.bos_token_id, eos_token_id=ref.eos_token_id,
                          pad_token_id=ref.pad_token_id, max_position_embeddings=2048, tie_word_embeddings=True,
                          dtype="float32", **SIZES[name])
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
        model.generation_config.pad_token_id, model.generation_config.eos_token_id = ref.pad_token_id, ref.eos_token_id
    return model.to(dtype).eval()  # the backend loads base weights in the plan's dtype


class StepClock:
    """TrainerCallback recording (time, tokens seen) at every step end."""

    def __init__(self):
        from transformers import TrainerCallback

        marks = self.marks = []

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                marks.clear()

            def on_step_end(self, args, state, control, **kw):
                marks.append((time.perf_counter(), state.num_input_tokens_seen))

        self.callback = CB()

    def tokens_per_s(self) -> float:
        (t0, n0), (t1, n1) = self.marks[WARMUP - 1], self.marks[WARMUP + MEASURED - 1]
        return (n1 - n0) / (t1 - t0)


def make_trainer(model, tok, rows, bf16: bool):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-dtype-"), per_device_train_batch_size=BATCH,
                     max_steps=WARMUP + MEASURED, learning_rate=2e-4, lr_scheduler_type="cosine", logging_steps=1000,
                     save_strategy="no", eval_strategy="no", report_to=[], seed=42, data_seed=42, bf16=bf16, fp16=False,
                     use_cpu=True, gradient_checkpointing=False, max_length=1024,
                     dataset_kwargs={"skip_prepare_dataset": True}, include_num_input_tokens_seen="non_padding",
                     disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False)
    ds = Dataset.from_list([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=[clock.callback])
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)
    return trainer, clock


def eval_tokens_per_s(model, rows, pad) -> float:
    """Like TorchSession.eval_loss: no grad, no autocast, logits upcast, summed CE."""
    model.eval()
    start, n = time.perf_counter(), 0
    with torch.no_grad():
        for i in range(0, len(rows), BATCH):
            chunk = rows[i:i + BATCH]
            w = max(len(r.input_ids) for r in chunk)
            ids = torch.full((len(chunk), w), pad)
            labels = torch.full((len(chunk), w), template.IGNORE)
            mask = torch.zeros((len(chunk), w), dtype=torch.long)
            for j, r in enumerate(chunk):
                k = len(r.input_ids)
                ids[j, :k], labels[j, :k], mask[j, :k] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                              ignore_index=template.IGNORE, reduction="sum").item()
            n += int(mask.sum())
    return n / (time.perf_counter() - start)


def gen_tokens_per_s(model, prompts, tok) -> float:
    """Like TorchSession.generate: greedy, one prompt at a time; min_new_tokens forces exactly GEN_TOKENS."""
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=GEN_TOKENS,
                           min_new_tokens=GEN_TOKENS, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return len(prompts) * GEN_TOKENS / (time.perf_counter() - start)


def main():
    t_all = time.perf_counter()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} of {CORES} cores, cpu flags: {cpu_flags()}, "
          f"mkldnn bf16 supported: {torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    path = tiny.ensure()
    tok = AutoTokenizer.from_pretrained(path)
    splits = data.load("sample", 0.1, 42)
    rows, _ = template.encode_all(splits.train, tok, 1024)
    eval_rows, _ = template.encode_all(splits.validation[:EVAL_ROWS], tok, 1024)
    prompts = [template.generation_prompt(ex, tok)[0] for ex in splits.validation[:GEN_PROMPTS]]
    mean_len = statistics.mean(len(r.input_ids) for r in rows)
    print(f"{len(rows)} train rows, mean {mean_len:.1f} tokens; batch {BATCH}, {WARMUP} warmup + {MEASURED} measured "
          f"steps; eval {len(eval_rows)} rows; generate {GEN_PROMPTS} prompts x {GEN_TOKENS} tokens; {REPEATS} repeats")

    results = []  # (size, params, {dtype: {metric: [values]}})
    for name in SIZES:
        t_size, cpu0 = time.perf_counter(), sum(os.times()[:2])
        variants = {}
        for dt in ("fp32", "bf16"):
            model = build_model(name, path, tok, torch.float32 if dt == "fp32" else torch.bfloat16)
            params = sum(p.numel() for p in model.parameters())
            trainer, clock = make_trainer(model, tok, rows, bf16=dt == "bf16")
            variants[dt] = (trainer, clock, {"train": [], "eval": [], "gen": []})
        for _ in range(REPEATS):
            for dt, (trainer, clock, m) in variants.items():  # interleaved: fp32, bf16, fp32, bf16, ...
                trainer.train()
                m["train"].append(clock.tokens_per_s())
                peft_model = trainer.model
                m["eval"].append(eval_tokens_per_s(peft_model, eval_rows, tok.pad_token_id))
                m["gen"].append(gen_tokens_per_s(peft_model, prompts, tok))
        lora = next(p.dtype for n, p in variants["bf16"][0].model.named_parameters() if "lora_A" in n)
        base = next(p.dtype for n, p in variants["bf16"][0].model.named_parameters() if "q_proj.base_layer" in n)
        wall = time.perf_counter() - t_size
        busy = (sum(os.times()[:2]) - cpu0) / (wall * CORES)  # far below ~85%: something else shared the CPU
        print(f"  {name}: {params / 1e6:.1f}M params, done in {wall:.0f}s, this process kept {busy:.0%} of the cores "
              f"busy (bf16 run: base {base}, LoRA {lora}); load avg now {os.getloadavg()[0]:.2f}")
        results.append((name, params, {dt: v[2] for dt, v in variants.items()}))
        del variants

    med = statistics.median
    print(f"\nTotal {time.perf_counter() - t_all:.0f}s. Figures: median of {REPEATS}; tok/s = non-padding tokens/s "
          "(train, eval) or new tokens/s (generate).\n")
    print("| model | params | train fp32 tok/s | train bf16 tok/s | bf16/fp32 | eval fp32 tok/s | eval bf16 tok/s "
          "| bf16/fp32 | gen fp32 tok/s | gen bf16 tok/s | bf16/fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for name, params, m in results:
        cells = []
        for k in ("train", "eval", "gen"):
            f, b = med(m["fp32"][k]), med(m["bf16"][k])
            cells += [f"{f:,.0f}", f"{b:,.0f}", f"{b / f:.2f}x"]
        print(f"| {name} | {params / 1e6:.1f}M | " + " | ".join(cells) + " |")
        verdicts.append((name, params, med(m["bf16"]["train"]) / med(m["fp32"]["train"])))

    print("\nConclusion (CPU with avx512_bf16, no AMX):" if "amx_bf16" not in cpu_flags() else "\nConclusion (CPU with AMX):")
    for name, params, r in verdicts:
        pick = "bf16" if r > 1.05 else "fp32" if r < 0.95 else "either (within 5%)"
        print(f"  {name} ({params / 1e6:.1f}M params): bf16 trains at {r:.2f}x fp32 -> pick {pick}")
    wins = [p for _, p, r in verdicts if r > 1.05]
    if wins:
        print(f"  bf16 wins for training from ~{min(wins) / 1e6:.0f}M params here; below that pick fp32.")
    else:
        print("  bf16 never beat fp32 for training at these sizes; pick fp32.")


if __name__ == "__main__":
    main()
