"""``cappy sweep``: the main job, BIG-Bench generation with Cappy selection against seven baselines.

Stages, each reusing what an earlier run left (examples: ``cappy sweep --help``): **data** (the
BIG-Bench tasks on this machine, fetched with ``cappy data download`` if missing → ``OUT/data``); **generator** (``--generator``,
or the embedded Llama trained once into the cache on ``--generator-tasks``); **scorer init**
(``--scorer``, or the scorer pretrained once into the cache); **sample + label** (``cappy sample``,
Ray Data → ``<cache>/stages/sampling/sampling-<digest>/{train,validation}``, linked from
``OUT/candidates``, one folder per sampling settings and generator);
**per task**, one Ray task each (after one shared
finetune with ``--finetune-scope all``): finetune, score and evaluate (:func:`cappy_core.selection.task_eval.run_task`),
each result written to ``OUT/tasks/<task>.json`` as it arrives (a failure with its error; the sweep
goes on); **summary** (:func:`cappy_core.selection.report.write_reports`, ``OUT/summary.{md,csv,png,json}``).

A rerun computes only the tasks that are missing, failed, or were run with other settings
(``--redo``: all), sampling only for a changed sampling setting (seed, decodings, max tokens,
generator, ...); a second sweep on the same OUT is refused while one runs, and the lock of a
killed one is taken over (:func:`cappy_core.io.output_lock`), so nothing left behind blocks a rerun.
A sweep into a new OUT reuses the candidates and finetunes earlier sweeps left in the stage cache
(:mod:`cappy_core.stage_cache`) for the same inputs; ``--no-cache`` turns it off.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from cappy_core.config import to_dict
from cappy_core.data.download import download_tasks
from cappy_core.fault_injection import check_task, sweep_faults
from cappy_core.io import write_json
from cappy_core.remote import is_remote, sync_outputs
from cappy_core.selection.task_eval import (TaskSettings, finetune_shared, finetune_shared_selector,
                                            record_shared_evaluation, run_task)
from cappy_core.selection.task_results import read_result, result_path, result_record, stage_cache_line
from cappy_core.selection.zero_shot import fit_pooled_selector, with_zero_shot
from jobs.cost_curve import write_cost_curve
from jobs.log_file import init_ray
from jobs.runtime import job_main, job_output
from jobs.scheduling import wait_for_tasks
from jobs.sweep_config import SweepConfig
from jobs.sweep_sampling import sample
from jobs.sweep_zero_shot import run_zero_shot_stage
from jobs.sweep_layout import (SweepPlan, checked_config, embedded_generator_name, missing_tasks, plan_tasks,
                               pretrain_preset_values, pretrained_scorer_path)

JOB = "sweep"
logger = logging.getLogger("jobs.sweep")  # not __name__: "__main__" under python -m
DESCRIPTION = ("The main job: sample candidates for BIG-Bench tasks, finetune a Cappy scorer per task, and "
               "compare Cappy's pick with the generator's own baselines (beam, four samplers, self-scores). "
               "Rerun the same command to compute only missing or failed tasks.")
EPILOG = """examples:
  cappy sweep --preset local
  cappy sweep --preset local --tasks tense rephrase --out /tmp/sweep
  cappy sweep --preset paper --out /mnt/shared/sweep --sampling.num-actors 8
  cappy sweep --preset local --out s3://my-bucket/sweeps/local     (needs s3fs, or pyarrow's S3)
  cappy sweep --tasks word_sorting --generator google/flan-t5-small --backend hf --scorer btan2/cappy-large

