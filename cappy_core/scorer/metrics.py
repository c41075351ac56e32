"""How well a scorer's outputs agree with the labels of held-out (instruction, response) pairs.

All functions take plain sequences (or numpy arrays) of floats and return Python floats; numpy
only, no scipy. ``scores`` are the scorer's raw first logits, ``labels`` the regression targets
in [0, 1] (1.0 reference, 0.0 negative, Rouge-L for a sampled candidate).

* :func:`mse` — mean of ``(score - label)²``: the training objective, on held-out pairs.
* :func:`pearson` — linear correlation of scores and labels; NaN when either side is constant.
* :func:`spearman` — Pearson correlation of the *ranks*, ties getting the average of the ranks
  they span (:func:`rankdata`), so it equals ``scipy.stats.spearmanr``; NaN when either side is
  constant.
* :func:`pairwise_accuracy` — what selection needs: for every two responses *to the same
  instruction* with *different* labels, does the higher-labelled one get the higher score? A
  strictly higher score counts 1, an equal score ½ (a coin flip), a lower one 0; pairs with
  equal labels are not counted. The result is the micro average over all such pairs of all
  instructions (an instruction with k responses of distinct labels contributes k·(k−1)/2
  pairs); NaN when there is no such pair.
* :func:`selected_label` — the mean, over instructions with at least two responses, of the label
  of the response the scorer ranks first (ties to the first in input order, as selection does).
"""

from __future__ import annotations

import math
from typing import Hashable, Sequence

import numpy as np

__all__ = ["mse", "pearson", "rankdata", "spearman", "pairwise_counts", "pairwise_accuracy",
           "selected_label", "scorer_metrics"]


def _pair(scores: Sequence[float], labels: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    return s, y


def mse(scores: Sequence[float], labels: Sequence[float]) -> float:
    """Mean squared error; NaN for empty input."""
    s, y = _pair(scores, labels)
    return float(np.mean((s - y) ** 2)) if s.size else math.nan


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when fewer than 2 values or either side is constant."""
    a, b = _pair(x, y)
    if a.size < 2:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    if denom == 0.0:
        return math.nan
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share the average of the ranks they span ([5, 1, 5] → [2.5, 1, 2.5])."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    # start index of each run of equal values in sorted order
    new_run = np.empty(a.size, dtype=bool)
    if a.size:
        new_run[0] = True
        new_run[1:] = sorted_a[1:] != sorted_a[:-1]
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], a.size)  # exclusive
    avg_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = avg_rank[run_id]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation with average ranks for ties (= scipy.stats.spearmanr)."""
    a, b = _pair(x, y)
    return pearson(rankdata(a), rankdata(b))


def _groups(groups: Sequence[Hashable], n: int) -> dict[Hashable, list[int]]:
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group keys but {n} scores")
    out: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return out


def pairwise_counts(scores: Sequence[float], labels: Sequence[float],
                    groups: Sequence[Hashable]) -> tuple[float, int]:
    """``(credit, pairs)`` behind :func:`pairwise_accuracy`: credit = wins + ½·score ties."""
    s, y = _pair(scores, labels)
    credit, pairs = 0.0, 0
    for idx in _groups(groups, s.size).values():
        if len(idx) < 2:
            continue
        gs, gy = s[idx], y[idx]
        higher = gy[:, None] > gy[None, :]  # i better-labelled than j
        n = int(higher.sum())
        if not n:
            continue
        ds = gs[:, None] - gs[None, :]
        credit += float((ds > 0)[higher].sum()) + 0.5 * float((ds == 0)[higher].sum())
        pairs += n
    return credit, pairs


def pairwise_accuracy(scores: Sequence[float], labels: Sequence[float],
                      groups: Sequence[Hashable]) -> float:
    """Fraction of same-instruction, different-label pairs ordered correctly by score (module
    docstring); ``groups[i]`` is the instruction (or any key) of pair ``i``. NaN if no pairs."""
    credit, pairs = pairwise_counts(scores, labels, groups)
    return credit / pairs if pairs else math.nan


def selected_label(scores: Sequence[float], labels: Sequence[float],
                   groups: Sequence[Hashable]) -> float:
    """Mean label of the top-scored response per instruction (instructions with ≥2 responses;
    ties to the first in input order; NaN scores never win). NaN if there is no such instruction."""
    s, y = _pair(scores, labels)
    picked = []
    for idx in _groups(groups, s.size).values():
        if len(idx) < 2:
            continue
        gs = np.where(np.isnan(s[idx]), -np.inf, s[idx])
        picked.append(y[idx][int(np.argmax(gs))])  # argmax: first maximum
    return float(np.mean(picked)) if picked else math.nan


def scorer_metrics(scores: Sequence[float], labels: Sequence[float],
                   groups: Sequence[Hashable]) -> dict[str, float]:
    """Every metric above in one dict: ``n``, ``mse``, ``pearson``, ``spearman``,
    ``pairwise_acc``, ``pairs`` (how many pairs it counted), ``selected_label``."""
    s, y = _pair(scores, labels)
    credit, pairs = pairwise_counts(s, y, groups)
    return {
        "n": int(s.size),
        "mse": mse(s, y),
        "pearson": pearson(s, y),
        "spearman": spearman(s, y),
        "pairwise_acc": credit / pairs if pairs else math.nan,
        "pairs": int(pairs),
        "selected_label": selected_label(s, y, groups),
    }
