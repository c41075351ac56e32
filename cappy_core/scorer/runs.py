"""Scorer training runs: the run folder and its resumption, checkpoints, what happens between
updates (log, eval, report), and the one-line summary. Ray-free: the Ray Train worker in
``jobs/train_scorer.py`` passes ``ray.train.report`` in as a callback.

A run (``cappy pretrain`` / ``cappy finetune``) lives in ``STORAGE_PATH/NAME``:

* ``cappy_run.json``: the settings a rerun must match to resume (:func:`resume_key`), written
  when training starts, so a run that failed its input checks leaves nothing to match;
* ``pairs/``: the train/eval pair Parquet files, reused when the run resumes;
* the checkpoints (:func:`save_checkpoint`: a scorer folder plus the train state and Adam
  moments), and the exported ``scorer/`` folder with ``results.json``.

Rerunning the same command with the same name and storage path resumes the run; with different
settings it is refused (:func:`check_run_dir`) unless ``fresh``, which deletes the old run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from cappy_core.config import ConfigError, SettingError
from cappy_core.io import LOCK_NAME

RUN_RECORD = "cappy_run.json"
#: Written into every exported scorer folder: marks it as this job's to replace on a rerun.
OUTPUT_MARKER = "cappy_output.json"



def check_init(init: str, allow_pickle: bool = False, flag: str = "--init") -> None:
    """Refuse an unusable scorer source in the driver, before any worker starts (clear message)."""
    from cappy_core.scorer.model import resolve_source

    try:
        resolve_source(init, allow_pickle)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{flag} {init!r}: {e}") from None


def check_name(name: str) -> None:
    """A run name is one folder under the storage path: ``..`` or ``a/b`` would put the run (and
    ``--fresh``'s deletion) outside it."""
    seps = [s for s in (os.sep, os.altsep, "/", "\\") if s]
    if not name or name in (".", "..") or any(s in name for s in seps) or name != name.strip():
        raise SettingError("name", f"{name!r}: a run name must be a single folder name (no path separators, "
                                   "not '.' or '..', no surrounding spaces)")


def resolve_paths(name: str, storage_path: str, *, pairs_dir: Optional[str] = None,
                  output: Optional[str] = None) -> dict[str, str]:
    """The run's absolute paths: ``name``, ``storage_path``, ``run_dir``, ``pairs_dir`` (default
    ``RUN_DIR/pairs``) and ``output`` (the exported scorer, default ``RUN_DIR/scorer``). The
    name is checked (:func:`check_name`)."""
    check_name(name)
    storage = Path(storage_path).expanduser().resolve()
    run_dir = storage / name
    return {
        "name": name,
        "storage_path": str(storage),
        "run_dir": str(run_dir),
        "pairs_dir": str(Path(pairs_dir).expanduser().resolve()) if pairs_dir else str(run_dir / "pairs"),
        "output": str(Path(output).expanduser().resolve()) if output else str(run_dir / "scorer"),
    }


def is_own_output(paths: Mapping[str, str]) -> bool:
    """Whether ``output`` was written by a scorer training job: the run's default
    ``RUN_DIR/scorer``, or a folder holding :data:`OUTPUT_MARKER`."""
    output = Path(paths["output"])
    return output == Path(paths["run_dir"]) / "scorer" or (output / OUTPUT_MARKER).is_file()


def check_output(paths: Mapping[str, str]) -> None:
    """Refuse, before any work, an ``--output`` whose replacement would delete what the job did
    not create: the working directory or a folder above it, the run's own folders, a file, or a
    non-empty folder that is not a scorer this job exported (:func:`is_own_output`)."""
    output = Path(paths["output"])
    what = f"--output {output}"
    for inside, name in ((Path.cwd().resolve(), "the working directory"), (Path(paths["run_dir"]), "the run folder"),
                         (Path(paths["pairs_dir"]), "the pairs folder")):
        if inside == output or output in inside.parents:
            raise ConfigError(f"{what} is or contains {name} ({inside}): the exported scorer replaces the whole "
                              "folder; give a new or dedicated folder")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{what} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not is_own_output(paths):
        raise ConfigError(f"{what} is a non-empty folder that this job did not write (no {OUTPUT_MARKER}); "
                          "refusing to replace it: give a new or empty folder")


def resume_key(config: Any, data_key: Mapping[str, Any]) -> dict[str, Any]:
    """The key a rerun must match: the job config's defining settings (:func:`cappy_core.config.key_values`:
    the init, sizes, workers and every :class:`~cappy_core.scorer.training.ScorerSchedule` field, by its
    bare name) and the job's ``data_key`` (where pairs come from)."""
    from cappy_core.config import key_values

    return {**key_values(config, flat_sections=True), **data_key}


def _recorded_before(name: str, value: Any) -> bool:
    """A schedule setting added after a run was recorded: it ran with the default, so a key
    without it still matches when the value is that default."""
    from cappy_core.scorer.training import ScorerSchedule

    default = ScorerSchedule()
    return hasattr(default, name) and getattr(default, name) == value


def check_run_dir(paths: Mapping[str, str], key: Mapping[str, Any], *, fresh: bool = False,
                  log: Callable[[str], None] = print) -> bool:
    """Whether a run with this name exists and is resumed. A rerun with a different key under
    the same name is a :class:`ConfigError` unless ``fresh``, which deletes the old run first."""
    run_dir = Path(paths["run_dir"])
    record = run_dir / RUN_RECORD
    if fresh and run_dir.exists():
        log(f"--fresh: deleting the existing run {run_dir}")
        for child in run_dir.iterdir():  # all but the lock this run holds and the logs (this run's is open)
            if child.name not in (LOCK_NAME, "logs"):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    if not record.is_file():
        return False
    old = json.loads(record.read_text()).get("key", {})
    diff = {k: (old.get(k), key.get(k)) for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k)
            and not (k not in old and _recorded_before(k, key[k]))}
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise SettingError("name", f"{paths['name']!r}: the run in {paths['storage_path']} was started with a "
                           f"different config ({shown}); pass another name, or fresh to discard it",
                           related=["fresh"])
    log(f"resuming run {paths['name']!r} from {run_dir}")
    return True


