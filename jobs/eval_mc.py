"""``cappy eval-mc``: classification with Cappy alone on held-out multiple-choice BIG-Bench tasks.

    cappy eval-mc --tasks implicatures date_understanding ruin_names \\
        --scorers minilm ~/cappy_runs/pretrain-local/scorer --max-examples 100 [--out mc.json]
    ray job submit --working-dir . -- python -m jobs.eval_mc --tasks ... --scorers ...

For every task, every scorer scores each ``(instruction, choice)`` pair of the task's examples
(``cappy_core.selection.evaluation.score_choices``; the instruction is the Hugging Face BIG-bench
``inputs``, which already lists the choices), picks the highest-scoring choice (ties to the
first) and counts it correct when it has the top ``choice_score`` (several choices can be
correct). Printed: one row per task — examples, mean choices per example, chance accuracy (a
uniform random pick's expected accuracy: the mean fraction of correct choices) and each scorer's
accuracy, in percent — and the unweighted mean over tasks. ``--out FILE.json|FILE.csv`` also
writes it. Runs in one process (no Ray); under ``ray job submit`` it runs on the head.

Examples: the task's ``--split`` (default ``validation``, which no job trains on) as the
Hugging Face loader splits it (already shuffled with seed 42), multiple-choice examples only, the
first ``--max-examples`` of them (0 = all).

Held-out tasks only (:mod:`cappy_core.selection.classification`). Refused, with an error naming the task:
an unknown task; one of the 45 generative evaluation tasks; a task whose split has no
multiple-choice examples; and a task a given scorer was trained on (recorded in the scorer
folder's ``results.json`` / ``cappy.json``, its ``init`` scorer followed). ``--allow-seen-tasks``
turns that refusal into a warning. A scorer whose training tasks are not recorded (a hub id, a
foreign folder) gets a warning.

Acceptance set (held out of the ``pretrain_local`` preset, multiple-choice, small):
``implicatures`` (98 validation examples, 2 choices), ``date_understanding`` (73, ~5.8 choices)
and ``ruin_names`` (89, 4 choices).
"""

from __future__ import annotations

import contextlib
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from jobs.runtime import job_main
from cappy_core.selection.classification import (ACCEPTANCE_TASKS, check_tasks, csv_rows, format_table,
                                       multiple_choice_examples, results_record, scorer_labels,
                                       seen_tasks, summarise, task_row)
from cappy_core.config import CacheOptions, ConfigError, to_dict


@dataclass
class EvalMCConfig(CacheOptions):
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "multiple-choice BIG-Bench task names held out of the scorers' training (required)"})
    task_dir: list[str] = field(default_factory=list, metadata={
        "help": "extra folders of BIG-Bench-format tasks (<dir>/<task>/task.json), e.g. multiple-choice tasks of your own"})
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


def write_results(path: str, rows: list[dict], mean: dict, labels: list[str], sources: list[str],
                  cfg: EvalMCConfig) -> Path:
    """``path`` as CSV (``.csv``) or JSON (anything else), atomically."""
    from cappy_core.io import atomic_path, write_json

    out = Path(path).expanduser()
    if out.suffix == ".csv":
        with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(csv_rows(rows, mean, labels))
    else:
        write_json(out, results_record(rows, mean, labels, sources, to_dict(cfg)))
    return out


def run(cfg: EvalMCConfig, log=None) -> tuple[list[dict], dict, list[str]]:
    """Check, load, score; returns ``(rows, mean, labels)``. Bad input raises ConfigError,
    FileNotFoundError or ValueError before any scorer is loaded."""
    from cappy_core.data.catalog import TaskCatalog
    from cappy_core.scorer.model import resolve_source

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
    catalog = TaskCatalog.open(cfg.cache_dir, cfg.task_dir).require_some()
    available = catalog.names
    seen = seen_tasks(cfg.scorers, available, warn=log)
    names = check_tasks(cfg.tasks, available, seen, cfg.allow_seen_tasks, warn=log)

    data: dict[str, list] = {}
    for t in names:
        split = catalog.load(t)[cfg.split]
        data[t] = multiple_choice_examples(split, t, cfg.split, cfg.max_examples)
        skipped = sum(not e.choices for e in split)
        if skipped:
            log(f"note: task {t!r}: {skipped} {cfg.split} example(s) without choices are not scored")

    from tqdm import tqdm

    from cappy_core.selection.evaluation import score_choices
    from cappy_core.scorer.model import Scorer, quiet_transformers

    quiet_transformers()
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

    rows = [task_row(t, examples, {lab: preds[lab][t] for lab in labels}) for t, examples in data.items()]
    return rows, summarise(rows, labels), labels


def report(cfg: EvalMCConfig) -> None:
    from cappy_core.io import output_lock, with_local_paths

    cfg = with_local_paths(cfg, "out")
    # One run per --out file at a time: a second one refuses at once, naming the holder.
    with output_lock(cfg.out, "cappy eval-mc", file=True) if cfg.out else contextlib.nullcontext():
        _report(cfg)


def _report(cfg: EvalMCConfig) -> None:
    rows, mean, labels = run(cfg)
    print(format_table(rows, mean, labels))
    for lab, src in zip(labels, cfg.scorers):
        if lab != src:
            print(f"{lab} = {src}")
    if cfg.out:
        path = write_results(cfg.out, rows, mean, labels, cfg.scorers, cfg)
        print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return job_main(EvalMCConfig, lambda cfg, _: report(cfg), job="eval_mc", module="jobs.eval_mc", argv=argv,
                    prog=prog, description="Classification with Cappy alone: score every answer choice of held-out "
                                           "multiple-choice BIG-Bench tasks, argmax, accuracy per scorer.",
                    epilog="example:\n  cappy eval-mc --tasks " + " ".join(ACCEPTANCE_TASKS)
                           + " --scorers minilm ~/cappy_runs/pretrain-local/scorer --max-examples 100")


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
