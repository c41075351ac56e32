"""Selection on tasks the scorer never saw: what the endpoint does for an instruction whose task has
no scorer of its own, and the sweep's leave-one-task-out measure of it.

**The endpoint's default selector** (:func:`fit_pooled_selector`). After a sweep, the scorer
finetuned on every task's pairs together (``<tasks_dir>/_shared/selector_scorer``, else
``_shared/scorer``) gets fused weights fitted on *all* tasks' dev instructions pooled (each task's
``dev_scored.parquet``; signals are z-scored within an instruction, so tasks pool without
rescaling), stored in its ``selector.json``. ``cappy serve --sweep OUT`` serves it for every
instruction whose task has no scorer of its own.

**Leave-one-task-out rows** (:func:`run_zero_shot`, ``cappy sweep --zero-shot``). For each task
T: the same finetune (the selector's schedule, else the scorer's, from the same init) on the
*other* tasks' pairs only, fused weights fitted on the other tasks' dev instructions pooled, then
T's candidates picked exactly as serve picks them (:func:`pick_rows`: the scorer's argmax, and
:func:`cappy_core.selection.selectors.fused_for_candidates` with those weights). Two rows per
task: ``cappy-0shot`` (the scorer alone) and ``fused-0shot``; neither reads a label of T except
to grade the pick. T's own dev instructions are graded too (``dev``), so a change to this recipe
is judged on held-out train instructions of the held-out task, never on its validation.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from cappy_core.selection.evaluation import CAPPY_0SHOT, FUSED_0SHOT, is_unlabeled
from cappy_core.selection.scored_tables import (SCORES_STAGE, SELECTOR_SCORE, SIGNALS, add_mbr, fit_fused,
                                               instruction_rows, score_table)
from cappy_core.selection.task_eval import (SHARED_DIR, TaskSettings, finetune_union, read_split_candidates,
                                            sampled_train_examples, set_device, split_dev)

if TYPE_CHECKING:
    import pyarrow as pa

#: The rows a never-seen task gets: its pick by the other tasks' scorer alone, and fused.
ZERO_SHOT_ROWS = (CAPPY_0SHOT, FUSED_0SHOT)
#: ``<tasks_dir>/_zero_shot/<task>/``: the scorer that never saw ``task`` and its result.
ZERO_SHOT_DIR = "_zero_shot"
#: The columns the fused fit reads (the Cappy signal as ``score``).
_FIT_COLUMNS = ("instruction_id", "text", "label", "score", "logprob_mean", "mbr")


def pick_rows(table: pa.Table, weights: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{instruction_id: {cappy-0shot, fused-0shot}}``: Rouge-L ×100 of each row's pick on a
    scored table (``score``, ``logprob_mean``, ``text``, ``label``), per labelled instruction, picked
    as serve picks: the highest score, and the highest
    :func:`cappy_core.selection.selectors.fused_for_candidates` value with ``weights`` (ties to
    the first candidate). Instructions with a null or NaN label are left out (they grade nothing)."""
    from cappy_core.scorer.model import select_best
    from cappy_core.selection.selectors import fused_for_candidates

    cols = table.select(["instruction_id", "text", "label", "score", "logprob_mean"]).to_pydict()
    out: dict[str, dict[str, float]] = {}
    for rows in instruction_rows(cols["instruction_id"]):
        labels = [cols["label"][i] for i in rows]
        if any(map(is_unlabeled, labels)):
            continue
        scores = [cols["score"][i] for i in rows]
        fused = fused_for_candidates(scores, [cols["logprob_mean"][i] for i in rows], [cols["text"][i] for i in rows],
                                     weights)
        out[cols["instruction_id"][rows[0]]] = {CAPPY_0SHOT: 100.0 * labels[select_best(scores)],
                                                FUSED_0SHOT: 100.0 * labels[select_best(list(fused))]}
    return out