outputs (OUT): tasks/<task>.json per task, summary.md / summary.csv / summary.png / summary.json,
candidates/ (sampled and labelled: a link into the stage cache <cache>/stages, which also keeps
every finetuned scorer for reuse by later sweeps; --no-cache: off), data/ (BIG-Bench Parquet), sweep_run.json (stage timings),
logs/sweep-<UTC time>.log (the full log, also what --log-level hides from the terminal)"""


# --- stages ----------------------------------------------------------------------------------

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
    from cappy_core.data.prepare import prepare_tasks
    from cappy_core.data.tasks import resolve_tasks

    ensure_tasks(cfg.tasks, cfg.cache_dir, cfg.task_dir, log)
    manifest = prepare_tasks(cfg.tasks, str(out / "data"), task_dirs=cfg.task_dir, cache_dir=cfg.cache_dir, log=log)
    tasks, _ = resolve_tasks(cfg.tasks, list(manifest["tasks"]))
    if not tasks:
        raise FileNotFoundError(f"none of the tasks {cfg.tasks} could be prepared (see the lines above)")
    return tasks


def ensure_generator_for(cfg: SweepConfig, tasks: list[str], log) -> str:
    """``--generator`` as given, or the embedded generator for these tasks (trained once, cached)."""
    if cfg.generator:  # checked now, not after the data and scorer stages
        from cappy_core.generation import resolve_generator

        return resolve_generator(cfg.generator, cfg.backend, cache_dir=cfg.cache_dir).path
    from jobs.train_generator import GeneratorConfig, ensure_generator

    name, train_tasks = embedded_generator_name(cfg, tasks)
    gcfg = GeneratorConfig(name=name, cache_dir=cfg.cache_dir, tasks=train_tasks, task_dir=list(cfg.task_dir),
                           updates=cfg.generator_updates, time_budget_s=cfg.generator_time_budget_s,
                           eval_tasks=sorted(tasks)[:6], eval_examples=16, seed=cfg.sampling.seed, report_to=cfg.report_to)
    return str(ensure_generator(config=gcfg, log=log))


def ensure_scorer_init(cfg: SweepConfig, log) -> str:
    """``--scorer`` as given, or the scorer pretrained once into the cache (pretrain job, Ray Train)."""
    from cappy_core.scorer.runs import check_init

    if cfg.scorer:  # checked now, not in every task after sampling
        check_init(cfg.scorer, flag="--scorer")
        return cfg.scorer
    from cappy_core.config import build
    from jobs.pretrain import run as run_pretrain
    from jobs.train_scorer import PretrainConfig

    path = pretrained_scorer_path(cfg)
    if (path / "config.json").is_file():
        log(f"using the pretrained scorer at {path}")
        return str(path)
    values = pretrain_preset_values(cfg)
    log(f"no pretrained scorer at {path}: pretraining one (`cappy pretrain --preset {cfg.pretrain_preset}`)")
    ensure_tasks(values["tasks"], cfg.cache_dir, [], log)
    values.update(output=str(path), storage_path=str(path.parents[1] / "runs"), cache_dir=cfg.cache_dir,
                  report_to=cfg.report_to)
    run_pretrain(build(PretrainConfig, values), log=log)
    return str(path)


def sweep_task(task: str, settings: TaskSettings, gpus: float, torch_threads: int,
               faults: tuple[list[str], list[str], list[str]] = ([], [], [])):
    """One Ray task (a generator): yields ``None`` the moment it starts running (the driver's
    ``--task-timeout-s`` counts from then, not from submission, so queued tasks are not timed,
    and it keeps counting through a retry after a worker death),
    then :func:`cappy_core.selection.task_eval.run_task`'s result and where it ran (for the multi-node test)."""
    import ray

    yield None
    check_task(task, *faults)
    result = run_task(task, settings, use_gpu=gpus > 0, torch_threads=torch_threads)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    yield {**result, "hostname": socket.gethostname(), "pid": os.getpid(), "node_id": node}


