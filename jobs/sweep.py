"""``cappy sweep``: the main job, BIG-Bench generation with Cappy selection against seven baselines.

Stages, each reusing what an earlier run left (examples: ``cappy sweep --help``): **data** (the
BIG-Bench tasks on this machine, fetched with ``cappy data download`` if missing → ``OUT/data``); **generator** (``--generator``,
or the embedded Llama trained once into the cache on ``--generator-tasks``); **scorer init**
(``--scorer``, or the scorer pretrained once into the cache); **sample + label** (``cappy sample``,
Ray Data → ``OUT/candidates/sampling-<digest>/{train,validation}``, one folder per sampling settings);
**per task**, one Ray task each (after one shared
finetune with ``--finetune-scope all``): finetune, score and evaluate (:func:`cappy_core.task_eval.run_task`),
each result written to ``OUT/tasks/<task>.json`` as it arrives (a failure with its error; the sweep
goes on); **summary** (:func:`cappy_core.report.write_reports`, ``OUT/summary.{md,csv,png,json}``).

A rerun computes only the tasks that are missing, failed, or were run with other settings
(``--redo``: all), sampling only for a changed sampling setting (seed, decodings, max tokens,
generator, ...); a second sweep on the same OUT is refused while one runs, and the lock of a
killed one is taken over (:func:`cappy_core.io.output_lock`), so nothing left behind blocks a rerun.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cappy_core.config import CacheOptions, ConfigError, build_parser, config_from_args, load_yaml, run_main, to_dict
from cappy_core.data.prepare import prepare_tasks
from cappy_core.data.cache import default_cache_dir
from cappy_core.data.catalog import TaskCatalog
from cappy_core.data.download import download_tasks
from cappy_core.data.tasks import LOCAL_TASKS, resolve_tasks
from cappy_core.fault_injection import check_task, sweep_fail_tasks, sweep_hang_tasks
from cappy_core.generation import PAPER_DECODING_NAMES
from cappy_core.io import local_path, with_local_paths, write_json
from cappy_core.remote import filesystem, is_remote, locked_output, staging_dir, sync_outputs
from cappy_core.task_eval import (TaskSettings, check_config, finetune_shared, finetune_shared_selector, finished,
                                  key_digest, read_result, result_key, result_path, result_record, run_task,
                                  settings_from_config, shared_selector, trains_on_every_task)
from jobs.cli import presets
from jobs.log_file import init_ray, log_file
from jobs.tracking import TrackingOptions, check_report_to

JOB = "sweep"
logger = logging.getLogger("jobs.sweep")  # not __name__: "__main__" under python -m
DESCRIPTION = ("The main job: sample candidates for BIG-Bench tasks, finetune a Cappy scorer per task, and "
               "compare Cappy's pick with the generator's own baselines (beam, four samplers, self-scores). "
               "Rerun the same command to compute only missing or failed tasks.")
EPILOG = """examples:
  cappy sweep --preset local
  cappy sweep --preset local --tasks tense rephrase --out /tmp/sweep
  cappy sweep --preset paper --out /mnt/shared/sweep --num-actors 8
  cappy sweep --preset local --out s3://my-bucket/sweeps/local     (needs s3fs, or pyarrow's S3)
  cappy sweep --tasks word_sorting --generator google/flan-t5-small --backend hf --scorer btan2/cappy-large

