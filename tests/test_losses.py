"""The losses are the functions they claim to be: each method's loss (written once in its module over a backend's
ops) run on torch and on MLX against the numpy reference (finetune/methods/reference.py) on tiny tensors, the trained-positions-only fast path against the model's own
full forward, and the SFT step loss against a plain reference computation, for any micro-batch split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backends import torch_ops
from finetune.config import Config
from finetune.methods import Batch, dpo, grpo, kto, orpo, reference, sft
from finetune.template import IGNORE, Encoded

RNG = np.random.default_rng(0)


def torch_loss(method, logps, rows, n_rows, extra, denominator, ref_tokens=None, **cfg):
    """A method's loss on torch tensors (weights 1: torch gathers no padding)."""
    as_t = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(v)  # noqa: E731
    return method.loss(torch_ops, as_t(logps), 1.0, as_t(rows), n_rows, {k: as_t(v) for k, v in extra.items()},
                       None if ref_tokens is None else as_t(ref_tokens), Config(**cfg), denominator)


def split_step(method, batch, by_seq: dict, micro: int, overhead, **cfg) -> tuple[float, dict]:
    """A step's loss summed over its micro-batches (as the backends run it), in float64; the summed stats too.
    `by_seq` maps id(sequence) -> its trained tokens' log-probs."""
    from finetune.methods import micro_batches

    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    total, stats = 0.0, {}
    for chunk, extra in micro_batches(batch, micro, overhead):
        tokens = np.concatenate([by_seq[id(s)] for s in chunk])
        rows = np.concatenate([np.full(s.n_trained, k) for k, s in enumerate(chunk)])
        loss, parts = torch_loss(method, f64(tokens), rows, len(chunk), {k: f64(v) for k, v in extra.items()},
                                 batch.denominator, **cfg)
        total += float(loss)
        for k, v in parts.items():
            stats[k] = stats.get(k, 0.0) + float(v)
    return total, stats


def test_dpo_loss_torch_matches_reference():
    pc, pr, rc, rr = (RNG.normal(-20, 5, 6) for _ in range(4))
    want = reference.dpo_losses(pc, pr, rc, rr, beta=0.1).sum() / 6
    seq = np.stack([pc, pr], 1).reshape(-1)          # chosen, rejected alternating
    ref = np.stack([rc, rr], 1).reshape(-1)
    # sequence log-probs from token log-probs: split each sequence into 3 tokens
    tokens = np.repeat(seq / 3, 3)
    rows = np.repeat(np.arange(12), 3)
    loss, stats = torch_loss(dpo, tokens, rows, 12, {"ref": ref}, 6.0, beta=0.1)
    assert float(loss) == pytest.approx(want, rel=1e-9)
    margin = (pc - rc) - (pr - rr)
    assert float(stats["pref_accuracy"]) == pytest.approx(float((margin > 0).mean()))
    assert float(stats["reward_margin"]) == pytest.approx(float((0.1 * margin).mean()))


def _rpo_pairs():
    """3 pairs whose chosen / rejected answers train 3/2, 5/4, 2/6 tokens, with random token log-probs."""
    from finetune.methods import dpo

    pairs, token_logps = [], []
    for n_c, n_r in ((3, 2), (5, 4), (2, 6)):
        c, r = (Encoded([0] * (n + 2), [IGNORE, IGNORE] + [1] * n) for n in (n_c, n_r))
        pair = dpo.Pair(c, r, example=None, ref=list(RNG.normal(-10, 2, 2)))
        pairs.append(pair)
        token_logps += [RNG.normal(-2, 0.5, n_c), RNG.normal(-2, 0.5, n_r)]
    return pairs, token_logps


