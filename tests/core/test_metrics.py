"""cappy_core.scorer.metrics: correlations against scipy.stats on seeded random data (ties, constant
input, tiny samples), the pairwise metrics against a brute-force count, and hand-computed cases."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from cappy_core.scorer import metrics


def scipy_corr(fn, x, y) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning: scipy returns NaN, as we do
        return float(fn(x, y)[0])


def same(ours: float, theirs: float) -> bool:
    if math.isnan(theirs):
        return math.isnan(ours)
    return ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def random_pairs(seed: int, n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels: continuous, heavily tied (small integer ranges, as Rouge-L labels 0/1
    and a saturated scorer give), correlated, or far from zero (numerical stability)."""
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        return rng.normal(size=n), rng.uniform(size=n)
    if kind == "ties":
        return rng.integers(0, 4, size=n).astype(float), rng.integers(0, 3, size=n) / 2
    if kind == "correlated":
        x = rng.normal(size=n)
        return x, 0.7 * x + 0.3 * rng.normal(size=n)
    if kind == "offset":
        x = rng.normal(size=n)
        return 1e6 + x, -3e5 + x ** 3 + rng.normal(size=n)
    raise ValueError(kind)


CASES = list(itertools.product(range(6), [2, 3, 7, 50, 400], ["continuous", "ties", "correlated", "offset"]))


@pytest.mark.parametrize("seed,n,kind", CASES)
def test_pearson_and_spearman_equal_scipy_on_random_data(seed, n, kind):
    x, y = random_pairs(seed, n, kind)
    assert same(metrics.pearson(x, y), scipy_corr(stats.pearsonr, x, y))
    assert same(metrics.spearman(x, y), scipy_corr(stats.spearmanr, x, y))
    # plain lists give the same as arrays; the correlations are symmetric
    assert same(metrics.pearson([float(v) for v in x], [float(v) for v in y]), metrics.pearson(x, y))
    assert same(metrics.spearman(y, x), metrics.spearman(x, y))


@pytest.mark.parametrize("seed", range(5))
def test_rankdata_equals_scipy_average_ranks(seed):
    rng = np.random.default_rng(seed)
    for x in (rng.normal(size=40), rng.integers(0, 5, size=40).astype(float), np.zeros(7), np.array([3.0])):
        assert np.array_equal(metrics.rankdata(x), stats.rankdata(x, method="average"))
    assert metrics.rankdata([]).tolist() == []


@pytest.mark.parametrize("x,y", [
    ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]),     # scores constant (an untrained head can be)
    ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]),     # labels constant
    ([2.0, 2.0], [2.0, 2.0]),               # both constant
    ([0.0] * 30, list(range(30))),
])
def test_constant_input_is_nan_like_scipy(x, y):
    assert math.isnan(metrics.pearson(x, y)) and math.isnan(scipy_corr(stats.pearsonr, x, y))
    assert math.isnan(metrics.spearman(x, y)) and math.isnan(scipy_corr(stats.spearmanr, x, y))


def test_fewer_than_two_values_is_nan_and_lengths_must_match():
    # scipy refuses n < 2; the metrics return NaN so an empty eval split reports, not crashes
    for x in ([], [1.0]):
        assert math.isnan(metrics.pearson(x, x)) and math.isnan(metrics.spearman(x, x))
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        metrics.pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        metrics.spearman([1, 2, 3], [1, 2])


@pytest.mark.parametrize("seed", range(4))
def test_mse_equals_numpy(seed):
    x, y = random_pairs(seed, 100, "continuous")
    assert metrics.mse(x, y) == pytest.approx(float(np.mean((x - y) ** 2)), rel=1e-12)


def brute_force_pairwise(scores, labels, groups) -> tuple[float, int]:
    credit, pairs = 0.0, 0
    for i, j in itertools.permutations(range(len(scores)), 2):
        if groups[i] == groups[j] and labels[i] > labels[j]:
            pairs += 1
            credit += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return credit, pairs


