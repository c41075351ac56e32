"""The Ray Train wrapper shared by ``cappy pretrain`` and ``cappy finetune``: around the plain fit
(:func:`cappy_core.training.fit_scorer`) only what Ray is for. A ``TorchTrainer`` worker group
(gloo on CPU, nccl on GPU; restarts from the last checkpoint up to ``max_failures``); every worker
reads the same ordered Ray Data stream and takes its rank's slice of each global micro-batch, so 1
and N workers see the same batches; DDP; rank-0 checkpoints and ``ray.train.report``. Rerunning a
command resumes its run (:mod:`cappy_core.scorer_runs`). Fault injection: ``--fail-at-update K``
or ``CAPPY_FAIL_AT_UPDATE=K`` (:mod:`cappy_core.fault_injection`). A URI ``--storage-path``
(``s3://``, ``gs://``, ...) goes to Ray Train as is; the run's own files are staged locally and
uploaded, as is a URI ``--output`` (:mod:`cappy_core.remote`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from cappy_core.config import ConfigError, to_dict
from jobs.tracking import TrackingOptions, check_report_to

logger = logging.getLogger(__name__)

#: What a run keeps in STORAGE/NAME besides Ray Train's own folders: synced with a URI storage path.
RUN_FILES = ("cappy_run.json", "pairs", "logs", "scorer")


@dataclass
class TrainScorerConfig(TrackingOptions):
    """Fields shared by the pretrain and finetune jobs (each adds its data fields)."""

    init: str = field(default="minilm", metadata={
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
    train_size: int = field(default=102400, metadata={"help": "training pairs (cut or tiled)"})
    eval_size: int = field(default=512, metadata={
        "help": "held-out pairs (whole instructions) for eval metrics; 0 disables eval"})
    max_length: int = field(default=512, metadata={"help": "pair truncation length in tokens"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (AdamW)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of updates of linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    epochs: int = field(default=1, metadata={"help": "passes over the training pairs"})
    batch_size: int = field(default=128, metadata={
        "help": "effective batch: pairs per optimizer update, over all workers"})
    micro_batch_size: int = field(default=32, metadata={
        "help": "pairs per forward pass per worker; accumulation = batch / (micro * workers)"})
    max_grad_norm: Optional[float] = field(default=None, metadata={"help": "clip gradients to this norm"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for training and eval"})
    seed: int = field(default=0, metadata={"help": "seeds pairs, head init and dropout"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers (data parallel)"})
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
    bucket_window: int = field(default=8, metadata={
        "help": "global micro-batches per length-grouping window (1: no grouping)"})
    eval_batch_size: int = field(default=64, metadata={"help": "pairs per eval batch"})
    data_timeout_s: Optional[float] = field(default=None, metadata={
        "help": "fail if the Ray Data feed makes no progress this long (default: Ray's, 30 min)"})
    fresh: bool = field(default=False, metadata={
        "help": "delete an existing run with this name instead of resuming it"})
    allow_pickle: bool = field(default=False, metadata={"help": "accept pickle-only init checkpoints"})
    loss: str = field(default="mse", metadata={"help": "objective: mse (the paper's), listwise or listwise+mse"})
    listwise_tau: float = field(default=0.3, metadata={"help": "listwise target: softmax(label / tau)"})
    mse_weight: float = field(default=0.0, metadata={"help": "listwise+mse: weight of the MSE term"})
    group_by_instruction: bool = field(default=False, metadata={"help": "one instruction's pairs per micro-batch"})
    push_to_hub: Optional[str] = field(default=None, metadata={
        "metavar": "REPO", "help": "upload the finished scorer (with its model card) to this Hugging Face "
                                   "model repo, e.g. me/cappy-tense; checked before training"})


def schedule_of(cfg: TrainScorerConfig):
    """The config's :class:`~cappy_core.training.ScorerSchedule` (same field names)."""
    from cappy_core.training import ScorerSchedule

    return ScorerSchedule(**{f.name: getattr(cfg, f.name) for f in fields(ScorerSchedule)})


def check_config(cfg: TrainScorerConfig) -> None:
    from cappy_core.scorer_runs import check_init
    from cappy_core.training import accum_steps

    rules = [(k, getattr(cfg, k) >= 1, ">= 1") for k in ("train_size", "max_length", "num_workers", "checkpoint_every",
                                                          "log_every", "keep_checkpoints", "eval_batch_size")]
    rules += [("eval_size", cfg.eval_size >= 0, ">= 0"), ("cpus_per_worker", cfg.cpus_per_worker > 0, "> 0"),
              ("eval_every", cfg.eval_every is None or cfg.eval_every >= 1, ">= 1"),
              ("fail_at_update", cfg.fail_at_update is None or cfg.fail_at_update >= 1, ">= 1")]
    for k, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{k} must be {rule}, got {getattr(cfg, k)}")
    accum_steps(schedule_of(cfg), cfg.num_workers)  # the schedule's rules; batch = micro x workers x k
    check_init(cfg.init, cfg.allow_pickle)
    check_report_to(cfg.report_to)
    if cfg.push_to_hub:
        check_hub_push(cfg.push_to_hub)


HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_hub_push(repo: str) -> None:
    """Fail before training, not after, when ``--push-to-hub REPO`` cannot work: a malformed
    repo id, offline mode, no token, or no route to the hub (one ``whoami`` call)."""
    if not HUB_REPO.fullmatch(repo):
        raise ConfigError(f"--push-to-hub {repo!r}: expected a model repo id OWNER/NAME")
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set; unset it on a machine with network")
    if not get_token():
        raise ConfigError(f"--push-to-hub {repo}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    try:
        HfApi().whoami()
    except Exception as e:  # connection refused, DNS, proxy, 401: all "cannot push from here"
        raise ConfigError(f"--push-to-hub {repo}: cannot reach the Hugging Face hub with this token "
                          f"({type(e).__name__}: {e})") from e


def push_to_hub(folder: str, repo: str, log: Callable[[str], None] = print) -> str:
    """Upload a scorer folder (weights, tokenizer, cappy.json, model card) to ``repo``; its URL."""
    from huggingface_hub import HfApi

    from cappy_core.training import TRAIN_STATE_FILE

    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    info = api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model",
                             ignore_patterns=[TRAIN_STATE_FILE, "results.json"],  # local paths, curves
                             commit_message="Cappy scorer (cappy on Ray)")
    url = getattr(info, "repo_url", None) or f"https://huggingface.co/{repo}"
    log(f"pushed {folder} to {url}")
    return str(url)


#: Print once from a worker (Ray Train's patched ``print`` shows stdout lines twice).
_say = functools.partial(print, file=sys.__stdout__, flush=True)