@pytest.mark.parametrize("micro,overhead", [(1, None), (2, None), (3, None), (3, 0.0), (2, 1.0)])
def test_rpo_step_loss_matches_reference_for_any_micro_batch_split(micro, overhead):
    """DPO + rpo_alpha x the chosen answers' mean token NLL over the step, however the step is split (also when the
    pad-saving split cuts it by length)."""
    pairs, token_logps = _rpo_pairs()
    by_seq = {id(s): t for p, (tc, tr) in zip(pairs, zip(token_logps[0::2], token_logps[1::2]))
              for s, t in ((p.chosen, tc), (p.rejected, tr))}
    batch = dpo.make_batch(None, pairs, Config(beta=0.1, rpo_alpha=0.7), None)
    total, _ = split_step(dpo, batch, by_seq, micro, overhead, beta=0.1, rpo_alpha=0.7)
    ref_c, ref_r = [p.ref[0] for p in pairs], [p.ref[1] for p in pairs]
    want = reference.rpo_step_loss(token_logps[0::2], token_logps[1::2], ref_c, ref_r, 0.1, 0.7)
    assert total == pytest.approx(want, rel=1e-9)
    plain = reference.rpo_step_loss(token_logps[0::2], token_logps[1::2], ref_c, ref_r, 0.1, 0.0)
    assert want - plain == pytest.approx(0.7 * -np.concatenate(token_logps[0::2]).mean())  # the NLL term itself


def test_dpo_loss_by_hand():
    # one pair, margin 2 nats, beta 0.5: -log sigmoid(1)
    assert reference.dpo_losses([-1.0], [-3.0], [0.0], [0.0], 0.5)[0] == pytest.approx(np.log1p(np.exp(-1.0)))


def test_group_advantages_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    adv = reference.group_advantages(rewards, 4)
    std = np.std([1, 0, 0, 1], ddof=1)
    assert adv[:4] == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert adv[4:] == pytest.approx([0, 0, 0, 0])  # a group that all agree teaches nothing


def test_grpo_loss_torch_matches_reference_with_kl():
    n_tok, n_seq = 10, 3
    logps, ref = RNG.normal(-2, 0.5, n_tok), RNG.normal(-2, 0.5, n_tok)
    rows = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    adv = np.array([1.5, -0.7, 0.2])
    want = reference.grpo_loss(logps, logps, ref, rows, adv, beta=0.04, epsilon=grpo.EPSILON, denominator=12.0)
    got, stats = torch_loss(grpo, logps, rows, n_seq, {"advantage": adv}, 12.0, ref_tokens=ref, beta=0.04)
    assert float(got) == pytest.approx(want, rel=1e-9)
    d = ref - logps
    assert float(stats["kl"]) == pytest.approx(float((np.exp(d) - d - 1).sum() / 12.0))


def test_grpo_with_no_old_policy_is_the_policy_gradient():
    logps = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    loss, stats = torch_loss(grpo, logps, [0, 0, 1], 2, {"advantage": [2.0, -1.0]}, 3.0, beta=0.0)
    loss.backward()
    assert stats == {}
    assert float(loss.detach()) == pytest.approx(-(2 + 2 - 1) / 3)           # ratio 1: -sum(A) / tokens
    assert logps.grad.tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3])  # d/dlogp = -A / tokens


def test_every_method_module_implements_the_written_protocol():
    import inspect

    from finetune import methods
    from finetune.methods.base import Method

    wanted = {n: inspect.signature(f) for n, f in vars(Method).items() if inspect.isfunction(f) and not n.startswith("_")}
    for name in methods.NAMES:
        module = methods.get(name)
        assert module.NAME == name and module.SAMPLE_DIR
        for fn, sig in wanted.items():
            got = list(inspect.signature(getattr(module, fn)).parameters)
            assert got == list(sig.parameters)[1:], (name, fn, got)  # the protocol's, without self


def test_no_backend_names_a_method():
    """A method is one file: the backends run its loss over their ops and never branch on its name."""
    import os

    from finetune import methods
    from tests.conftest import ROOT

    for name in ("torch_backend.py", "mlx_backend.py", "unsloth_backend.py", "torch_ops.py", "mlx_ops.py"):
        text = open(os.path.join(ROOT, "backends", name)).read()
        for method in methods.NAMES:
            assert f'"{method}"' not in text and f"'{method}'" not in text, (name, method)


