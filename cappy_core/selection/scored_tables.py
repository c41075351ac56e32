"""Scored candidate tables and the fused selector's columns on them: ``score`` (and a selector
scorer's :data:`SELECTOR_SCORE`) from a scorer, ``mbr`` per instruction, the fused weights fitted
on labelled (dev) instructions and ``fused`` with them. Nothing here reads a label except
:func:`fit_fused`, which the sweep only gives dev tables. Tested in ``tests/core/test_task_eval.py``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from cappy_core.selection.selectors import CAPPY_SIGNAL, LENGTH_SIGNAL, LM_SIGNAL, MBR_SIGNAL

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from cappy_core.stage_cache import StageCache

#: The fused selector's signals (the sweep's default ``selector_signals``; ``length`` joined them on
#: the held-out tasks' dev comparison README quotes) and the scored-table column each is read from
#: (``length`` is computed from ``text``).
SIGNALS = (CAPPY_SIGNAL, LM_SIGNAL, MBR_SIGNAL, LENGTH_SIGNAL)
SIGNAL_COLUMNS = {CAPPY_SIGNAL: "score", LM_SIGNAL: "logprob_mean", MBR_SIGNAL: "mbr", LENGTH_SIGNAL: "text"}
#: The selector scorer's column: when a table has it, it is the fused selector's Cappy signal.
SELECTOR_SCORE = "selector_score"


#: The stage-cache stage of scored tables (:func:`cached_scores`).
SCORES_STAGE = "scores"


def cached_scores(scorer: Any, table: pa.Table, cache: StageCache | None = None) -> list[float]:
    """The scorer's score of each (instruction, text) row of ``table``. With ``cache`` (a
    :class:`cappy_core.stage_cache.StageCache` that is on), the scores an earlier run computed
    with the same scorer (:meth:`cappy_core.scorer.model.Scorer.fingerprint`: weights, length,
    dtype) on the same pairs (the rows' instruction and text) are read back from its ``scores``
    stage instead, and new ones are kept there: a rerun rescores nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cappy_core.stage_cache import table_fingerprint

    instructions, texts = table["instruction"].to_pylist(), table["text"].to_pylist()
    if cache is None or cache.root is None:
        return scorer.score(instructions, texts)
    key = {"scorer": scorer.fingerprint(), "pairs": table_fingerprint(table, ["instruction", "text"])}
    hit = cache.lookup(SCORES_STAGE, key, mark_used=False)  # a reuse once read whole
    if hit is not None:
        try:
            scores = pq.read_table(hit / "scores.parquet")["score"].to_pylist()
        except (OSError, KeyError, pa.ArrowException):  # unreadable, or no score column
            scores = None
        if scores is not None and len(scores) == table.num_rows:
            cache.mark_reused(SCORES_STAGE, hit)
            return scores
        # a damaged entry: recomputed and replaced below
    scores = scorer.score(instructions, texts)
    try:
        with cache.fill(SCORES_STAGE, key) as tmp:
            pq.write_table(pa.table({"score": pa.array(scores, pa.float64())}), tmp / "scores.parquet")
    except OSError as e:  # a full or read-only cache costs the reuse, not these scores
        logging.getLogger(__name__).warning("stage cache: scores not kept (%s)", e)
    return scores


def score_table(scorer: Any, table: pa.Table, column: str = "score", cache: StageCache | None = None) -> pa.Table:
    """``table`` (candidate rows) with ``column`` appended: the scorer's score of each
    (instruction, text), through ``cache`` when given (:func:`cached_scores`)."""
    import pyarrow as pa

    return table.append_column(column, pa.array(cached_scores(scorer, table, cache), pa.float64()))


def signal_column(table: pa.Table, name: str) -> str:
    """The column the fused selector reads signal ``name`` from: :data:`SIGNAL_COLUMNS`, except
    that the Cappy signal is :data:`SELECTOR_SCORE` when the table has it."""
    if name == CAPPY_SIGNAL and SELECTOR_SCORE in table.column_names:
        return SELECTOR_SCORE
    return SIGNAL_COLUMNS[name]


def signal_values(table: pa.Table, name: str) -> np.ndarray:
    """Signal ``name`` of every row (:func:`signal_column`; ``length`` from the texts)."""
    import numpy as np

    from cappy_core.selection.selectors import length_signal

    column = table[signal_column(table, name)].to_pylist()
    return np.asarray(length_signal(column) if name == LENGTH_SIGNAL else column, dtype=np.float64)


def score_with(scorer: Any, selector: Any | None, table: pa.Table, cache: StageCache | None = None) -> pa.Table:
    """``table`` with ``score`` and, given a selector scorer, :data:`SELECTOR_SCORE` (:func:`score_table`)."""
    table = score_table(scorer, table, cache=cache)
    return table if selector is None else score_table(selector, table, SELECTOR_SCORE, cache)


def instruction_rows(instruction_ids: Sequence[str]) -> list[list[int]]:
    """Row indices of each instruction, in first-appearance order (rows in file order)."""
    rows: dict[str, list[int]] = {}
    for i, iid in enumerate(instruction_ids):
        rows.setdefault(iid, []).append(i)
    return list(rows.values())


def add_mbr(table: pa.Table) -> pa.Table:
    """``table`` (candidate rows) with ``mbr`` appended: :func:`cappy_core.selection.selectors.mbr_scores`
    of each instruction's ``text`` (reads no label)."""
    import numpy as np
    import pyarrow as pa

    from cappy_core.selection.selectors import mbr_scores

    texts = table["text"].to_pylist()
    mbr = np.zeros(table.num_rows)
    for rows in instruction_rows(table["instruction_id"].to_pylist()):
        mbr[rows] = mbr_scores([texts[i] for i in rows])
    return table.append_column("mbr", pa.array(mbr, pa.float64()))


def add_fused(table: pa.Table, weights: Mapping[str, float]) -> pa.Table:
    """``table`` (scored, with ``mbr``) with ``fused`` appended: :func:`cappy_core.selection.selectors.fused_scores`
    of the weighted :data:`SIGNALS` per instruction (reads no label)."""
    import numpy as np
    import pyarrow as pa

    from cappy_core.selection.selectors import fused_scores

    cols = {name: signal_values(table, name) for name in weights}
    fused = np.zeros(table.num_rows)
    for rows in instruction_rows(table["instruction_id"].to_pylist()):
        fused[rows] = fused_scores({name: col[rows] for name, col in cols.items()}, weights)
    return table.append_column("fused", pa.array(fused, pa.float64()))


def with_selector_columns(table: pa.Table, weights: Mapping[str, float] | None = None) -> pa.Table:
    """A scored candidate table with ``mbr`` (:func:`add_mbr`) and, given ``weights``, ``fused``
    (:func:`add_fused`) appended. Reads ``instruction_id``, ``text``, ``score`` and
    ``logprob_mean`` (and :data:`SELECTOR_SCORE` when there): never a label."""
    table = add_mbr(table)
    return table if weights is None else add_fused(table, weights)


def fit_fused(table: pa.Table, signals: Sequence[str] = SIGNALS) -> tuple[dict[str, float], float | None, int]:
    """The fused weights fitted on the labelled instructions of a scored table with ``mbr``
    (:func:`cappy_core.selection.selectors.fit_weights` over ``signals``): ``(weights, mean Rouge-L
    of their picks, instructions)``; an instruction with a null or NaN label is left out. No
    labelled instruction: the grid's first point, ``None``, 0."""
    from cappy_core.selection.evaluation import is_unlabeled
    from cappy_core.selection.selectors import fit_weights, weight_grid

    signals = tuple(signals)
    labels = table["label"].to_pylist()
    cols = {name: signal_values(table, name) for name in signals}
    instructions, rouges = [], []
    for rows in instruction_rows(table["instruction_id"].to_pylist()):
        if any(is_unlabeled(labels[i]) for i in rows):  # null or NaN: no references, nothing to fit
            continue
        instructions.append({name: col[rows] for name, col in cols.items()})
        rouges.append([labels[i] for i in rows])
    if not instructions:
        return weight_grid(signals)[0], None, 0
    weights, value = fit_weights(instructions, rouges, signals)
    return weights, value, len(instructions)