def fit_across_tasks(tables: Sequence[pa.Table], score_column: str = "score",
                     signals: Sequence[str] = SIGNALS) -> tuple[dict[str, float], float | None, int]:
    """:func:`cappy_core.selection.scored_tables.fit_fused` over ``signals`` on several tasks' scored
    dev tables pooled (``score_column`` is the Cappy signal): ``(weights, dev Rouge-L of their picks,
    instructions)``."""
    import pyarrow as pa

    pooled = []
    for t in tables:
        if "mbr" not in t.column_names:
            t = add_mbr(t)
        cols = {c: t[score_column if c == "score" else c] for c in _FIT_COLUMNS}
        pooled.append(pa.table({c: col.cast(pa.float64()) if c in ("label", "score", "logprob_mean", "mbr")
                                else col.cast(pa.string()) for c, col in cols.items()}))
    return fit_fused(pa.concat_tables(pooled), signals)


def fit_pooled_selector(tasks_dir: str | Path, tasks: Sequence[str],
                        signals: Sequence[str] = SIGNALS) -> dict[str, Any] | None:
    """The endpoint's default selector: the shared scorer's fused weights fitted on every task's
    dev instructions pooled, written to its ``selector.json``. The shared scorer is
    ``_shared/selector_scorer`` (the tasks' dev tables hold its scores as ``selector_score``), else
    ``_shared/scorer``. Returns what was written (None: no shared scorer or no dev table)."""
    import pyarrow.parquet as pq

    from cappy_core.selection.selectors import write_selector

    shared = Path(tasks_dir) / SHARED_DIR
    for name, column in (("selector_scorer", SELECTOR_SCORE), ("scorer", "score")):
        if (shared / name / "config.json").is_file():
            break
    else:
        return None
    files = [Path(tasks_dir) / t / "dev_scored.parquet" for t in tasks]
    tables = [pq.read_table(f) for f in files if f.is_file()]
    tables = [t for t in tables if column in t.column_names]
    if not tables:
        return None
    weights, value, fitted_on = fit_across_tasks(tables, column, signals)
    info = {"scope": "all tasks' dev instructions, pooled", "tasks": len(tables), "dev_instructions": fitted_on,
            "dev_rouge": None if value is None else 100.0 * value}
    write_selector(shared / name, weights, scorer=str(shared / name), **info)
    return {"folder": str(shared / name), "weights": weights, **info}


def dev_candidates(task: str, settings: TaskSettings) -> pa.Table:
    """The task's dev instructions' candidates (the held-out train instructions, :func:`split_dev`)."""
    _, dev = split_dev(sampled_train_examples(settings.data_dir, task, settings.max_train_examples),
                       settings.dev_examples)
    return read_split_candidates(task, settings.candidates_dir, "train", dev)


def zero_shot_digest(digest: str, others: Sequence[str]) -> str:
    """The held-out finetune's record key: the sweep's settings digest and the tasks it trains on."""
    return hashlib.sha256(json.dumps([digest, sorted(others)]).encode()).hexdigest()[:16]