@pytest.mark.parametrize("micro,overhead", [(1, None), (2, None), (3, None), (2, 1.0)])
def test_orpo_step_loss_matches_reference_for_any_micro_batch_split(micro, overhead):
    """The chosen answers' mean token NLL over the step + beta x the mean odds-ratio loss, however the step is split."""
    pairs, token_logps = _rpo_pairs()
    by_seq = {id(s): t for p, (tc, tr) in zip(pairs, zip(token_logps[0::2], token_logps[1::2]))
              for s, t in ((p.chosen, tc), (p.rejected, tr))}
    batch = orpo.make_batch(None, pairs, Config(beta=0.2), None)
    total, stats = split_step(orpo, batch, by_seq, micro, overhead, beta=0.2)
    accuracy = stats["pref_accuracy"]
    assert total == pytest.approx(reference.orpo_step_loss(token_logps[0::2], token_logps[1::2], 0.2), rel=1e-9)
    means = [float(np.mean(t)) for t in token_logps]
    assert accuracy == pytest.approx(np.mean([c > r for c, r in zip(means[0::2], means[1::2])]))


def test_orpo_loss_by_hand():
    # mean log-probs log(0.8) and log(0.2): odds 4 and 1/4, log odds ratio log 16; beta 1: -log sigmoid(log 16)
    got = reference.orpo_losses([np.log(0.8)], [np.log(0.2)], 1.0)[0]
    assert got == pytest.approx(-np.log(16 / 17))
    # a fully confident chosen answer (mean log-prob 0) stays finite
    assert np.isfinite(reference.orpo_losses([0.0], [-1.0], 0.1)).all()
    t = torch.zeros(4, dtype=torch.float64, requires_grad=True)  # every token certain: log(1 - 1) is clipped
    loss, _ = torch_loss(orpo, t, torch.tensor([0, 0, 1, 1]), 2, {"nll": torch.tensor([0.5, 0.0], dtype=torch.float64),
                         "n_tokens": torch.tensor([2.0, 2.0], dtype=torch.float64)}, 1.0, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(t.grad).all()


def _kto_step():
    """6 rows (3 thumbs-up, 3 thumbs-down) of 2-4 trained tokens, their reference log-probs and a z0."""
    n_tokens, good = [2, 3, 4, 2, 3, 4], np.array([True, False, True, True, False, False])
    token_logps = [RNG.normal(-2, 0.5, n) for n in n_tokens]
    ref = np.array([t.sum() for t in token_logps]) + RNG.normal(0, 1.0, 6)
    rows = np.concatenate([np.full(n, k) for k, n in enumerate(n_tokens)])
    extra = {"ref": ref, "sign": np.where(good, 1.0, -1.0), "z0": np.full(6, 0.3)}
    return np.concatenate(token_logps), rows, extra, good, np.array([t.sum() for t in token_logps]) - ref


def test_kto_loss_torch_matches_reference():
    tokens, rows, extra, good, reward = _kto_step()
    loss, parts = torch_loss(kto, tokens, rows, 6, extra, 6.0, beta=0.5)
    assert float(loss) == pytest.approx(reference.kto_losses(reward, good, 0.3, 0.5).mean(), rel=1e-9)
    assert float(parts["label_accuracy"]) == pytest.approx(np.mean(np.where(good, reward - 0.3, 0.3 - reward) > 0))
    assert float(parts["kl"]) == pytest.approx(0.3)


@pytest.mark.parametrize("micro,overhead", [(1, None), (2, None), (4, None), (3, 0.0)])
def test_kto_with_the_thumbs_up_nll_matches_reference_for_any_micro_batch_split(micro, overhead):
    """KTO + RPO_ALPHA x the desirable completions' mean token NLL over the step, however the step is split."""
    good = [True, False, True, True, False]
    items, token_logps = [], []
    for n, g in zip((3, 2, 5, 4, 6), good):
        items.append(kto.Item(Encoded([0] * (n + 2), [IGNORE, IGNORE] + [1] * n), None, g, None,
                              ref=float(RNG.normal(-8, 2))))
        token_logps.append(RNG.normal(-2, 0.5, n))
    by_seq = {id(i.seq): t for i, t in zip(items, token_logps)}
    session = type("NoKL", (), {"token_logps": lambda self, seqs: [np.zeros(1)] * len(seqs)})()  # z0 = max(0, -ref)
    batch = kto.make_batch(session, items, Config(beta=0.3, rpo_alpha=0.6), None)
    z0 = batch.per_sequence["z0"][0]
    total, _ = split_step(kto, batch, by_seq, micro, overhead, beta=0.3, rpo_alpha=0.6)
    refs = [i.ref for i in items]
    want = reference.kto_step_loss(token_logps, refs, good, z0, 0.3, 0.6)
    assert total == pytest.approx(want, rel=1e-9)
    plain = reference.kto_step_loss(token_logps, refs, good, z0, 0.3, 0.0)
    thumbs_up = np.concatenate([t for t, g in zip(token_logps, good) if g])
    assert want - plain == pytest.approx(0.6 * -thumbs_up.mean())  # the NLL term: thumbs-up tokens only


def test_kto_loss_by_hand():
    # at the start r = 0 and z0 = 0: every row costs 1 - sigmoid(0) = 0.5, thumbs-up or down
    assert reference.kto_losses([0.0, 0.0], [True, False], 0.0, 0.1) == pytest.approx([0.5, 0.5])
    # a thumbs-up row whose reward rose costs less, a thumbs-down row whose reward rose costs more
    up, down = reference.kto_losses([2.0, 2.0], [True, False], 0.0, 1.0)
    assert up == pytest.approx(1 - 1 / (1 + np.exp(-2))) and down == pytest.approx(1 - 1 / (1 + np.exp(2)))


# ---------------------------------------------------------------- MLX (the tests marked `mlx` skip where it is absent)


def mlx_loss(method, logps, weights, rows, n_rows, extra, denominator, ref_tokens=None, **cfg):
    import mlx.core as mx

    from backends import mlx_ops

    f32 = lambda v: mx.array(np.asarray(v, np.float32))  # noqa: E731
    return method.loss(mlx_ops, f32(logps), f32(weights), mx.array(np.asarray(rows)), n_rows,
                       {k: f32(v) for k, v in extra.items()}, None if ref_tokens is None else f32(ref_tokens),
                       Config(**cfg), denominator)


@pytest.mark.mlx
def test_mlx_losses_match_reference():
    pc, pr, rc, rr = (RNG.normal(-20, 5, 4) for _ in range(4))
    seq = np.stack([pc, pr], 1).reshape(-1)
    ref = np.stack([rc, rr], 1).reshape(-1)
    nll = np.array([0.5, 0.0] * 4, np.float32)
    loss, _ = mlx_loss(dpo, seq, np.ones(8), np.arange(8), 8, {"ref": ref, "nll": nll}, 4.0, beta=0.1, rpo_alpha=0.0)
    assert float(loss) == pytest.approx(reference.dpo_losses(pc, pr, rc, rr, 0.1).sum() / 4, rel=1e-5)
    # RPO: the chosen answers' NLL weighted per sequence (alpha / chosen tokens; rejected 0), as on torch
    with_nll, _ = mlx_loss(dpo, seq, np.ones(8), np.arange(8), 8, {"ref": ref, "nll": nll}, 4.0, beta=0.1,
                           rpo_alpha=0.5)
    torch_nll, _ = torch_loss(dpo, seq, torch.arange(8), 8, {"ref": ref, "nll": nll.astype(np.float64)}, 4.0,
                              beta=0.1, rpo_alpha=0.5)
    assert float(with_nll) == pytest.approx(float(torch_nll), rel=1e-5)
    assert float(with_nll) - float(loss) == pytest.approx(-0.5 * pc.sum(), rel=1e-4)
    logps, refs = (RNG.normal(-2, 0.5, 6).astype(np.float32) for _ in range(2))
    rows, adv = np.array([0, 0, 1, 1, 1, 0]), np.array([0.8, -1.2], np.float32)
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)  # last slot is bucket padding
    got, stats = mlx_loss(grpo, logps, weights, rows, 2, {"advantage": adv}, 5.0, ref_tokens=refs, beta=0.04)
    want = reference.grpo_loss(logps[:5], logps[:5], refs[:5], rows[:5], adv, 0.04, grpo.EPSILON, 5.0)
    assert float(got) == pytest.approx(want, rel=1e-5)
    got_t, stats_t = torch_loss(grpo, logps[:5], rows[:5], 2, {"advantage": adv}, 5.0, ref_tokens=refs[:5], beta=0.04)
    assert float(stats["kl"]) == pytest.approx(float(stats_t["kl"]), rel=1e-5)
    tokens, krows, kextra, good, reward = _kto_step()
    kto_m, _ = mlx_loss(kto, np.append(tokens, 0.0), np.append(np.ones(len(tokens)), 0.0), np.append(krows, 0), 6,
                        kextra, 6.0, beta=0.5)  # one slot of bucket padding
    assert float(kto_m) == pytest.approx(reference.kto_losses(reward, good, 0.3, 0.5).mean(), rel=1e-5)
    knll = {**kextra, "nll": np.where(good, 0.1, 0.0)}  # the thumbs-up NLL term, on both backends
    kto_m2, _ = mlx_loss(kto, np.append(tokens, 0.0), np.append(np.ones(len(tokens)), 0.0), np.append(krows, 0), 6,
                         knll, 6.0, beta=0.5, rpo_alpha=1.0)
    kto_t2, _ = torch_loss(kto, tokens, krows, 6, knll, 6.0, beta=0.5, rpo_alpha=1.0)
    assert float(kto_m2) == pytest.approx(float(kto_t2), rel=1e-5) and float(kto_m2) > float(kto_m)
    sft_m, _ = mlx_loss(sft, logps, weights, rows, 2, {}, 5.0)
    assert float(sft_m) == pytest.approx(-logps[:5].sum() / 5.0, rel=1e-5)