def train_loop_per_worker(c: dict) -> None:
    """Runs on every Ray Train worker; ``c`` is the plain dict :func:`run_training` built."""
    import ray.train
    import ray.train.torch
    import torch
    import transformers

    from cappy_core.fault_injection import check_update
    from cappy_core.scorer import Scorer
    from cappy_core.scorer_runs import RunProgress, evaluate_pairs, save_checkpoint
    from cappy_core.training import (TrainState, fit_scorer, load_train_state, make_optimizer, mean_over_ranks,
                                     window_rows)

    transformers.utils.logging.disable_progress_bar()
    logging.getLogger().setLevel(c.get("worker_log_level", logging.INFO))
    say = _say if c.get("progress", True) else None
    schedule, total = c["schedule"], c["total_updates"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(c["torch_threads"])
    checkpoint = ray.train.get_checkpoint()
    state, resumed = TrainState(), checkpoint is not None
    with (checkpoint.as_directory() if resumed else contextlib.nullcontext()) as ckpt_dir:
        scorer = Scorer.from_pretrained(ckpt_dir or c["init"], dtype="bfloat16" if schedule.bf16 else "float32",
                                        device=device, max_length=c["max_length"], allow_pickle=c["allow_pickle"],
                                        seed=schedule.seed, for_training=True)
        model = ray.train.torch.prepare_model(scorer.model)
        optimizer = make_optimizer(model, schedule.lr, schedule.weight_decay)
        if resumed:
            state, _ = load_train_state(ckpt_dir, optimizer)
    fail_at = None if resumed or rank != 0 else c["fail_at_update"]
    if rank == 0 and say is not None:
        where = f"resumed at update {state.update}/{total}" if resumed else f"starting: {total} updates"
        say(f"[train] {where}; world {world} on {device}, accumulation {c['grad_accum_steps']}")
    if state.update >= total:
        return  # a finished run rerun: nothing to do, its last checkpoint is the result
    if resumed:
        state.resumes.append(state.update)
    eval_rows = ray.get(c["eval_pairs"]) if c["eval_pairs"] is not None else None

    def report(metrics: dict, with_checkpoint: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "scorer"
            if with_checkpoint and rank == 0:
                save_checkpoint(path, scorer, state, optimizer, total_updates=total,
                                metadata={"metrics": metrics, "run": c["run_info"]})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(path) if path.is_dir() else None)

    def evaluate() -> dict:
        return evaluate_pairs(scorer, eval_rows, rank=rank, world_size=world, batch_size=c["eval_batch_size"])

    progress = RunProgress(state, total, report=report, evaluate=evaluate if eval_rows is not None else None,
                           world_size=world, log_every=c["log_every"], eval_every=c["eval_every"],
                           checkpoint_every=c["checkpoint_every"], log=say if rank == 0 else None)
    progress.begin()

    def on_update(info) -> None:
        check_update(info.update, fail_at)
        progress(info)

    shard, rows = ray.train.get_dataset_shard("train"), window_rows(schedule, world)
    reduce = functools.partial(mean_over_ranks, device=device) if world > 1 else None
    fit_scorer(scorer, None, schedule, total_updates=total, world_size=world, rank=rank, model=model,
               windows=lambda: shard.iter_batches(batch_size=rows, batch_format="numpy", prefetch_batches=2),
               optimizer=optimizer, state=state, device=device, on_update=on_update, reduce_loss=reduce)


# --- the driver ------------------------------------------------------------------------------

def ray_storage(paths: dict[str, str]) -> tuple[str, Any]:
    """``RunConfig``'s ``(storage_path, storage_filesystem)``: the local storage folder and None,
    or for a URI ``--storage-path`` its path in its pyarrow filesystem (Ray Train writes the
    checkpoints there itself, as it does for any URI)."""
    if not paths.get("storage_uri"):
        return paths["storage_path"], None
    from cappy_core.remote import filesystem

    fs, path = filesystem(paths["storage_uri"], "--storage-path")
    return path, fs


@contextlib.contextmanager
def keeping_sigint_handler():
    """Restore this process's SIGINT handler after the block. Ray Train's ``fit()`` replaces it
    ("Received SIGINT. Gracefully aborting the training run") and does not put it back, so a sweep
    that pretrained first could no longer be stopped with Ctrl-C (it printed that line and went on)."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()  # handlers live in the main thread only
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


def run_training(cfg: TrainScorerConfig, paths: dict[str, str], train_file: str, eval_file: str | None,
                 run_info: dict, log: Callable[[str], None] = print, before_fit=None, progress: bool = True):
    """Check the pair files, then fit a TorchTrainer and export the final scorer to ``output``;
    returns a :class:`~cappy_core.scorer_runs.TrainOutcome`. ``progress``: rank 0 prints its
    per-update and eval lines (the driver's terminal shows them)."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from cappy_core.fault_injection import fail_at_update
    from cappy_core.io import atomic_dir, write_json
    from cappy_core.pretrain_data import check_pair_file, read_pair_columns
    from cappy_core.scorer_runs import OUTPUT_MARKER, TrainOutcome, check_output
    from cappy_core.training import OPTIMIZER_FILE, load_train_state, plan_pair_updates, plan_updates
    from jobs.log_file import init_ray

    rows = check_pair_file(train_file)
    if rows == 0:
        raise ValueError(f"{train_file}: the training dataset is empty (0 pairs)")
    eval_rows = check_pair_file(eval_file) if eval_file and cfg.eval_size else 0
    schedule = schedule_of(cfg)
    accum, total = (plan_pair_updates(read_pair_columns(train_file), schedule, cfg.num_workers)
                    if schedule.group_by_instruction else plan_updates(rows, schedule, cfg.num_workers))
    threads = cfg.torch_threads or max(1, int(cfg.cpus_per_worker))
    storage_path, storage_fs = ray_storage(paths)
    init_ray()  # ray.init, and Ray's driver log kept in the log file
    # Set for this fit only: left behind, a short timeout fails the sweep's later sampling stage.
    data_ctx = ray.data.DataContext.get_current()
    saved = (data_ctx.execution_options.preserve_order, data_ctx.enable_progress_bars,
             data_ctx.execution_no_progress_timeout_s)
    data_ctx.execution_options.preserve_order = True
    data_ctx.enable_progress_bars = False  # one feed per worker: bars would interleave in the log
    if cfg.data_timeout_s is not None:
        data_ctx.execution_no_progress_timeout_s = cfg.data_timeout_s
    worker_cfg = {
        "schedule": schedule, "init": cfg.init, "max_length": cfg.max_length, "allow_pickle": cfg.allow_pickle,
        "total_updates": total, "grad_accum_steps": accum, "torch_threads": threads,
        "checkpoint_every": cfg.checkpoint_every, "eval_every": cfg.eval_every or cfg.checkpoint_every,
        "log_every": cfg.log_every, "eval_batch_size": cfg.eval_batch_size,
        "fail_at_update": fail_at_update(cfg.fail_at_update), "progress": progress,
        # Ray Train's workers log at INFO through the root logger ("Reporting training result ..."),
        # which its LoggingConfig level does not filter: below --log-level debug, only warnings
        "worker_log_level": logging.INFO if os.environ.get("CAPPY_LOG_LEVEL") == "debug" else logging.WARNING,
        # in every checkpoint's cappy.json, and so in its model card
        "run_info": {**run_info, "train_pairs": rows, "eval_pairs": eval_rows, "loss": cfg.loss},
        # The held-out pairs are small and every rank scores its share of all of them: one object
        # in the object store instead of a second Ray Data pipeline per worker and attempt.
        "eval_pairs": ray.put(read_pair_columns(eval_file)) if eval_rows else None}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=worker_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=paths["name"], storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets={"train": ray.data.read_parquet(train_file, columns=["instruction", "response", "label"])},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]))
    log(f"training on {rows} pairs ({eval_rows} held out): {total} updates of {cfg.batch_size} "
        f"({cfg.num_workers} worker(s) x {cfg.micro_batch_size} x {accum} accumulation), "
        f"{'GPU' if cfg.use_gpu else f'CPU {cfg.cpus_per_worker} + {threads} thread(s)'} per worker; "
        f"run {paths['run_dir']}")
    if before_fit is not None:
        before_fit()
    t0 = time.time()
    try:
        with keeping_sigint_handler():  # Ray Train's fit() installs its own and leaves it behind
            result = trainer.fit()
    finally:
        (data_ctx.execution_options.preserve_order, data_ctx.enable_progress_bars,
         data_ctx.execution_no_progress_timeout_s) = saved
    seconds = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"run {paths['name']} finished without a checkpoint")
    check_output(paths)  # again: the folder may have changed during training
    with result.checkpoint.as_directory() as d, atomic_dir(paths["output"]) as tmp:
        state, _ = load_train_state(d)
        shutil.copytree(d, tmp, ignore=shutil.ignore_patterns(OPTIMIZER_FILE), dirs_exist_ok=True)
        write_json(tmp / OUTPUT_MARKER, {"job": run_info.get("job"), "run": paths["name"],
                                         "run_dir": paths["run_dir"]})
    return TrainOutcome(output=paths["output"], updates=state.update, total_updates=total, seconds=seconds,
                        losses=state.losses, evals=state.evals, checkpoint_path=result.checkpoint.path,
                        samples_per_s=(result.metrics or {}).get("samples_per_s"), resumes=state.resumes)


