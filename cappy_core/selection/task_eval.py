"""One task of the sweep, whole: finetune a scorer on the task's pairs, score its held-out train
("dev") and validation candidates, fit the fused selector on dev, evaluate every method on
validation. Plain Python: ``jobs/sweep.py`` runs :func:`run_task` as one Ray task per BIG-Bench
task (and :func:`finetune_shared` / :func:`finetune_shared_selector` once before them with
``finetune_scope: all`` / ``selector_scope: all``).

Inputs, written by the sweep's earlier stages (:class:`TaskSettings` says where):

* ``data_dir/<task>/train.parquet``: the task's train examples (``cappy data prepare``);
* ``candidates_dir/train`` and ``candidates_dir/validation``: sampled, Rouge-L-labelled
  candidates (``cappy sample``; ``train/`` only when finetuning or holding out dev).

Instructions. The sampled train instructions are the first ``max_train_examples`` of the train
split. The last ``dev_examples`` of them are **dev** (:func:`split_dev`): they give no finetuning
pair (no reference, negative or candidate of theirs, nor of a train example with the same
instruction text), and every choice made after finetuning is made on them. Validation labels
are read only by the final evaluation.

Steps: the train pairs (references, random negatives and the labelled candidates of the other
train instructions, :func:`cappy_core.labeling.pair_mixture.build_pair_mixture`, cut or tiled to
``train_size``) → ``tasks_dir/<task>/train_pairs.parquet`` → :func:`cappy_core.scorer.training.fit_scorer`
from ``init`` with the :class:`ScorerSchedule` (its loss, batches and precision); the finetuned
scorer then scores in ``score_dtype`` (bf16 autocast only when that says ``bfloat16``). Without
a schedule the ``init`` scorer scores as is. With a ``selector_schedule`` (``selector_loss:
listwise``) a second scorer is finetuned from ``init`` on the same pairs with that loss; it scores
every candidate too (``selector_score``) and is the fused selector's Cappy signal, while the
``cappy`` row stays the first (the paper's) scorer; with ``selector_scope: all`` that selector
scorer is instead finetuned once, before the tasks, on every task's pairs together
(:func:`finetune_shared_selector`, the paper's multi-task step) and each task scores with it
(``selector_init``). Then:

* **dev** candidates: ``score`` (the scorer), ``mbr`` (:func:`cappy_core.selection.selectors.mbr_scores`
  per instruction over ``text``) → the fused weights, :func:`cappy_core.selection.selectors.fit_weights`
  over :data:`cappy_core.selection.scored_tables.SIGNALS` on the labelled dev instructions (equal weights when there is none) →
  ``fused`` → ``tasks_dir/<task>/dev_scored.parquet`` and every method's Rouge-L on dev
  (``dev_metrics``; ``cappy+lm+mbr`` there is in-sample);
* **validation** candidates: ``score``, ``mbr`` and ``fused`` with the dev weights (no label is
  read: :func:`cappy_core.selection.scored_tables.with_selector_columns`) → ``tasks_dir/<task>/validation_scored.parquet`` →
  :func:`cappy_core.selection.evaluation.evaluate_task`, per-instruction values and rankers' Spearman.

With ``keep_scorer`` the finetuned scorer is saved under ``tasks_dir/<task>/scorer`` with the
fused weights in it (:data:`cappy_core.selection.selectors.SELECTOR_FILE`), for serve, and, once
validation is evaluated, the Cappy pick's Rouge-L in its ``cappy.json`` and model card
(``model-index``: :func:`cappy_core.scorer.checkpoint.record_evaluation`); a task with a
selector scorer of its own saves that one too, under ``tasks_dir/<task>/selector_scorer``, and the
weights go there, since they are fitted on its scores; a task scored by the shared scorer,
``tasks_dir/_shared/scorer``, keeps its weights in ``tasks_dir/<task>``.

The sweep's bookkeeping of finished tasks (each task's ``tasks_dir/<task>.json``) is
:mod:`cappy_core.selection.task_results`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from cappy_core.selection.scored_tables import (SCORES_STAGE, SIGNALS, add_fused, add_mbr, fit_fused, score_with,
                                               with_selector_columns)

if TYPE_CHECKING:  # torch and pyarrow load only where a task runs
    import pyarrow as pa

    from cappy_core.data.records import Example
    from cappy_core.scorer.schedule import ScorerSchedule

#: Where :func:`finetune_shared` / :func:`finetune_shared_selector` keep the scorers finetuned on
#: every task: ``<tasks_dir>/_shared``.
SHARED_DIR = "_shared"


@dataclass(frozen=True)
class TaskSettings:
    """What every task of one sweep shares: where its inputs are and how to train and score."""

    data_dir: str  # prepared BIG-Bench Parquet: <data_dir>/<task>/<split>.parquet
    candidates_dir: str  # sampled candidates: <candidates_dir>/{train,validation}
    tasks_dir: str  # each task's files go under <tasks_dir>/<task>/
    init: str  # the scorer to start from: a folder, a hub id or "minilm"
    max_length: int  # scorer pair truncation length in tokens
    schedule: Optional[ScorerSchedule] = None  # how to finetune; None: score with init as is
    train_size: int = 512  # finetuning pairs (cut or tiled)
    max_train_examples: Optional[int] = None  # the train instructions that were sampled (None: all)
    score_dtype: str = "float32"  # "bfloat16": score under bf16 autocast
    keep_scorer: bool = False  # save the finetuned scorer under <tasks_dir>/<task>/scorer
    dev_examples: int = 0  # the last N sampled train instructions: held out, fit the fused selector
    finetune_scope: str = "task"  # "all": finetune_shared makes one scorer for every task
    shared_training: Optional[dict] = None  # finetune_shared's record: init is that shared scorer
    selector_schedule: Optional[ScorerSchedule] = None  # the fused selector's own scorer; None: schedule's
    selector_init: Optional[str] = None  # a selector scorer shared by every task (finetune_shared_selector)
    shared_selector_training: Optional[dict] = None  # finetune_shared_selector's record
    stage_cache: Optional[str] = None  # finetunes reused from / kept in this stage cache; None: off
    selector_signals: tuple[str, ...] = SIGNALS  # what the fused selector weighs (fit_fused)


# --- instructions and pairs ------------------------------------------------------------------

def split_dev(examples: Sequence[Example], dev_examples: int) -> tuple[list[Example], list[Example]]:
    """``(train, dev)``: the last ``dev_examples`` of the sampled train examples are dev; a train
    example whose instruction text is a dev instruction's is dropped (it would leak its pairs)."""
    examples = list(examples)
    if dev_examples <= 0:
        return examples, []
    if dev_examples >= len(examples):
        raise ValueError(f"{dev_examples} dev instruction(s) leave none of the {len(examples)} sampled "
                         "train instructions to finetune on")
    train, dev = examples[:-dev_examples], examples[-dev_examples:]
    texts = {e.instruction for e in dev}
    return [e for e in train if e.instruction not in texts], dev