# ---------------------------------------------------------------- the real forward passes (tiny model)
def _plan(**kw):
    from finetune.plan import Plan

    base = dict(backend="torch", device="cpu", method="sft", batch_size=4, grad_accum=1, max_seq_length=256,
                max_steps=10, eval_steps=5, save_steps=5, gradient_checkpointing=False, dtype="fp32",
                quantize="none", memory_kind="ram", memory_total_gb=16, budget_gb=8, predicted_peak_gb=1)
    return Plan(**{**base, **kw})


@pytest.fixture(scope="module")
def torch_session(tiny_model, tokenizer):
    from backends.torch_backend import TorchSession
    from finetune import models

    info = models.info_from_config("finetune/tiny-qwen2", tiny_model, models._read_config(tiny_model), is_tiny=True)
    return TorchSession(Config(lora_dropout=0.0, beta=0.1), _plan(), info, tokenizer)


@pytest.fixture(scope="module")
def rows(tokenizer):
    from finetune import data, template

    splits = data.load("sample", 0.1, 42)
    encoded, _ = template.encode_all(splits.train[:12], tokenizer, 256)
    return encoded


def _reference_sft_loss(model, rows, pad_id) -> float:
    from finetune.template import pad_batch

    ids, labels, mask = (torch.from_numpy(a) for a in pad_batch(rows, pad_id))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=IGNORE, reduction="sum")
    return float(ce) / int((target != IGNORE).sum())


