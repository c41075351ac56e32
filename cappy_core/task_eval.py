"""One task of the sweep, whole: finetune a scorer on the task's pairs, score its validation
candidates, evaluate Cappy's pick against the baselines. Plain Python: ``jobs/sweep.py`` runs
:func:`run_task` as one Ray task per BIG-Bench task.

Inputs, written by the sweep's earlier stages (:class:`TaskSettings` says where):

* ``data_dir/<task>/train.parquet``: the task's train examples (``cappy data prepare``);
* ``candidates_dir/train`` and ``candidates_dir/validation``: sampled, Rouge-L-labelled
  candidates (``cappy sample``; ``train/`` only when finetuning).

Steps: the train pairs (references, random negatives and the labelled train candidates of the
first ``max_train_examples`` instructions, :func:`cappy_core.pretrain_data.build_pair_mixture`,
cut or tiled to ``train_size``) → ``tasks_dir/<task>/train_pairs.parquet`` →
:func:`cappy_core.training.fit_scorer` from ``init`` with the :class:`ScorerSchedule` → score every
validation candidate → ``tasks_dir/<task>/validation_scored.parquet`` →
:func:`cappy_core.evaluation.evaluate_task`. Without a schedule the ``init`` scorer scores as is.
Scoring runs under bf16 autocast when ``score_dtype`` is ``bfloat16`` *or* the scorer was
finetuned with ``schedule.bf16`` (it is loaded that way for training and keeps it).

The sweep's bookkeeping of finished tasks lives here too: each task's result record is
``tasks_dir/<task>.json`` (:func:`result_record`), and a task counts as finished when its record
says ``ok`` and carries the digest (:func:`key_digest`) of the settings that define its result
(:func:`result_key`, :func:`finished`).
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

if TYPE_CHECKING:  # torch loads only where a task runs
    from cappy_core.training import ScorerSchedule


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
    score_dtype: str = "float32"  # "bfloat16": score under bf16 autocast (a bf16-finetuned scorer always does)
    keep_scorer: bool = False  # save the finetuned scorer under <tasks_dir>/<task>/scorer


def train_pairs(task: str, *, data_dir: str | Path, candidates_dir: str | Path, max_train_examples: int | None,
                train_size: int, seed: int) -> tuple[list, dict[str, int]]:
    """The task's finetuning pairs, cut or tiled to ``train_size``, and their sizes."""
    from cappy_core.data.records import read_examples, split_path
    from cappy_core.pretrain_data import build_pair_mixture, read_samples, tile

    examples = read_examples(split_path(data_dir, task, "train"))
    if max_train_examples is not None:
        examples = examples[:max_train_examples]  # the instructions that were sampled
    cands = read_samples(Path(candidates_dir) / "train", tasks=[task], splits=["train"])
    built, _ = build_pair_mixture(examples, cands, train_size=None, eval_size=0, seed=seed)
    pairs = tile(built, train_size)
    return pairs, {"train_examples": len(examples), "train_candidates": len(cands),
                   "train_pairs_built": len(built), "train_pairs": len(pairs)}