outputs (OUT): tasks/<task>.json per task, summary.md / summary.csv / summary.png / summary.json,
candidates/ (sampled and labelled), data/ (BIG-Bench Parquet), sweep_run.json (stage timings),
logs/sweep-<UTC time>.log (the full log, also what --log-level hides from the terminal)"""


@dataclass
class SweepConfig(CacheOptions, TrackingOptions):
    tasks: list[str] = field(default_factory=lambda: list(LOCAL_TASKS), metadata={
        "help": "'all45' (the paper's 45 generative tasks; 44 offline) or task names"})
    task_dir: list[str] = field(default_factory=list, metadata={
        "help": "extra folders of BIG-Bench-format tasks (<dir>/<task>/task.json), e.g. for tellmewhy"})
    out: Optional[str] = field(default=None, metadata={
        "help": "output folder (default ~/cappy_runs/sweep-<preset>), or a URI (s3://, gs://, ...: built in a local "
                "staging folder under the cache, uploaded after each task)"})
    redo: bool = field(default=False, metadata={"help": "recompute every task, even finished ones"})
    task_timeout_s: float = field(default=0.0, metadata={
        "help": "cancel a task (finetune + score) running longer than this and record it as failed; a rerun "
                "retries it (0: no limit)"})
    task_retries: int = field(default=3, metadata={
        "help": "times a task whose worker process died (killed, out of memory, node lost) runs again within "
                "the sweep; an error the task raises is not retried: it is recorded as failed"})
    # generator
    generator: Optional[str] = field(default=None, metadata={
        "help": "generator folder or hub id (default: the embedded Llama, trained into the cache if missing)"})
    backend: str = field(default="vllm", metadata={
        "choices": ["vllm", "hf"], "help": "vllm (decoder-only) or hf (transformers; also seq2seq such as FLAN-T5)"})
    generator_tasks: list[str] = field(default_factory=lambda: ["sweep"], metadata={
        "help": "what the embedded generator trains on: 'sweep' (this sweep's tasks), 'all45' or task names"})
    generator_updates: int = field(default=1500, metadata={
        "help": "optimizer updates of the embedded generator (when it is missing; fixed, so reruns agree)"})
    generator_time_budget_s: float = field(default=0.0, metadata={
        "help": "optional wall-clock cap on training the embedded generator (0: none)"})
    # sampling
    max_examples_per_task: Optional[int] = field(default=40, metadata={
        "help": "evaluate on the first N validation instructions of each task (none: all)"})
    max_train_examples_per_task: Optional[int] = field(default=40, metadata={
        "help": "finetune on candidates for the first N train instructions of each task (none: all)"})
    decodings: list[str] = field(default_factory=lambda: list(PAPER_DECODING_NAMES), metadata={
        "help": "decodings; the paper's: beam4 + 4 samples each of sample, temp0.9, topk40, topp0.95 = 17"})
    samples_per_decoding: int = field(default=4, metadata={"help": "candidates per sampling decoding"})
    max_new_tokens: int = field(default=64, metadata={"help": "most generated tokens per candidate"})
    num_actors: int = field(default=1, metadata={"help": "generator actors (one model each)"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per generator actor"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per generator actor"})
    sample_batch_size: int = field(default=32, metadata={"help": "instructions per generator call"})
    sample_batch_rows: int = field(default=64, metadata={"help": "--backend hf: candidate rows decoded in one batch"})
    # scorer
    scorer: Optional[str] = field(default=None, metadata={
        "help": "scorer to finetune from: a folder, a hub id (btan2/cappy-large) or 'minilm' "
                "(default: the scorer pretrained into the cache with `cappy pretrain --preset PRETRAIN_PRESET`)"})
    pretrain_preset: str = field(default="local", metadata={
        "help": "pretrain preset used when no --scorer is given and none is cached"})
    finetune: bool = field(default=True, metadata={
        "help": "finetune per task (--no-finetune: score with the init scorer as is)"})
    train_size: int = field(default=512, metadata={"help": "finetuning pairs per task (cut or tiled)"})
    max_length: int = field(default=128, metadata={"help": "scorer pair truncation length in tokens"})
    lr: float = field(default=1e-4, metadata={"help": "finetuning peak learning rate"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of updates of linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=1, metadata={"help": "passes over the finetuning pairs"})
    batch_size: int = field(default=16, metadata={"help": "pairs per optimizer update"})
    micro_batch_size: int = field(default=8, metadata={"help": "pairs per forward pass"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for finetuning"})
    loss: str = field(default="mse", metadata={"choices": ["mse", "listwise", "listwise+mse"], "help": "the paper's "
                      "mse, or listwise: softmax CE against softmax(label/tau) (needs --group-by-instruction)"})
    listwise_tau: float = field(default=0.3, metadata={"help": "temperature tau of the listwise target"})
    mse_weight: float = field(default=0.0, metadata={"help": "listwise+mse: loss = listwise + w * mse"})
    group_by_instruction: bool = field(default=False, metadata={"help": "micro-batches keep an instruction together"})
    finetune_scope: str = field(default="task", metadata={"choices": ["task", "all"], "help": "per task or all"})
    selector_loss: str = field(default="same", metadata={"choices": ["same", "listwise", "listwise+mse"], "help":
                               "the fused selector's Cappy signal: same: the cappy row's scorer; listwise[+mse]: "
                               "a second per-task scorer finetuned on the same pairs with that loss"})
    selector_scope: str = field(default="task", metadata={"choices": ["task", "all"], "help": "with "
                                "--selector-loss: task: a selector scorer per task; all: one selector scorer "
                                "finetuned on every task's pairs together (each task's train_size pairs), before the "
                                "tasks"})
    shared_torch_threads: int = field(default=0, metadata={"help": "torch threads (and CPUs reserved) of a "
                                      "finetune on every task's pairs (--finetune-scope/--selector-scope all), "
                                      "which runs alone before the tasks; 0: --torch-threads"})
    dev_examples_per_task: int = field(default=0, metadata={"help": "hold out the last N sampled train "
                                       "instructions per task from finetuning; the fused selector is fitted on them"})
    score_dtype: str = field(default="float32", metadata={
        "choices": ["float32", "bfloat16"], "help": "dtype for scoring the validation candidates"})
    seed: int = field(default=0, metadata={"help": "seeds sampling, pairs and finetuning"})
    keep_scorers: bool = field(default=False, metadata={
        "help": "save each task's finetuned scorer under OUT/tasks/<task>/scorer"})
    # per-task resources
    cpus_per_task: float = field(default=1.0, metadata={"help": "CPUs reserved per task (finetune + score)"})
    gpus_per_task: float = field(default=0.0, metadata={"help": "GPUs per task (fractions pack tasks on a GPU)"})
    torch_threads: int = field(default=1, metadata={"help": "torch threads per task on CPU"})


# --- stages ----------------------------------------------------------------------------------

def missing_tasks(specs: list[str], cache_dir: str | None, task_dir: list[str] = ()) -> list[str]:
    """The tasks of ``specs`` that are known but not on this machine; an unknown task raises."""
    catalog = TaskCatalog.open(cache_dir, task_dir)
    return catalog.missing(catalog.resolve(specs, require=False)[0])


def ensure_tasks(specs: list[str], cache_dir: str | None, task_dir: list[str], log) -> None:
    """Download (``cappy data download``, verified) whichever of ``specs`` this machine lacks."""
    missing = missing_tasks(specs, cache_dir, task_dir)
    if missing:
        log(f"{len(missing)} task(s) not on this machine ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}): "
            "fetching them from the verified sources (`cappy data download`)")
        download_tasks(missing, cache_dir=cache_dir, log=log)


def ensure_data(cfg: SweepConfig, out: Path, log) -> list[str]:
    """The sweep's tasks on this machine (vendored, cached, or downloaded now), then as Parquet
    under OUT/data; returns the tasks. An unknown task fails here, before anything runs."""
    ensure_tasks(cfg.tasks, cfg.cache_dir, cfg.task_dir, log)
    manifest = prepare_tasks(cfg.tasks, str(out / "data"), task_dirs=cfg.task_dir, cache_dir=cfg.cache_dir, log=log)
    tasks, _ = resolve_tasks(cfg.tasks, list(manifest["tasks"]))
    if not tasks:
        raise FileNotFoundError(f"none of the tasks {cfg.tasks} could be prepared (see the lines above)")
    return tasks


def embedded_generator_name(cfg: SweepConfig, tasks: list[str]) -> tuple[str, list[str]]:
    """(cache name, training tasks) of the embedded generator this sweep trains: one cached
    generator per task set and training length (the sampling benchmark reads the same one)."""
    from cappy_core.lm import DEFAULT_GENERATOR_NAME

    train_tasks = sorted(tasks) if cfg.generator_tasks == ["sweep"] else list(cfg.generator_tasks)
    what = " ".join(train_tasks) + f" updates={cfg.generator_updates} budget={cfg.generator_time_budget_s:g}"
    return f"{DEFAULT_GENERATOR_NAME}-{hashlib.sha256(what.encode()).hexdigest()[:8]}", train_tasks


def ensure_generator_for(cfg: SweepConfig, tasks: list[str], log) -> str:
    """``--generator`` as given, or the embedded generator for these tasks (trained once, cached)."""
    if cfg.generator:  # checked now, not after the data and scorer stages
        from cappy_core.generation import resolve_generator

        return resolve_generator(cfg.generator, cfg.backend, cache_dir=cfg.cache_dir).path
    from jobs.train_generator import GeneratorConfig, ensure_generator

    name, train_tasks = embedded_generator_name(cfg, tasks)
    gcfg = GeneratorConfig(name=name, cache_dir=cfg.cache_dir, tasks=train_tasks, task_dir=list(cfg.task_dir),
                           updates=cfg.generator_updates, time_budget_s=cfg.generator_time_budget_s,
                           eval_tasks=sorted(tasks)[:6], eval_examples=16, seed=cfg.seed, report_to=cfg.report_to)
    return str(ensure_generator(config=gcfg, log=log))


def pretrain_preset_values(cfg: SweepConfig) -> dict:
    """The settings of ``--pretrain-preset`` (``jobs/configs/pretrain_<preset>.yaml``); an unknown preset raises."""
    from jobs.pretrain import PretrainConfig

    known = presets("pretrain")
    if cfg.pretrain_preset not in known:
        raise ConfigError(f"--pretrain-preset {cfg.pretrain_preset!r}: unknown; choose from {sorted(known)}")
    return load_yaml(PretrainConfig, known[cfg.pretrain_preset])


def pretrained_scorer_path(cfg: SweepConfig) -> Path:
    """Where the scorer pretrained for this sweep lives: ``<cache>/scorer/pretrain-<preset>``."""
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return cache / "scorer" / f"pretrain-{cfg.pretrain_preset}"


def sweep_models(preset: str = "local", cache_dir: str | None = None) -> tuple[Path, Path]:
    """``(embedded generator folder, pretrained scorer folder)`` that ``cappy sweep --preset PRESET``
    trains or reuses, by the sweep's own rules (``cappy serve`` serves them by default)."""
    from cappy_core.config import load_yaml
    from cappy_core.lm import default_generator_path

    cfg = SweepConfig(**{**load_yaml(SweepConfig, presets("sweep")[preset]), "cache_dir": cache_dir})
    name, _ = embedded_generator_name(cfg, list(cfg.tasks))
    return default_generator_path(name, cache_dir=cache_dir), pretrained_scorer_path(cfg)