def test_fast_path_equals_the_full_forward(torch_session, rows):
    """Logits only at trained positions give exactly the log-probs the full forward gives there."""
    with torch.no_grad():
        fast, idx = torch_session.trained_logps(rows[:5])
        torch_session.fast = False
        try:
            full, idx_full = torch_session.trained_logps(rows[:5])
        finally:
            torch_session.fast = True
    assert torch.equal(idx, idx_full) and len(fast) == sum(r.n_trained for r in rows[:5])
    assert torch.allclose(fast, full, atol=1e-5)


@pytest.mark.parametrize("micro", [1, 3, 12])
def test_sft_step_loss_is_mean_ce_over_every_trained_token_of_the_step(torch_session, rows, micro):
    """Assistant-only, EOS trained (it is in the labels), mean over the step's trained tokens, whatever the split."""
    from finetune.methods import micro_batches as split

    want = _reference_sft_loss(torch_session.model, rows, torch_session.pad_id)
    batch = Batch("sft", rows, float(sum(r.n_trained for r in rows)))
    total = 0.0
    with torch.no_grad():
        for chunk, _ in split(batch, micro):
            logps, _ = torch_session.trained_logps(chunk)
            total += float(sft.loss(torch_ops, logps, 1.0, None, len(chunk), {}, None, Config(), batch.denominator)[0])
    assert total == pytest.approx(want, rel=1e-5)
    eos = torch_session.tokenizer.eos_token_id
    assert all([t for t in r.labels if t != IGNORE][-1] == eos for r in rows)  # the end-of-turn token is trained