def sampled_train_examples(data_dir: str | Path, task: str, max_train_examples: int | None) -> list[Example]:
    """The task's train examples that were sampled: the first ``max_train_examples`` (None: all)."""
    from cappy_core.data.records import read_examples, split_path

    examples = read_examples(split_path(data_dir, task, "train"))
    return examples if max_train_examples is None else examples[:max_train_examples]


def train_pairs(task: str, *, data_dir: str | Path, candidates_dir: str | Path, max_train_examples: int | None,
                train_size: int | None, seed: int, dev_examples: int = 0) -> tuple[list, dict[str, int]]:
    """The task's finetuning pairs (dev instructions held out, :func:`split_dev`), cut or tiled
    to ``train_size`` (None: as built), and their sizes."""
    from cappy_core.labeling.pair_mixture import build_pair_mixture, read_samples, tile

    examples, dev = split_dev(sampled_train_examples(data_dir, task, max_train_examples), dev_examples)
    cands = read_samples(Path(candidates_dir) / "train", tasks=[task], splits=["train"])
    built, _ = build_pair_mixture(examples, cands, train_size=None, eval_size=0, seed=seed)
    pairs = tile(built, train_size)
    return pairs, {"train_examples": len(examples), "dev_instructions": len(dev),
                   "train_candidates": sum(len(cands.for_example(e)) for e in examples),
                   "train_pairs_built": len(built), "train_pairs": len(pairs)}


# --- finetuning ------------------------------------------------------------------------------

