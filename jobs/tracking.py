"""Experiment tracking (``--report-to``): a job's curves and metrics in TensorBoard, MLflow or W&B.

Each job logs what it already records, once it has it: pretrain / finetune the loss of every
update, its learning rate (the schedule's :func:`~cappy_core.scorer.training.lr_at`), the evals and the
throughput; generator training its loss curve, tokens/s and greedy Rouge-L; the sweep every task's
metrics, the means and the stage times. The values are the job's own (``results.json``,
``cappy_generator.json``, ``summary.json``), so a tracker and the JSON never disagree.

All three work offline on local files: TensorBoard event files (``tensorboardX``, which the vLLM
extras install; ``pip install -e ".[tracking]"`` otherwise) under ``FOLDER/tensorboard/<run>``,
an MLflow file store under ``FOLDER/mlruns`` (experiment ``cappy``), W&B in offline mode under
``FOLDER/wandb`` (``wandb sync`` uploads it later; its rows are written in step order when the
run closes, since W&B drops a step lower than one it has). A missing package is an error naming it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cappy_core.config import flatten

REPORT_TO = ("none", "tensorboard", "mlflow", "wandb")
_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


@dataclass
class TrackingOptions:
    """``--report-to``, shared by the jobs that train or evaluate (their configs inherit it)."""

    report_to: str = field(default="none", metadata={
        "choices": list(REPORT_TO), "help": "also log curves and metrics to TensorBoard, MLflow or W&B "
                                            "(offline, local files under the job's output folder)"})


def check_report_to(kind: str) -> None:
    """Fail before the job runs when the tracker's package is missing."""
    if kind not in REPORT_TO:
        raise ValueError(f"--report-to {kind!r}: choose one of {', '.join(REPORT_TO)}")
    if kind == "none":
        return
    import importlib.util

    package = _PACKAGES[kind]
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"--report-to {kind}: the {package!r} package is not installed "
                          f"(pip install {'-e .[tracking]' if kind == 'tensorboard' else package})")