def write_run_record(paths: Mapping[str, str], key: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """``RUN_DIR/cappy_run.json``: the key a rerun must match and the whole resolved config."""
    from cappy_core.io import write_json

    write_json(Path(paths["run_dir"]) / RUN_RECORD, {"key": dict(key), "config": dict(config)})


def save_checkpoint(path: str | Path, scorer: Any, state: Any, optimizer: Any, *, total_updates: int,
                    metadata: Mapping[str, Any]) -> None:
    """A resumable checkpoint folder: the scorer (:meth:`~cappy_core.scorer.model.Scorer.save_pretrained`;
    its ``cappy.json`` records the update, the total and ``metadata``) plus the train state and
    Adam moments (:func:`~cappy_core.scorer.train_state.save_train_state`)."""
    from cappy_core.scorer.train_state import save_train_state

    scorer.save_pretrained(path, metadata={"update": state.update, "total_updates": total_updates, **metadata})
    save_train_state(path, state, optimizer, extra={"total_updates": total_updates})


def evaluate_pairs(scorer: Any, pairs: Mapping[str, Sequence[Any]], *, rank: int = 0, world_size: int = 1,
                   batch_size: int = 64) -> dict[str, Any]:
    """:func:`cappy_core.scorer.metrics.scorer_metrics` of ``scorer`` on held-out pair columns; with
    ``world_size`` ranks (``torch.distributed`` initialised) each scores rows ``rank::world_size``
    and the scores are gathered. Leaves the model in train mode (this runs between updates)."""
    from cappy_core.scorer.metrics import scorer_metrics

    n = len(pairs["label"])
    mine = range(rank, n, world_size)
    scores = scorer.score([pairs["instruction"][i] for i in mine], [pairs["response"][i] for i in mine],
                          batch_size=batch_size)
    gathered: list = [scores]
    if world_size > 1:
        import torch.distributed

        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, scores)
    full = [0.0] * n
    for r, part in enumerate(gathered):
        for i, s in zip(range(r, n, world_size), part):
            full[i] = s
    metrics = scorer_metrics(full, pairs["label"], pairs["instruction"])
    scorer.model.train()
    return metrics


