"""Selection at lower cost: Rouge-L against the number of candidates generated, and a rule that
stops generating when the selector is sure enough.

**Order of generation.** An instruction's candidates are taken in the order a caller asking for
k of them would get them (:func:`generation_order`): beam4 first, then one sample of each sampling
decoding in turn (``sample``, ``temp0.9``, ``topk40``, ``topp0.95``), then the second of each, and
so on. With k candidates every method picks among the first k: ``beam4`` (always the first),
``mbr`` (consensus among those k), ``cappy`` (the scorer's argmax) and ``cappy+lm+mbr`` (the task's
fused weights, z-scored over those k, MBR recomputed on them: what serve computes for k
candidates, :func:`cappy_core.selection.selectors.fused_for_candidates`).

**Adaptive rule** (:func:`adaptive_picks` on a sweep's tables; serve's ``adaptive`` requests
generate by :func:`cappy_core.selection.adaptive.adaptive_rounds`). Generate the candidates in
rounds of the curve's k (1, 2, 4, 8, 17); after each round from 2 on, stop when the fused value's
margin between the best and second-best candidate (:func:`~cappy_core.selection.adaptive.margin`:
per unit of weight, so in within-instruction standard deviations of the signals) is at least
``tau``. ``tau`` is fitted on dev (:func:`fit_tau`): the grid value with the fewest candidates on average whose
dev Rouge-L is within ``tolerance`` points of the fused pick from every candidate. Validation is
only graded.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from cappy_core.generation.decoding import PAPER_DECODING_NAMES
from cappy_core.selection.adaptive import COUNTS, margin
from cappy_core.selection.evaluation import CAPPY, FUSED, MBR, is_unlabeled
from cappy_core.selection.scored_tables import SELECTOR_SCORE, instruction_rows

if TYPE_CHECKING:
    import pyarrow as pa

#: The rows of the curve: the LLM alone, consensus, the scorer and the fused selector.
CURVE_METHODS = ("beam4", MBR, CAPPY, FUSED)
#: Margins (:func:`margin`) the adaptive rule's ``tau`` is chosen from; inf: never stop early.
TAU_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, math.inf)


def generation_order(decodings: Sequence[str], sample_idx: Sequence[int]) -> list[int]:
    """Row indices of one instruction's candidates in generation order (module doc): by sample
    index, then by decoding in :data:`PAPER_DECODING_NAMES` order (others after, by name)."""
    rank = {d: i for i, d in enumerate(PAPER_DECODING_NAMES)}
    return sorted(range(len(decodings)), key=lambda i: (sample_idx[i], rank.get(decodings[i], len(rank)),
                                                        decodings[i]))


def _instructions(table: pa.Table) -> list[dict[str, Any]]:
    """Per labelled instruction, its candidates in generation order: text, label, score (the
    fused selector's Cappy signal: ``selector_score`` when there), the paper scorer's score, and
    mean log-likelihood."""
    names = table.column_names
    cols = table.select(["instruction_id", "decoding", "sample_idx", "text", "label", "score", "logprob_mean"]
                        + ([SELECTOR_SCORE] if SELECTOR_SCORE in names else [])).to_pydict()
    out = []
    for rows in instruction_rows(cols["instruction_id"]):
        rows = [rows[i] for i in generation_order([cols["decoding"][r] for r in rows],
                                                  [cols["sample_idx"][r] for r in rows])]
        labels = [cols["label"][r] for r in rows]
        if any(map(is_unlabeled, labels)):
            continue
        signal = cols[SELECTOR_SCORE] if SELECTOR_SCORE in cols else cols["score"]
        out.append({"id": cols["instruction_id"][rows[0]], "label": np.array(labels), "pos": rows,
                    "text": [cols["text"][r] for r in rows], "score": [cols["score"][r] for r in rows],
                    "signal": [signal[r] for r in rows], "lm": [cols["logprob_mean"][r] for r in rows],
                    "beam": next((i for i, r in enumerate(rows) if cols["decoding"][r] == "beam4"
                                  and cols["sample_idx"][r] == 0), 0)})
    return out


def _fused(ins: Mapping[str, Any], k: int, weights: Mapping[str, float]) -> np.ndarray:
    from cappy_core.selection.selectors import fused_for_candidates

    return np.asarray(fused_for_candidates(ins["signal"][:k], ins["lm"][:k], ins["text"][:k], weights))


def _best(values: Sequence[float], ins: Mapping[str, Any]) -> int:
    """:func:`cappy_core.scorer.model.select_best` over the first ``len(values)`` candidates, ties
    to the one first in the table's (decoding) order, as the sweep's own picks break them."""
    from cappy_core.scorer.model import select_best

    by_file = sorted(range(len(values)), key=lambda i: ins["pos"][i])
    return by_file[select_best([values[i] for i in by_file])]


def _pick(method: str, ins: Mapping[str, Any], k: int, weights: Mapping[str, float]) -> int:
    from cappy_core.selection.selectors import mbr_scores

    if method == "beam4":
        return ins["beam"] if ins["beam"] < k else 0
    if method == MBR:
        return _best(mbr_scores(ins["text"][:k]), ins)
    if method == CAPPY:
        return _best(ins["score"][:k], ins)
    return _best(list(_fused(ins, k, weights)), ins)


def curve(table: pa.Table, weights: Mapping[str, float], counts: Sequence[int] = COUNTS) -> dict[str, dict[int, list[float]]]:
    """``{method: {k: [Rouge-L ×100 of its pick among the first k candidates, per instruction]}}``
    for :data:`CURVE_METHODS` (labelled instructions; k capped at each instruction's count)."""
    out: dict[str, dict[int, list[float]]] = {m: {k: [] for k in counts} for m in CURVE_METHODS}
    for ins in _instructions(table):
        for k in counts:
            kk = min(k, len(ins["text"]))
            for m in CURVE_METHODS:
                out[m][k].append(100.0 * float(ins["label"][_pick(m, ins, kk, weights)]))
    return out


def rounds(table: pa.Table, weights: Mapping[str, float],
           counts: Sequence[int] = COUNTS) -> list[list[tuple[int, float, float]]]:
    """Per labelled instruction, each round of the adaptive rule as ``(k, Rouge-L ×100 of the fused
    pick among the first k, its margin)``: computed once, whatever ``tau`` then reads them."""
    out = []
    for ins in _instructions(table):
        n, steps = len(ins["text"]), []
        for k in dict.fromkeys(min(k, n) for k in counts):
            if k == 1:  # one candidate: beam4 alone, no margin yet
                steps.append((1, 100.0 * float(ins["label"][0]), -math.inf))
                continue
            fused = _fused(ins, k, weights)
            steps.append((k, 100.0 * float(ins["label"][_best(list(fused), ins)]), margin(fused, weights)))
        out.append(steps)
    return out


def _stop(steps: Sequence[tuple[int, float, float]], tau: float) -> tuple[float, int]:
    """``(Rouge-L, candidates)`` where the rule with threshold ``tau`` stops: the first round whose
    margin reaches it, else the last."""
    for k, value, m in steps:
        if m >= tau:
            return value, k
    return steps[-1][1], steps[-1][0]


def adaptive_picks(table: pa.Table, weights: Mapping[str, float], tau: float,
                   counts: Sequence[int] = COUNTS) -> tuple[list[float], list[int]]:
    """The adaptive rule with threshold ``tau`` (module doc): per labelled instruction, the
    Rouge-L ×100 of its fused pick and the number of candidates it generated."""
    stops = [_stop(steps, tau) for steps in rounds(table, weights, counts)]
    return [v for v, _ in stops], [k for _, k in stops]


def fit_tau(dev_tables: Sequence[tuple[pa.Table, Mapping[str, float]]], tolerance: float = 0.5,
            counts: Sequence[int] = COUNTS) -> dict[str, Any]:
    """``tau`` fitted on dev (``[(dev table, that task's fused weights)]``): the :data:`TAU_GRID`
    value with the fewest candidates on average (over the tasks' mean) whose mean dev Rouge-L is
    at least the all-candidates fused pick's minus ``tolerance``; ``inf`` (never stop early) when
    none is. Returns ``{"tau", "dev_rouge", "dev_full", "dev_candidates"}``."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 Rouge-L points, got {tolerance}")
    per_task = [rounds(t, w, counts) for t, w in dev_tables]

    def mean_over_tasks(tau: float) -> tuple[float, float]:
        stops = [[_stop(steps, tau) for steps in task] for task in per_task]
        return (float(np.mean([np.mean([v for v, _ in s]) for s in stops])),
                float(np.mean([np.mean([k for _, k in s]) for s in stops])))

    full = mean_over_tasks(math.inf)[0]
    best = None
    for tau in TAU_GRID:
        rouge, cands = mean_over_tasks(tau)
        if rouge >= full - tolerance and (best is None or cands < best["dev_candidates"]):
            best = {"tau": tau, "dev_rouge": rouge, "dev_full": full, "dev_candidates": cands}
    return best
