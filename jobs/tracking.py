"""Experiment tracking (``--report-to``): a job's curves and metrics in TensorBoard, MLflow or W&B,
*while it runs*. Where they go is decided once, on the driver (:func:`tracking`, which reads the
environment there), and travels as a picklable :class:`TrackingRun` to whoever logs: the rank-0
Ray Train worker for pretrain / finetune (each update's loss and LR as it is made, each report's
evals and throughput), the job's own process for generator training and for the sweep (each
stage's seconds as it ends, then the task metrics, means, paired intervals and the report's files).

- **TensorBoard**: event files under ``FOLDER/tensorboard/<run>`` (``tensorboardX``), on disk
  within 2 s and flushed at every report.
- **MLflow**: ``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME`` when set; otherwise a file store
  under ``FOLDER/mlruns``, experiment ``cappy``. The driver creates the run and marks it FINISHED
  or FAILED; workers log into it by id, so a restarted worker group continues the same run.
  Metrics are logged asynchronously (a remote server's round trip is not on the training loop),
  one batch in flight at a time, and waited on at every flush and at close.
- **W&B**: ``WANDB_MODE`` / ``WANDB_PROJECT`` when set (``online`` needs a key); otherwise offline
  files under ``FOLDER/wandb`` (``wandb sync``), project ``cappy``. Workers use Ray's ``setup_wandb``.

A missing package, or W&B online without a key, is an error before the job starts.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from cappy_core.config import flatten

REPORT_TO = ("none", "tensorboard", "mlflow", "wandb")
_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


@dataclass
class TrackingOptions:
    """``--report-to``, shared by the jobs that train or evaluate (their configs inherit it)."""

    report_to: str = field(default="none", metadata={
        "choices": list(REPORT_TO), "help": "also log curves and metrics, live, to TensorBoard, MLflow or W&B "
                                            "(MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, WANDB_MODE / WANDB_PROJECT "
                                            "when set; else local files under the job's output folder)"})


def check_report_to(kind: str) -> None:
    """Fail before the job runs when the tracker's package is missing, or W&B would need a login."""
    if kind not in REPORT_TO:
        raise ValueError(f"--report-to {kind!r}: choose one of {', '.join(REPORT_TO)}")
    if kind == "none":
        return
    import importlib.util

    package = _PACKAGES[kind]
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"--report-to {kind}: the {package!r} package is not installed "
                          f"(pip install {'-e .[tracking]' if kind == 'tensorboard' else package})")
    if kind == "wandb" and os.environ.get("WANDB_MODE", "offline") not in ("offline", "disabled", "dryrun"):
        import wandb

        if not os.environ.get("WANDB_API_KEY") and not wandb.api.api_key:
            raise ValueError(f"--report-to wandb with WANDB_MODE={os.environ['WANDB_MODE']}: no W&B key "
                             "(run `wandb login` or set WANDB_API_KEY; unset WANDB_MODE to log offline)")


