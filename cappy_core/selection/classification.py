"""Classification with Cappy alone on held-out multiple-choice tasks: what may be evaluated, and the result table.

The scoring itself is :func:`cappy_core.selection.evaluation.score_choices` (every ``(instruction,
choice)`` pair), :func:`~cappy_core.selection.evaluation.classification_accuracy` and
:func:`~cappy_core.selection.evaluation.chance_accuracy`. This module holds the rules around them:

* **Held out.** :func:`trained_tasks` reads which tasks a scorer folder was trained on: a folder
  written by ``cappy pretrain`` / ``cappy finetune`` records them in ``results.json``
  (``config.tasks`` / ``config.task``) and ``cappy.json`` (``metadata.run.tasks`` / ``.task``),
  ``pretrain`` standing for every task outside the 45; its ``init`` scorer is followed.
  :func:`check_tasks` refuses, naming the task, an unknown task, a task set, one of the 45
  generative evaluation tasks and a task a scorer was trained on (a warning instead when
  allowed).
* **Examples.** :func:`multiple_choice_examples`: the multiple-choice examples of one task's
  split, the first ``max_examples`` of them.
* **Results.** One row per task (:func:`task_row`: examples, mean choices per example, chance
  accuracy, each scorer's accuracy), the unweighted mean over tasks (:func:`summarise`), the
  printed table (:func:`format_table`) and the CSV/JSON forms (:func:`csv_rows`,
  :func:`results_record`).

Tested in ``tests/jobs/test_eval_mc.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from cappy_core.config import ConfigError, SettingError
from cappy_core.data.tasks import ALL45, GENERATIVE_45, PRETRAIN, UnknownTaskError, expand_task_specs, resolve_tasks

#: Held out of ``jobs/configs/pretrain_local.yaml``, multiple-choice, under 100 validation examples.
ACCEPTANCE_TASKS = ("implicatures", "date_understanding", "ruin_names")
#: How deep :func:`trained_tasks` follows ``init`` scorers.
MAX_INIT_DEPTH = 8


# --- which tasks may be evaluated ------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def trained_tasks(source: str, available: Iterable[str], depth: int = 0) -> tuple[set[str], list[str]]:
    """``(tasks the scorer was trained on, sources whose training data is not recorded)``.

    ``minilm`` was trained on no BIG-Bench task. A local folder is read for ``results.json``
    (``config.tasks`` / ``config.task`` / ``config.init``) and ``cappy.json``
    (``metadata.run.tasks`` / ``.task``); its ``init`` scorer is followed (``depth`` counts the
    hops). A hub id or a folder with neither record is "unknown"; so is a run trained on
    ``--train-pairs`` (its tasks are whatever the pairs held).
    """
    from cappy_core.scorer.model import CAPPY_JSON, EMBEDDED_ALIAS, RESULTS_JSON  # torch: only when used

    available = list(available)
    if source == EMBEDDED_ALIAS:
        return set(), []
    path = Path(source).expanduser()
    if not path.is_dir():
        return set(), [source]
    specs: list[str] = []
    recorded = False
    unknown: list[str] = []
    results = path / RESULTS_JSON
    if results.is_file():
        cfg = _read_json(results).get("config") or {}
        if cfg.get("train_pairs"):
            unknown.append(f"{source} (trained on --train-pairs {cfg['train_pairs']})")
        specs += list(cfg.get("tasks") or [])
        specs += [cfg["task"]] if cfg.get("task") else []
        recorded = True
        init = cfg.get("init")
        if init and depth < MAX_INIT_DEPTH and Path(str(init)).expanduser().resolve() != path.resolve():
            seen, unk = trained_tasks(str(init), available, depth + 1)
            specs += sorted(seen)
            unknown += unk
    info = path / CAPPY_JSON
    if info.is_file():
        run = (_read_json(info).get("metadata") or {}).get("run") or {}
        specs += list(run.get("tasks") or [])
        specs += [run["task"]] if run.get("task") else []
        recorded = recorded or bool(run)
    if not recorded:
        unknown.append(source)
    return expand_task_specs(specs, available), unknown


def seen_tasks(scorers: Sequence[str], available: Iterable[str],
               warn: Callable[[str], None]) -> dict[str, set[str]]:
    """``{scorer: tasks it was trained on}``; ``warn`` is told of each scorer that does not
    record its training tasks."""
    available = list(available)
    seen: dict[str, set[str]] = {}
    for s in scorers:
        tasks, unknown = trained_tasks(s, available)
        seen[s] = tasks
        for u in unknown:
            warn(f"warning: scorer {u!r} does not record its training tasks; cannot check that the "
                 "tasks are held out of its training")
    return seen


def check_tasks(tasks: Iterable[str], available: Iterable[str],
                seen_by_scorer: Mapping[str, set[str]] | None = None,
                allow_seen: bool = False, warn: Callable[[str], None] | None = None) -> list[str]:
    """The task names to evaluate (first occurrence order), or :class:`ConfigError` naming the
    first bad task: an unknown name (with close matches), a task set (``all45``/``pretrain``),
    one of the 45 generative evaluation tasks, or a task in ``seen_by_scorer[scorer]`` (a
    warning via ``warn`` instead when ``allow_seen``)."""
    available = set(available)
    names: list[str] = []
    for t in tasks:
        if t in (ALL45, PRETRAIN):
            raise ConfigError(f"eval-mc takes task names, not the task set {t!r}")
        if t in GENERATIVE_45:
            raise ConfigError(f"task {t!r} is one of the 45 generative evaluation tasks; eval-mc "
                              "scores answer choices of held-out multiple-choice tasks")
        try:
            resolve_tasks([t], available)
        except UnknownTaskError as e:
            raise ConfigError(str(e)) from None
        if t not in names:
            names.append(t)
    for scorer, seen in (seen_by_scorer or {}).items():
        for t in names:
            if t in seen:
                msg = (f"task {t!r} is in the training data of scorer {scorer!r} (its results.json/"
                       "cappy.json); eval-mc is for held-out tasks")
                if not allow_seen:
                    raise SettingError("tasks", msg + " (allow_seen_tasks evaluates it anyway)",
                                       related=["allow_seen_tasks"])
                if warn is not None:
                    warn(f"warning: {msg}")
    return names


def multiple_choice_examples(examples: Sequence[Any], task: str, split: str, max_examples: int) -> list:
    """The multiple-choice examples of one task's split, first ``max_examples`` (0 = all);
    ``ValueError`` when there are none."""
    mc = [e for e in examples if e.choices]
    if not mc:
        raise ValueError(f"task {task!r} has no multiple-choice examples in its {split} split "
                         "(a generative task); eval-mc needs answer choices")
    return mc[:max_examples] if max_examples > 0 else mc


# --- results ---------------------------------------------------------------------------------

def scorer_labels(sources: Sequence[str]) -> list[str]:
    """Short unique column names: ``minilm``/hub ids as given, folders as ``parent/name``."""
    from cappy_core.scorer.model import EMBEDDED_ALIAS

    labels: list[str] = []
    for s in sources:
        p = Path(s).expanduser()
        label = "/".join(p.parts[-2:]) if p.is_dir() and s != EMBEDDED_ALIAS else s
        base, k = label, 2
        while label in labels:
            label, k = f"{base}#{k}", k + 1
        labels.append(label)
    return labels


def task_row(task: str, examples: Sequence[Any], scores: Mapping[str, Sequence[Sequence[float]]]) -> dict:
    """One task's row: examples, mean choices per example, chance and each scorer's accuracy
    (``scores[label]`` = one score list per example, aligned with its choices)."""
    from cappy_core.selection.evaluation import chance_accuracy, classification_accuracy

    gold = [list(e.choice_scores) for e in examples]
    return {"task": task, "examples": len(examples),
            "choices_per_example": sum(len(g) for g in gold) / len(gold),
            "chance": chance_accuracy(gold),
            "accuracy": {lab: classification_accuracy(gold, s) for lab, s in scores.items()}}


def summarise(rows: Sequence[dict], labels: Sequence[str]) -> dict:
    """The unweighted mean over tasks of chance and each scorer's accuracy."""
    n = len(rows)
    return {"task": "mean", "examples": sum(r["examples"] for r in rows),
            "choices_per_example": sum(r["choices_per_example"] for r in rows) / n,
            "chance": sum(r["chance"] for r in rows) / n,
            "accuracy": {lab: sum(r["accuracy"][lab] for r in rows) / n for lab in labels}}


