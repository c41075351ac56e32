"""``cappy eval-mc``: classification with Cappy alone on held-out multiple-choice BIG-Bench tasks.

    cappy eval-mc --tasks implicatures date_understanding ruin_names \\
        --scorers minilm ~/cappy_runs/pretrain-local/scorer --max-examples 100 [--out mc.json]
    ray job submit --working-dir . -- python -m jobs.eval_mc --tasks ... --scorers ...

For every task, every scorer scores each ``(instruction, choice)`` pair of the task's examples
(``cappy_core.evaluation.score_choices``; the instruction is the Hugging Face BIG-bench
``inputs``, which already lists the choices), picks the highest-scoring choice (ties to the
first) and counts it correct when it has the top ``choice_score`` (several choices can be
correct). Printed: one row per task — examples, mean choices per example, chance accuracy (a
uniform random pick's expected accuracy: the mean fraction of correct choices) and each scorer's
accuracy, in percent — and the unweighted mean over tasks. ``--out FILE.json|FILE.csv`` also
writes it. Runs in one process (no Ray); under ``ray job submit`` it runs on the head.

Examples: the task's ``--split`` (default ``validation``, which no job trains on) as the
Hugging Face loader splits it (already shuffled with seed 42), multiple-choice examples only, the
first ``--max-examples`` of them (0 = all).

Held-out tasks only. Refused, with an error naming the task: an unknown task; one of the 45
generative evaluation tasks; a task whose split has no multiple-choice examples; and a task a
given scorer was trained on. A scorer folder written by ``cappy pretrain`` / ``cappy finetune``
records its training tasks (``results.json`` ``config.tasks``/``config.task``, and
``cappy.json`` ``metadata.run``; ``pretrain`` = every JSON task outside the 45), and its ``init``
scorer is followed too. ``--allow-seen-tasks`` turns that refusal into a warning. A scorer whose
training tasks are not recorded (a hub id, a foreign folder) gets a warning.

Acceptance set (held out of the ``pretrain_local`` preset, multiple-choice, small):
``implicatures`` (98 validation examples, 2 choices), ``date_understanding`` (73, ~5.8 choices)
and ``ruin_names`` (89, 4 choices).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from cappy_core.config import ConfigError, add_dataclass_arguments, config_from_args, to_dict

#: Held out of ``jobs/configs/pretrain_local.yaml``, multiple-choice, under 100 validation examples.
ACCEPTANCE_TASKS = ("implicatures", "date_understanding", "ruin_names")
#: Files in a scorer folder that record what it was trained on.
RESULTS_JSON = "results.json"
CAPPY_JSON = "cappy.json"


@dataclass
class EvalMCConfig:
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "multiple-choice BIG-Bench task names held out of the scorers' training (required)"})
    scorers: list[str] = field(default_factory=lambda: ["minilm"], metadata={
        "help": "scorers to compare: 'minilm' (embedded, untrained head), checkpoint folders, hub ids"})
    split: str = field(default="validation", metadata={"choices": ["train", "validation"],
                                                       "help": "which split's examples to score"})
    max_examples: int = field(default=200, metadata={
        "help": "first N multiple-choice examples of each task's split (0 = all)"})
    max_length: int = field(default=128, metadata={"help": "pair truncation length in tokens"})
    batch_size: int = field(default=128, metadata={"help": "most pairs per batch"})
    max_tokens: Optional[int] = field(default=1024, metadata={
        "help": "most padded tokens per batch (CPU-tuned; raise on a GPU)"})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "bfloat16"],
                                                    "help": "compute dtype"})
    device: Optional[str] = field(default=None, metadata={"help": "cpu, cuda, ... (default: auto)"})
    seed: int = field(default=0, metadata={"help": "initialises a head missing from a checkpoint (minilm)"})
    allow_pickle: bool = field(default=False, metadata={
        "help": "accept checkpoints whose weights are only pytorch_model.bin"})
    allow_seen_tasks: bool = field(default=False, metadata={
        "help": "warn instead of refusing a task a scorer was trained on"})
    out: Optional[str] = field(default=None, metadata={"help": "also write the results (.json or .csv)"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "cache holding the extracted BIG-Bench (default $CAPPY_CACHE_DIR or ~/.cache/cappy)"})


# ----------------------------------------------------------------------------- task checks

def expand_task_specs(specs: Iterable[str], available: Iterable[str]) -> set[str]:
    """Task names a training config's task list stands for (``pretrain`` = every available
    task outside the 45, ``all45`` = the 45)."""
    from cappy_core.data.tasks import ALL45, GENERATIVE_45, PRETRAIN

    available = set(available)
    out: set[str] = set()
    for spec in specs:
        if spec == PRETRAIN:
            out |= available - set(GENERATIVE_45)
        elif spec == ALL45:
            out |= set(GENERATIVE_45)
        else:
            out.add(str(spec))
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def trained_tasks(source: str, available: Iterable[str], _depth: int = 0) -> tuple[set[str], list[str]]:
    """``(tasks the scorer was trained on, sources whose training data is not recorded)``.

    ``minilm`` was trained on no BIG-Bench task. A local folder is read for ``results.json``
    (``config.tasks`` / ``config.task`` / ``config.init``, written by ``cappy pretrain`` and
    ``cappy finetune``) and ``cappy.json`` (``metadata.run.tasks`` / ``.task``, in every
    checkpoint they write); its ``init`` scorer is followed. A hub id or a folder with neither
    record is "unknown".
    """
    from cappy_core.scorer import EMBEDDED_ALIAS

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
        if init and _depth < 8 and Path(str(init)).expanduser().resolve() != path.resolve():
            seen, unk = trained_tasks(str(init), available, _depth + 1)
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


def check_tasks(tasks: Iterable[str], available: Iterable[str],
                seen_by_scorer: Mapping[str, set[str]] | None = None,
                allow_seen: bool = False, warn=None) -> list[str]:
    """The task names to evaluate, or :class:`ConfigError` naming the first bad task: an unknown
    name (with close matches), a task set (``all45``/``pretrain``), one of the 45 generative
    evaluation tasks, or a task in ``seen_by_scorer[scorer]`` (a warning via ``warn`` instead
    when ``allow_seen``)."""
    from cappy_core.data.tasks import ALL45, GENERATIVE_45, PRETRAIN, UnknownTaskError, resolve_tasks

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
                    raise ConfigError(msg + " (--allow-seen-tasks evaluates it anyway)")
                if warn is not None:
                    warn(f"warning: {msg}")
    return names


def mc_examples(examples: list, task: str, split: str, max_examples: int) -> list:
    """The multiple-choice examples of one task's split, first ``max_examples`` (0 = all)."""
    mc = [e for e in examples if e.choices]
    if not mc:
        raise ValueError(f"task {task!r} has no multiple-choice examples in its {split} split "
                         "(a generative task); eval-mc needs answer choices")
    return mc[:max_examples] if max_examples > 0 else mc


