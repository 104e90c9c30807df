"""CPU dtype benchmark: bf16 (bf16 base weights, fp32 LoRA, bf16=True autocast, as our torch backend does)
vs fp32 for LoRA training, eval forward and generate, on random-init Qwen2 models of four sizes.

Run:  python bench/cpu_dtype.py        (about 4-5 minutes on 2 cores)
Variants are interleaved (fp32, bf16, fp32, bf16, ...), REPEATS times, each repeat timing the same work units (train
steps on the same batches, eval batches, prompts); each unit's rate is its best over the repeats, since on a shared
machine other processes can only slow a unit down (with 2 threads on 2 cores, one busy neighbour can make a step 10x
slower). Each sample records how much CPU other processes used meanwhile (/proc/stat minus our own time); after a
disturbed sample the next one waits (up to 10 s) for the machine to go quiet.
"""
from __future__ import annotations

import statistics
import tempfile
import time

from _timing import FOREIGN_MAX, Gate, cpu_flags, env_line, setup_torch, wait_quiet

torch = setup_torch()
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from finetune import data, template, tiny  # noqa: E402

GATE = Gate()

REPEATS, WARMUP, MEASURED, BATCH = 5, 2, 6, 8
EVAL_ROWS, GEN_PROMPTS, GEN_TOKENS = 24, 3, 32
SIZES = {  # name -> Qwen2Config overrides (None = the tiny model as built by finetune.tiny)
    "tiny": None,
    "mini": dict(hidden_size=256, num_hidden_layers=6, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=512, num_hidden_layers=6, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2),
    # ~91M (hidden 1024, 8 layers, inter 2816) took ~35 s per fp32 run here: too slow for 3 repeats in 5 min.
    "medium": dict(hidden_size=768, num_hidden_layers=6, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4),
}


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
    """TrainerCallback timing each step from its begin (after waiting, if the last sample was disturbed) to its end."""

    def __init__(self):
        from transformers import TrainerCallback

        steps = self.steps = []

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                steps.clear()

            def on_step_begin(self, args, state, control, **kw):
                self.begin = (GATE.start(), state.num_input_tokens_seen)  # tokens are counted after this hook

            def on_step_end(self, args, state, control, **kw):
                a, n0 = self.begin
                steps.append(GATE.stop(a, state.num_input_tokens_seen - n0))

        self.callback = CB()

    def rates(self) -> list[tuple[float, float]]:
        """(tokens/s, foreign cores) of each measured step (same batches for every variant: same data seed)."""
        return self.steps[WARMUP:WARMUP + MEASURED]


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


