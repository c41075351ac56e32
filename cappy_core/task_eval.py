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
train instructions, :func:`cappy_core.pretrain_data.build_pair_mixture`, cut or tiled to
``train_size``) → ``tasks_dir/<task>/train_pairs.parquet`` → :func:`cappy_core.training.fit_scorer`
from ``init`` with the :class:`ScorerSchedule` (its loss, batches and precision); the finetuned
scorer then scores in ``score_dtype`` (bf16 autocast only when that says ``bfloat16``). Without
a schedule the ``init`` scorer scores as is. With a ``selector_schedule`` (``selector_loss:
listwise``) a second scorer is finetuned from ``init`` on the same pairs with that loss; it scores
every candidate too (``selector_score``) and is the fused selector's Cappy signal, while the
``cappy`` row stays the first (the paper's) scorer; with ``selector_scope: all`` that selector
scorer is instead finetuned once, before the tasks, on every task's pairs together
(:func:`finetune_shared_selector`, the paper's multi-task step) and each task scores with it
(``selector_init``). Then:

* **dev** candidates: ``score`` (the scorer), ``mbr`` (:func:`cappy_core.selectors.mbr_scores`
  per instruction over ``text``) → the fused weights, :func:`cappy_core.selectors.fit_weights`
  over :data:`SIGNALS` on the labelled dev instructions (equal weights when there is none) →
  ``fused`` → ``tasks_dir/<task>/dev_scored.parquet`` and every method's Rouge-L on dev
  (``dev_metrics``; ``cappy+lm+mbr`` there is in-sample);
* **validation** candidates: ``score``, ``mbr`` and ``fused`` with the dev weights (no label is
  read: :func:`with_selector_columns`) → ``tasks_dir/<task>/validation_scored.parquet`` →
  :func:`cappy_core.evaluation.evaluate_task`, per-instruction values and rankers' Spearman.

With ``keep_scorer`` the finetuned scorer is saved under ``tasks_dir/<task>/scorer`` with the
fused weights in it (:data:`cappy_core.selectors.SELECTOR_FILE`), for serve; a task with a
selector scorer of its own saves that one too, under ``tasks_dir/<task>/selector_scorer``, and the
weights go there, since they are fitted on its scores; a task scored by the shared scorer,
``tasks_dir/_shared/scorer``, keeps its weights in ``tasks_dir/<task>``.

The sweep's bookkeeping of finished tasks lives here too: each task's result record is
``tasks_dir/<task>.json`` (:func:`result_record`), and a task counts as finished when its record
says ``ok`` and carries the digest (:func:`key_digest`) of the settings that define its result
(:func:`result_key`, :func:`finished`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from cappy_core.config import ConfigError
from cappy_core.selectors import CAPPY_SIGNAL, LM_SIGNAL, MBR_SIGNAL

if TYPE_CHECKING:  # torch and pyarrow load only where a task runs
    import pyarrow as pa

    from cappy_core.data.records import Example
    from cappy_core.training import ScorerSchedule

#: The fused selector's signals and the scored-table column each is read from.
SIGNALS = (CAPPY_SIGNAL, LM_SIGNAL, MBR_SIGNAL)
SIGNAL_COLUMNS = {CAPPY_SIGNAL: "score", LM_SIGNAL: "logprob_mean", MBR_SIGNAL: "mbr"}
#: The selector scorer's column: when a table has it, it is the fused selector's Cappy signal.
SELECTOR_SCORE = "selector_score"
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


#: The sweep settings that define its sampled candidates (with the resolved generator).
SAMPLING_DEFINING = ("backend", "decodings", "samples_per_decoding", "max_new_tokens", "seed",
                     "max_examples_per_task", "max_train_examples_per_task")


def candidates_folder(config: Mapping[str, Any], generator: str) -> str:
    """The folder name, under ``OUT/candidates``, of the candidates sampled with these settings:
    one folder per :data:`SAMPLING_DEFINING` values and generator, so a rerun with a changed
    sampling setting samples anew beside the old candidates (and going back reuses them)
    instead of mixing or refusing."""
    return "sampling-" + key_digest({**{k: config[k] for k in SAMPLING_DEFINING}, "generator": generator})[:12]


def settings_from_config(config: Mapping[str, Any], out: str | Path, init: str, generator: str) -> TaskSettings:
    """The tasks' settings from the sweep's config (``to_dict(SweepConfig)``), its ``OUT``
    folder and resolved generator: inputs under ``OUT/data`` and
    ``OUT/candidates/<candidates_folder>``, results under ``OUT/tasks``."""
    from cappy_core.training import ScorerSchedule

    c, out = config, Path(out)
    schedule = ScorerSchedule(
        lr=c["lr"], warmup_ratio=c["warmup_ratio"], weight_decay=c["weight_decay"], epochs=c["epochs"],
        batch_size=c["batch_size"], micro_batch_size=c["micro_batch_size"], bf16=c["bf16"], seed=c["seed"],
        loss=c["loss"], listwise_tau=c["listwise_tau"], mse_weight=c["mse_weight"],
        group_by_instruction=c["group_by_instruction"]) if c["finetune"] else None
    selector_schedule = None
    if schedule is not None and c["selector_loss"] != "same":  # listwise ranks within an instruction: grouped
        selector_schedule = dataclasses.replace(schedule, loss=c["selector_loss"], group_by_instruction=True)
    return TaskSettings(data_dir=str(out / "data"),
                        candidates_dir=str(out / "candidates" / candidates_folder(c, generator)),
                        tasks_dir=str(out / "tasks"), init=init, max_length=c["max_length"], schedule=schedule,
                        train_size=c["train_size"], max_train_examples=c["max_train_examples_per_task"],
                        score_dtype=c["score_dtype"], keep_scorer=c["keep_scorers"],
                        dev_examples=c["dev_examples_per_task"], finetune_scope=c["finetune_scope"],
                        selector_schedule=selector_schedule)


def shared_selector(config: Mapping[str, Any]) -> bool:
    """Whether the sweep finetunes one selector scorer for every task (``selector_scope: all``)."""
    return bool(config["finetune"]) and config["selector_loss"] != "same" and config["selector_scope"] == "all"


def trains_on_every_task(config: Mapping[str, Any]) -> bool:
    """Whether a scorer is finetuned on every task's pairs (``finetune_scope: all`` or a shared
    selector): then every task's train candidates are needed and the tasks are part of the key."""
    return bool(config["finetune"]) and (config["finetune_scope"] == "all" or shared_selector(config))


def check_config(config: Mapping[str, Any]) -> None:
    """:class:`ConfigError` for sweep settings that cannot run (before any stage does)."""
    c = config
    for name in ("train_size", "batch_size", "micro_batch_size", "epochs", "torch_threads", "max_length",
                 "sample_batch_rows"):
        if c[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if c["batch_size"] % c["micro_batch_size"]:
        raise ConfigError(f"--batch-size {c['batch_size']} must be a multiple of --micro-batch-size "
                          f"{c['micro_batch_size']}")
    if c["shared_torch_threads"] < 0:
        raise ConfigError("--shared-torch-threads must be >= 0 (0: --torch-threads)")
    if c["dev_examples_per_task"] < 0:
        raise ConfigError("--dev-examples-per-task must be >= 0")
    cap = c["max_train_examples_per_task"]
    if c["finetune"] and cap is not None and c["dev_examples_per_task"] >= cap:
        raise ConfigError(f"--dev-examples-per-task {c['dev_examples_per_task']} leaves none of the "
                          f"{cap} train instructions (--max-train-examples-per-task) to finetune on")
    if c["loss"].startswith("listwise") and not c["group_by_instruction"]:
        raise ConfigError(f"--loss {c['loss']} ranks one instruction's candidates against each other: it needs "
                          "--group-by-instruction (micro-batches that keep an instruction's candidates together)")
    if c["selector_scope"] == "all" and c["selector_loss"] == "same":
        raise ConfigError("--selector-scope all finetunes one selector scorer for every task: it needs "
                          "--selector-loss listwise (or listwise+mse)")
    if c["selector_loss"] != "same" and not (c["finetune"] and c["finetune_scope"] == "task"):
        raise ConfigError(f"--selector-loss {c['selector_loss']} finetunes a second scorer per task: it needs "
                          "--finetune and --finetune-scope task")
    if not c["listwise_tau"] > 0 or c["mse_weight"] < 0:
        raise ConfigError("--listwise-tau must be > 0 and --mse-weight >= 0")


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
    from cappy_core.pretrain_data import build_pair_mixture, read_samples, tile

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
    from cappy_core.pretrain_data import read_pair_columns
    from cappy_core.scorer import Scorer
    from cappy_core.training import Throughput, fit_scorer

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


def set_device(use_gpu: bool, torch_threads: int) -> str:
    """``"cuda"`` when asked and present, else ``"cpu"`` with ``torch_threads`` threads."""
    import torch

    from cappy_core.scorer import quiet_transformers

    quiet_transformers()  # load reports and progress bars, once per task process
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(torch_threads)
    return device


def _finetune_union(tasks: Sequence[str], settings: TaskSettings, schedule: ScorerSchedule, name: str,
                    digest: str, *, use_gpu: bool, torch_threads: int) -> tuple[str, dict[str, Any]]:
    """One scorer from ``settings.init`` finetuned with ``schedule`` on the union of every task's
    train pairs, each task's cut or tiled to ``train_size`` as its own finetune would see them
    (dev held out), shuffled; saved as ``<tasks_dir>/_shared/<name>`` beside its pairs and record
    (``train_pairs.parquet`` and ``training.json``, prefixed ``selector_`` for the selector scorer).
    Kept and reused while the record's ``digest`` matches. ``(folder, record)``."""
    from cappy_core.io import atomic_dir, write_json
    from cappy_core.pretrain_data import write_pairs

    shared = Path(settings.tasks_dir) / SHARED_DIR
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
    scorer, info = finetune(settings.init, pairs_file, schedule, max_length=settings.max_length,
                            device=device, score_dtype=settings.score_dtype)
    with atomic_dir(folder) as tmp:
        scorer.save_pretrained(tmp)
    record = {"digest": digest, "scope": "all", "tasks": sorted(tasks), "train_pairs": len(union),
              "sizes": sizes, **info, "loss": schedule.loss, "pairs_s": pairs_s,
              "finetune_s": time.monotonic() - t}
    write_json(record_file, record)
    return str(folder), record


def finetune_shared(tasks: Sequence[str], settings: TaskSettings, digest: str, *, use_gpu: bool = False,
                    torch_threads: int = 1) -> TaskSettings:
    """``finetune_scope: all``: one scorer for every task (:func:`_finetune_union` with the
    schedule), ``<tasks_dir>/_shared/scorer``. Returns the settings that score every task with it
    (``init`` that folder, no schedule, ``shared_training`` its record)."""
    if settings.schedule is None:
        raise ValueError("finetune_shared needs a schedule")
    folder, record = _finetune_union(tasks, settings, settings.schedule, "scorer", digest, use_gpu=use_gpu,
                                     torch_threads=torch_threads)
    return dataclasses.replace(settings, init=folder, schedule=None, shared_training=record)


def finetune_shared_selector(tasks: Sequence[str], settings: TaskSettings, digest: str, *, use_gpu: bool = False,
                             torch_threads: int = 1) -> TaskSettings:
    """``selector_scope: all``: one selector scorer for every task (:func:`_finetune_union` with
    the selector schedule: the paper's multi-task step, for the fused selector's Cappy signal),
    ``<tasks_dir>/_shared/selector_scorer``. Returns the settings whose tasks score with it
    (``selector_init`` that folder, no selector schedule, ``shared_selector_training`` its record)."""
    if settings.selector_schedule is None:
        raise ValueError("finetune_shared_selector needs a selector schedule")
    folder, record = _finetune_union(tasks, settings, settings.selector_schedule, "selector_scorer", digest,
                                     use_gpu=use_gpu, torch_threads=torch_threads)
    return dataclasses.replace(settings, selector_init=folder, selector_schedule=None,
                               shared_selector_training=record)


# --- scoring and the selector columns ----------------------------------------------------------

def read_split_candidates(task: str, candidates_dir: str | Path, split: str,
                          examples: Sequence[Example] | None = None) -> pa.Table:
    """The task's sampled candidates of ``split`` (file order), only those of ``examples`` when given."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cappy_core.candidates import instruction_id, read_candidates

    table = read_candidates(Path(candidates_dir) / split, tasks=[task], splits=[split])
    if examples is not None:
        ids = [instruction_id(e.task, e.subtask, e.split, e.example_idx) for e in examples]
        table = table.filter(pc.is_in(table["instruction_id"], value_set=pa.array(ids, pa.string())))
    if table.num_rows == 0:
        raise ValueError(f"task {task}: no {split} candidates under {Path(candidates_dir) / split}"
                         + (f" for its {len(examples)} instruction(s)" if examples is not None else ""))
    return table


def score_table(scorer: Any, table: pa.Table, column: str = "score") -> pa.Table:
    """``table`` (candidate rows) with ``column`` appended: the scorer's score of each
    (instruction, text)."""
    import pyarrow as pa

    scores = scorer.score(table["instruction"].to_pylist(), table["text"].to_pylist())
    return table.append_column(column, pa.array(scores, pa.float64()))


def signal_column(table: pa.Table, name: str) -> str:
    """The column the fused selector reads signal ``name`` from: :data:`SIGNAL_COLUMNS`, except
    that the Cappy signal is :data:`SELECTOR_SCORE` when the table has it."""
    if name == CAPPY_SIGNAL and SELECTOR_SCORE in table.column_names:
        return SELECTOR_SCORE
    return SIGNAL_COLUMNS[name]


def score_with(scorer: Any, selector: Any | None, table: pa.Table) -> pa.Table:
    """``table`` with ``score`` and, given a selector scorer, :data:`SELECTOR_SCORE` (:func:`score_table`)."""
    table = score_table(scorer, table)
    return table if selector is None else score_table(selector, table, SELECTOR_SCORE)


def instruction_rows(instruction_ids: Sequence[str]) -> list[list[int]]:
    """Row indices of each instruction, in first-appearance order (rows in file order)."""
    rows: dict[str, list[int]] = {}
    for i, iid in enumerate(instruction_ids):
        rows.setdefault(iid, []).append(i)
    return list(rows.values())


def add_mbr(table: pa.Table) -> pa.Table:
    """``table`` (candidate rows) with ``mbr`` appended: :func:`cappy_core.selectors.mbr_scores`
    of each instruction's ``text`` (reads no label)."""
    import numpy as np
    import pyarrow as pa

    from cappy_core.selectors import mbr_scores

    texts = table["text"].to_pylist()
    mbr = np.zeros(table.num_rows)
    for rows in instruction_rows(table["instruction_id"].to_pylist()):
        mbr[rows] = mbr_scores([texts[i] for i in rows])
    return table.append_column("mbr", pa.array(mbr, pa.float64()))


def add_fused(table: pa.Table, weights: Mapping[str, float]) -> pa.Table:
    """``table`` (scored, with ``mbr``) with ``fused`` appended: :func:`cappy_core.selectors.fused_scores`
    of the weighted :data:`SIGNALS` per instruction (reads no label)."""
    import numpy as np
    import pyarrow as pa

    from cappy_core.selectors import fused_scores

    cols = {name: np.asarray(table[signal_column(table, name)].to_pylist(), dtype=np.float64) for name in weights}
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


def fit_fused(table: pa.Table) -> tuple[dict[str, float], float | None, int]:
    """The fused weights fitted on the labelled instructions of a scored table with ``mbr``
    (:func:`cappy_core.selectors.fit_weights` over :data:`SIGNALS`): ``(weights, mean Rouge-L
    of their picks, instructions)``. No labelled instruction: equal weights, ``None``, 0."""
    import numpy as np

    from cappy_core.selectors import fit_weights, weight_grid

    labels = table["label"].to_pylist()
    cols = {name: np.asarray(table[signal_column(table, name)].to_pylist(), dtype=np.float64) for name in SIGNALS}
    signals, rouges = [], []
    for rows in instruction_rows(table["instruction_id"].to_pylist()):
        if any(labels[i] is None for i in rows):
            continue
        signals.append({name: col[rows] for name, col in cols.items()})
        rouges.append([labels[i] for i in rows])
    if not signals:
        return weight_grid(SIGNALS)[0], None, 0
    weights, value = fit_weights(signals, rouges, SIGNALS)
    return weights, value, len(signals)


def evaluate_scored(table: pa.Table, what: str) -> tuple[list, int, dict[str, Any]]:
    """``(groups, unlabeled instructions, {"metrics", "per_instruction", "spearman"})`` of a
    scored table with selector columns (:func:`cappy_core.evaluation.evaluate_task` and
    friends); ``what`` names the table in the error when no instruction has references."""
    from cappy_core.evaluation import evaluate_task, per_instruction_values, ranker_spearman, scored_groups

    groups, _, unlabeled = scored_groups(table)
    if not groups:
        raise ValueError(f"{what}: no instruction has references to evaluate against")
    metrics = evaluate_task(groups)
    return groups, unlabeled, {"metrics": metrics, "per_instruction": per_instruction_values(groups),
                               "spearman": ranker_spearman(groups)}


# --- one task --------------------------------------------------------------------------------

def run_task(task: str, settings: TaskSettings, *, use_gpu: bool = False, torch_threads: int = 1) -> dict[str, Any]:
    """Finetune (when ``settings.schedule``), score dev and validation, fit the fused selector
    on dev and evaluate one task, on CUDA when ``use_gpu`` and there is one, else on CPU with
    ``torch_threads`` threads. Returns ``{"metrics", "per_instruction", "spearman",
    "fused_weights", "sizes", "training", "timings", "device"}`` (the task's result record, less
    the sweep's bookkeeping); with dev held out also ``"fused_fit"`` (``dev_rouge``: the fitted
    pick's Rouge-L ×100 on dev, ``dev_instructions``: the labelled ones it was fitted on),
    ``"dev_metrics"`` and ``"dev_spearman"``. ``fused_weights`` is None without dev."""
    from cappy_core.io import write_parquet
    from cappy_core.pretrain_data import write_pairs
    from cappy_core.scorer import Scorer
    from cappy_core.selectors import write_selector

    device = set_device(use_gpu, torch_threads)
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
        scorer, training = finetune(settings.init, pairs_file, settings.schedule, max_length=settings.max_length,
                                    device=device, score_dtype=settings.score_dtype)
        timings["finetune_s"] = time.monotonic() - t
        if settings.selector_schedule is not None:
            t = time.monotonic()
            selector, training["selector"] = finetune(settings.init, pairs_file, settings.selector_schedule,
                                                      max_length=settings.max_length, device=device,
                                                      score_dtype=settings.score_dtype)
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
                                                                         dev_examples)))
        weights, dev_value, fitted_on = fit_fused(dev)
        dev = add_fused(dev, weights)
        write_parquet(dev, task_dir / "dev_scored.parquet")
        dev_record["fused_fit"] = {"dev_rouge": None if dev_value is None else 100.0 * dev_value,
                                   "dev_instructions": fitted_on}
        if fitted_on:
            _, _, dev_eval = evaluate_scored(dev, f"task {task} dev")
            dev_record.update(dev_metrics=dev_eval["metrics"], dev_spearman=dev_eval["spearman"])
        sizes.update(dev_instructions=len(dev_examples), dev_labelled_instructions=fitted_on,
                     dev_candidates=dev.num_rows)
        timings["dev_s"] = time.monotonic() - t
        t = time.monotonic()
    kept = task_dir / "scorer" if settings.keep_scorer and settings.schedule is not None else None
    if kept is not None:
        scorer.save_pretrained(kept)
        if selector is not None:  # the weights belong with the scores they were fitted on (serve finds
            kept = task_dir / "selector_scorer"  # a task's selector scorer here, a shared one included)
            selector.save_pretrained(kept)
    if settings.keep_scorer and weights is not None:  # in the kept scorer, else in the task's folder
        write_selector(kept or task_dir, weights, task=task, scorer=str(kept or settings.init),
                       **dev_record["fused_fit"])
    val = read_split_candidates(task, settings.candidates_dir, "validation")
    val = with_selector_columns(score_with(scorer, selector, val), weights)
    write_parquet(val, task_dir / "validation_scored.parquet")
    timings["score_s"] = time.monotonic() - t
    groups, unlabeled, result = evaluate_scored(val, f"task {task}")  # the one place validation labels are read
    sizes.update(validation_instructions=len(groups), validation_candidates=sum(map(len, groups)),
                 validation_unlabeled_instructions=unlabeled)
    return {**result, "fused_weights": weights, **dev_record, "sizes": sizes,
            "training": training, "timings": timings, "device": device}


# --- results on disk: what is finished ------------------------------------------------------

#: The sweep's settings that change a task's result: a finished task is recomputed when one differs.
RESULT_DEFINING = ("generator", "backend", "decodings", "samples_per_decoding", "max_new_tokens",
                   "max_examples_per_task", "max_train_examples_per_task", "scorer", "finetune", "train_size",
                   "max_length", "lr", "warmup_ratio", "weight_decay", "epochs", "batch_size", "micro_batch_size",
                   "bf16", "seed", "score_dtype", "dev_examples_per_task", "loss", "listwise_tau", "mse_weight",
                   "group_by_instruction", "finetune_scope", "selector_loss", "selector_scope")
#: Raised when a task's result is computed differently: every earlier result is then recomputed.
RESULT_VERSION = 2


def result_key(config: Mapping[str, Any], generator: str, init: str,
               tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """What defines a task's result: the :data:`RESULT_DEFINING` values of the sweep's ``config``,
    with the generator and scorer init it resolved to, and :data:`RESULT_VERSION`; with
    ``finetune_scope: all`` or a shared selector also the sweep's ``tasks`` (the shared scorer
    trains on all of them)."""
    key = {**{k: config[k] for k in RESULT_DEFINING}, "generator": generator, "scorer": init,
           "version": RESULT_VERSION}
    if trains_on_every_task(config):
        key["finetune_tasks"] = sorted(tasks or [])
    return key


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
