"""Paired bootstrap intervals: seeded, paired, resampled within tasks."""

from __future__ import annotations

import numpy as np
import pytest

from cappy_core.selection.bootstrap import paired_bootstrap


def test_identical_methods_give_a_zero_width_interval():
    vals = [0.1, 0.5, 0.9, 0.3]
    total, per = paired_bootstrap({"a": (vals, vals), "b": (vals[:2], vals[:2])}, resamples=200)
    assert (total.mean, total.low, total.high) == (0.0, 0.0, 0.0)
    assert per["a"].half_width == 0.0


def test_constant_shift_is_exact_and_paired():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 100, size=50)  # large spread shared by both methods
    total, _ = paired_bootstrap({"t": (base + 2.0, base)}, resamples=500)
    # pairing cancels the shared spread: every resample's difference is exactly 2
    assert total.low == pytest.approx(2.0) and total.high == pytest.approx(2.0)


def test_mean_is_unweighted_over_tasks_and_interval_covers_it():
    rng = np.random.default_rng(2)
    per_task = {"big": (rng.normal(1, 5, 400), np.zeros(400)), "small": (rng.normal(-1, 5, 20), np.zeros(20))}
    total, per = paired_bootstrap(per_task, resamples=1000, seed=3)
    expected = (per_task["big"][0].mean() + per_task["small"][0].mean()) / 2
    assert total.mean == pytest.approx(expected)
    assert total.low < total.mean < total.high
    # the small task dominates the width: its own interval is wider than the big one's
    assert per["small"].half_width > per["big"].half_width
    again, _ = paired_bootstrap(per_task, resamples=1000, seed=3)
    assert again == total  # seeded: same inputs, same interval


def test_coverage_is_about_95_percent():
    rng = np.random.default_rng(4)
    hits = 0
    for _ in range(200):
        a = rng.normal(0.5, 3, 60)
        iv, _ = paired_bootstrap({"t": (a, np.zeros(60))}, resamples=400, seed=int(rng.integers(1 << 30)))
        hits += iv.low <= 0.5 <= iv.high
    assert 0.88 <= hits / 200 <= 0.99


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="task x"):
        paired_bootstrap({"x": ([1.0, 2.0], [1.0])})
    with pytest.raises(ValueError, match="at least one task"):
        paired_bootstrap({})