class RunProgress:
    """What a training attempt does between updates (``fit_scorer``'s ``on_update``): a progress
    line every ``log_every`` updates, an eval every ``eval_every`` and a report every
    ``checkpoint_every`` (and both at the last update). A report carries the mean loss since the
    previous one, the LR, samples/s (:class:`~cappy_core.scorer.training.Throughput`, without eval and
    report time) and the eval's metrics as ``eval_<name>`` (NaN as ``None``);
    ``report(metrics, with_checkpoint)`` is the caller's (``ray.train.report``). Evals are
    appended to ``state.evals``."""

    def __init__(self, state: Any, total_updates: int, *, report: Callable[[dict, bool], None],
                 evaluate: Callable[[], dict] | None = None, world_size: int = 1, log_every: int = 10,
                 eval_every: int = 100, checkpoint_every: int = 100, log: Callable[[str], None] | None = None):
        from cappy_core.scorer.training import Throughput

        self.state, self.total, self.report, self.evaluate, self.log = state, total_updates, report, evaluate, log
        self.log_every, self.eval_every, self.checkpoint_every = log_every, eval_every, checkpoint_every
        self.meter = Throughput(world_size)
        self.last = state.update  # the update of the previous report

    def _eval(self, update: int) -> dict[str, Any]:
        self.state.evals.append({"update": update, **self.evaluate()})
        if self.log:
            self.log(f"[eval] update {update}: {json.dumps(self.state.evals[-1])}")
        return {f"eval_{k}": v for k, v in self.state.evals[-1].items() if k != "update"}

    def begin(self) -> None:
        """The eval before the first update of a fresh run, reported without a checkpoint."""
        if self.evaluate is not None and self.state.update == 0 and not self.state.evals:
            self._report({"update": 0, **self._eval(0)}, False)

    def __call__(self, info: Any) -> None:
        u = info.update
        rate = self.meter.tick(self.state.samples)
        if self.log and (u % self.log_every == 0 or u == self.total):
            self.log(f"[train] update {u}/{self.total} loss {info.loss:.4f} lr {info.lr:.3g} {rate:.1f} samples/s")
        evals = self.evaluate is not None and (u % self.eval_every == 0 or u == self.total)
        checkpoint = u % self.checkpoint_every == 0 or u == self.total
        if not (evals or checkpoint):
            return
        with self.meter.paused():
            losses, self.last = self.state.losses[self.last:u], u
            metrics = {"update": u, "loss": sum(losses) / max(len(losses), 1), "lr": info.lr, "samples_per_s": rate}
            if evals:
                metrics.update(self._eval(u))
            self._report(metrics, checkpoint)

    def _report(self, metrics: dict, checkpoint: bool) -> None:
        self.report({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()},
                    checkpoint)


@dataclass
class TrainOutcome:
    """What a finished training run reports."""

    output: str  # the exported scorer folder
    updates: int
    total_updates: int
    seconds: float
    losses: list[float]
    evals: list[dict]
    checkpoint_path: str
    samples_per_s: float | None = None  # training throughput of the last attempt (all workers)
    resumes: list[int] = field(default_factory=list)  # updates at which the run resumed


def format_metrics(m: Mapping[str, Any] | None) -> str:
    """``mse 0.123, pearson 0.456, spearman ..., pairwise_acc ... (n N, pairs P)``; NaN → n/a."""
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
    evals = f"eval before: {format_metrics(first)}; after: {format_metrics(last)}" if last else "no eval"
    return (f"{label}: {outcome.updates}/{outcome.total_updates} updates in {outcome.seconds:.0f}s, "
            f"loss {head:.4f} -> {tail:.4f}; {evals}; scorer -> {outcome.output}")