def run_tasks(cfg: SweepConfig, plan: SweepPlan, settings: TaskSettings, log) -> None:
    """One Ray task per task still to run (``--task-timeout-s``: :func:`jobs.scheduling.wait_for_tasks`);
    each result is written the moment it arrives."""
    import ray
    from tqdm import tqdm

    from cappy_core.selection.report import progress_line

    # max_retries: Ray reruns a task whose worker died (a streaming task from its start; the
    # driver already has its first item); retry_exceptions stays off: a raised error is final.
    remote = ray.remote(sweep_task).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None,
                                            max_retries=cfg.task_retries, name=sweep_task.__name__,
                                            num_returns="streaming")
    faults = sweep_faults()
    submitted = {t: time.time() for t in plan.todo}
    generators = {remote.remote(t, settings, cfg.gpus_per_task, cfg.torch_threads, faults): t for t in plan.todo}
    bar = tqdm(total=len(plan.todo), desc="tasks", unit=" task", file=sys.stderr)
    for task, result in wait_for_tasks(generators, cfg.task_timeout_s):
        rec = result_record(task, plan.key, to_dict(cfg), result, submitted[task])  # a failure is recorded too
        write_json(result_path(settings.tasks_dir, task), rec)
        sync_outputs()  # an --out URI gets each task's result as it arrives
        bar.update(1)
        if rec["status"] == "ok":
            bar.write(progress_line(task, rec))
        else:
            log(f"task {task} failed: {rec['error']}")
    bar.close()


def cost_curve(out: Path, records: dict, log) -> None:
    """``OUT/cost_curve.*`` (:func:`jobs.cost_curve.write_cost_curve`): an extra view of the same
    picks, so its failure is a warning and costs no result."""
    try:
        write_cost_curve(out, records, log=log)
    except Exception as e:  # noqa: BLE001
        log(f"warning: no cost curve ({type(e).__name__}: {e}); `cappy cost-curve --out {out}` retries it")


# --- the driver ------------------------------------------------------------------------------

def run(cfg: SweepConfig, preset: str | None = None, log=print) -> dict:
    """The whole sweep; returns the summary (also written under OUT). One sweep per OUT at a
    time: a second one refuses at once, naming the holder (:func:`cappy_core.io.output_lock`).
    An ``--out`` URI is built in OUT, a local staging folder first filled from the URI, and
    uploaded after each task and at the end (:func:`cappy_core.remote.locked_output`)."""
    cfg, out = checked_config(cfg, preset)
    target = cfg.out if is_remote(cfg.out) else str(out)
    with job_output(target, "--out", "cappy sweep", JOB, cfg, log, cache_dir=cfg.cache_dir, logger=logger) as (_, log):
        from jobs.tracking import Tracker, tracking

        with tracking(cfg.report_to, out, "sweep", to_dict(cfg), log) as run, Tracker(run) as tracker:
            return _run_locked(cfg, out, preset, log, tracker)


