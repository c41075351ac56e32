"""What ``cappy pretrain`` and ``cappy finetune`` share: their settings (:class:`TrainScorerConfig`,
the recipe a :class:`~cappy_core.scorer.schedule.ScorerSchedule` section; each job's own,
:class:`PretrainConfig` and :class:`FinetuneConfig`, here too, so the sweep reads a preset without
importing a job) and the run's lifecycle
(:func:`run_job`) around the Ray Train fit (:mod:`jobs.scorer_trainer`). Rerunning a
command resumes its run (:mod:`cappy_core.scorer.runs`). Fault injection: ``--fail-at-update K``
or ``CAPPY_FAIL_AT_UPDATE=K`` (:mod:`cappy_core.fault_injection`). A URI ``--storage-path``
(``s3://``, ``gs://``, ...) goes to Ray Train as is; the run's own files are staged locally and
uploaded, as is a URI ``--output`` (:mod:`cappy_core.remote`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from cappy_core.config import CacheOptions, ConfigError, SettingError, to_dict
from cappy_core.scorer.schedule import ScorerSchedule
from jobs.hub import check_hub_push, push_to_hub
from jobs.scorer_trainer import run_training
from jobs.tracking import TrackingOptions, check_report_to

logger = logging.getLogger(__name__)

#: What a run keeps in STORAGE/NAME besides Ray Train's own folders: synced with a URI storage path.
RUN_FILES = ("cappy_run.json", "pairs", "logs", "scorer")


@dataclass
class TrainScorerConfig(TrackingOptions):
    """Fields shared by the pretrain and finetune jobs (each adds its data fields)."""

    init: str = field(default="minilm", metadata={"key": True,
        "help": "scorer to start from: 'minilm' (embedded), a scorer folder, or a hub id "
                "(roberta-large, btan2/cappy-large)"})
    name: Optional[str] = field(default=None, metadata={
        "help": "run name; rerunning with the same name and storage path resumes it"})
    storage_path: str = field(default="~/cappy_runs", metadata={
        "help": "where runs keep pairs and checkpoints (shared storage on a multi-node cluster), or a URI "
                "(s3://, gs://, ...): Ray Train checkpoints there itself; the run's own files are staged locally "
                "and uploaded"})
    output: Optional[str] = field(default=None, metadata={
        "help": "final scorer folder (default STORAGE_PATH/NAME/scorer), or a URI (built locally, then uploaded)"})
    pairs_dir: Optional[str] = field(default=None, metadata={
        "help": "where the train/eval pair Parquet files are written (default STORAGE_PATH/NAME/pairs)"})
    train_pairs: Optional[str] = field(default=None, metadata={
        "help": "train on this pair Parquet file/folder (PAIR_SCHEMA) instead of building pairs"})
    eval_pairs: Optional[str] = field(default=None, metadata={
        "help": "with --train-pairs: held-out pair file/folder for eval metrics"})
    train_size: int = field(default=102400, metadata={"key": True, "help": "training pairs (cut or tiled)"})
    eval_size: int = field(default=512, metadata={"key": True,
        "help": "held-out pairs (whole instructions) for eval metrics; 0 disables eval"})
    max_length: int = field(default=512, metadata={"key": True, "help": "pair truncation length in tokens"})
    schedule: ScorerSchedule = field(default_factory=ScorerSchedule, metadata={
        "key": True, "help": "the training recipe (optimizer, schedule, batches, precision, seed, loss)"})
    num_workers: int = field(default=1, metadata={"key": True, "help": "Ray Train workers (data parallel)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker (nccl); else CPU (gloo)"})
    cpus_per_worker: float = field(default=1.0, metadata={
        "help": "CPUs reserved per worker; fractional (0.25-0.5) on small machines so Ray Data gets a CPU"})
    torch_threads: Optional[int] = field(default=None, metadata={
        "help": "torch threads per CPU worker (default: max(1, int(cpus_per_worker)))"})
    checkpoint_every: int = field(default=100, metadata={"help": "updates between checkpoints"})
    eval_every: Optional[int] = field(default=None, metadata={
        "help": "updates between evals (default: checkpoint_every)"})
    log_every: int = field(default=10, metadata={"help": "updates between progress lines"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept in storage"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the last checkpoint"})
    fail_at_update: Optional[int] = field(default=None, metadata={
        "help": "fault injection: raise after this update in an attempt that did not resume "
                "(also env CAPPY_FAIL_AT_UPDATE)"})
    eval_batch_size: int = field(default=64, metadata={"help": "pairs per eval batch"})
    data_timeout_s: Optional[float] = field(default=None, metadata={
        "help": "fail if the Ray Data feed makes no progress this long (default: Ray's, 30 min)"})
    fresh: bool = field(default=False, metadata={
        "help": "delete an existing run with this name instead of resuming it"})
    allow_pickle: bool = field(default=False, metadata={"help": "accept pickle-only init checkpoints"})

    def __post_init__(self) -> None:
        rules = [(k, getattr(self, k) >= 1, ">= 1") for k in ("train_size", "max_length", "num_workers",
                                                              "checkpoint_every", "log_every", "keep_checkpoints",
                                                              "eval_batch_size")]
        rules += [("eval_size", self.eval_size >= 0, ">= 0"), ("cpus_per_worker", self.cpus_per_worker > 0, "> 0"),
                  ("eval_every", self.eval_every is None or self.eval_every >= 1, ">= 1"),
                  ("fail_at_update", self.fail_at_update is None or self.fail_at_update >= 1, ">= 1")]
        for k, ok, rule in rules:
            if not ok:
                raise SettingError(k, f"must be {rule}, got {getattr(self, k)}")
        s, per_step = self.schedule, self.schedule.micro_batch_size * self.num_workers
        if s.batch_size % per_step:  # batch = micro x workers x accumulation
            raise SettingError("schedule.batch_size", f"{s.batch_size} must be a multiple of schedule.micro_batch_size "
                               f"x num_workers = {s.micro_batch_size} x {self.num_workers} = {per_step}",
                               related=["schedule.micro_batch_size", "num_workers"])
    push_to_hub: Optional[str] = field(default=None, metadata={
        "metavar": "REPO", "help": "upload the finished scorer (with its model card) to this Hugging Face "
                                   "model repo, e.g. me/cappy-tense; checked before training"})
    private: bool = field(default=False, metadata={
        "help": "with --push-to-hub: create the model repo private (an existing repo keeps its visibility)"})


@dataclass
class PretrainConfig(CacheOptions, TrainScorerConfig):
    tasks: list[str] = field(default_factory=lambda: ["pretrain"], metadata={
        "help": "'pretrain' (every BIG-Bench JSON task outside the 45) or task names"})
    splits: list[str] = field(default_factory=lambda: ["train", "validation"], metadata={
        "help": "splits of the pretraining tasks to use (none of them is evaluated)"})
    examples: Optional[str] = field(default=None, metadata={
        "help": "a `cappy data prepare` folder (default: read the BIG-Bench tasks on this machine directly: vendored or downloaded)"})
    samples: Optional[str] = field(default=None, metadata={
        "help": "folder of sample+label Parquet (Rouge-L-labelled candidates) to add"})
    max_pairs_per_task: Optional[int] = field(default=2000, metadata={
        "help": "cap per task (whole instructions) so one big task cannot dominate"})
    max_wrong_choices: Optional[int] = field(default=4, metadata={
        "help": "wrong choices kept per multiple-choice example (a seeded sample)"})


@dataclass
class FinetuneConfig(CacheOptions, TrainScorerConfig):
    task: Optional[str] = field(default=None, metadata={"help": "the task to finetune on (required)"})
    examples: Optional[str] = field(default=None, metadata={
        "help": "a `cappy data prepare` folder (default: read the BIG-Bench tasks on this machine directly: vendored or downloaded)"})
    samples: Optional[str] = field(default=None, metadata={
        "help": "folder of sample+label Parquet (Rouge-L-labelled candidates for the task)"})


def check_config(cfg: TrainScorerConfig) -> None:
    """What the values alone cannot tell (:meth:`TrainScorerConfig.__post_init__` checked those):
    the init scorer, the trackers and the hub are usable from here."""
    from cappy_core.scorer.runs import check_init

    check_init(cfg.init, cfg.allow_pickle)
    check_report_to(cfg.report_to)
    if cfg.push_to_hub:
        check_hub_push(cfg.push_to_hub)


def run_job(job: str, cfg: TrainScorerConfig, *, default_name: str, data_key: dict[str, Any],
            build_pairs: Callable[[str], tuple[str, str | None]], run_info: dict[str, Any], label: str,
            log: Callable[[str], None] = print) -> dict:
    """The lifecycle both jobs share: check config → run dir → pairs (reused when resuming) →
    Ray Train → ``results.json`` beside the exported scorer → one summary line."""
    from cappy_core.io import output_lock, with_local_paths
    from cappy_core.remote import is_remote, locked_output, staging_dir
    from cappy_core.scorer.runs import check_output, resolve_paths
    from jobs.log_file import log_file, nested

    check_config(cfg)
    # A URI --storage-path: Ray Train checkpoints there itself; this run's own files (lock, log,
    # cappy_run.json, pairs, the exported scorer) live in a local staging folder synced to
    # STORAGE/NAME (cappy_core.remote). A URI --output: built in its staging folder, then uploaded.
    storage_uri, output_uri = (v if is_remote(v) else None for v in (cfg.storage_path, cfg.output))
    if storage_uri and cfg.fresh:
        raise ConfigError(f"--fresh with --storage-path {storage_uri}: the job never deletes at a URI; delete the "
                          "run's folder there yourself, or pass another --name")
    cfg = with_local_paths(cfg, *[n for n, uri in (("storage_path", storage_uri), ("output", output_uri)) if not uri],
                           "pairs_dir", "train_pairs", "eval_pairs")
    paths = resolve_paths(cfg.name or default_name, str(staging_dir(storage_uri)) if storage_uri else cfg.storage_path,
                          pairs_dir=cfg.pairs_dir, output=str(staging_dir(output_uri)) if output_uri else cfg.output)
    if storage_uri:
        paths["storage_uri"] = storage_uri
    if not output_uri:
        check_output(paths)
    holder = f"cappy {job} --name {paths['name']}"
    output = Path(paths["output"])
    with contextlib.ExitStack() as locks:
        if output_uri:  # the lock file beside its staging folder, which the export replaces whole
            locks.enter_context(locked_output(output_uri, "--output", holder, local=output, file=True, log=log))
            check_output(paths)  # what is at the URI now: refused unless this job exported it
        elif Path(paths["run_dir"]) not in output.parents:  # one run per --output outside the run folder
            locks.enter_context(output_lock(output, holder, file=True))  # (the lock file beside it)
        if storage_uri:  # and per run folder
            locks.enter_context(locked_output(f"{storage_uri.rstrip('/')}/{paths['name']}", "--storage-path", holder,
                                              local=paths["run_dir"], only=RUN_FILES, log=log))
        else:
            locks.enter_context(output_lock(paths["run_dir"], holder))
        inner = nested()  # inside the sweep: its stage lines, not the workers' per-update lines
        log = locks.enter_context(log_file(paths["run_dir"], job, log))
        logger.debug("config: %s", json.dumps(to_dict(cfg)))
        return _run_job_locked(job, cfg, paths, data_key, build_pairs, run_info, label, log,
                               progress=not inner or os.environ.get("CAPPY_LOG_LEVEL") == "debug")


def _run_job_locked(job, cfg, paths, data_key, build_pairs, run_info, label, log, progress=True) -> dict:
    from cappy_core.io import write_json
    from cappy_core.labeling.pair_mixture import existing_pair_files
    from cappy_core.remote import sync_outputs
    from cappy_core.scorer.runs import check_run_dir, resume_key, summary_line, write_run_record

    key = resume_key(cfg, data_key)
    resuming = check_run_dir(paths, key, fresh=cfg.fresh, log=log)
    if cfg.train_pairs:
        files = (cfg.train_pairs, cfg.eval_pairs)
    else:
        files = (existing_pair_files(paths["pairs_dir"]) if resuming else None) or build_pairs(paths["pairs_dir"])
    def before_fit() -> None:
        write_run_record(paths, key, to_dict(cfg))
        sync_outputs()  # a URI --storage-path gets the run record and the pairs before training

    from jobs.tracking import tracking

    with tracking(cfg.report_to, paths["run_dir"], paths["name"], to_dict(cfg), log) as run:
        outcome = run_training(cfg, paths, files[0], files[1], run_info={"job": job, "name": paths["name"], **run_info},
                               progress=progress, log=log, before_fit=before_fit, tracking=run)
    results = {"job": job, "config": to_dict(cfg), "paths": paths, "train_pairs": files[0],
               "eval_pairs": files[1], "updates": outcome.updates, "seconds": outcome.seconds,
               "samples_per_s": outcome.samples_per_s, "resumed_at": outcome.resumes,
               "losses": outcome.losses, "evals": outcome.evals}
    write_json(Path(outcome.output) / "results.json", results)
    log(summary_line(label, outcome))
    if cfg.push_to_hub:
        results["hub_url"] = push_to_hub(outcome.output, cfg.push_to_hub, log, private=cfg.private)
    return results


def explain(e: BaseException) -> Optional[tuple[int, str]]:
    """For :func:`cappy_core.config.run_main`: a training run that failed beyond
    ``max_failures`` → exit 1 with its cause (and what to do when the data feed starved)."""
    failure = getattr(sys.modules.get("ray.train"), "TrainingFailedError", None)
    if failure is None or not isinstance(e, failure):
        return None
    hint = ""
    text = str(e) + "".join(str(x) for x in getattr(e, "worker_failures", {}).values())
    if any(k in text for k in ("ExecutionTimeoutError", "made no progress", "no_progress_timeout")):
        hint = (" [the Ray Data feed made no progress: the workers may hold every CPU; give them fewer "
                "(--cpus-per-worker 0.25-0.5 on a small machine) or raise --data-timeout-s]")
    return 1, f"training failed{hint} (rerun the same command to resume from the last checkpoint): {e}"