def finetune(init: str, pairs_file: str | Path, schedule: ScorerSchedule, *, max_length: int,
             device: str, score_dtype: str = "float32") -> tuple[Any, dict[str, float]]:
    """A scorer from ``init`` finetuned in this process on the pair file; ``(scorer, info)``
    with the update count, pairs seen, samples/s and the mean loss of the first and last tenth
    of updates. It trains under bf16 autocast when ``schedule.bf16`` and then scores in
    ``score_dtype``."""
    from cappy_core.labeling.pair_mixture import read_pair_columns
    from cappy_core.scorer.model import Scorer
    from cappy_core.scorer.training import Throughput, fit_scorer

    scorer = Scorer.from_pretrained(init, dtype="bfloat16" if schedule.bf16 else "float32", device=device,
                                    max_length=max_length, allow_pickle=False, seed=schedule.seed,
                                    for_training=True)
    meter, rate = Throughput(1), [0.0]
    state = fit_scorer(scorer, read_pair_columns(pairs_file), schedule, device=device,
                       on_update=lambda info: rate.__setitem__(0, meter.tick(info.samples)))
    scorer.dtype = score_dtype  # training's autocast is fit_scorer's; scoring follows score_dtype
    k = max(1, len(state.losses) // 10)
    return scorer, {"updates": state.update, "pairs": state.samples, "samples_per_s": rate[0],
                    "loss_first_tenth": sum(state.losses[:k]) / k, "loss_last_tenth": sum(state.losses[-k:]) / k}


def finetune_key(settings: TaskSettings, pairs_fingerprint: str, schedule: ScorerSchedule) -> dict[str, Any]:
    """What a finetune's output depends on: the init's weights, the pairs' rows, the schedule, the length."""
    from cappy_core.stage_cache import folder_fingerprint

    return {"init": folder_fingerprint(settings.init), "pairs": pairs_fingerprint,
            "schedule": dataclasses.asdict(schedule), "max_length": settings.max_length}


def cached_finetune(settings: TaskSettings, pairs_file: str | Path, schedule: ScorerSchedule, *,
                    device: str) -> tuple[Any, dict[str, Any]]:
    """:func:`finetune` through the stage cache (``settings.stage_cache``): an earlier finetune of
    the same scorer init (its weights' fingerprint) on the same pairs (their rows) with the same
    schedule and length is loaded instead of trained again. The info says which:
    ``"cache": "reused KEY"`` or ``"stored KEY"``."""
    from cappy_core.io import write_json
    from cappy_core.scorer.model import Scorer
    from cappy_core.stage_cache import StageCache, table_fingerprint

    cache = StageCache(settings.stage_cache)
    if cache.root is None:
        return finetune(settings.init, pairs_file, schedule, max_length=settings.max_length, device=device,
                        score_dtype=settings.score_dtype)
    key = finetune_key(settings, table_fingerprint(pairs_file), schedule)
    hit = cache.lookup("finetune", key)
    if hit is not None:  # loaded as finetune leaves it: training dtype, then scoring in score_dtype
        scorer = Scorer.from_pretrained(hit, dtype="bfloat16" if schedule.bf16 else "float32", device=device,
                                        max_length=settings.max_length)
        scorer.dtype = settings.score_dtype
        return scorer, {**json.loads((hit / "training.json").read_text()), "cache": f"reused {hit.name}"}
    scorer, info = finetune(settings.init, pairs_file, schedule, max_length=settings.max_length, device=device,
                            score_dtype=settings.score_dtype)
    with cache.fill("finetune", key) as tmp:
        scorer.save_pretrained(tmp)
        write_json(tmp / "training.json", info)
    return scorer, {**info, "cache": f"stored {cache.path('finetune', key).name}"}


def set_device(use_gpu: bool, torch_threads: int) -> str:
    """``"cuda"`` when asked and present, else ``"cpu"`` with ``torch_threads`` threads."""
    import torch

    from cappy_core.scorer.model import quiet_transformers

    quiet_transformers()  # load reports and progress bars, once per task process
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(torch_threads)
    return device


def finetune_union(tasks: Sequence[str], settings: TaskSettings, schedule: ScorerSchedule, name: str,
                   digest: str, *, use_gpu: bool, torch_threads: int,
                   home: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """One scorer from ``settings.init`` finetuned with ``schedule`` on the union of ``tasks``'
    train pairs, each task's cut or tiled to ``train_size`` as its own finetune would see them
    (dev held out), shuffled; saved as ``<home>/<name>`` (``home``: ``<tasks_dir>/_shared``) beside
    its pairs and record (``train_pairs.parquet`` and ``training.json``, prefixed ``selector_`` for
    the selector scorer). Kept and reused while the record's ``digest`` matches. ``(folder, record)``."""
    from cappy_core.io import atomic_dir, write_json
    from cappy_core.labeling.pair_mixture import write_pairs

    shared = Path(home) if home is not None else Path(settings.tasks_dir) / SHARED_DIR
    prefix = "" if name == "scorer" else name.removesuffix("scorer")
    folder, record_file = shared / name, shared / f"{prefix}training.json"
    if record_file.is_file() and folder.is_dir():
        record = json.loads(record_file.read_text())
        if record.get("digest") == digest:
            return str(folder), record
    device = set_device(use_gpu, torch_threads)
    t = time.monotonic()
    union: list = []
    sizes: dict[str, dict] = {}
    for task in sorted(tasks):
        pairs, sizes[task] = train_pairs(task, data_dir=settings.data_dir, candidates_dir=settings.candidates_dir,
                                         max_train_examples=settings.max_train_examples,
                                         train_size=settings.train_size, seed=schedule.seed,
                                         dev_examples=settings.dev_examples)
        union += pairs
    random.Random(schedule.seed).shuffle(union)
    shared.mkdir(parents=True, exist_ok=True)
    pairs_file = write_pairs(union, shared / f"{prefix}train_pairs.parquet")
    pairs_s = time.monotonic() - t
    t = time.monotonic()
    scorer, info = cached_finetune(settings, pairs_file, schedule, device=device)
    with atomic_dir(folder) as tmp:
        scorer.save_pretrained(tmp)
    record = {"digest": digest, "scope": "all", "tasks": sorted(tasks), "train_pairs": len(union),
              "sizes": sizes, **info, "loss": schedule.loss, "pairs_s": pairs_s,
              "finetune_s": time.monotonic() - t}
    write_json(record_file, record)
    return str(folder), record


def finetune_shared(tasks: Sequence[str], settings: TaskSettings, digest: str, *, use_gpu: bool = False,
                    torch_threads: int = 1) -> TaskSettings:
    """``finetune_scope: all``: one scorer for every task (:func:`finetune_union` with the
    schedule), ``<tasks_dir>/_shared/scorer``. Returns the settings that score every task with it
    (``init`` that folder, no schedule, ``shared_training`` its record)."""
    if settings.schedule is None:
        raise ValueError("finetune_shared needs a schedule")
    folder, record = finetune_union(tasks, settings, settings.schedule, "scorer", digest, use_gpu=use_gpu,
                                     torch_threads=torch_threads)
    return dataclasses.replace(settings, init=folder, schedule=None, shared_training=record)


def finetune_shared_selector(tasks: Sequence[str], settings: TaskSettings, digest: str, *, use_gpu: bool = False,
                             torch_threads: int = 1) -> TaskSettings:
    """``selector_scope: all``: one selector scorer for every task (:func:`finetune_union` with
    the selector schedule: the paper's multi-task step, for the fused selector's Cappy signal),
    ``<tasks_dir>/_shared/selector_scorer``. Returns the settings whose tasks score with it
    (``selector_init`` that folder, no selector schedule, ``shared_selector_training`` its record)."""
    if settings.selector_schedule is None:
        raise ValueError("finetune_shared_selector needs a selector schedule")
    folder, record = finetune_union(tasks, settings, settings.selector_schedule, "selector_scorer", digest,
                                     use_gpu=use_gpu, torch_threads=torch_threads)
    return dataclasses.replace(settings, selector_init=folder, selector_schedule=None,
                               shared_selector_training=record)


def record_shared_evaluation(tasks_dir: str | Path, records: dict[str, dict]) -> list[str]:
    """A sweep's end: the shared scorers (``<tasks_dir>/_shared/{scorer,selector_scorer}``) get each
    finished task's validation Rouge-L of the row they pick for (``cappy``, ``cappy+lm+mbr``) in
    their ``cappy.json`` and model card. Returns the folders written."""
    from cappy_core.scorer.checkpoint import CAPPY_JSON, record_evaluation
    from cappy_core.selection.evaluation import CAPPY, FUSED

    written = []
    for folder, method in (("scorer", CAPPY), ("selector_scorer", FUSED)):
        path = Path(tasks_dir) / SHARED_DIR / folder
        rows = [{"task": task, "split": "validation", "method": method, "rouge_l": rec["metrics"][method]}
                for task, rec in sorted(records.items())
                if rec.get("status") == "ok" and method in (rec.get("metrics") or {})]
        if (path / CAPPY_JSON).is_file() and rows:
            record_evaluation(path, rows, name=f"cappy-shared-{folder.replace('_', '-')}")
            written.append(str(path))
    return written


# --- scoring and the selector columns ----------------------------------------------------------

def read_split_candidates(task: str, candidates_dir: str | Path, split: str,
                          examples: Sequence[Example] | None = None) -> pa.Table:
    """The task's sampled candidates of ``split`` (file order), only those of ``examples`` when given."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cappy_core.labeling.candidates import instruction_id, read_candidates

    table = read_candidates(Path(candidates_dir) / split, tasks=[task], splits=[split])
    if examples is not None:
        ids = [instruction_id(e.task, e.subtask, e.split, e.example_idx) for e in examples]
        table = table.filter(pc.is_in(table["instruction_id"], value_set=pa.array(ids, pa.string())))
    if table.num_rows == 0:
        raise ValueError(f"task {task}: no {split} candidates under {Path(candidates_dir) / split}"
                         + (f" for its {len(examples)} instruction(s)" if examples is not None else ""))
    return table


def evaluate_scored(table: pa.Table, what: str) -> tuple[list, int, dict[str, Any]]:
    """``(groups, unlabeled instructions, {"metrics", "per_instruction", "instruction_ids", "spearman"})``
    of a scored table with selector columns (:func:`cappy_core.selection.evaluation.evaluate_task` and
    friends; ``instruction_ids`` name the instructions ``per_instruction`` is in the order of); ``what``
    names the table in the error when no instruction has references."""
    from cappy_core.selection.evaluation import evaluate_task, per_instruction_values, ranker_spearman, scored_groups

    groups, ids, unlabeled = scored_groups(table)
    if not groups:
        raise ValueError(f"{what}: no instruction has references to evaluate against")
    metrics = evaluate_task(groups)
    return groups, unlabeled, {"metrics": metrics, "per_instruction": per_instruction_values(groups),
                               "instruction_ids": ids, "spearman": ranker_spearman(groups)}


# --- one task --------------------------------------------------------------------------------

def run_task(task: str, settings: TaskSettings, *, use_gpu: bool = False, torch_threads: int = 1) -> dict[str, Any]:
    """Finetune (when ``settings.schedule``), score dev and validation, fit the fused selector
    on dev and evaluate one task, on CUDA when ``use_gpu`` and there is one, else on CPU with
    ``torch_threads`` threads. Returns ``{"metrics", "per_instruction", "spearman",
    "fused_weights", "sizes", "training", "timings", "device"}`` (the task's result record, less
    the sweep's bookkeeping); with dev held out also ``"fused_fit"`` (``dev_rouge``: the fitted
    pick's Rouge-L ×100 on dev, ``dev_instructions``: the labelled ones it was fitted on),
    ``"dev_metrics"``, ``"dev_spearman"``, ``"dev_per_instruction"`` and ``"dev_instruction_ids"``
    (what ``cappy dev-report`` compares). ``fused_weights`` is None without dev. With the stage
    cache on, every scored table goes through it too, and ``"scores_cache"`` counts the tables
    ``reused`` and ``stored`` (:func:`cappy_core.selection.scored_tables.cached_scores`)."""
    from cappy_core.io import write_parquet
    from cappy_core.labeling.pair_mixture import write_pairs
    from cappy_core.scorer.checkpoint import record_evaluation
    from cappy_core.scorer.model import Scorer
    from cappy_core.selection.evaluation import CAPPY, FUSED
    from cappy_core.selection.selectors import write_selector
    from cappy_core.stage_cache import StageCache

    device = set_device(use_gpu, torch_threads)
    cache = StageCache(settings.stage_cache)  # scored tables (and each finetune, in cached_finetune)
    timings: dict[str, float] = {}
    t = time.monotonic()
    selector = None  # the fused selector's own scorer (settings.selector_schedule), else the scorer's scores
    task_dir = Path(settings.tasks_dir) / task
    task_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, Any] = {}
    training: dict[str, Any] = dict(settings.shared_training or {})
    dev_examples: list = []
    if settings.dev_examples:
        _, dev_examples = split_dev(sampled_train_examples(settings.data_dir, task, settings.max_train_examples),
                                    settings.dev_examples)
    if settings.schedule is not None:
        pairs, sizes = train_pairs(task, data_dir=settings.data_dir, candidates_dir=settings.candidates_dir,
                                   max_train_examples=settings.max_train_examples, train_size=settings.train_size,
                                   seed=settings.schedule.seed, dev_examples=settings.dev_examples)
        pairs_file = write_pairs(pairs, task_dir / "train_pairs.parquet")
        timings["pairs_s"] = time.monotonic() - t
        t = time.monotonic()
        scorer, training = cached_finetune(settings, pairs_file, settings.schedule, device=device)
        timings["finetune_s"] = time.monotonic() - t
        if settings.selector_schedule is not None:
            t = time.monotonic()
            selector, training["selector"] = cached_finetune(settings, pairs_file, settings.selector_schedule,
                                                             device=device)
            training["selector"]["loss"] = settings.selector_schedule.loss
            timings["selector_finetune_s"] = time.monotonic() - t
    else:
        scorer = Scorer.from_pretrained(settings.init, dtype=settings.score_dtype, device=device,
                                        max_length=settings.max_length)
    if settings.selector_init is not None:  # one selector scorer for every task, finetuned before them
        selector = Scorer.from_pretrained(settings.selector_init, dtype=settings.score_dtype, device=device,
                                          max_length=settings.max_length)
        training["selector"] = dict(settings.shared_selector_training or {})
    t = time.monotonic()
    weights, dev_record = None, {}  # dev: fit the fused selector (and report every method there)
    if dev_examples:
        dev = add_mbr(score_with(scorer, selector, read_split_candidates(task, settings.candidates_dir, "train",
                                                                         dev_examples), cache))
        weights, dev_value, fitted_on = fit_fused(dev, settings.selector_signals)
        dev = add_fused(dev, weights)
        write_parquet(dev, task_dir / "dev_scored.parquet")
        dev_record["fused_fit"] = {"dev_rouge": None if dev_value is None else 100.0 * dev_value,
                                   "dev_instructions": fitted_on}
        if fitted_on:
            _, _, dev_eval = evaluate_scored(dev, f"task {task} dev")
            dev_record.update(dev_metrics=dev_eval["metrics"], dev_spearman=dev_eval["spearman"],
                              dev_per_instruction=dev_eval["per_instruction"],
                              dev_instruction_ids=dev_eval["instruction_ids"])
        sizes.update(dev_instructions=len(dev_examples), dev_labelled_instructions=fitted_on,
                     dev_candidates=dev.num_rows)
        timings["dev_s"] = time.monotonic() - t
        t = time.monotonic()
    kept = task_dir / "scorer" if settings.keep_scorer and settings.schedule is not None else None
    if kept is not None:
        scorer.save_pretrained(kept, metadata={"run": {"job": "sweep", "name": task, "task": task,
                                                       "loss": settings.schedule.loss},
                                               "update": training.get("updates")})
        if selector is not None:  # the weights belong with the scores they were fitted on (serve finds
            kept = task_dir / "selector_scorer"  # a task's selector scorer here, a shared one included)
            selector.save_pretrained(kept)
    if settings.keep_scorer and weights is not None:  # in the kept scorer, else in the task's folder
        write_selector(kept or task_dir, weights, task=task, scorer=str(kept or settings.init),
                       **dev_record["fused_fit"])
    val = read_split_candidates(task, settings.candidates_dir, "validation")
    val = with_selector_columns(score_with(scorer, selector, val, cache), weights)
    write_parquet(val, task_dir / "validation_scored.parquet")
    timings["score_s"] = time.monotonic() - t
    groups, unlabeled, result = evaluate_scored(val, f"task {task}")  # the one place validation labels are read
    sizes.update(validation_instructions=len(groups), validation_candidates=sum(map(len, groups)),
                 validation_unlabeled_instructions=unlabeled)
    if settings.keep_scorer and settings.schedule is not None and CAPPY in result["metrics"]:
        record_evaluation(task_dir / "scorer", [{"task": task, "split": "validation", "method": CAPPY,
                                                 "rouge_l": result["metrics"][CAPPY]}], name=f"cappy-{task}")
    if kept == task_dir / "selector_scorer" and FUSED in result["metrics"]:  # kept above; its row: the fused pick
        record_evaluation(task_dir / "selector_scorer", [{"task": task, "split": "validation", "method": FUSED,
                                                          "rouge_l": result["metrics"][FUSED]}],
                          name=f"cappy-selector-{task}")
    return {**result, "fused_weights": weights, **dev_record, "sizes": sizes, "training": training,
            "timings": timings, "device": device,
            **({"scores_cache": cache.counts(SCORES_STAGE)} if cache.root else {})}