# ----------------------------------------------------------------------------- results

def scorer_labels(sources: list[str]) -> list[str]:
    """Short unique column names: ``minilm``/hub ids as given, folders as ``parent/name``."""
    labels: list[str] = []
    for s in sources:
        p = Path(s).expanduser()
        label = "/".join(p.parts[-2:]) if p.is_dir() and s != "minilm" else s
        base, k = label, 2
        while label in labels:
            label, k = f"{base}#{k}", k + 1
        labels.append(label)
    return labels


def summarise(rows: list[dict], labels: list[str]) -> dict:
    """The unweighted mean over tasks of chance and each scorer's accuracy."""
    n = len(rows)
    return {"task": "mean", "examples": sum(r["examples"] for r in rows),
            "choices_per_example": sum(r["choices_per_example"] for r in rows) / n,
            "chance": sum(r["chance"] for r in rows) / n,
            "accuracy": {lab: sum(r["accuracy"][lab] for r in rows) / n for lab in labels}}


def format_table(rows: list[dict], mean: dict, labels: list[str]) -> str:
    width = max(len("task"), *(len(r["task"]) for r in rows), len("mean"))
    cols = [max(8, len(lab)) for lab in labels]
    head = f"{'task':<{width}}  {'examples':>8}  {'choices':>7}  {'chance':>6}  " + "  ".join(
        f"{lab:>{w}}" for lab, w in zip(labels, cols))
    lines = [head, "-" * len(head)]
    for r in rows + [mean]:
        if r is mean:
            lines.append("-" * len(head))
        lines.append(f"{r['task']:<{width}}  {r['examples']:>8}  {r['choices_per_example']:>7.2f}  "
                     f"{100 * r['chance']:>6.1f}  " + "  ".join(
                         f"{100 * r['accuracy'][lab]:>{w}.1f}" for lab, w in zip(labels, cols)))
    lines.append("accuracy and chance in %; mean = unweighted over tasks")
    return "\n".join(lines)


def write_results(path: str, rows: list[dict], mean: dict, labels: list[str], sources: list[str],
                  cfg: EvalMCConfig) -> Path:
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".csv":
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["task", "examples", "choices_per_example", "chance"] + [f"acc:{lab}" for lab in labels])
            for r in rows + [mean]:
                w.writerow([r["task"], r["examples"], f"{r['choices_per_example']:.4f}", f"{r['chance']:.6f}"]
                           + [f"{r['accuracy'][lab]:.6f}" for lab in labels])
    else:
        tmp.write_text(json.dumps({"scorers": [{"label": lab, "source": s} for lab, s in zip(labels, sources)],
                                   "tasks": rows, "mean": mean, "config": to_dict(cfg)}, indent=1) + "\n")
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------- main