def _numeric(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def mlflow_key(name: str) -> str:
    """``name`` as MLflow accepts it: characters other than letters, digits, ``_ - . : /`` and
    spaces become ``_`` (``tense/cappy+lm+mbr`` → ``tense/cappy_lm_mbr``); MLflow refuses the rest."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def _allow_file_store(uri: str) -> None:
    if uri.startswith("file:") or "://" not in uri:  # MLflow 3 keeps the file store behind this opt-in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


@dataclass
class TrackingRun:
    """One run of one tracker, resolved on the driver; picklable, so a Ray Train worker opens it."""

    kind: str
    name: str
    folder: str  # the job's folder: TensorBoard events, the default MLflow store, W&B's files
    params: dict = field(default_factory=dict)  # flat: schedule.lr, ...
    mlflow_uri: str = ""
    experiment: str = ""
    run_id: str = ""  # MLflow's run (created by the driver) or W&B's run id
    wandb_mode: str = ""
    wandb_project: str = ""

    @property
    def where(self) -> str:
        if self.kind == "tensorboard":
            return str(Path(self.folder) / "tensorboard" / self.name)
        if self.kind == "mlflow":
            return f"{self.mlflow_uri} (experiment {self.experiment}, run {self.run_id})"
        return f"{Path(self.folder) / 'wandb'} ({self.wandb_mode}, project {self.wandb_project}, run {self.run_id})"


def start_run(kind: str, folder: str | Path, name: str, params: Mapping[str, Any]) -> TrackingRun | None:
    """The driver's half: read the environment, create the MLflow run (with the params) or pick the
    W&B run id. None for ``--report-to none``."""
    if kind == "none":
        return None
    check_report_to(kind)
    flat = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in flatten(params).items()}
    run = TrackingRun(kind, name, str(Path(folder).resolve()), flat)
    if kind == "mlflow":
        from mlflow.entities import Param

        run.mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(run.folder) / "mlruns").as_uri()
        run.experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "cappy"
        _allow_file_store(run.mlflow_uri)
        client = _mlflow_client(run.mlflow_uri)
        exp = client.get_experiment_by_name(run.experiment)
        created = client.create_run(exp.experiment_id if exp else client.create_experiment(run.experiment),
                                    run_name=name, tags={"cappy.job": name.split("-")[0]})
        run.run_id = created.info.run_id
        client.log_batch(run.run_id, params=[Param(k, str(v)[:500]) for k, v in flat.items()])
    elif kind == "wandb":
        run.wandb_mode = os.environ.get("WANDB_MODE") or "offline"
        run.wandb_project = os.environ.get("WANDB_PROJECT") or "cappy"
        run.run_id = uuid.uuid4().hex[:8]  # W&B ids: letters and digits
    return run


def _mlflow_client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def finish_run(run: TrackingRun | None, ok: bool) -> None:
    """The driver's last word: MLflow's run status (W&B and TensorBoard are closed by their writer)."""
    if run is not None and run.kind == "mlflow":
        _mlflow_client(run.mlflow_uri).set_terminated(run.run_id, "FINISHED" if ok else "FAILED")


@contextlib.contextmanager
def tracking(kind: str, folder: str | Path, name: str, params: Mapping[str, Any],
             log: Callable[[str], None] = print) -> Iterator[TrackingRun | None]:
    """:func:`start_run` … :func:`finish_run` around a job; logs where the run is."""
    run = start_run(kind, folder, name, params)
    if run is not None:
        log(f"{kind}: {run.where}")
    ok = False
    try:
        yield run
        ok = True
    finally:
        finish_run(run, ok)


class Tracker:
    """The writer for a :class:`TrackingRun`, opened where the metrics are made (a no-op for None):
    :meth:`scalars` at a step, :meth:`artifact` for a file, :meth:`flush`, :meth:`close`."""

    def __init__(self, run: TrackingRun | None, in_ray_train: bool = False):
        self.run, self.kind = run, run.kind if run else "none"
        if self.kind == "tensorboard":
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=run.where, flush_secs=2)  # its thread writes to disk this often
            self._tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in run.params.items()), 0)
        elif self.kind == "mlflow":
            _allow_file_store(run.mlflow_uri)
            self._ml = _mlflow_client(run.mlflow_uri)
            self._pending: list = []  # MLflow's RunOperations of the async log_batch calls not yet waited on
        elif self.kind == "wandb":
            self._wb = _open_wandb(run, in_ray_train)
        self._last_step = -1

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        values = _numeric(values)
        if not values or self.kind == "none":
            return
        if self.kind == "tensorboard":
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        elif self.kind == "mlflow":
            import time

            from mlflow.entities import Metric

            # async: a remote server's round trip stays off the training loop. One batch in flight
            # at a time: MLflow runs queued batches on a thread pool, and two batches of one run
            # at once race in a file store (both create metrics/<task>: "File exists").
            self.flush()
            now = int(time.time() * 1000)
            self._pending.append(self._ml.log_batch(self.run.run_id, synchronous=False, metrics=[
                Metric(mlflow_key(k), v, now, step) for k, v in values.items()]))
        else:  # W&B drops a step below one it has: a job logs in step order (evals at their update)
            self._wb.log(values, step=max(step, self._last_step))
        self._last_step = max(step, self._last_step)

    def artifact(self, path: str | Path) -> None:
        """A file of the job's (the sweep's chart and tables): an MLflow artifact, a W&B image or
        file, TensorBoard image or text."""
        path = Path(path)
        if self.kind == "none" or not path.is_file():
            return
        if self.kind == "mlflow":
            self._ml.log_artifact(self.run.run_id, str(path))
        elif self.kind == "tensorboard":
            if path.suffix == ".png":
                import numpy as np
                from PIL import Image

                self._tb.add_image(path.stem, np.asarray(Image.open(path).convert("RGB")), 0, dataformats="HWC")
            else:
                self._tb.add_text(path.name, path.read_text(), 0)
        elif path.suffix == ".png":
            import wandb

            self._wb.log({path.stem: wandb.Image(str(path))}, step=max(self._last_step, 0))
        else:
            self._wb.save(str(path), base_path=str(path.parent), policy="now")

    def flush(self) -> None:
        """Everything logged so far is written (MLflow: its async batches waited on; errors raise here)."""
        if self.kind == "tensorboard":
            self._tb.flush()
        elif self.kind == "mlflow":
            while self._pending:
                self._pending.pop(0).wait()

    def close(self) -> None:
        self.flush()  # before the driver marks an MLflow run FINISHED
        if self.kind == "tensorboard":
            self._tb.close()
        elif self.kind == "wandb":
            self._wb.finish()
            _open_wandb_runs.remove(self.run.run_id)
            if not _open_wandb_runs:  # (the sweep's own run stays open around the generator's)
                import wandb

                wandb.teardown()  # finish() can return before the run file is whole; teardown waits for its writer
        self.kind = "none"


_open_wandb_runs: list[str] = []  # this process's open W&B runs


def _open_wandb(run: TrackingRun, in_ray_train: bool):
    """W&B's run ``run.run_id``: through Ray's ``setup_wandb`` inside a Ray Train worker, else
    ``wandb.init``; resumed when a restarted worker opens it again."""
    import wandb

    folder = Path(run.folder) / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_MODE"] = run.wandb_mode  # setup_wandb reads the mode from here (no key offline)
    # W&B's own console report (run summary, sync hint) only at --log-level debug
    quiet = os.environ.get("CAPPY_LOG_LEVEL", "info") != "debug"
    kwargs = dict(project=run.wandb_project, name=run.name, id=run.run_id, resume="allow", mode=run.wandb_mode,
                  dir=str(folder), settings=wandb.Settings(silent=quiet))
    if in_ray_train:
        from ray.air.integrations.wandb import setup_wandb

        opened = setup_wandb(run.params, rank_zero_only=True, group=None, reinit="finish_previous", **kwargs)
    else:  # beside another run of this process (the sweep's, while it trains the generator)
        opened = wandb.init(config=run.params, reinit="create_new", **kwargs)
    _open_wandb_runs.append(run.run_id)
    return opened