def brute_force_selected(scores, labels, groups) -> float:
    picked = []
    for g in dict.fromkeys(groups):
        idx = [i for i, h in enumerate(groups) if h == g]
        if len(idx) >= 2:
            best = max(idx, key=lambda i: (scores[i], -i))  # first maximum
            picked.append(labels[best])
    return float(np.mean(picked)) if picked else math.nan


@pytest.mark.parametrize("seed", range(8))
def test_pairwise_metrics_equal_a_brute_force_count(seed):
    rng = np.random.default_rng(seed)
    n = 60
    groups = [f"q{g}" for g in rng.integers(0, 12, size=n)]
    scores = [float(s) for s in rng.integers(0, 5, size=n)]  # many score ties
    labels = [float(v) for v in rng.integers(0, 4, size=n) / 3]  # many label ties
    credit, pairs = brute_force_pairwise(scores, labels, groups)
    assert metrics.pairwise_counts(scores, labels, groups) == (credit, pairs)
    assert metrics.pairwise_accuracy(scores, labels, groups) == pytest.approx(credit / pairs)
    assert metrics.selected_label(scores, labels, groups) == pytest.approx(brute_force_selected(scores, labels, groups))
    m = metrics.scorer_metrics(scores, labels, groups)
    assert m["n"] == n and m["pairs"] == pairs and same(m["spearman"], scipy_corr(stats.spearmanr, scores, labels))


# --- hand-computed cases ---------------------------------------------------------------------

def test_mse_and_pearson_by_hand():
    assert metrics.mse([1, 2, 3], [1, 1, 1]) == pytest.approx(5 / 3)
    # dx = (-1, 0, 1), dy = (-4/3, -1/3, 5/3): Σdxdy = 3, Σdx² = 2, Σdy² = 14/3
    assert metrics.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 14 / 3))
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(metrics.mse([], []))


def test_ranks_and_spearman_with_ties_by_hand():
    assert metrics.rankdata([5, 1, 5]).tolist() == [2.5, 1.0, 2.5]
    assert metrics.rankdata([3, 1, 4, 1, 5]).tolist() == [3.0, 1.5, 4.0, 1.5, 5.0]
    # ranks (1, 2, 3, 4) vs (1, 2.5, 2.5, 4): Σdxdy = 4.5, Σdx² = 5, Σdy² = 4.5
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 20, 30]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    assert metrics.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=30, unique=True))
def test_spearman_without_ties_matches_the_textbook_formula(xs):
    ys = [x ** 3 - 5 * x for x in xs]
    if len(set(ys)) < len(ys):
        return
    rx, ry = metrics.rankdata(xs), metrics.rankdata(ys)
    n = len(xs)
    textbook = 1 - 6 * float(((rx - ry) ** 2).sum()) / (n * (n * n - 1))
    assert metrics.spearman(xs, ys) == pytest.approx(textbook, abs=1e-9)


def test_pairwise_accuracy_and_selected_label_by_hand():
    groups = ["A", "A", "A", "B", "B", "C", "C", "D"]
    labels = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0, 0.3]
    scores = [0.9, 0.1, 0.9, 0.3, 0.2, 0.4, 0.4, 9.0]
    # A: (1>0) right, (1 vs 0.5) tied score → ½, (0.5>0) right; B: wrong; C: equal labels; D: alone
    assert metrics.pairwise_counts(scores, labels, groups) == (2.5, 4)
    assert metrics.pairwise_accuracy(scores, labels, groups) == pytest.approx(2.5 / 4)
    # picks: A → first 0.9 (label 1), B → 0.3 (label 0), C → first (label 1); D has one response
    assert metrics.selected_label(scores, labels, groups) == pytest.approx(2 / 3)
    m = metrics.scorer_metrics(scores, labels, groups)
    assert m["pairs"] == 4 and m["n"] == 8 and m["pairwise_acc"] == pytest.approx(0.625)
    assert math.isnan(metrics.pairwise_accuracy([1, 2], [0.5, 0.5], ["a", "a"]))
    with pytest.raises(ValueError):
        metrics.pairwise_accuracy([1, 2], [0, 1], ["a"])
