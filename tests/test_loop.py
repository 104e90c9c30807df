"""The shared loop's data order and learning-rate schedule (pure functions: no model)."""
from __future__ import annotations

import numpy as np
import pytest

from finetune.loop import GROUP_STEPS, DataOrder, learning_rate


def test_default_order_is_a_seeded_shuffle_so_each_step_is_a_random_draw():
    lengths = [10] * 50 + [200] * 50   # two "tasks" of very different lengths
    order = DataOrder(lengths, per_step=8, seed=3)
    first = order.epoch(0)
    assert sorted(first) == list(range(100))
    assert list(first) == list(np.random.default_rng([3, 0]).permutation(100))
    # steps mix both lengths (with length grouping most steps would be one length only)
    steps = [{lengths[i] for i in first[s * 8:(s + 1) * 8]} for s in range(12)]
    assert sum(len(kinds) == 2 for kinds in steps) >= 9
    assert order.take(95, 10) == [int(first[95]), *map(int, first[96:100]), *map(int, order.epoch(1)[:5])]
    assert DataOrder(lengths, 8, 3).take(37, 20) == order.take(37, 20)   # position n is the same on every run


def test_group_by_length_sorts_inside_windows_of_steps():
    lengths = list(np.random.default_rng(0).integers(5, 500, 160))
    order = DataOrder(lengths, per_step=4, seed=1, grouped=True)
    perm = order.epoch(0)
    window = 4 * GROUP_STEPS
    assert sorted(perm) == list(range(160))
    for w in range(0, 160, window):
        got = [lengths[i] for i in perm[w:w + window]]
        assert got == sorted(got, reverse=True)
        assert set(perm[w:w + window]) == set(np.random.default_rng([1, 0]).permutation(160)[w:w + window])


def test_learning_rate_warms_up_then_follows_the_schedule():
    assert learning_rate(1, 100, 5, 1.0, "constant") == 0.2
    assert learning_rate(50, 100, 5, 1.0, "constant") == 1.0
    assert learning_rate(6, 100, 5, 1.0, "linear") == 1.0
    assert 0 < learning_rate(100, 100, 5, 1.0, "linear") < 0.02
    assert 0 < learning_rate(100, 100, 5, 1.0, "cosine") < 0.01


def test_wsd_holds_the_peak_then_decays_over_the_last_fifth():
    lrs = [learning_rate(u, 40, 2, 1.0, "wsd") for u in range(1, 41)]
    assert lrs[:2] == [0.5, 1.0] and set(lrs[2:32]) == {1.0}
    assert all(a > b > 0 for a, b in zip(lrs[31:], lrs[32:])) and abs(lrs[-1] - 1 / 9) < 1e-9
    assert learning_rate(1, 1, 0, 1.0, "wsd") == 0.5   # a one-step run still makes a non-zero update


def test_a_step_is_cut_where_padding_costs_more_than_a_micro_batch():
    from finetune.methods import split_points

    mixed = [104, 90, 45, 40]
    assert split_points(mixed, 4, None) == [(0, 4)]           # the batch size alone decides
    assert split_points(mixed, 4, 30) == [(0, 2), (2, 4)]             # 416 padded tokens -> 298 + 2 x 30
    assert split_points(mixed, 4, 500) == [(0, 4)]                    # a GPU's launch cost: one micro-batch
    assert split_points([88] * 8, 4, 0) == [(0, 4), (4, 8)]           # equal lengths: never more than needed
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = sorted(rng.integers(5, 300, rng.integers(1, 20)), reverse=True)
        size, overhead = int(rng.integers(1, 9)), float(rng.uniform(0, 200))
        runs = split_points(lengths, size, overhead)
        assert [a for a, _ in runs[1:]] == [b for _, b in runs[:-1]] and runs[0][0] == 0 and runs[-1][1] == len(lengths)
        assert all(0 < b - a <= size for a, b in runs)
        fixed = sum(lengths[i] * len(lengths[i:i + size]) + overhead for i in range(0, len(lengths), size))
        assert sum((b - a) * lengths[a] + overhead for a, b in runs) <= fixed + 1e-9  # never costlier than fixed


def test_auto_holds_the_peak_until_a_plateau_then_decays_linearly_to_the_end():
    assert [learning_rate(u, 100, 5, 1.0, "auto") for u in (1, 5, 6, 100)] == [0.2, 1.0, 1.0, 1.0]  # no plateau yet
    after = [learning_rate(u, 100, 5, 1.0, "auto", decay_from=60) for u in range(61, 101)]
    assert after[0] == pytest.approx(40 / 41) and after[-1] == pytest.approx(1 / 41)
    assert all(a - b == pytest.approx(1 / 41) for a, b in zip(after, after[1:]))


def test_the_plateau_test_finds_a_flat_curve_but_not_a_short_noisy_or_still_falling_one():
    from finetune.schedule import PLATEAU_MIN_STEPS, plateaued

    rng = np.random.default_rng(0)
    noise = 0.25 * rng.standard_normal(200)
    steps = np.arange(200)
    flattens = 3 * np.exp(-steps / 12) + 1 + noise    # one row per step: flat by ~step 50
    falling = 4 - 0.015 * steps + noise                # still learning at a steady pace
    first = next(n for n in range(1, 201) if plateaued(list(flattens[:n])))
    assert 40 <= first <= 120
    assert not any(plateaued(list(falling[:n])) for n in range(1, 201))
    assert not plateaued(list(flattens[:PLATEAU_MIN_STEPS - 1]))   # too few losses to judge
    assert not plateaued(list(1 + noise[:100]))                    # never fell: a wrong rate, not a plateau
    assert not plateaued(list(2 + 0.01 * steps[:100]))             # rising
