"""The one argmax rule of selection: :func:`select_best` (one instruction's candidates) and
:func:`select_best_grouped` (many instructions' candidates, flattened). Serve, ``cappy score``
and evaluation's picks all choose with it, so ties and NaN are decided the same way everywhere.

Separate from :mod:`cappy_core.scorer.model` because choosing from scores needs no model or torch.
Tested in ``tests/core/test_scorer.py``.
"""

from __future__ import annotations

import math
from typing import Sequence


def select_best(scores: Sequence[float]) -> int:
    """Index of the highest score: the one argmax rule of selection (serve, ``cappy score``,
    evaluation's picks). Ties go to the first (decoding order); NaN never wins over a number.
    Empty, or every score NaN (nothing to compare) → ``ValueError``."""
    if len(scores) == 0:
        raise ValueError("select_best: no candidates to choose from (empty score list)")
    best_i, best = -1, None
    for i, s in enumerate(scores):
        s = float(s)
        if math.isnan(s):
            continue
        if best is None or s > best:
            best_i, best = i, s
    if best is None:
        raise ValueError(f"select_best: every one of the {len(scores)} scores is NaN; nothing to choose")
    return best_i


def rank_best(scores: Sequence[float], k: int | None = None) -> list[int]:
    """The ``k`` best indices (all when None), best first, by the rule of :func:`select_best`:
    ties in decoding order, NaN last; ``rank_best(s, 1) == [select_best(s)]``."""
    best = select_best(scores)  # the same errors for empty and all-NaN lists
    values = [float(s) for s in scores]
    order = sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -values[i] if not math.isnan(values[i])
                                                      else 0.0, i))
    assert order[0] == best
    return order if k is None else order[:k]


def select_best_grouped(scores: Sequence[float], group_sizes: Sequence[int]) -> list[int]:
    """:func:`select_best` within consecutive groups of ``scores``; indices are group-local.

    ``scores`` is the flat concatenation of each group's candidate scores (e.g. 17 candidates
    per instruction); ``group_sizes`` must sum to ``len(scores)`` and each must be ≥ 1.
    """
    sizes = [int(n) for n in group_sizes]
    if any(n < 1 for n in sizes):
        raise ValueError(f"select_best_grouped: every group needs ≥1 candidate, got sizes {sizes}")
    if sum(sizes) != len(scores):
        raise ValueError(
            f"select_best_grouped: group sizes sum to {sum(sizes)} but there are {len(scores)} scores")
    out, start = [], 0
    for n in sizes:
        out.append(select_best(scores[start:start + n]))
        start += n
    return out

