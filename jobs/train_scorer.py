"""The Ray Train wrapper shared by ``cappy pretrain`` and ``cappy finetune``.

It adds to the plain loop (:func:`cappy_core.training.train`) only what Ray is for
(STYLE.md practice 6): the worker group, the dataset feed, DDP and ``ray.train.report``.

* **Trainer**: Ray Train V2 ``TorchTrainer`` with ``ScalingConfig(num_workers, use_gpu,
  resources_per_worker={"CPU": cpus_per_worker})``; the backend is gloo on CPU and nccl on GPU
  (TorchConfig's default), same code. ``RunConfig(name, storage_path, FailureConfig(max_failures),
  CheckpointConfig(num_to_keep))``.
* **Data**: ``ray.data.read_parquet`` of the training pairs (``PAIR_SCHEMA``) with
  ``preserve_order``; every worker reads the same ordered stream (``DataConfig(
  datasets_to_split=[])``) through ``ray.train.get_dataset_shard("train")`` +
  ``iter_torch_batches(collate_fn=...)``, and :class:`~cappy_core.training.PairWindowCollator`
  makes each rank's slice of every global micro-batch (length-grouped within a window, dynamic
  padding, tokenised in Ray's prefetch threads). Every rank therefore knows exactly which rows
  every update used: 1 worker and N workers see the same global batches, and a restart skips
  exactly the ``updates_done · grad_accum`` micro-batches already consumed.
* **Checkpoints**: every ``checkpoint_every`` updates (and at the end) rank 0 writes a Hugging
  Face folder with :meth:`Scorer.save_pretrained` (safetensors + ``cappy.json``) plus
  ``trainer_state.json`` and ``optimizer.safetensors``; every rank calls ``ray.train.report``.
* **Resume**: ``ray.train.get_checkpoint()`` after a worker failure (``max_failures``) or when the
  same command is rerun with the same ``storage_path`` and ``name``: weights, Adam moments, the
  update counter, the loss curve and the eval history continue from the checkpoint.
* **Eval**: the held-out pairs (small; one object in the object store) are scored, sharded over
  ranks and gathered, before training and every ``eval_every`` updates;
  :func:`cappy_core.metrics.scorer_metrics`.
* **Fault injection**: ``fail_at_update=K`` (or ``CAPPY_FAIL_AT_UPDATE=K`` in the driver's
  environment) makes rank 0 raise right after update K in an attempt that did *not* start from a
  checkpoint (its first attempt, if a checkpoint is written before K).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from cappy_core.config import ConfigError, add_dataclass_arguments, load_yaml, to_dict

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
RUN_RECORD = "cappy_run.json"
FAIL_ENV = "CAPPY_FAIL_AT_UPDATE"


@dataclass
class TrainScorerConfig:
    """Fields shared by the pretrain and finetune jobs (each adds its data fields)."""

    init: str = field(default="minilm", metadata={
        "help": "scorer to start from: 'minilm' (embedded), a scorer folder, or a hub id "
                "(roberta-large, btan2/cappy-large)"})
    name: Optional[str] = field(default=None, metadata={
        "help": "run name; rerunning with the same name and storage path resumes it"})
    storage_path: str = field(default="~/cappy_runs", metadata={
        "help": "where runs keep pairs and checkpoints (shared storage on a multi-node cluster)"})
    output: Optional[str] = field(default=None, metadata={
        "help": "final scorer folder (default STORAGE_PATH/NAME/scorer)"})
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
        "help": f"fault injection: raise after this update in an attempt that did not resume "
                f"(also env {FAIL_ENV})"})
    bucket_window: int = field(default=8, metadata={
        "help": "global micro-batches per length-grouping window (1: no grouping)"})
    eval_batch_size: int = field(default=64, metadata={"help": "pairs per eval batch"})
    data_timeout_s: Optional[float] = field(default=None, metadata={
        "help": "fail if the Ray Data feed makes no progress this long (default: Ray's, 30 min)"})
    fresh: bool = field(default=False, metadata={
        "help": "delete an existing run with this name instead of resuming it"})
    allow_pickle: bool = field(default=False, metadata={"help": "accept pickle-only init checkpoints"})


# Fields that must match for a rerun to resume an existing run.
RESUME_KEYS = ("init", "train_size", "eval_size", "max_length", "lr", "warmup_ratio", "weight_decay",
               "epochs", "batch_size", "micro_batch_size", "num_workers", "seed", "bucket_window")


# --- config ----------------------------------------------------------------------------------

def presets(job: str) -> dict[str, Path]:
    return {p.stem[len(job) + 1:]: p for p in sorted(CONFIG_DIR.glob(f"{job}_*.yaml"))}


def build_parser(cls: type, job: str, prog: str | None, description: str, epilog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or f"python -m jobs.{job}", description=description,
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = sorted(presets(job))
    parser.add_argument("--preset", choices=names, default=None,
                        help=f"a shipped config (jobs/configs/{job}_<preset>.yaml); "
                             "--config and flags override it")
    add_dataclass_arguments(parser, cls)
    return parser


def config_from_args(cls: type, args: argparse.Namespace, job: str):
    """defaults < --preset YAML < --config YAML < explicit flags."""
    values: dict[str, Any] = {}
    if args.preset:
        values.update(load_yaml(cls, presets(job)[args.preset]))
    if args.config:
        values.update(load_yaml(cls, args.config))
    names = {f.name for f in fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)


def check_config(cfg: TrainScorerConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for k in ("train_size", "max_length", "epochs", "batch_size", "micro_batch_size", "num_workers",
              "checkpoint_every", "log_every", "keep_checkpoints", "bucket_window", "eval_batch_size"):
        need(getattr(cfg, k) >= 1, f"{k} must be >= 1, got {getattr(cfg, k)}")
    need(cfg.eval_size >= 0, f"eval_size must be >= 0, got {cfg.eval_size}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(0 <= cfg.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    need(cfg.cpus_per_worker > 0, f"cpus_per_worker must be > 0, got {cfg.cpus_per_worker}")
    per_update = cfg.micro_batch_size * cfg.num_workers
    need(cfg.batch_size % per_update == 0,
         f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size x num_workers = "
         f"{cfg.micro_batch_size} x {cfg.num_workers} = {per_update}")
    need(cfg.eval_every is None or cfg.eval_every >= 1, f"eval_every must be >= 1, got {cfg.eval_every}")
    need(cfg.fail_at_update is None or cfg.fail_at_update >= 1,
         f"fail_at_update must be >= 1, got {cfg.fail_at_update}")
    check_init(cfg.init, cfg.allow_pickle)


def check_init(init: str, allow_pickle: bool = False, flag: str = "--init") -> None:
    """Refuse an unusable scorer source in the driver, before any worker starts (clear message)."""
    from cappy_core.scorer import resolve_source

    try:
        resolve_source(init, allow_pickle)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{flag} {init!r}: {e}") from None


def resolve_paths(cfg: TrainScorerConfig, default_name: str) -> dict[str, str]:
    name = cfg.name or default_name
    storage = Path(cfg.storage_path).expanduser().resolve()
    run_dir = storage / name
    return {
        "name": name,
        "storage_path": str(storage),
        "run_dir": str(run_dir),
        "pairs_dir": str(Path(cfg.pairs_dir).expanduser().resolve()) if cfg.pairs_dir else str(run_dir / "pairs"),
        "output": str(Path(cfg.output).expanduser().resolve()) if cfg.output else str(run_dir / "scorer"),
    }


def check_run_dir(cfg: TrainScorerConfig, paths: dict[str, str], data_key: dict[str, Any],
                  log=print) -> tuple[bool, dict[str, Any]]:
    """Returns ``(resuming, key)``: whether a run with this name exists (and is resumed) and the
    config key it must match. A rerun with a different config under the same name is an error
    unless ``--fresh``, which deletes the old run first."""
    run_dir = Path(paths["run_dir"])
    record = run_dir / RUN_RECORD
    key = {**{k: getattr(cfg, k) for k in RESUME_KEYS}, **data_key}
    if cfg.fresh and run_dir.exists():
        log(f"--fresh: deleting the existing run {run_dir}")
        shutil.rmtree(run_dir)
    if not record.is_file():
        return False, key
    old = json.loads(record.read_text()).get("key", {})
    diff = {k: (old.get(k), v) for k, v in key.items() if old.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"run {paths['name']!r} in {paths['storage_path']} was started with a "
                          f"different config ({shown}); pass another --name, or --fresh to discard it")
    log(f"resuming run {paths['name']!r} from {run_dir}")
    return True, key


def write_run_record(cfg: TrainScorerConfig, paths: dict[str, str], key: dict[str, Any]) -> None:
    """``RUN_DIR/cappy_run.json``: the config a rerun must match to resume (written when
    training starts, so a run that failed input checks leaves nothing to match)."""
    record = Path(paths["run_dir"]) / RUN_RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "config": to_dict(cfg)}, indent=1) + "\n")
    tmp.replace(record)


def fail_at_update(cfg: TrainScorerConfig) -> Optional[int]:
    if cfg.fail_at_update is not None:
        return cfg.fail_at_update
    env = os.environ.get(FAIL_ENV)
    if env:
        try:
            return int(env)
        except ValueError:
            raise ConfigError(f"{FAIL_ENV}={env!r} is not an integer") from None
    return None


# --- data ----------------------------------------------------------------------------------

def load_examples(tasks: Sequence[str], splits: Sequence[str], examples_dir: str | None,
                  cache_dir: str | None, log=print) -> tuple[list, list[str]]:
    """Examples of ``tasks`` (specs: names, 'pretrain', 'all45') and ``splits``, from a
    ``cappy data prepare`` folder or, without one, straight from the BIG-Bench cache.
    Returns ``(examples, task names)``."""
    from cappy_core.data.bigbench import TooFewExamples, find_tasks, load_task
    from cappy_core.data.records import read_examples, split_path
    from cappy_core.data.source import bigbench_task_root
    from cappy_core.data.tasks import resolve_tasks

    if examples_dir:
        root = Path(examples_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--examples {root}: no such folder (write it with `cappy data prepare`)")
        available = sorted(p.name for p in root.iterdir() if (p / f"{splits[0]}.parquet").is_file())
    else:
        located = find_tasks([bigbench_task_root(cache_dir)])
        available = sorted(located)
    names, unavailable = resolve_tasks(tasks, available)
    for why in unavailable.values():
        log(f"unavailable: {why}")
    examples, used = [], []
    for name in names:
        if examples_dir:
            for s in splits:
                path = split_path(examples_dir, name, s)
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: missing; run `cappy data prepare --tasks {name} "
                                            f"--out {examples_dir}`")
                examples.extend(read_examples(path))
        else:
            try:
                parts = load_task(located[name], name)
            except TooFewExamples as e:
                log(f"skipped {name}: {e}")
                continue
            for s in splits:
                examples.extend(parts[s])
        used.append(name)
    return examples, used


def write_pair_files(train, held, pairs_dir: str, log=print) -> tuple[str, str | None]:
    from collections import Counter

    from cappy_core.pretrain_data import write_pairs

    d = Path(pairs_dir)
    train_file = write_pairs(train, d / "train.parquet")
    eval_file = write_pairs(held, d / "eval.parquet") if held else None
    sources = Counter(p.source for p in train)
    log(f"pairs: {len(train)} train ({', '.join(f'{k} {v}' for k, v in sorted(sources.items()))}; "
        f"{len({p.instruction for p in train})} instructions, {len({p.task for p in train})} tasks), "
        f"{len(held)} held out ({len({p.instruction for p in held})} instructions) -> {d}")
    return str(train_file), str(eval_file) if eval_file else None


def existing_pair_files(pairs_dir: str) -> tuple[str, str | None] | None:
    d = Path(pairs_dir)
    if not (d / "train.parquet").is_file():
        return None
    return str(d / "train.parquet"), str(d / "eval.parquet") if (d / "eval.parquet").is_file() else None


# --- the worker ------------------------------------------------------------------------------

class Throughput:
    """Training samples/s over all ranks, from the end of the first update of this attempt (so
    model loading, the data feed's start-up and the first step's warm-up are excluded) and
    without the time spent in eval and checkpoints (:meth:`paused`)."""

    def __init__(self, world_size: int = 1):
        self.world = world_size
        self.t0: float | None = None
        self.s0 = 0
        self.pause = 0.0

    def tick(self, samples: int) -> float:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.s0 = now, samples
            return 0.0
        return (samples - self.s0) * self.world / max(now - self.t0 - self.pause, 1e-9)

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.pause += time.perf_counter() - t


def _say(msg: str) -> None:
    """Print once from a worker (Ray Train's patched ``print`` shows stdout lines twice)."""
    print(msg, file=sys.__stdout__, flush=True)


def train_loop_per_worker(c: dict) -> None:
    """Runs on every Ray Train worker; ``c`` is the plain dict the driver built."""
    import ray.train
    import ray.train.torch
    import torch
    import transformers
    from ray.data.collate_fn import NumpyBatchCollateFn

    from cappy_core.metrics import scorer_metrics
    from cappy_core.scorer import Scorer
    from cappy_core.training import (PairWindowCollator, TrainState, iter_micro_batches, load_train_state,
                                     make_optimizer, save_train_state, scorer_mse_loss, train)

    transformers.utils.logging.disable_progress_bar()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(c["torch_threads"])
    dtype = "bfloat16" if c["bf16"] else "float32"
    checkpoint = ray.train.get_checkpoint()
    state = TrainState()
    resumed = checkpoint is not None
    with (checkpoint.as_directory() if resumed else contextlib.nullcontext()) as ckpt_dir:
        scorer = Scorer.from_pretrained(ckpt_dir or c["init"], dtype=dtype, device=device,
                                        max_length=c["max_length"], allow_pickle=c["allow_pickle"],
                                        seed=c["seed"])
        model = ray.train.torch.prepare_model(scorer.model)
        optimizer = make_optimizer(model, c["lr"], c["weight_decay"])
        if resumed:
            state, _ = load_train_state(ckpt_dir, optimizer)
    scorer.model.train()
    total, accum = c["total_updates"], c["grad_accum_steps"]
    fail_at = None if resumed else c["fail_at_update"]
    if rank == 0:
        where = f"resumed at update {state.update}/{total}" if resumed else f"starting: {total} updates"
        _say(f"[train] {where}; world {world} on {device}, accumulation {accum}")
    if state.update >= total:
        return  # a finished run rerun: nothing to do, its last checkpoint is the result
    if resumed:
        state.resumes.append(state.update)

    eval_rows = ray.get(c["eval_pairs"]) if c["eval_pairs"] is not None else None

    def evaluate(update: int) -> dict:
        n = len(eval_rows["label"])
        mine = list(range(rank, n, world))
        scores = scorer.score([eval_rows["instruction"][i] for i in mine],
                              [eval_rows["response"][i] for i in mine], batch_size=c["eval_batch_size"])
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, scores)
        else:
            gathered = [scores]
        full = [0.0] * n
        for r, part in enumerate(gathered):
            for i, s in zip(range(r, n, world), part):
                full[i] = s
        m = scorer_metrics(full, eval_rows["label"], eval_rows["instruction"])
        scorer.model.train()
        return {"update": update, **m}

    def report(metrics: dict, with_checkpoint: bool) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        if not with_checkpoint:
            ray.train.report(clean)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                path = Path(tmp) / "scorer"
                scorer.save_pretrained(path, metadata={"update": state.update, "total_updates": total,
                                                       "metrics": clean, "run": c["run_info"]})
                save_train_state(path, state, optimizer, extra={"total_updates": total})
                ckpt = ray.train.Checkpoint.from_directory(path)
            ray.train.report(clean, checkpoint=ckpt)

    if eval_rows is not None and state.update == 0 and not state.evals:
        state.evals.append(evaluate(0))
        if rank == 0:
            _say(f"[eval] update 0: {json.dumps(state.evals[-1])}")
        report({"update": 0, **{f"eval_{k}": v for k, v in state.evals[-1].items() if k != "update"}}, False)

    meter = Throughput(world)
    last = [state.update]

    def on_update(info) -> None:
        u = info.update
        if fail_at is not None and u == fail_at and rank == 0:
            raise RuntimeError(f"injected fault after update {u} (fail_at_update)")
        rate = meter.tick(state.samples)
        if rank == 0 and (u % c["log_every"] == 0 or u == total):
            _say(f"[train] update {u}/{total} loss {info.loss:.4f} lr {info.lr:.3g} {rate:.1f} samples/s")
        do_eval = eval_rows is not None and (u % c["eval_every"] == 0 or u == total)
        do_ckpt = u % c["checkpoint_every"] == 0 or u == total
        if not (do_eval or do_ckpt):
            return
        with meter.paused():
            losses = state.losses[last[0]:u]
            last[0] = u
            metrics = {"update": u, "loss": sum(losses) / max(len(losses), 1), "lr": info.lr,
                       "samples_per_s": rate}
            if do_eval:
                state.evals.append(evaluate(u))
                metrics.update({f"eval_{k}": v for k, v in state.evals[-1].items() if k != "update"})
                if rank == 0:
                    _say(f"[eval] update {u}: {json.dumps(state.evals[-1])}")
            report(metrics, do_ckpt)

    train_shard = ray.train.get_dataset_shard("train")
    collator = PairWindowCollator(scorer.tokenizer, max_length=c["max_length"],
                                  micro_batch_size=c["micro_batch_size"], world_size=world, rank=rank,
                                  sort_by_length=c["bucket_window"] > 1, seed=c["seed"])

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collator(batch)

    window_rows = collator.global_batch * c["bucket_window"]

    def windows():
        return train_shard.iter_torch_batches(batch_size=window_rows, collate_fn=Collate(),
                                              prefetch_batches=2)

    def mean_over_ranks(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / world

    batches = iter_micro_batches(windows, epochs=c["epochs"], skip=state.update * accum)
    train(model, batches, loss_fn=scorer_mse_loss, total_updates=total, lr=c["lr"],
          warmup_ratio=c["warmup_ratio"], weight_decay=c["weight_decay"], grad_accum_steps=accum,
          bf16=c["bf16"], max_grad_norm=c["max_grad_norm"], seed=c["seed"] + state.update,
          optimizer=optimizer, state=state, device=device, on_update=on_update,
          reduce_loss=mean_over_ranks if world > 1 else None)
    if state.update < total:
        raise RuntimeError(f"the training data ran out after {state.update} of {total} updates")


def train_in_process(c: dict, train_file: str, *, device: str = "cpu") -> tuple[Any, float]:
    """The worker's training, without Ray: same scorer, optimizer, collator, windows and loop,
    fed from the Parquet file in this process (one rank). For the benchmark and the tests that
    check a Ray run against it. ``c`` is the worker config dict. Returns ``(state, samples/s)``."""
    _, state, rate = fit_in_process(c, train_file, device=device)
    return state, rate


def fit_in_process(c: dict, train_file: str, *, device: str = "cpu") -> tuple[Any, Any, float]:
    """:func:`train_in_process` returning the trained scorer too: ``(scorer, state, samples/s)``.
    The sweep finetunes each task this way inside one Ray task (a worker group per task would
    cost more than the training itself at the local preset's size)."""
    import torch
    import transformers

    from cappy_core.pretrain_data import read_pair_columns
    from cappy_core.scorer import Scorer
    from cappy_core.training import (PairWindowCollator, TrainState, iter_micro_batches, make_optimizer,
                                     scorer_mse_loss, table_windows, train)

    transformers.utils.logging.disable_progress_bar()
    if device == "cpu":
        torch.set_num_threads(c["torch_threads"])
    scorer = Scorer.from_pretrained(c["init"], dtype="bfloat16" if c["bf16"] else "float32", device=device,
                                    max_length=c["max_length"], allow_pickle=c["allow_pickle"], seed=c["seed"])
    scorer.model.train()
    optimizer = make_optimizer(scorer.model, c["lr"], c["weight_decay"])
    columns = read_pair_columns(train_file)
    collator = PairWindowCollator(scorer.tokenizer, max_length=c["max_length"],
                                  micro_batch_size=c["micro_batch_size"], sort_by_length=c["bucket_window"] > 1,
                                  seed=c["seed"])
    window_rows = collator.global_batch * c["bucket_window"]
    state = TrainState()
    meter = Throughput(1)
    rate = [0.0]

    def windows():
        return (collator(w) for w in table_windows(columns, window_rows))

    train(scorer.model, iter_micro_batches(windows, epochs=c["epochs"]), loss_fn=scorer_mse_loss,
          total_updates=c["total_updates"], lr=c["lr"], warmup_ratio=c["warmup_ratio"],
          weight_decay=c["weight_decay"], grad_accum_steps=c["grad_accum_steps"], bf16=c["bf16"],
          max_grad_norm=c["max_grad_norm"], seed=c["seed"], optimizer=optimizer, state=state,
          device=device, on_update=lambda info: rate.__setitem__(0, meter.tick(state.samples)))
    scorer.model.eval()
    return scorer, state, rate[0]


# --- the driver ------------------------------------------------------------------------------

@dataclass
class TrainOutcome:
    output: str
    updates: int
    total_updates: int
    seconds: float
    losses: list[float]
    evals: list[dict]
    checkpoint_path: str
    samples_per_s: float | None = None  # training throughput of the last attempt (all workers)
    resumes: list[int] = field(default_factory=list)  # updates at which the run resumed


def plan_updates(rows: int, cfg: TrainScorerConfig) -> tuple[int, int]:
    """``(grad_accum_steps, total_updates)`` for ``rows`` training pairs."""
    from cappy_core.training import micro_batches_per_epoch

    accum = cfg.batch_size // (cfg.micro_batch_size * cfg.num_workers)
    total = micro_batches_per_epoch(rows, cfg.micro_batch_size, cfg.num_workers) * cfg.epochs // accum
    if total < 1:
        raise ConfigError(f"{rows} training pairs make no full update of batch_size {cfg.batch_size}")
    return accum, total


def worker_config(cfg: TrainScorerConfig, rows: int, eval_rows: int, run_info: dict) -> dict:
    """The plain dict every worker gets (and :func:`train_in_process`)."""
    accum, total = plan_updates(rows, cfg)
    return {
        **{k: getattr(cfg, k) for k in ("init", "max_length", "lr", "warmup_ratio", "weight_decay", "epochs",
                                        "micro_batch_size", "max_grad_norm", "bf16", "seed", "allow_pickle",
                                        "checkpoint_every", "log_every", "bucket_window", "eval_batch_size")},
        "eval_size": eval_rows, "eval_every": cfg.eval_every or cfg.checkpoint_every,
        "total_updates": total, "grad_accum_steps": accum,
        "torch_threads": cfg.torch_threads or max(1, int(cfg.cpus_per_worker)),
        "fail_at_update": fail_at_update(cfg), "run_info": run_info, "eval_pairs": None,
    }


def run_training(cfg: TrainScorerConfig, paths: dict[str, str], train_file: str, eval_file: str | None,
                 run_info: dict, log=print, before_fit=None) -> TrainOutcome:
    """Check the pair files, then fit a TorchTrainer and export the final scorer to ``output``."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from cappy_core.pretrain_data import check_pair_file, read_pair_columns
    from cappy_core.training import TRAIN_STATE_FILE, OPTIMIZER_FILE

    rows = check_pair_file(train_file)
    if rows == 0:
        raise ValueError(f"{train_file}: the training dataset is empty (0 pairs)")
    eval_rows = check_pair_file(eval_file) if eval_file and cfg.eval_size else 0
    worker_cfg = worker_config(cfg, rows, eval_rows, run_info)
    accum, total, threads = worker_cfg["grad_accum_steps"], worker_cfg["total_updates"], worker_cfg["torch_threads"]
    if not ray.is_initialized():
        ray.init()
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.execution_options.preserve_order = True
    data_ctx.enable_progress_bars = False  # one feed per worker: bars would interleave in the log
    if cfg.data_timeout_s is not None:
        data_ctx.execution_no_progress_timeout_s = cfg.data_timeout_s
    columns = ["instruction", "response", "label"]
    datasets = {"train": ray.data.read_parquet(train_file, columns=columns)}
    # The held-out pairs are small and every rank scores its share of all of them: one object
    # in the object store instead of a second Ray Data pipeline per worker and attempt.
    worker_cfg["eval_pairs"] = ray.put(read_pair_columns(eval_file)) if eval_rows else None
    resources = {"CPU": cfg.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=worker_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=paths["name"], storage_path=paths["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=[]))
    log(f"training on {rows} pairs ({eval_rows} held out): {total} updates of {cfg.batch_size} "
        f"({cfg.num_workers} worker(s) x {cfg.micro_batch_size} x {accum} accumulation), "
        f"{'GPU' if cfg.use_gpu else f'CPU {cfg.cpus_per_worker} + {threads} thread(s)'} per worker; "
        f"run {paths['run_dir']}")
    if before_fit is not None:
        before_fit()
    t0 = time.time()
    result = trainer.fit()
    seconds = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"run {paths['name']} finished without a checkpoint")
    output = Path(paths["output"])
    with result.checkpoint.as_directory() as d:
        from cappy_core.training import load_train_state

        state, _ = load_train_state(d)
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(d, tmp, ignore=shutil.ignore_patterns(OPTIMIZER_FILE))
    if output.exists():
        shutil.rmtree(output)
    tmp.replace(output)
    assert (output / TRAIN_STATE_FILE).is_file()
    return TrainOutcome(output=str(output), updates=state.update, total_updates=total, seconds=seconds,
                        losses=state.losses, evals=state.evals, checkpoint_path=result.checkpoint.path,
                        samples_per_s=(result.metrics or {}).get("samples_per_s"), resumes=state.resumes)


def _fmt(m: dict | None) -> str:
    if not m:
        return "n/a"
    keys = ("mse", "pearson", "spearman", "pairwise_acc")
    parts = [f"{k} {m[k]:.3f}" if isinstance(m.get(k), (int, float)) and m[k] == m[k] else f"{k} n/a"
             for k in keys]
    return ", ".join(parts) + f" (n {m.get('n')}, pairs {m.get('pairs')})"


def summary_line(label: str, outcome: TrainOutcome) -> str:
    """One line: updates, time, loss over the first and last tenth of updates, eval before/after."""
    first = outcome.evals[0] if outcome.evals else None
    last = outcome.evals[-1] if outcome.evals else None
    k = max(1, len(outcome.losses) // 10)
    head = sum(outcome.losses[:k]) / k if outcome.losses else float("nan")
    tail = sum(outcome.losses[-k:]) / k if outcome.losses else float("nan")
    evals = f"eval before: {_fmt(first)}; after: {_fmt(last)}" if last else "no eval"
    return (f"{label}: {outcome.updates}/{outcome.total_updates} updates in {outcome.seconds:.0f}s, "
            f"loss {head:.4f} -> {tail:.4f}; {evals}; scorer -> {outcome.output}")


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def run_job(job: str, cfg: TrainScorerConfig, *, default_name: str, data_key: dict[str, Any],
            build_pairs: Any, run_info: dict[str, Any], label: str, log=print) -> dict:
    """The lifecycle both jobs share: check config → run dir → pairs (reused when resuming) →
    Ray Train → ``results.json`` beside the exported scorer → one summary line."""
    check_config(cfg)
    paths = resolve_paths(cfg, default_name=default_name)
    resuming, key = check_run_dir(cfg, paths, data_key, log)
    if cfg.train_pairs:
        files = (cfg.train_pairs, cfg.eval_pairs)
    else:
        files = existing_pair_files(paths["pairs_dir"]) if resuming else None
        files = files or build_pairs(paths["pairs_dir"])
    outcome = run_training(cfg, paths, files[0], files[1], run_info={"job": job, "name": paths["name"], **run_info},
                           log=log, before_fit=lambda: write_run_record(cfg, paths, key))
    results = {"job": job, "config": to_dict(cfg), "paths": paths, "train_pairs": files[0],
               "eval_pairs": files[1], "updates": outcome.updates, "seconds": outcome.seconds,
               "samples_per_s": outcome.samples_per_s, "resumed_at": outcome.resumes,
               "losses": outcome.losses, "evals": outcome.evals}
    write_json(Path(outcome.output) / "results.json", results)
    print(summary_line(label, outcome), flush=True)
    return results


def _is_training_failure(e: BaseException) -> bool:
    train_mod = sys.modules.get("ray.train")
    failure = getattr(train_mod, "TrainingFailedError", None)
    return failure is not None and isinstance(e, failure)


def run_main(job: str, run: Any, args_config: Any) -> int:
    """Shared error handling: bad input → one ``error:`` line and exit 2 (no traceback); a
    training run that failed beyond ``max_failures`` → its cause and exit 1."""
    from cappy_core.pretrain_data import LabelError

    try:
        run(args_config)
    except Exception as e:
        if _is_training_failure(e):
            hint = ""
            text = str(e) + "".join(str(x) for x in getattr(e, "worker_failures", {}).values())
            if any(k in text for k in ("ExecutionTimeoutError", "made no progress", "no_progress_timeout")):
                hint = (" [the Ray Data feed made no progress: the workers may hold every CPU; give "
                        "them fewer (--cpus-per-worker 0.25-0.5 on a small machine) or raise "
                        "--data-timeout-s]")
            print(f"error: training failed{hint} (rerun the same command to resume from the last "
                  f"checkpoint): {e}", file=sys.stderr)
            return 1
        if isinstance(e, (ConfigError, LabelError, FileNotFoundError, ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0