def ensure_scorer_init(cfg: SweepConfig, log) -> str:
    """``--scorer`` as given, or the scorer pretrained once into the cache (pretrain job, Ray Train)."""
    from cappy_core.scorer_runs import check_init

    if cfg.scorer:  # checked now, not in every task after sampling
        check_init(cfg.scorer, flag="--scorer")
        return cfg.scorer
    from jobs.pretrain import PretrainConfig, run as run_pretrain

    path = pretrained_scorer_path(cfg)
    if (path / "config.json").is_file():
        log(f"using the pretrained scorer at {path}")
        return str(path)
    values = pretrain_preset_values(cfg)
    log(f"no pretrained scorer at {path}: pretraining one (`cappy pretrain --preset {cfg.pretrain_preset}`)")
    ensure_tasks(values["tasks"], cfg.cache_dir, [], log)
    values.update(output=str(path), storage_path=str(path.parents[1] / "runs"), cache_dir=cfg.cache_dir,
                  report_to=cfg.report_to)
    run_pretrain(PretrainConfig(**values), log=log)
    return str(path)


def sample(cfg: SweepConfig, tasks: list[str], out: Path, generator: str, log, candidates_dir: str) -> None:
    """Candidates for the train (finetuning) and validation (evaluation) instructions: two
    outputs under ``candidates_dir``, one folder per sampling settings (a changed setting samples
    anew there, instead of being refused)."""
    from jobs.sample_label import SampleConfig, run as run_sample

    splits = [("train", cfg.max_train_examples_per_task)] if cfg.finetune or cfg.dev_examples_per_task else []
    for split, cap in splits + [("validation", cfg.max_examples_per_task)]:
        log(f"-- {split} split")
        run_sample(SampleConfig(
            tasks=tasks, splits=[split], data=str(out / "data"), out=str(Path(candidates_dir) / split),
            generator=generator, backend=cfg.backend, decodings=list(cfg.decodings),
            samples_per_decoding=cfg.samples_per_decoding, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
            max_examples_per_task=cap, batch_size=cfg.sample_batch_size, batch_rows=cfg.sample_batch_rows,
            num_actors=cfg.num_actors,
            gpus_per_actor=cfg.gpus_per_actor, cpus_per_actor=cfg.cpus_per_actor), log=log)


