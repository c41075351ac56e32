"""How sure is a difference between two selection methods: paired bootstrap over instructions.

The sweep's metric is a mean over tasks of per-task means over instructions. To put an interval on
"method − baseline" we resample *instructions* with replacement **within each task** (so every
task keeps its weight, as in the metric), apply the same resample to both methods (paired: the
instruction-level noise they share cancels), recompute each task's mean difference and then the
unweighted mean over tasks, ``resamples`` times. The 2.5% and 97.5% quantiles of those
resampled means are the 95% interval.

Seeded (``numpy.random.default_rng(seed)``, tasks in sorted order), so the same inputs give the
same interval on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Interval:
    """A mean difference with its paired-bootstrap 95% interval (same units as the inputs)."""

    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def _diffs(a: Sequence[float], b: Sequence[float], where: str) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"{where}: paired values need two equal, non-empty 1-d arrays, got {a.shape} and {b.shape}")
    return a - b


def _resampled_means(d: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    return d[idx].mean(axis=1)


def _interval(point: float, samples: np.ndarray) -> Interval:
    low, high = np.quantile(samples, [0.025, 0.975])
    return Interval(mean=float(point), low=float(low), high=float(high))


def paired_bootstrap(per_task: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
                     ) -> tuple[Interval, dict[str, Interval]]:
    """``per_task[task] = (method_values, baseline_values)``, one value per instruction, aligned.

    Returns the interval of the mean over tasks of (method − baseline) and one interval per task.
    """
    if not per_task:
        raise ValueError("paired_bootstrap needs at least one task")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    tasks = sorted(per_task)
    per: dict[str, Interval] = {}
    total = np.zeros(resamples)
    for t in tasks:
        d = _diffs(*per_task[t], where=f"task {t}")
        samples = _resampled_means(d, resamples, rng)
        per[t] = _interval(d.mean(), samples)
        total += samples
    point = float(np.mean([per[t].mean for t in tasks]))
    return _interval(point, total / len(tasks)), per
