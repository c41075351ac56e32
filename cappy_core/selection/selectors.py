"""Selection signals beyond the paper's scorer: Rouge-L consensus (MBR) and a fused selector.

Every selector here ranks the candidates of *one* instruction; the pick is the highest value,
ties to the first candidate in decoding order (:func:`cappy_core.scorer.model.select_best`).

* **MBR** (minimum Bayes risk with Rouge-L as the utility, training-free): each candidate's mean
  Rouge-L F1 (:func:`cappy_core.labeling.rouge.rouge_l`) against the *other* candidates of the same
  instruction — the candidate the others agree with most. Needs no references and no scorer, so
  it is a baseline, not a Cappy variant. Rouge-L F1 is symmetric, so each pair is scored once.
* **Fused**: standardize each signal within the instruction (z-score over its candidates; a
  constant signal contributes 0) and add them with weights: ``Σ_s w_s · z(signal_s)``. The
  weights are chosen per task on held-out *train* instructions (:func:`fit_weights`) from a small
  fixed grid, ties to the earliest grid point (equal weights come first), so nothing is tuned on
  validation and few instructions cannot overfit many free parameters.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cappy_core.labeling.rouge import rouge_l

#: Signals a fused selector can combine (names of per-candidate values). ``length``: the candidate's
#: words (whitespace-separated), a candidate-aware feature.
CAPPY_SIGNAL, LM_SIGNAL, MBR_SIGNAL, LENGTH_SIGNAL = "cappy", "logprob_mean", "mbr", "length"
ALL_SIGNALS = (CAPPY_SIGNAL, LM_SIGNAL, MBR_SIGNAL, LENGTH_SIGNAL)
#: Weight values tried for each signal; the grid's first point is all-ones (equal weights).
WEIGHT_GRID: tuple[float, ...] = (1.0, 0.5, 2.0, 0.0)
#: Signals whose better direction is not known in advance: signed weights, 0 first (unused on a tie).
SIGNED_GRID: dict[str, tuple[float, ...]] = {LENGTH_SIGNAL: (0.0, 0.5, -0.5, 1.0, -1.0)}
#: The fused selector's file in a scorer folder.
SELECTOR_FILE = "selector.json"


def mbr_scores(texts: Sequence[str]) -> list[float]:
    """Mean Rouge-L F1 of each candidate against the other candidates (0.0 for a lone one)."""
    k = len(texts)
    if k < 2:
        return [0.0] * k
    sims = np.zeros((k, k))
    for i, j in itertools.combinations(range(k), 2):
        sims[i, j] = sims[j, i] = rouge_l(texts[i], [texts[j]])
    return list(sims.sum(axis=1) / (k - 1))


def standardize(values: Sequence[float]) -> np.ndarray:
    """z-score over one instruction's candidates; NaN → the lowest value; constant → zeros."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    finite = np.isfinite(v)
    if not finite.any():
        return np.zeros_like(v)
    v = np.where(finite, v, v[finite].min())
    sd = v.std()
    return np.zeros_like(v) if sd == 0 else (v - v.mean()) / sd


def fused_scores(signals: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> np.ndarray:
    """``Σ_s weights[s] · standardize(signals[s])`` for one instruction's candidates."""
    out = None
    for name, w in weights.items():
        if name not in signals:
            raise ValueError(f"fused selector: weight for {name!r} but no such signal (have {sorted(signals)})")
        z = w * standardize(signals[name])
        out = z if out is None else out + z
    if out is None:
        raise ValueError("fused selector: no weights")
    return out


def length_signal(texts: Sequence[str]) -> list[float]:
    """The ``length`` signal: each candidate's number of whitespace-separated words."""
    return [float(len(t.split())) for t in texts]


def fused_for_candidates(cappy: Sequence[float], logprob_mean: Sequence[float], texts: Sequence[str],
                         weights: Mapping[str, float]) -> np.ndarray:
    """The fused selector's value of each of one instruction's candidates from their Cappy scores,
    mean log-likelihoods and texts (MBR and length are computed only when they have a weight);
    serve uses this with a task's stored weights."""
    signals: dict[str, Sequence[float]] = {CAPPY_SIGNAL: cappy, LM_SIGNAL: logprob_mean}
    if weights.get(MBR_SIGNAL):
        signals[MBR_SIGNAL] = mbr_scores(texts)
    if weights.get(LENGTH_SIGNAL):
        signals[LENGTH_SIGNAL] = length_signal(texts)
    return fused_scores(signals, {k: w for k, w in weights.items() if w or k in signals})


def weight_grid(names: Sequence[str]) -> list[dict[str, float]]:
    """Every combination of :data:`WEIGHT_GRID` values (:data:`SIGNED_GRID` for a signed signal)
    over ``names``, all-zero excluded, in a fixed order that starts with equal weights (and a
    signed signal unused)."""
    grid = []
    for combo in itertools.product(*(SIGNED_GRID.get(n, WEIGHT_GRID) for n in names)):
        if any(combo):
            grid.append(dict(zip(names, combo)))
    return grid


def fit_weights(instructions: Sequence[Mapping[str, Sequence[float]]], rouges: Sequence[Sequence[float]],
                names: Sequence[str]) -> tuple[dict[str, float], float]:
    """The grid point (:func:`weight_grid`) whose fused pick has the highest mean Rouge-L over
    ``instructions`` (each a mapping signal → per-candidate values, aligned with ``rouges``);
    ties to the earliest. Returns ``(weights, mean Rouge-L of its picks)``."""
    from cappy_core.scorer.model import select_best  # torch loads only where something is scored

    if not instructions or len(instructions) != len(rouges):
        raise ValueError(f"fit_weights needs aligned, non-empty instructions and rouges "
                         f"({len(instructions)} vs {len(rouges)})")
    zs = [{n: standardize(sig[n]) for n in names} for sig in instructions]
    best, best_value = None, -np.inf
    for w in weight_grid(names):
        total = 0.0
        for z, r in zip(zs, rouges):
            fused = sum(w[n] * z[n] for n in names)
            total += r[select_best(list(fused))]
        value = total / len(zs)
        if value > best_value + 1e-12:
            best, best_value = w, value
    return dict(best), float(best_value)


def write_selector(folder: str | Path, weights: Mapping[str, float], **info: Any) -> Path:
    """Store fused weights as ``folder/selector.json`` (``{"kind": "fused", "weights": ...,
    "standardize": "within-instruction z-score", **info}``; ``info``: where they were fitted)."""
    from cappy_core.io import write_json

    path = Path(folder) / SELECTOR_FILE
    write_json(path, {"kind": "fused", "weights": dict(weights), "standardize": "within-instruction z-score",
                      **info})
    return path


def read_selector(folder: str | Path) -> dict[str, float] | None:
    """The fused weights stored in ``folder`` (:func:`write_selector`), or None when it has none."""
    path = Path(folder) / SELECTOR_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    weights = record.get("weights")
    if record.get("kind") != "fused" or not isinstance(weights, dict) or not weights:
        raise ValueError(f"{path}: not a fused selector (expected kind 'fused' and a 'weights' mapping)")
    return {str(k): float(v) for k, v in weights.items()}
