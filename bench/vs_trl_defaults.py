"""Our torch backend's TRL configuration vs a typical user script that keeps TRL SFTTrainer's defaults.

Same workload for every variant: the tiny model, the shipped sample train rows, 60 steps x batch 8, LoRA r=16
alpha 32 dropout 0.05 on all linear layers, lr 2e-4, seed 42, no eval.
  trl-defaults   model passed as a path, raw {"messages"} rows, SFTConfig(max_steps, batch, lr, use_cpu) only:
                 TRL then tokenizes itself, trains every token (assistant_only_loss off), turns gradient
                 checkpointing on and bf16 autocast on (fp32 weights: TRL loads float32 by default)
  trl-no-ckpt    the same with gradient_checkpointing=False                       (ablation)
  trl-no-ckpt-fp32  the same with gradient_checkpointing=False, bf16=False        (ablation)
  ours           as backends/torch_backend.py configures it: rows pre-tokenized with finetune.template (assistant-only
                 labels), skip_prepare_dataset, checkpointing off, fp32 (the tiny model on this CPU), cosine + warmup
Run:  python bench/vs_trl_defaults.py   (about 3 minutes on 2 cores). Variants interleaved, 3 repeats, medians.
"""
from __future__ import annotations

import statistics
import tempfile
import time

from _timing import FOREIGN_MAX, Gate, clean_median, env_line, sample, setup_torch, snap, wait_quiet

torch = setup_torch()
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from finetune import data, template, tiny  # noqa: E402

STEPS, BATCH, LR, REPEATS = 60, 8, 2e-4, 3
VARIANTS = ["trl-defaults", "trl-no-ckpt", "trl-no-ckpt-fp32", "ours"]
# Settings only for measuring, identical in every variant: no checkpoints written, no trackers, no progress
# bars, count non-padding tokens.
MEASURE = dict(save_strategy="no", report_to=[], disable_tqdm=True, include_num_input_tokens_seen="non_padding")