def format_table(rows: Sequence[dict], mean: dict, labels: Sequence[str]) -> str:
    """The printed table: one line per task, then the mean; accuracy and chance in %."""
    width = max(len("task"), *(len(r["task"]) for r in rows), len("mean"))
    cols = [max(8, len(lab)) for lab in labels]
    head = f"{'task':<{width}}  {'examples':>8}  {'choices':>7}  {'chance':>6}  " + "  ".join(
        f"{lab:>{w}}" for lab, w in zip(labels, cols))
    lines = [head, "-" * len(head)]
    for r in list(rows) + [mean]:
        if r is mean:
            lines.append("-" * len(head))
        lines.append(f"{r['task']:<{width}}  {r['examples']:>8}  {r['choices_per_example']:>7.2f}  "
                     f"{100 * r['chance']:>6.1f}  " + "  ".join(
                         f"{100 * r['accuracy'][lab]:>{w}.1f}" for lab, w in zip(labels, cols)))
    lines.append("accuracy and chance in %; mean = unweighted over tasks")
    return "\n".join(lines)


def csv_rows(rows: Sequence[dict], mean: dict, labels: Sequence[str]) -> list[list[Any]]:
    """The results as CSV rows (header first, the mean last); fractions, not %."""
    out: list[list[Any]] = [["task", "examples", "choices_per_example", "chance"]
                            + [f"acc:{lab}" for lab in labels]]
    for r in list(rows) + [mean]:
        out.append([r["task"], r["examples"], f"{r['choices_per_example']:.4f}", f"{r['chance']:.6f}"]
                   + [f"{r['accuracy'][lab]:.6f}" for lab in labels])
    return out


def results_record(rows: Sequence[dict], mean: dict, labels: Sequence[str], sources: Sequence[str],
                   config: Mapping[str, Any]) -> dict:
    """The results as one JSON object: scorers (label, source), task rows, mean, config."""
    return {"scorers": [{"label": lab, "source": s} for lab, s in zip(labels, sources)],
            "tasks": list(rows), "mean": mean, "config": dict(config)}