def finetune(init: str, pairs_file: str | Path, schedule: ScorerSchedule, *, max_length: int,
             device: str) -> tuple[Any, dict[str, float]]:
    """A scorer from ``init`` finetuned in this process on the pair file; ``(scorer, info)``
    with the update count, pairs seen, samples/s and the mean loss of the first and last tenth
    of updates. The scorer is loaded in bf16 autocast when ``schedule.bf16`` (and so also
    scores that way)."""
    from cappy_core.pretrain_data import read_pair_columns
    from cappy_core.scorer import Scorer
    from cappy_core.training import Throughput, fit_scorer

    scorer = Scorer.from_pretrained(init, dtype="bfloat16" if schedule.bf16 else "float32", device=device,
                                    max_length=max_length, allow_pickle=False, seed=schedule.seed)
    meter, rate = Throughput(1), [0.0]
    state = fit_scorer(scorer, read_pair_columns(pairs_file), schedule, device=device,
                       on_update=lambda info: rate.__setitem__(0, meter.tick(info.samples)))
    k = max(1, len(state.losses) // 10)
    return scorer, {"updates": state.update, "pairs": state.samples, "samples_per_s": rate[0],
                    "loss_first_tenth": sum(state.losses[:k]) / k, "loss_last_tenth": sum(state.losses[-k:]) / k}


def score_validation(scorer: Any, task: str, candidates_dir: str | Path) -> Any:
    """The task's validation candidates (Arrow table) with a ``score`` column appended."""
    import pyarrow as pa

    from cappy_core.candidates import read_candidates

    val_dir = Path(candidates_dir) / "validation"
    val = read_candidates(val_dir, tasks=[task], splits=["validation"])
    if val.num_rows == 0:
        raise ValueError(f"task {task}: no validation candidates under {val_dir}")
    scores = scorer.score(val["instruction"].to_pylist(), val["text"].to_pylist())
    return val.append_column("score", pa.array(scores, pa.float64()))


def run_task(task: str, settings: TaskSettings, *, use_gpu: bool = False, torch_threads: int = 1) -> dict[str, Any]:
    """Finetune (when ``settings.schedule``), score and evaluate one task, on CUDA when
    ``use_gpu`` and there is one, else on CPU with ``torch_threads`` threads. Returns
    ``{"metrics", "sizes", "training", "timings", "device"}`` (the task's result record, less
    the sweep's bookkeeping)."""
    import torch

    from cappy_core.evaluation import evaluate_task, scored_groups
    from cappy_core.io import write_parquet
    from cappy_core.pretrain_data import write_pairs
    from cappy_core.scorer import Scorer, quiet_transformers

    quiet_transformers()  # load reports and progress bars, once per task process
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(torch_threads)
    timings: dict[str, float] = {}
    t = time.monotonic()
    task_dir = Path(settings.tasks_dir) / task
    task_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, Any] = {}
    training: dict[str, Any] = {}
    if settings.schedule is not None:
        pairs, sizes = train_pairs(task, data_dir=settings.data_dir, candidates_dir=settings.candidates_dir,
                                   max_train_examples=settings.max_train_examples,
                                   train_size=settings.train_size, seed=settings.schedule.seed)
        pairs_file = write_pairs(pairs, task_dir / "train_pairs.parquet")
        timings["pairs_s"] = time.monotonic() - t
        t = time.monotonic()
        scorer, training = finetune(settings.init, pairs_file, settings.schedule, max_length=settings.max_length,
                                    device=device)
        timings["finetune_s"] = time.monotonic() - t
        if settings.score_dtype == "bfloat16":
            scorer.dtype = "bfloat16"
        if settings.keep_scorer:
            scorer.save_pretrained(task_dir / "scorer")
    else:
        scorer = Scorer.from_pretrained(settings.init, dtype=settings.score_dtype, device=device,
                                        max_length=settings.max_length)
    t = time.monotonic()
    val = score_validation(scorer, task, settings.candidates_dir)
    write_parquet(val, task_dir / "validation_scored.parquet")
    timings["score_s"] = time.monotonic() - t
    groups, _, unlabeled = scored_groups(val)
    if not groups:
        raise ValueError(f"task {task}: no validation instruction has references to evaluate against")
    metrics = evaluate_task(groups)
    sizes.update(validation_instructions=len(groups), validation_candidates=sum(map(len, groups)),
                 validation_unlabeled_instructions=unlabeled)
    return {"metrics": metrics, "sizes": sizes, "training": training, "timings": timings, "device": device}


# --- results on disk: what is finished ------------------------------------------------------

#: The sweep's settings that change a task's result: a finished task is recomputed when one differs.
RESULT_DEFINING = ("generator", "backend", "decodings", "samples_per_decoding", "max_new_tokens",
                   "max_examples_per_task", "max_train_examples_per_task", "scorer", "finetune", "train_size",
                   "max_length", "lr", "warmup_ratio", "weight_decay", "epochs", "batch_size", "micro_batch_size",
                   "bf16", "seed", "score_dtype")
#: Raised when a task's result is computed differently: every earlier result is then recomputed.
RESULT_VERSION = 1


def result_key(config: Mapping[str, Any], generator: str, init: str) -> dict[str, Any]:
    """What defines a task's result: the :data:`RESULT_DEFINING` values of the sweep's ``config``,
    with the generator and scorer init it resolved to, and :data:`RESULT_VERSION`."""
    return {**{k: config[k] for k in RESULT_DEFINING}, "generator": generator, "scorer": init,
            "version": RESULT_VERSION}


def key_digest(key: Mapping[str, Any]) -> str:
    """A short digest of the settings that define a task's result."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def result_path(tasks_dir: str | Path, task: str) -> Path:
    return Path(tasks_dir) / f"{task}.json"


def read_result(tasks_dir: str | Path, task: str) -> dict:
    """The task's result record, or ``{"task": task, "status": "missing"}``."""
    path = result_path(tasks_dir, task)
    return json.loads(path.read_text()) if path.is_file() else {"task": task, "status": "missing"}


def result_record(task: str, key: Mapping[str, Any], config: Mapping[str, Any],
                  result: Callable[[], Mapping[str, Any]], started: float) -> dict[str, Any]:
    """The task's result record: the sweep's bookkeeping (``key`` and its digest, the resolved
    ``config``, the wall time since ``started`` (``time.time()``)), then ``status: ok`` and what
    ``result()`` returns, or ``status: failed`` with the error ``result()`` raised (a wrapped
    error's ``cause`` when it has one, as Ray's task errors do) and the end of its traceback."""
    rec: dict[str, Any] = {"task": task, "key_digest": key_digest(key), "key": dict(key), "config": dict(config),
                           "wall_s": None}
    try:
        rec.update(status="ok", **result())
    except Exception as e:
        cause = getattr(e, "cause", None) or e
        rec.update(status="failed", error=f"{type(cause).__name__}: {cause}",
                   traceback="".join(traceback.format_exception(e))[-4000:])
    rec["wall_s"] = round(time.time() - started, 1)
    return rec


def finished(tasks_dir: str | Path, task: str, digest: str) -> dict | None:
    """The task's earlier result if it succeeded with the same settings, else None."""
    try:
        rec = json.loads(result_path(tasks_dir, task).read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("status") == "ok" and rec.get("key_digest") == digest else None