def _run_locked(cfg: SweepConfig, out: Path, preset: str | None, log, tracker) -> dict:
    import ray

    from cappy_core.selection.report import write_reports
    from jobs.tracking_reports import sweep_run

    stages: dict[str, float] = {}
    t_all = time.monotonic()

    def stage(name: str, message: str | None, fn, *args):  # log, run fn(*args), record (and track) its seconds
        if message:
            log(message)
        t = time.monotonic()
        result = fn(*args)
        stages[name] = round(time.monotonic() - t, 1)
        tracker.scalars({f"stages/{name}": stages[name]}, 0)
        tracker.flush()
        return result

    tasks = stage("data_s", f"== sweep into {out}", ensure_data, cfg, out, log)
    generator = stage("generator_s", f"== generator ({len(tasks)} tasks: {', '.join(tasks)})",
                      ensure_generator_for, cfg, tasks, log)
    init = stage("scorer_init_s", "== scorer init", ensure_scorer_init, cfg, log)
    plan = plan_tasks(cfg, out, tasks, generator, init)  # the rules --dry-run shows
    settings, todo = plan.settings, plan.todo
    log(f"== {len(tasks) - len(todo)} task(s) already finished with these settings; {len(todo)} to run")
    if todo:
        init_ray()  # ray.init, and Ray's driver log kept in the log file
        stage("sampling_s", f"== sample + label (train and validation candidates) into {settings.candidates_dir}",
              sample, cfg, plan, out, log)
        threads = cfg.shared_torch_threads or cfg.torch_threads  # a shared finetune runs alone: all its CPUs
        shared_opts = dict(num_cpus=max(cfg.cpus_per_task, cfg.shared_torch_threads if not cfg.gpus_per_task else 0),
                           num_gpus=cfg.gpus_per_task or None, max_retries=cfg.task_retries)
        shared_kw = dict(use_gpu=cfg.gpus_per_task > 0, torch_threads=threads)
        if cfg.finetune and cfg.finetune_scope == "all":  # one scorer for every task, finetuned first (one Ray task)
            shared = ray.remote(finetune_shared).options(name="finetune_shared", **shared_opts).remote(
                tasks, settings, plan.digest, **shared_kw)
            settings = stage("shared_finetune_s", "== one scorer finetuned on all tasks", ray.get, shared)
        if cfg.shared_selector:  # one selector scorer for every task, the same way
            shared = ray.remote(finetune_shared_selector).options(name="finetune_shared_selector", **shared_opts).remote(
                tasks, settings, plan.digest, **shared_kw)
            settings = stage("shared_selector_finetune_s", f"== one {cfg.selector_loss} selector scorer finetuned on "
                             f"all tasks ({len(tasks)} x {cfg.train_size} pairs, {threads} thread(s))", ray.get, shared)
        stage("tasks_s", f"== finetune, score and evaluate: {len(todo)} Ray task(s), {cfg.cpus_per_task} CPU"
              + (f" + {cfg.gpus_per_task} GPU" if cfg.gpus_per_task else "") + " each",
              run_tasks, cfg, plan, settings, log)
    if cfg.zero_shot:  # after the tasks: the same finetune once per task, on the other tasks' pairs
        stage("zero_shot_s", "== zero-shot rows: each task picked by a selector finetuned on the other tasks",
              run_zero_shot_stage, cfg, plan, tasks, log)
    records = with_zero_shot(settings.tasks_dir, {task: read_result(settings.tasks_dir, task) for task in tasks})
    pooled = fit_pooled_selector(settings.tasks_dir, tasks, cfg.selector_signals)  # for a task with no scorer
    if pooled:
        log(f"fused weights for tasks without a scorer of their own: {pooled['weights']} (fitted on "
            f"{pooled['dev_instructions']} dev instructions of {pooled['tasks']} task(s)) in {pooled['folder']}")
    if settings.stage_cache and todo:  # what this run took from the stage cache instead of computing
        log(stage_cache_line(settings.stage_cache, records, todo))
    summary = stage("report_s", None, write_reports, out, records, log)
    stage("cost_curve_s", None, cost_curve, out, records, log)
    if cfg.keep_scorers:  # the shared scorers' cards get every task's row (each task's own got its row)
        record_shared_evaluation(settings.tasks_dir, records)
    stages["total_s"] = round(time.monotonic() - t_all, 1)
    run_record = {"config": to_dict(cfg), "preset": preset, "generator": generator, "scorer_init": init,
                  "tasks": tasks, "ran": todo, "stages": stages}
    write_json(out / "sweep_run.json", run_record)
    log(f"stage times (s): {json.dumps(stages)}")
    sweep_run(tracker, summary, records, stages)
    if cfg.push_to_hub:  # last: a failed push loses nothing above
        from jobs.hub import push_sweep_scorers

        summary["hub"] = push_sweep_scorers(cfg.push_to_hub, settings.tasks_dir, tasks, cfg.private, log)
        write_json(out / "sweep_run.json", {**run_record, "hub": summary["hub"]})
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    def body(cfg: SweepConfig, args) -> int:  # 1: some task failed
        if args.dry_run:  # not a setting: it changes no result
            from jobs.sweep_plan import format_plan, plan

            print(format_plan(plan(cfg, args.preset)))
            return 0
        summary = run(cfg, preset=args.preset)
        pushes_failed = any(v.startswith("error:") for v in (summary.get("hub") or {}).values())
        return 1 if summary.get("failed") or pushes_failed else 0

    return job_main(SweepConfig, body, job=JOB, module="jobs.sweep", argv=argv, prog=prog, description=DESCRIPTION,
                    epilog=EPILOG, add_arguments=lambda parser: parser.add_argument(
                        "--dry-run", action="store_true", help="print the plan (tasks, instructions and candidates per "
                        "split, cached stages, estimated minutes) and run nothing"))


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
