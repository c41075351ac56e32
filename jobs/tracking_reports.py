"""What each job logs through its :class:`~jobs.tracking.Tracker`: a scorer worker's reports
(:func:`training_report`) and the sweep's end (:func:`sweep_run`)."""

from __future__ import annotations

from typing import Any, Mapping

from jobs.tracking import Tracker


def training_report(tracker: Tracker, metrics: Mapping[str, Any]) -> None:
    """A scorer worker's report (:class:`~cappy_core.scorer.runs.RunProgress`): its evals as
    ``eval/<name>``, its throughput, flushed so a reader sees them now."""
    values = {f"eval/{k[5:]}": v for k, v in metrics.items() if k.startswith("eval_")}
    if "samples_per_s" in metrics:
        values["train/samples_per_s"] = metrics["samples_per_s"]
    tracker.scalars(values, int(metrics.get("update", 0)))
    tracker.flush()


def sweep_run(tracker: Tracker, summary: Mapping[str, Any], records: Mapping[str, dict],
              stages: Mapping[str, float]) -> None:
    """The sweep's end: each task's metrics and training numbers, the means, the stage times, the
    paired intervals against the best baseline (``intervals/<method>/<task or mean>/<low|mean|high>``),
    all at step 0, then the report's chart and tables as artifacts."""
    for task, rec in records.items():
        if rec.get("status") == "ok":
            tracker.scalars({f"{task}/{m}": v for m, v in rec.get("metrics", {}).items()}, 0)
            tracker.scalars({f"{task}/training/{k}": v for k, v in (rec.get("training") or {}).items()}, 0)
    tracker.scalars({f"mean/{m}": v for m, v in (summary.get("mean") or {}).items()}, 0)
    tracker.scalars({f"stages/{k}": v for k, v in stages.items()}, 0)
    for method, iv in ((summary.get("intervals") or {}).get("methods") or {}).items():
        for where, x in [("mean", iv.get("mean")), *(iv.get("per_task") or {}).items()]:
            if x:
                tracker.scalars({f"intervals/{method}/{where}/{k}": x.get(k) for k in ("low", "mean", "high")}, 0)
    for key in ("chart", "table", "csv", "csv_ci"):
        if summary.get(key):
            tracker.artifact(summary[key])
    tracker.flush()
