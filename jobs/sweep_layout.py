"""Where a sweep's things live and which stages it runs: the rules shared by the driver
(:mod:`jobs.sweep`), ``--dry-run`` (:mod:`jobs.sweep_plan`), ``cappy serve`` and the benchmarks.
Ray-free and side-effect free: nothing here trains, samples, downloads or writes.

The cache: the embedded generator ``<cache>/generators/<name>`` (:func:`embedded_generator_name`:
one per training task set and length) and the pretrained scorer ``<cache>/scorer/pretrain-<preset>``.
The stage cache ``<cache>/stages`` (:mod:`cappy_core.stage_cache`): sampled candidates and finetuned
scorers, reused by any OUT. ``OUT``: ``data/`` (the tasks as Parquet), ``candidates/sampling-<digest>``
(a link into the stage cache, or the candidates themselves with ``--no-cache``: one folder per
sampling settings and generator, :func:`candidates_folder`), ``tasks/<task>.json`` and
``tasks/<task>/`` (each result, keyed by :func:`result_key`). :func:`plan_tasks` turns a config,
its tasks, generator and scorer init into a :class:`SweepPlan`: what the run then executes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cappy_core.config import ConfigError, key_values, load_yaml
from cappy_core.data.cache import default_cache_dir
from cappy_core.io import local_path, with_local_paths
from cappy_core.remote import filesystem, is_remote, staging_dir
from cappy_core.selection.task_eval import TaskSettings
from cappy_core.selection.task_results import RESULT_VERSION, finished, key_digest
from jobs.cli import presets
from jobs.sweep_config import SweepConfig
from jobs.tracking import check_report_to


def checked_config(cfg: SweepConfig, preset: str | None = None) -> tuple[SweepConfig, Path]:
    """``(cfg with local paths, OUT)``, or the :class:`ConfigError` of settings that cannot run
    from here (the values alone were checked by :class:`SweepConfig`). An ``--out`` URI stays
    one in ``cfg``; OUT is then its local staging folder (:mod:`cappy_core.remote`)."""
    check_report_to(cfg.report_to)
    if cfg.push_to_hub:  # ORG/PREFIX-<task>: a repo id once a task name is added; a token and a route now
        from jobs.hub import check_hub_push

        check_hub_push(cfg.push_to_hub)
    cfg = with_local_paths(cfg, "task_dir", "cache_dir")
    if is_remote(cfg.out):
        filesystem(cfg.out, "--out")  # an unknown scheme or a missing package: refused before any stage
        return cfg, staging_dir(cfg.out, cfg.cache_dir).resolve()
    cfg = dataclasses.replace(cfg, out=local_path(cfg.out, "--out"))
    return cfg, Path(cfg.out or f"~/cappy_runs/sweep-{preset or 'custom'}").expanduser().resolve()


def missing_tasks(specs: list[str], cache_dir: str | None, task_dir: list[str] = ()) -> list[str]:
    """The tasks of ``specs`` that are known but not on this machine; an unknown task raises."""
    from cappy_core.data.catalog import TaskCatalog

    catalog = TaskCatalog.open(cache_dir, task_dir)
    return catalog.missing(catalog.resolve(specs, require=False)[0])


# --- the cache: generator and scorer init ----------------------------------------------------

def embedded_generator_name(cfg: SweepConfig, tasks: list[str]) -> tuple[str, list[str]]:
    """(cache name, training tasks) of the embedded generator this sweep trains: one cached
    generator per task set and training length (the sampling benchmark reads the same one)."""
    from cappy_core.generation.embedded_model import DEFAULT_GENERATOR_NAME

    train_tasks = sorted(tasks) if cfg.generator_tasks == ["sweep"] else list(cfg.generator_tasks)
    # the check's train examples are not trained on, and the fused AdamW step rounds differently: each
    # made another generator than the names before them
    what = (" ".join(train_tasks) + f" updates={cfg.generator_updates} budget={cfg.generator_time_budget_s:g}"
            " check=held-out-train adamw=fused")
    return f"{DEFAULT_GENERATOR_NAME}-{hashlib.sha256(what.encode()).hexdigest()[:8]}", train_tasks


def pretrain_preset_values(cfg: SweepConfig) -> dict:
    """The settings of ``pretrain_preset`` (``jobs/configs/pretrain_<preset>.yaml``); an unknown preset raises."""
    from jobs.train_scorer import PretrainConfig

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
    from cappy_core.config import build
    from cappy_core.generation.embedded_model import default_generator_path

    cfg = build(SweepConfig, {**load_yaml(SweepConfig, presets("sweep")[preset]), "cache_dir": cache_dir})
    name, _ = embedded_generator_name(cfg, list(cfg.tasks))
    return default_generator_path(name, cache_dir=cache_dir), pretrained_scorer_path(cfg)


def sweep_serving(out: str | Path) -> dict[str, str]:
    """What ``cappy serve --sweep OUT`` serves from a finished sweep: its generator
    (``sweep_run.json``), the per-task scorers it kept (``OUT/tasks``), and as the default scorer,
    for any task without one, the scorer finetuned on every task's pairs
    (``tasks/_shared/selector_scorer``, else ``tasks/_shared/scorer``, with the fused weights fitted
    on all tasks' dev instructions) or else the scorer the sweep started from; and the adaptive
    rule's ``adaptive_tau`` when its cost curve fitted one (``cost_curve.json``)."""
    out = Path(out).expanduser()
    try:
        run = json.loads((out / "sweep_run.json").read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--sweep {out}: no readable sweep_run.json (not a finished `cappy sweep` output): "
                                f"{e}") from None
    if not (isinstance(run, dict) and isinstance(run.get("generator"), str) and isinstance(run.get("scorer_init"), str)):
        raise ValueError(f"--sweep {out}: {out / 'sweep_run.json'} names no generator and scorer_init "
                         "(not written by `cappy sweep`)")
    shared = out / "tasks" / "_shared"
    scorer = next((shared / n for n in ("selector_scorer", "scorer") if (shared / n / "config.json").is_file()), None)
    served = {"generator": run["generator"], "scorer": str(scorer or run["scorer_init"]), "scorers_dir": str(out / "tasks")}
    try:  # the adaptive rule's threshold, fitted on dev by the cost curve (None there: never stop early)
        tau = json.loads((out / "cost_curve.json").read_text())["adaptive"]["tau"]
    except (OSError, ValueError, KeyError, TypeError):
        tau = None
    return {**served, "adaptive_tau": float(tau)} if isinstance(tau, (int, float)) else served


# --- OUT: candidates and results -------------------------------------------------------------

def candidates_folder(cfg: SweepConfig, generator: str) -> str:
    """The folder name of the candidates sampled with these settings: one folder per ``"sampling"``
    settings and generator (its files' fingerprint, not its path: a retrained generator samples
    anew), so a rerun with a changed sampling setting samples anew beside the old candidates (and
    going back reuses them). Each task's candidates in it are tied to its examples
    (:data:`EXAMPLES_RECORD`)."""
    from cappy_core.stage_cache import folder_fingerprint

    return "sampling-" + key_digest({**key_values(cfg, marker="sampling"),
                                     "generator": folder_fingerprint(generator)})[:12]


#: ``<candidates>/<split>/<task>/examples.json``: the fingerprint of the examples the task's
#: candidates were sampled from (a task whose examples changed is sampled anew).
EXAMPLES_RECORD = "examples.json"


def stage_cache_root(cfg: SweepConfig) -> Optional[Path]:
    """``<cache>/stages``, or None with ``--no-cache`` or an ``--out`` URI (whose candidates stay
    in OUT, uploaded with it)."""
    from cappy_core.stage_cache import default_root

    return None if not cfg.cache or is_remote(cfg.out) else default_root(cfg.cache_dir)


def candidates_dir(cfg: SweepConfig, out: Path, generator: str) -> Path:
    """Where this sweep's candidates are: in the stage cache (``<cache>/stages/sampling/<folder>``,
    linked from ``OUT/candidates/<folder>``), else ``OUT/candidates/<folder>``."""
    root = stage_cache_root(cfg)
    return (root / "sampling" if root else out / "candidates") / candidates_folder(cfg, generator)


def task_settings(cfg: SweepConfig, out: Path, init: str, generator: str) -> TaskSettings:
    """What every task of the sweep shares (:class:`~cappy_core.selection.task_eval.TaskSettings`): inputs
    under ``OUT/data`` and :func:`candidates_dir`, results under ``OUT/tasks``, finetunes through
    the stage cache."""
    schedule = cfg.schedule if cfg.finetune else None
    selector = None
    if schedule is not None and cfg.selector_loss != "same":  # listwise ranks within an instruction: grouped
        selector = dataclasses.replace(schedule, loss=cfg.selector_loss, group_by_instruction=True)
    root = stage_cache_root(cfg)
    return TaskSettings(data_dir=str(out / "data"), candidates_dir=str(candidates_dir(cfg, out, generator)),
                        stage_cache=str(root) if root else None,
                        tasks_dir=str(out / "tasks"), init=init, max_length=cfg.max_length, schedule=schedule,
                        train_size=cfg.train_size, max_train_examples=cfg.max_train_examples_per_task,
                        score_dtype=cfg.score_dtype, keep_scorer=cfg.keep_scorers,
                        dev_examples=cfg.dev_examples_per_task, finetune_scope=cfg.finetune_scope,
                        selector_schedule=selector, selector_signals=tuple(cfg.selector_signals))


def result_key(cfg: SweepConfig, generator: str, init: str, tasks: list[str]) -> dict[str, Any]:
    """What defines a task's result: the ``"key"`` settings, the generator and scorer init they
    resolved to, and :data:`~cappy_core.selection.task_results.RESULT_VERSION`; with a scorer trained on every
    task also the sweep's tasks."""
    key = {**key_values(cfg), "generator": generator, "scorer": init, "version": RESULT_VERSION}
    if cfg.trains_on_every_task:
        key["finetune_tasks"] = sorted(tasks)
    return key


@dataclass
class SweepPlan:
    """What a sweep of ``tasks`` does with this generator and scorer init: its settings, the
    result key, the tasks still to run, the tasks whose candidates are sampled, and the splits
    with their instruction caps."""

    tasks: list[str]
    generator: str
    init: str
    settings: TaskSettings
    key: dict[str, Any]
    todo: list[str]
    sampled: list[str]
    splits: list[tuple[str, Optional[int]]]

    @property
    def digest(self) -> str:
        return key_digest(self.key)


def plan_tasks(cfg: SweepConfig, out: Path, tasks: list[str], generator: str, init: str) -> SweepPlan:
    """The :class:`SweepPlan` for these tasks: a task is to run unless its result is finished
    with the same key (``redo``: all); candidates are sampled for the tasks to run (every task
    when a scorer trains on all of them), for the train split only when it is finetuned on or
    holds dev instructions."""
    settings = task_settings(cfg, out, init, generator)
    key = result_key(cfg, generator, init, tasks)
    todo = [t for t in tasks if cfg.redo or finished(settings.tasks_dir, t, key_digest(key)) is None]
    splits = [("train", cfg.max_train_examples_per_task)] if cfg.finetune or cfg.dev_examples_per_task else []
    return SweepPlan(tasks=list(tasks), generator=generator, init=init, settings=settings, key=key, todo=todo,
                     sampled=list(tasks) if cfg.trains_on_every_task else todo,
                     splits=splits + [("validation", cfg.max_examples_per_task)])