def sweep_task(task: str, settings: TaskSettings, gpus: float, torch_threads: int, fail_tasks: list[str],
               hang_tasks: list[str] = ()):
    """One Ray task (a generator): yields ``None`` the moment it starts running (the driver's
    ``--task-timeout-s`` counts from then, not from submission, so queued tasks are not timed,
    and it keeps counting through a retry after a worker death),
    then :func:`cappy_core.task_eval.run_task`'s result and where it ran (for the multi-node test)."""
    import ray

    yield None
    check_task(task, fail_tasks, hang_tasks)
    result = run_task(task, settings, use_gpu=gpus > 0, torch_threads=torch_threads)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    yield {**result, "hostname": socket.gethostname(), "pid": os.getpid(), "node_id": node}


def wait_for_tasks(generators: dict, timeout_s: float = 0.0):
    """Yield ``(task, get_result)`` for each streaming Ray task of ``generators``
    (``{ObjectRefGenerator: task}``, each yielding once when it starts, then its result) as it
    ends. A task running longer than ``timeout_s`` (0: no limit) is cancelled with its worker
    killed (a hung task does not return on its own), and its ``get_result`` raises TimeoutError."""
    import ray

    pending, started = list(generators), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=1.0 if timeout_s else None)
        for gen in ready:
            task = generators[gen]
            if gen not in started:  # its first item: the task began running
                started[gen] = time.time()
                try:
                    ray.get(next(gen))
                except Exception as e:  # it failed before it began (its worker died, ...)
                    yield task, functools.partial(_raise, e)
                    continue
                pending.append(gen)
                continue
            ref = next(gen, None)
            yield task, functools.partial(_second_item, ref, task)
        now = time.time()
        for gen in [g for g in pending if g in started and timeout_s and now - started[g] > timeout_s]:
            ray.cancel(gen, force=True)
            pending.remove(gen)
            yield generators[gen], functools.partial(_raise, TimeoutError(
                f"task {generators[gen]} ran longer than --task-timeout-s {timeout_s:g} s and was cancelled "
                "(a rerun retries it)"))