def run_zero_shot(task: str, tasks: Sequence[str], settings: TaskSettings, digest: str, *, use_gpu: bool = False,
                  torch_threads: int = 1) -> dict[str, Any]:
    """Task ``task`` picked by a selector that never saw it (module doc). ``settings`` are the
    sweep's own (before any shared finetune: ``init`` the scorer init). Returns and writes to
    ``<tasks_dir>/_zero_shot/<task>/result.json`` (``sweep_digest``: ``digest``, the sweep's
    settings, which the task's result record is keyed by): ``{"validation", "dev"}`` (each
    ``{instruction_id: {row: Rouge-L ×100}}``), ``weights``, ``fit`` and ``training``."""
    from cappy_core.io import write_json
    from cappy_core.scorer.model import Scorer
    from cappy_core.selection.selectors import write_selector
    from cappy_core.stage_cache import StageCache

    others = [t for t in tasks if t != task]
    schedule = settings.selector_schedule or settings.schedule
    if not others:
        raise ValueError(f"zero-shot rows for {task}: no other task to train on (the sweep has one task)")
    if schedule is None or not settings.dev_examples:
        raise ValueError("zero-shot rows need finetuning and dev instructions (dev_examples_per_task > 0)")
    home = Path(settings.tasks_dir) / ZERO_SHOT_DIR / task
    t = time.monotonic()
    folder, training = finetune_union(others, settings, schedule, "scorer", zero_shot_digest(digest, others),
                                      use_gpu=use_gpu, torch_threads=torch_threads, home=home)
    finetune_s = time.monotonic() - t
    t = time.monotonic()
    device = set_device(use_gpu, torch_threads)
    scorer = Scorer.from_pretrained(folder, dtype=settings.score_dtype, device=device, max_length=settings.max_length)
    cache = StageCache(settings.stage_cache)  # a rerun reads these scores back (cached_scores)
    weights, value, fitted_on = fit_across_tasks([score_table(scorer, dev_candidates(o, settings), cache=cache)
                                                  for o in others], signals=settings.selector_signals)
    fit = {"tasks": others, "dev_instructions": fitted_on, "dev_rouge": None if value is None else 100.0 * value}
    write_selector(folder, weights, scorer=folder, **fit)
    result = {"task": task, "sweep_digest": digest, "weights": weights, "fit": fit, "training": {k: v for k, v in training.items()
                                                                         if k != "sizes"},
              "dev": pick_rows(score_table(scorer, dev_candidates(task, settings), cache=cache), weights),
              "validation": pick_rows(score_table(scorer, read_split_candidates(task, settings.candidates_dir,
                                                                                "validation"), cache=cache), weights),
              "timings": {"finetune_s": finetune_s, "score_s": time.monotonic() - t}}
    if cache.root is not None:
        result["scores_cache"] = cache.counts(SCORES_STAGE)
    write_json(home / "result.json", result)
    return result


def merge_zero_shot(record: dict[str, Any], zero: Mapping[str, Any]) -> dict[str, Any]:
    """A task's result record with the zero-shot rows added: ``metrics`` (mean over the record's
    validation instructions), ``per_instruction`` (aligned with its ``instruction_ids``, for the
    paired intervals), ``dev_metrics`` / ``dev_per_instruction`` likewise, and ``zero_shot``
    (weights, fit, training). Raises when an instruction the record grades has no zero-shot value."""
    record = dict(record)
    for split, ids_key, per_key, metrics_key in (("validation", "instruction_ids", "per_instruction", "metrics"),
                                                 ("dev", "dev_instruction_ids", "dev_per_instruction", "dev_metrics")):
        ids, values = record.get(ids_key), zero.get(split) or {}
        if not ids or record.get(per_key) is None:
            continue
        missing = [i for i in ids if i not in values]
        if missing:
            raise ValueError(f"task {record.get('task')}: {len(missing)} {split} instruction(s) without a zero-shot "
                             f"pick (first: {missing[0]}); rerun with --redo")
        per = dict(record[per_key])
        metrics = dict(record.get(metrics_key) or {})
        for row in ZERO_SHOT_ROWS:
            per[row] = [values[i][row] for i in ids]
            metrics[row] = sum(per[row]) / len(per[row])
        record[per_key], record[metrics_key] = per, metrics
    record["zero_shot"] = {k: zero[k] for k in ("weights", "fit", "training", "timings", "scores_cache") if k in zero}
    return record


def with_zero_shot(tasks_dir: str | Path, records: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The sweep's task records with each task's zero-shot rows merged in (:func:`merge_zero_shot`)
    where ``<tasks_dir>/_zero_shot/<task>/result.json`` was recorded with the settings the
    record was (its ``key_digest``); the others as they are."""
    out = {}
    for task, rec in records.items():
        path = Path(tasks_dir) / ZERO_SHOT_DIR / task / "result.json"
        zero = None
        if rec.get("status") == "ok" and path.is_file():
            try:
                zero = json.loads(path.read_text())
            except ValueError as e:
                raise ValueError(f"{path}: not a zero-shot result ({e}); delete it and rerun with --zero-shot") from None
        out[task] = merge_zero_shot(rec, zero) if zero and zero.get("sweep_digest") == rec.get("key_digest") else rec
    return out