def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Classification with Cappy alone: score every answer choice of held-out "
                               "multiple-choice BIG-Bench tasks, argmax, accuracy per scorer.",
        epilog="example:\n  cappy eval-mc --tasks " + " ".join(ACCEPTANCE_TASKS)
               + " --scorers minilm ~/cappy_runs/pretrain-local/scorer --max-examples 100",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, EvalMCConfig)
    return parser


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run(cfg: EvalMCConfig, log=None) -> tuple[list[dict], dict, list[str]]:
    """Check, load, score; returns ``(rows, mean, labels)``. Bad input raises ConfigError,
    FileNotFoundError or ValueError before any scorer is loaded."""
    from cappy_core.data.bigbench import list_json_tasks, load_task
    from cappy_core.data.source import bigbench_task_root
    from cappy_core.evaluation import chance_accuracy, classification_accuracy, score_choices
    from cappy_core.scorer import resolve_source

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not cfg.tasks:
        raise ConfigError("no tasks: give --tasks NAME ... (held-out multiple-choice BIG-Bench tasks, e.g. "
                          + " ".join(ACCEPTANCE_TASKS) + ")")
    if not cfg.scorers:
        raise ConfigError("no scorers: give --scorers minilm|PATH|HF_ID ...")
    if cfg.max_examples < 0:
        raise ConfigError(f"--max-examples must be >= 0 (0 = all), got {cfg.max_examples}")
    for s in cfg.scorers:
        resolve_source(s, cfg.allow_pickle)  # a missing checkpoint fails now, not after scoring
    root = bigbench_task_root(cfg.cache_dir)
    available = list_json_tasks(root)
    seen: dict[str, set[str]] = {}
    for s in cfg.scorers:
        tasks, unknown = trained_tasks(s, available)
        seen[s] = tasks
        for u in unknown:
            log(f"warning: scorer {u!r} does not record its training tasks; cannot check that the "
                "tasks are held out of its training")
    names = check_tasks(cfg.tasks, available, seen, cfg.allow_seen_tasks, warn=log)

    data: dict[str, list] = {}
    for t in names:
        split = load_task(root, t)[cfg.split]
        data[t] = mc_examples(split, t, cfg.split, cfg.max_examples)
        skipped = sum(not e.choices for e in split)
        if skipped:
            log(f"note: task {t!r}: {skipped} {cfg.split} example(s) without choices are not scored")

    _quiet_transformers()
    from tqdm import tqdm

    from cappy_core.scorer import Scorer

    labels = scorer_labels(cfg.scorers)
    preds: dict[str, dict[str, list[list[float]]]] = {}
    pairs = sum(len(e.choices) for ex in data.values() for e in ex)
    with tqdm(total=pairs * len(cfg.scorers), desc="scoring choices", unit=" pair", file=sys.stderr) as bar:
        for label, source in zip(labels, cfg.scorers):
            scorer = Scorer.from_pretrained(source, dtype=cfg.dtype, device=cfg.device, max_length=cfg.max_length,
                                            allow_pickle=cfg.allow_pickle, seed=cfg.seed)
            preds[label] = {}
            for t, examples in data.items():
                bar.set_postfix_str(f"{label}: {t}")
                preds[label][t] = score_choices(scorer, examples, progress=bar.update,
                                                batch_size=cfg.batch_size, max_tokens=cfg.max_tokens)
            del scorer

    rows = []
    for t, examples in data.items():
        gold = [list(e.choice_scores) for e in examples]
        rows.append({"task": t, "examples": len(examples),
                     "choices_per_example": sum(len(g) for g in gold) / len(gold),
                     "chance": chance_accuracy(gold),
                     "accuracy": {lab: classification_accuracy(gold, preds[lab][t]) for lab in labels}})
    return rows, summarise(rows, labels), labels


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    prog = parser.prog
    from cappy_core.data.bigbench import TaskFormatError, TooFewExamples

    try:
        cfg = config_from_args(EvalMCConfig, args)
        rows, mean, labels = run(cfg)
    except (ConfigError, FileNotFoundError, TooFewExamples, TaskFormatError, ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, mean, labels))
    for lab, src in zip(labels, cfg.scorers):
        if lab != src:
            print(f"{lab} = {src}")
    if cfg.out:
        path = write_results(cfg.out, rows, mean, labels, cfg.scorers, cfg)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