def _raise(e: BaseException):
    raise e


def _second_item(ref, task: str) -> dict:
    import ray

    if ref is None:
        raise RuntimeError(f"task {task} ended without a result")
    return ray.get(ref)


def run_tasks(cfg: SweepConfig, tasks: list[str], settings: TaskSettings, key: dict, log) -> None:
    """One Ray task per sweep task; each result is written the moment it arrives."""
    import ray
    from tqdm import tqdm

    from cappy_core.report import progress_line

    # max_retries: Ray reruns a task whose worker died (a streaming task from its start; the
    # driver already has its first item); retry_exceptions stays off: a raised error is final.
    remote = ray.remote(sweep_task).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None,
                                            max_retries=cfg.task_retries, name=sweep_task.__name__,
                                            num_returns="streaming")
    faults = (sweep_fail_tasks(), sweep_hang_tasks())
    submitted = {t: time.time() for t in tasks}
    generators = {remote.remote(t, settings, cfg.gpus_per_task, cfg.torch_threads, *faults): t for t in tasks}
    bar = tqdm(total=len(tasks), desc="tasks", unit=" task", file=sys.stderr)
    for task, result in wait_for_tasks(generators, cfg.task_timeout_s):
        rec = result_record(task, key, to_dict(cfg), result, submitted[task])  # a failure is recorded too
        write_json(result_path(settings.tasks_dir, task), rec)
        sync_outputs()  # an --out URI gets each task's result as it arrives
        bar.update(1)
        if rec["status"] == "ok":
            bar.write(progress_line(task, rec))
        else:
            log(f"task {task} failed: {rec['error']}")
    bar.close()


