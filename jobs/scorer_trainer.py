"""What Ray is for in scorer training: a ``TorchTrainer`` worker group around the plain fit
(:func:`cappy_core.scorer.training.fit_scorer`). Gloo on CPU, nccl on GPU; the group restarts from the
last checkpoint up to ``max_failures``; every worker reads the same ordered Ray Data stream and
takes its rank's slice of each global micro-batch, so 1 and N workers see the same batches; DDP;
rank 0 checkpoints and ``ray.train.report``. The run's lifecycle around it (paths, locks, pairs,
results) is :func:`jobs.train_scorer.run_job`'s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


#: Print once from a worker (Ray Train's patched ``print`` shows stdout lines twice).
_say = functools.partial(print, file=sys.__stdout__, flush=True)


def train_loop_per_worker(c: dict) -> None:
    """Runs on every Ray Train worker; ``c`` is the plain dict :func:`run_training` built."""
    import ray.train
    import ray.train.torch
    import torch
    import transformers

    from cappy_core.scorer.model import Scorer
    from cappy_core.scorer.train_state import TrainState, load_train_state
    from cappy_core.scorer.training import scorer_optimizer

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
        optimizer = scorer_optimizer(model, schedule)
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
    # --report-to: rank 0 logs each update's loss and LR as it is made, each report's evals and throughput
    from jobs.tracking import Tracker

    with Tracker(c.get("tracking") if rank == 0 else None, in_ray_train=True) as tracker:
        _fit(c, scorer, model, optimizer, state, rank, world, device, eval_rows, fail_at, say, tracker)


def _fit(c, scorer, model, optimizer, state, rank, world, device, eval_rows, fail_at, say, tracker) -> None:
    """The worker's fit, once its scorer, optimizer and state are ready: reports, evals, updates."""
    import ray.train

    from cappy_core.fault_injection import check_update
    from cappy_core.scorer.runs import RunProgress, evaluate_pairs, save_checkpoint
    from cappy_core.scorer.training import fit_scorer, mean_over_ranks, window_rows
    from jobs.tracking_reports import training_report

    schedule, total = c["schedule"], c["total_updates"]

    def report(metrics: dict, with_checkpoint: bool) -> None:
        training_report(tracker, metrics)
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
        tracker.scalars({"train/loss": info.loss, "train/lr": info.lr}, info.update)
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


def run_training(cfg: Any, paths: dict[str, str], train_file: str, eval_file: str | None,
                 run_info: dict, log: Callable[[str], None] = print, before_fit=None, progress: bool = True,
                 tracking=None):
    """Check the pair files, then fit a TorchTrainer and export the final scorer to ``output``;
    returns a :class:`~cappy_core.scorer.runs.TrainOutcome`. ``progress``: rank 0 prints its
    per-update and eval lines (the driver's terminal shows them); ``tracking``: the
    :class:`~jobs.tracking.TrackingRun` rank 0 logs into as it trains."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from cappy_core.fault_injection import fail_at_update
    from cappy_core.io import atomic_dir, write_json
    from cappy_core.labeling.pair_mixture import check_pair_file, read_pair_columns
    from cappy_core.scorer.runs import OUTPUT_MARKER, TrainOutcome, check_output
    from cappy_core.scorer.train_state import OPTIMIZER_FILE, load_train_state
    from cappy_core.scorer.training import plan_pair_updates, plan_updates
    from jobs.log_file import init_ray

    rows = check_pair_file(train_file)
    if rows == 0:
        raise ValueError(f"{train_file}: the training dataset is empty (0 pairs)")
    eval_rows = check_pair_file(eval_file) if eval_file and cfg.eval_size else 0
    schedule = cfg.schedule
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
        "fail_at_update": fail_at_update(cfg.fail_at_update), "progress": progress, "tracking": tracking,
        # Ray Train's workers log at INFO through the root logger ("Reporting training result ..."),
        # which its LoggingConfig level does not filter: below --log-level debug, only warnings
        "worker_log_level": logging.INFO if os.environ.get("CAPPY_LOG_LEVEL") == "debug" else logging.WARNING,
        # in every checkpoint's cappy.json, and so in its model card
        "run_info": {**run_info, "train_pairs": rows, "eval_pairs": eval_rows, "loss": schedule.loss},
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
    log(f"training on {rows} pairs ({eval_rows} held out): {total} updates of {schedule.batch_size} "
        f"({cfg.num_workers} worker(s) x {schedule.micro_batch_size} x {accum} accumulation), "
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