def _numeric(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def mlflow_key(name: str) -> str:
    """``name`` as MLflow accepts it: characters other than letters, digits, ``_ - . : /`` and
    spaces become ``_`` (``tense/cappy+lm+mbr`` → ``tense/cappy_lm_mbr``); MLflow refuses the rest."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


class Tracker:
    """One run of one tracker: :meth:`scalars` at a step, :meth:`close` → where it was written."""

    def __init__(self, kind: str, folder: str | Path, run_name: str, params: Mapping[str, Any]):
        check_report_to(kind)
        self.kind, folder = kind, Path(folder)
        flat = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                for k, v in flatten(params).items()}  # a section's settings as schedule.lr, ...
        if kind == "tensorboard":
            from tensorboardX import SummaryWriter

            self.where = folder / "tensorboard" / run_name
            self._tb = SummaryWriter(logdir=str(self.where))
            self._tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat.items()), 0)
        elif kind == "mlflow":
            # the file store needs no database packages and no server; MLflow 3 keeps it behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            import mlflow

            self.where = folder / "mlruns"
            self._ml = mlflow.MlflowClient(tracking_uri=self.where.resolve().as_uri())
            exp = self._ml.get_experiment_by_name("cappy")
            exp_id = exp.experiment_id if exp else self._ml.create_experiment("cappy")
            self._run = self._ml.create_run(exp_id, run_name=run_name)
            for k, v in flat.items():
                self._ml.log_param(self._run.info.run_id, k, str(v)[:500])
        else:
            import wandb

            self.where = folder / "wandb"
            self.where.mkdir(parents=True, exist_ok=True)
            # wandb's own console report (run summary, sync hint) only at --log-level debug
            quiet = os.environ.get("CAPPY_LOG_LEVEL", "info") != "debug"
            # (no reinit: report() finishes each run, so none is active when the next job's opens)
            self._wb = wandb.init(project="cappy", name=run_name, config=flat, dir=str(self.where), mode="offline",
                                  settings=wandb.Settings(silent=quiet))
            # W&B drops a step lower than one already logged (a job logs its evals, from update 0,
            # after its losses): rows are kept per step and logged in step order at close
            self._rows: dict[int, dict[str, float]] = {}

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        values = _numeric(values)
        if self.kind == "tensorboard":
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        elif self.kind == "mlflow":
            for k, v in values.items():
                self._ml.log_metric(self._run.info.run_id, mlflow_key(k), v, step=step)
        else:
            self._rows.setdefault(step, {}).update(values)

    def curve(self, tag: str, values: Sequence[float], first_step: int = 1) -> None:
        for i, v in enumerate(values):
            self.scalars({tag: v}, first_step + i)

    def close(self) -> Path:
        if self.kind == "tensorboard":
            self._tb.close()
        elif self.kind == "mlflow":
            self._ml.set_terminated(self._run.info.run_id)
        else:
            for step in sorted(self._rows):
                self._wb.log(self._rows[step], step=step)
            self._wb.finish()
            import wandb

            wandb.teardown()  # finish() can return before the run file is whole; teardown waits for its writer
        return self.where


def report(kind: str, folder: str | Path, run_name: str, params: Mapping[str, Any],
           write: Callable[[Tracker], None], log: Callable[[str], None] = print) -> Path | None:
    """Open a tracker (unless ``kind`` is ``none``), let ``write`` log into it, close it."""
    if kind == "none":
        return None
    tracker = Tracker(kind, folder, run_name, params)
    try:
        write(tracker)
    finally:
        where = tracker.close()
    log(f"{kind}: {where}")
    return where


# --- what each job logs ----------------------------------------------------------------------

def scorer_run(tracker: Tracker, results: Mapping[str, Any], total_updates: int) -> None:
    """pretrain / finetune: loss and learning rate per update, evals, throughput."""
    from cappy_core.scorer.training import lr_at, warmup_updates

    schedule = results["config"]["schedule"]
    warmup = warmup_updates(total_updates, schedule["warmup_ratio"])
    for i, loss in enumerate(results["losses"]):
        tracker.scalars({"train/loss": loss, "train/lr": lr_at(i, total_updates, warmup, schedule["lr"])}, i + 1)
    for ev in results.get("evals") or []:
        tracker.scalars({f"eval/{k}": v for k, v in ev.items() if k != "update"}, int(ev.get("update", 0)))
    last = len(results["losses"])
    tracker.scalars({"train/samples_per_s": results.get("samples_per_s"), "train/seconds": results.get("seconds")}, last)


def generator_run(tracker: Tracker, losses: Sequence[float], metadata: Mapping[str, Any]) -> None:
    """generator training: loss per update, then throughput and the greedy eval."""
    tracker.curve("train/loss", losses)
    training = metadata.get("training", {})
    tracker.scalars({"train/tokens_per_s": training.get("tokens_per_s"), "train/seconds": training.get("seconds"),
                     **{f"eval/{k}": v for k, v in (metadata.get("eval") or {}).items()}}, len(losses))


def sweep_run(tracker: Tracker, summary: Mapping[str, Any], records: Mapping[str, dict],
              stages: Mapping[str, float]) -> None:
    """the sweep: each task's metrics and training numbers, the means, the stage times (step 0)."""
    for task, rec in records.items():
        if rec.get("status") == "ok":
            tracker.scalars({f"{task}/{m}": v for m, v in rec.get("metrics", {}).items()}, 0)
            tracker.scalars({f"{task}/training/{k}": v for k, v in (rec.get("training") or {}).items()}, 0)
    tracker.scalars({f"mean/{m}": v for m, v in (summary.get("mean") or {}).items()}, 0)
    tracker.scalars({f"stages/{k}": v for k, v in stages.items()}, 0)