# --- the driver ------------------------------------------------------------------------------

def checked_config(cfg: SweepConfig, preset: str | None = None) -> tuple[SweepConfig, Path]:
    """``(cfg with local paths, OUT)``, or the :class:`ConfigError` of settings that cannot run:
    the checks of :func:`run` before any stage, shared with ``--dry-run``'s plan. An ``--out``
    URI stays one in ``cfg``; OUT is then its local staging folder (:mod:`cappy_core.remote`)."""
    check_config(to_dict(cfg))
    check_report_to(cfg.report_to)
    if cfg.task_timeout_s < 0:
        raise ConfigError(f"--task-timeout-s must be >= 0 (0: no limit), got {cfg.task_timeout_s}")
    if cfg.task_retries < 0:
        raise ConfigError(f"--task-retries must be >= 0, got {cfg.task_retries}")
    cfg = with_local_paths(cfg, "task_dir", "cache_dir")
    if is_remote(cfg.out):
        filesystem(cfg.out, "--out")  # an unknown scheme or a missing package: refused before any stage
        return cfg, staging_dir(cfg.out, cfg.cache_dir).resolve()
    cfg = dataclasses.replace(cfg, out=local_path(cfg.out, "--out"))
    return cfg, Path(cfg.out or f"~/cappy_runs/sweep-{preset or 'custom'}").expanduser().resolve()


def run(cfg: SweepConfig, preset: str | None = None, log=print) -> dict:
    """The whole sweep; returns the summary (also written under OUT). One sweep per OUT at a
    time: a second one refuses at once, naming the holder (:func:`cappy_core.io.output_lock`).
    An ``--out`` URI is built in OUT, a local staging folder first filled from the URI, and
    uploaded after each task and at the end (:func:`cappy_core.remote.locked_output`)."""
    cfg, out = checked_config(cfg, preset)
    target = cfg.out if is_remote(cfg.out) else str(out)
    with locked_output(target, "--out", "cappy sweep", cache_dir=cfg.cache_dir, log=log), \
            log_file(out, JOB, log) as log:
        logger.debug("config: %s", json.dumps(to_dict(cfg)))
        return _run_locked(cfg, out, preset, log)