def run_job(job: str, cfg: TrainScorerConfig, *, default_name: str, data_key: dict[str, Any],
            build_pairs: Callable[[str], tuple[str, str | None]], run_info: dict[str, Any], label: str,
            log: Callable[[str], None] = print) -> dict:
    """The lifecycle both jobs share: check config → run dir → pairs (reused when resuming) →
    Ray Train → ``results.json`` beside the exported scorer → one summary line."""
    from cappy_core.io import output_lock, with_local_paths
    from cappy_core.remote import is_remote, locked_output, staging_dir
    from cappy_core.scorer_runs import check_output, resolve_paths
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
    from cappy_core.pretrain_data import existing_pair_files
    from cappy_core.remote import sync_outputs
    from cappy_core.scorer_runs import check_run_dir, resume_key, summary_line, write_run_record

    key = resume_key(to_dict(cfg), data_key)
    resuming = check_run_dir(paths, key, fresh=cfg.fresh, log=log)
    if cfg.train_pairs:
        files = (cfg.train_pairs, cfg.eval_pairs)
    else:
        files = (existing_pair_files(paths["pairs_dir"]) if resuming else None) or build_pairs(paths["pairs_dir"])
    def before_fit() -> None:
        write_run_record(paths, key, to_dict(cfg))
        sync_outputs()  # a URI --storage-path gets the run record and the pairs before training

    outcome = run_training(cfg, paths, files[0], files[1], run_info={"job": job, "name": paths["name"], **run_info},
                           progress=progress,
                           log=log, before_fit=before_fit)
    results = {"job": job, "config": to_dict(cfg), "paths": paths, "train_pairs": files[0],
               "eval_pairs": files[1], "updates": outcome.updates, "seconds": outcome.seconds,
               "samples_per_s": outcome.samples_per_s, "resumed_at": outcome.resumes,
               "losses": outcome.losses, "evals": outcome.evals}
    write_json(Path(outcome.output) / "results.json", results)
    log(summary_line(label, outcome))
    from jobs.tracking import report, scorer_run

    report(cfg.report_to, paths["run_dir"], paths["name"], to_dict(cfg),
           lambda tracker: scorer_run(tracker, results, outcome.total_updates), log)
    if cfg.push_to_hub:
        results["hub_url"] = push_to_hub(outcome.output, cfg.push_to_hub, log)
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