def eval_rates(model, rows, pad) -> list[tuple[float, float]]:
    """Like TorchSession.eval_loss: no grad, no autocast, logits upcast, summed CE."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), BATCH):
            start = GATE.start()
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
            out.append(GATE.stop(start, int(mask.sum())))
    return out


def gen_rates(model, prompts, tok) -> list[tuple[float, float]]:
    """Like TorchSession.generate: greedy, one prompt at a time; min_new_tokens forces exactly GEN_TOKENS."""
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            start = GATE.start()
            ids = torch.tensor([p])
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=GEN_TOKENS,
                           min_new_tokens=GEN_TOKENS, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out.append(GATE.stop(start, GEN_TOKENS))
    return out


def main():
    t_all = time.perf_counter()
    print(env_line())
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
        t_size, waited0 = time.perf_counter(), GATE.waited
        variants = {}
        for dt in ("fp32", "bf16"):
            model = build_model(name, path, tok, torch.float32 if dt == "fp32" else torch.bfloat16)
            params = sum(p.numel() for p in model.parameters())
            trainer, clock = make_trainer(model, tok, rows, bf16=dt == "bf16")
            variants[dt] = (trainer, clock, {"train": [], "eval": [], "gen": []})  # one list of samples per repeat
        for _ in range(REPEATS):
            for dt, (trainer, clock, m) in variants.items():  # interleaved: fp32, bf16, fp32, bf16, ...
                GATE.waited += wait_quiet(window=0.5)
                trainer.train()
                m["train"].append(clock.rates())
                m["eval"].append(eval_rates(trainer.model, eval_rows, tok.pad_token_id))  # PEFT model, as the backend
                m["gen"].append(gen_rates(trainer.model, prompts, tok))
        lora = next(p.dtype for n, p in variants["bf16"][0].model.named_parameters() if "lora_A" in n)
        base = next(p.dtype for n, p in variants["bf16"][0].model.named_parameters() if "q_proj.base_layer" in n)
        print(f"  {name}: {params / 1e6:.1f}M params, done in {time.perf_counter() - t_size:.0f}s ({GATE.waited - waited0:.0f}s of it "
              f"waiting for other processes to go quiet); bf16 run: base {base}, LoRA {lora}")
        results.append((name, params, {dt: v[2] for dt, v in variants.items()}))
        del variants

    print(f"\nTotal {time.perf_counter() - t_all:.0f}s. tok/s = non-padding tokens/s (train, eval) or new tokens/s "
          f"(generate). Every repeat runs the same work units (train steps {WARMUP + 1}-{WARMUP + MEASURED} on the same "
          f"batches, {EVAL_ROWS // BATCH} eval batches, {GEN_PROMPTS} prompts): a unit's rate is its best over the "
          f"{REPEATS} repeats (other processes only ever slow a unit down), the figure is the median over units, and "
          "bf16/fp32 is the median over units of the per-unit ratio; in brackets the same ratio from typical rather than "
          "best times (median over repeats of each repeat's median per-unit ratio). quiet = samples during which other processes "
          f"used <= {FOREIGN_MAX} core.\n")
    print("| model | params | quiet samples | train fp32 tok/s | train bf16 tok/s | train bf16/fp32 | eval fp32 tok/s "
          "| eval bf16 tok/s | eval bf16/fp32 | gen fp32 tok/s | gen bf16 tok/s | gen bf16/fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for name, params, m in results:
        cells, ratios, kept, total = [], [], 0, 0
        for k in ("train", "eval", "gen"):
            best = {dt: [max(rep[i][0] for rep in m[dt][k]) for i in range(len(m[dt][k][0]))] for dt in m}
            r = statistics.median(b / f for f, b in zip(best["fp32"], best["bf16"]))
            typical = statistics.median(statistics.median(b[0] / f[0] for f, b in zip(fr, br))
                                        for fr, br in zip(m["fp32"][k], m["bf16"][k]))
            cells += [f"{statistics.median(best['fp32']):,.0f}", f"{statistics.median(best['bf16']):,.0f}",
                      f"{r:.2f}x ({typical:.2f}x)"]
            ratios.append(r)
            samples = [x for dt in m for rep in m[dt][k] for x in rep]
            kept, total = kept + sum(f <= FOREIGN_MAX for _, f in samples), total + len(samples)
        print(f"| {name} | {params / 1e6:.1f}M | {kept}/{total} | " + " | ".join(cells) + " |")
        verdicts.append((name, params, *ratios))

    print("\nConclusion (CPU with " + ("AMX):" if "amx_bf16" in cpu_flags() else "avx512_bf16, no AMX):"))
    for name, params, r, e, g in verdicts:
        pick = "bf16" if r > 1.05 else "fp32" if r < 0.95 else "either (within 5%)"
        print(f"  {name} ({params / 1e6:.1f}M params): bf16 = {r:.2f}x fp32 train, {e:.2f}x eval, {g:.2f}x generate "
              f"-> pick {pick}")
    lose = [p for _, p, r, *_ in verdicts if r <= 1.05]
    win = [p for _, p, r, *_ in verdicts if r > 1.05 and p > max(lose, default=0)]
    if win and lose:
        print(f"  Rule: fp32 up to ~{max(lose) / 1e6:.1f}M params (bf16 gains <= 5% there), bf16 from "
              f"~{min(win) / 1e6:.0f}M (threshold somewhere in between).")
    else:
        print("  Rule: " + ("bf16 at every size measured." if win else "bf16 never gains > 5%: fp32 at every size."))


if __name__ == "__main__":
    main()