def _run_locked(cfg: SweepConfig, out: Path, preset: str | None, log) -> dict:
    import ray

    from cappy_core.report import write_reports

    stages: dict[str, float] = {}
    t_all = time.monotonic()

    def stage(name: str, message: str | None, fn, *args):  # log, run fn(*args), record its seconds
        if message:
            log(message)
        t = time.monotonic()
        result = fn(*args)
        stages[name] = round(time.monotonic() - t, 1)
        return result

    tasks = stage("data_s", f"== sweep into {out}", ensure_data, cfg, out, log)
    generator = stage("generator_s", f"== generator ({len(tasks)} tasks: {', '.join(tasks)})",
                      ensure_generator_for, cfg, tasks, log)
    init = stage("scorer_init_s", "== scorer init", ensure_scorer_init, cfg, log)
    key = result_key(to_dict(cfg), generator, init, tasks)
    settings = settings_from_config(to_dict(cfg), out, init, generator)
    todo = [t for t in tasks if cfg.redo or finished(settings.tasks_dir, t, key_digest(key)) is None]
    log(f"== {len(tasks) - len(todo)} task(s) already finished with these settings; {len(todo)} to run")
    if todo:
        init_ray()  # ray.init, and Ray's driver log kept in the log file
        stage("sampling_s", f"== sample + label (train and validation candidates) into {settings.candidates_dir}",
              sample, cfg, tasks if trains_on_every_task(to_dict(cfg)) else todo, out,
              generator, log, settings.candidates_dir)
        threads = cfg.shared_torch_threads or cfg.torch_threads  # a shared finetune runs alone: all its CPUs
        shared_opts = dict(num_cpus=max(cfg.cpus_per_task, cfg.shared_torch_threads if not cfg.gpus_per_task else 0),
                           num_gpus=cfg.gpus_per_task or None, max_retries=cfg.task_retries)
        shared_kw = dict(use_gpu=cfg.gpus_per_task > 0, torch_threads=threads)
        if cfg.finetune and cfg.finetune_scope == "all":  # one scorer for every task, finetuned first (one Ray task)
            shared = ray.remote(finetune_shared).options(name="finetune_shared", **shared_opts).remote(
                tasks, settings, key_digest(key), **shared_kw)
            settings = stage("shared_finetune_s", "== one scorer finetuned on all tasks", ray.get, shared)
        if shared_selector(to_dict(cfg)):  # one selector scorer for every task, the same way
            shared = ray.remote(finetune_shared_selector).options(name="finetune_shared_selector", **shared_opts).remote(
                tasks, settings, key_digest(key), **shared_kw)
            settings = stage("shared_selector_finetune_s", f"== one {cfg.selector_loss} selector scorer finetuned on "
                             f"all tasks ({len(tasks)} x {cfg.train_size} pairs, {threads} thread(s))", ray.get, shared)
        stage("tasks_s", f"== finetune, score and evaluate: {len(todo)} Ray task(s), {cfg.cpus_per_task} CPU"
              + (f" + {cfg.gpus_per_task} GPU" if cfg.gpus_per_task else "") + " each",
              run_tasks, cfg, todo, settings, key, log)
    records = {task: read_result(settings.tasks_dir, task) for task in tasks}
    summary = stage("report_s", None, write_reports, out, records, log)
    stages["total_s"] = round(time.monotonic() - t_all, 1)
    write_json(out / "sweep_run.json", {"config": to_dict(cfg), "preset": preset, "generator": generator,
                                        "scorer_init": init, "tasks": tasks, "ran": todo, "stages": stages})
    log(f"stage times (s): {json.dumps(stages)}")
    from jobs.tracking import report, sweep_run

    report(cfg.report_to, out, "sweep", to_dict(cfg), lambda tracker: sweep_run(tracker, summary, records, stages), log)
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(SweepConfig, prog=prog or f"python -m jobs.{JOB}", description=DESCRIPTION,
                          epilog=EPILOG, presets=presets(JOB))
    parser.add_argument("--dry-run", action="store_true", help="print the plan (tasks, instructions and candidates "
                        "per split, cached stages, estimated minutes) and run nothing")
    args = parser.parse_args(argv)

    def body() -> int:  # 1: some task failed
        cfg = config_from_args(SweepConfig, args, presets(JOB))
        if args.dry_run:  # not a config field: it changes no result
            from jobs.sweep_plan import format_plan, plan

            print(format_plan(plan(cfg, args.preset)))
            return 0
        return 1 if run(cfg, preset=args.preset).get("failed") else 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