@pytest.mark.mlx
def test_torch_and_mlx_give_the_same_dpo_loss_on_the_same_weights(torch_session, tiny_model, tokenizer, rows):
    """The same base weights, the same (zero-initialised) adapter and batch: per-token log-probs agree within
    1e-4 and so do the DPO losses (fp32 both)."""
    from backends.mlx_backend import MLXSession
    from finetune import models

    info = models.info_from_config("finetune/tiny-qwen2", tiny_model, models._read_config(tiny_model), is_tiny=True)
    mlx_session = MLXSession(Config(lora_dropout=0.0, beta=0.1), _plan(backend="mlx", device="mlx"), info, tokenizer)
    seqs = rows[:8]
    lp_t = torch_session.token_logps(seqs)
    lp_m = mlx_session.token_logps(seqs)
    assert max(float(np.abs(a - b).max()) for a, b in zip(lp_t, lp_m)) < 1e-4
    sums_t, sums_m = np.array([x.sum() for x in lp_t]), np.array([x.sum() for x in lp_m])
    ref = sums_t + RNG.normal(0, 0.5, 8)  # a reference that differs from the policy
    loss_t = reference.dpo_losses(sums_t[0::2], sums_t[1::2], ref[0::2], ref[1::2], 0.1).mean()
    toks = np.concatenate(lp_m).astype(np.float32)
    owner = np.concatenate([[i] * len(x) for i, x in enumerate(lp_m)])
    loss_m, _ = mlx_loss(dpo, toks, np.ones(len(toks)), owner, 8, {"ref": ref, "nll": np.zeros(8)}, 4.0, beta=0.1)
    assert float(loss_m) == pytest.approx(loss_t, abs=1e-4)


@pytest.mark.mlx
def test_torch_and_mlx_give_the_same_orpo_loss_on_the_same_weights(torch_session, tiny_model, tokenizer, rows):
    from backends.mlx_backend import MLXSession
    from finetune import models

    info = models.info_from_config("finetune/tiny-qwen2", tiny_model, models._read_config(tiny_model), is_tiny=True)
    mlx_session = MLXSession(Config(lora_dropout=0.0, beta=0.1), _plan(backend="mlx", device="mlx"), info, tokenizer)
    seqs = rows[:8]
    lp_t, lp_m = torch_session.token_logps(seqs), mlx_session.token_logps(seqs)
    want = reference.orpo_step_loss(lp_t[0::2], lp_t[1::2], 0.1)
    extra = {"nll": np.array([1.0 / sum(len(x) for x in lp_m[0::2]), 0.0] * 4),
             "n_tokens": np.array([len(x) for x in lp_m], np.float64)}
    toks = np.concatenate(lp_m).astype(np.float32)
    owner = np.concatenate([[i] * len(x) for i, x in enumerate(lp_m)])
    loss_m, _ = mlx_loss(orpo, toks, np.ones(len(toks)), owner, 8, extra, 4.0, beta=0.1)
    assert float(loss_m) == pytest.approx(want, abs=1e-4)
    loss_t, _ = torch_loss(orpo, np.concatenate(lp_t), owner, 8, extra, 4.0, beta=0.1)
    assert float(loss_t) == pytest.approx(want, rel=1e-6)


def test_encoded_length_is_its_tokens():
    assert Encoded([1, 2, 3], [IGNORE, 2, 3]).length == 3