def lora() -> LoraConfig:
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def build(variant: str, path: str, splits):
    """The trainer as the variant's script would build it (everything up to trainer.train())."""
    out = tempfile.mkdtemp(prefix="bench-trl-")
    if variant.startswith("trl"):
        # A typical user script: raw conversations, model id/path, the few arguments the task needs.
        ds = Dataset.from_list([{"messages": ex.messages} for ex in splits.train])
        extra = {} if variant == "trl-defaults" else dict(gradient_checkpointing=False)
        if variant == "trl-no-ckpt-fp32":
            extra["bf16"] = False
        # use_cpu=True: with bf16 left at TRL's default (True), transformers refuses to start on a CPU-only machine
        # ("Your setup doesn't support bf16/gpu. You need to assign use_cpu..."), so such a script must add it.
        args = SFTConfig(output_dir=out, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
                         use_cpu=True, **extra, **MEASURE)
        return SFTTrainer(model=path, args=args, train_dataset=ds, peft_config=lora())
    # ours: mirrors TorchSession.__init__ + TorchSession.train (eval off for the timing)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cpu").eval()
    rows, _ = template.encode_all(splits.train, tok, 1024)
    ds = Dataset.from_list([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
    args = SFTConfig(output_dir=out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
                     gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="cosine",
                     warmup_steps=int(0.05 * STEPS), logging_steps=5, eval_strategy="no", seed=42, data_seed=42,
                     bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, max_length=1024,
                     dataset_kwargs={"skip_prepare_dataset": True}, dataloader_num_workers=0,
                     remove_unused_columns=False, **MEASURE)
    return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora())


class StepClock(TrainerCallback):
    """Times each step, begin to end; after a step disturbed by other processes, the next one first waits for quiet
    (up to 10 s, subtracted from the train time)."""

    def __init__(self):
        self.gate, self.steps = Gate(), []

    def on_step_begin(self, args, state, control, **kw):
        self.begin = (self.gate.start(), state.num_input_tokens_seen)  # tokens are counted after this hook

    def on_step_end(self, args, state, control, **kw):
        a, n0 = self.begin
        self.steps.append(self.gate.stop(a, state.num_input_tokens_seen - n0))


def run(variant: str, path: str, splits) -> dict:
    waited = wait_quiet()
    t0 = time.perf_counter()
    trainer = build(variant, path, splits)
    trainer.remove_callback(PrinterCallback)
    clock = StepClock()
    trainer.add_callback(clock)
    setup = time.perf_counter() - t0
    s0 = snap()
    out = trainer.train()
    s1 = snap()
    seconds = s1[0] - s0[0] - clock.gate.waited
    ds = trainer.train_dataset
    ids = ds["input_ids"]
    n_tokens = sum(len(r) for r in ids)
    trained = (sum(sum(x != template.IGNORE for x in r) for r in ds["labels"]) if "labels" in ds.column_names
               else n_tokens)  # no labels column: TRL trains every (non-padding) token
    return dict(setup=setup, seconds=seconds, tokens=int(trainer.state.num_input_tokens_seen),
                steps=clock.steps[1:], foreign=sample(s0, s1, 0)[1], waited=waited + clock.gate.waited, loss=float(out.training_loss),
                row_tokens=n_tokens / len(ids), trained_share=trained / n_tokens,
                ckpt=trainer.args.gradient_checkpointing, autocast=trainer.args.bf16,
                dtype=str(next(trainer.model.parameters()).dtype).replace("torch.", ""))


def main():
    t_all = time.perf_counter()
    print(env_line())
    path = tiny.ensure()
    splits = data.load("sample", 0.1, 42)
    print(f"tiny model, {len(splits.train)} sample train rows, {STEPS} steps x batch {BATCH}, LoRA r=16 all-linear, "
          f"lr {LR:g}; {REPEATS} repeats, variants interleaved")
    results = {v: [] for v in VARIANTS}
    for rep in range(REPEATS):
        for v in VARIANTS:
            r = run(v, path, splits)
            results[v].append(r)
            print(f"  rep {rep + 1} {v:<17} train {r['seconds']:6.1f}s  setup {r['setup']:4.1f}s  loss {r['loss']:.3f}  "
                  f"other processes used {r['foreign']:.2f} cores meanwhile (waited {r['waited']:.0f}s for quiet)")

    med = lambda v, k: statistics.median(r[k] for r in results[v])  # noqa: E731
    quiet = {v: clean_median([s for r in results[v] for s in r["steps"]]) for v in VARIANTS}
    ours_s, ours_q = med("ours", "seconds"), quiet["ours"][0]
    print(f"\nTotal {time.perf_counter() - t_all:.0f}s. train s, tok/s, setup s: medians of {REPEATS} runs "
          "(tok/s = non-padding tokens seen / train s; train s excludes waits for quiet); setup = model load + dataset preparation + trainer "
          f"construction. quiet tok/s: median per-step rate over steps where other processes used <= {FOREIGN_MAX} "
          "core (kept/total steps), the figure to trust when the machine was shared.\n")
    print("| variant | grad ckpt | bf16 autocast | weights | loss on | tokens/row | setup s | train s | tok/s "
          "| quiet tok/s | train s vs ours | quiet speed vs ours |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in VARIANTS:
        r0, secs = results[v][0], med(v, "seconds")
        loss_on = "all tokens" if r0["trained_share"] > 0.99 else f"assistant ({r0['trained_share']:.0%})"
        q, nq = quiet[v]
        print(f"| {v} | {'on' if r0['ckpt'] else 'off'} | {'on' if r0['autocast'] else 'off'} | {r0['dtype']} | "
              f"{loss_on} | {r0['row_tokens']:.1f} | {med(v, 'setup'):.1f} | {secs:.1f} | {med(v, 'tokens') / secs:,.0f} "
              f"| {q:,.0f} ({nq}/{sum(len(r['steps']) for r in results[v])}) | {secs / ours_s:.2f}x | {q / ours_q:.2f}x |")
    d, dq = med("trl-defaults", "seconds"), quiet["trl-defaults"][0]
    print(f"\nConclusion: with TRL's defaults the same {STEPS} steps take {d:.1f}s vs {ours_s:.1f}s configured as our backend "
          f"does ({d / ours_s:.2f}x the time; quiet-step throughput {dq:,.0f} vs {ours_q:,.0f} tok/s = {ours_q / dq:.2f}x "
          f"in our favour). Checkpointing off alone: {quiet['trl-no-ckpt'][0]:,.0f} tok/s; checkpointing off and no "
          f"bf16 autocast: {quiet['trl-no-ckpt-fp32'][0]:,.0f} tok/s (quiet steps).")


if __name__ == "__main__":
    main()
