"""``--report-to``: what a job logs to TensorBoard / MLflow is its own curve and metrics, read back
from the files the tracker wrote (offline, local)."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from jobs import tracking, tracking_reports


def tensorboard_events(folder: Path):
    """The Events of the event files under ``folder`` (TFRecord framing: length, its CRC, the
    serialized Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` of the scalars under ``folder``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in tensorboard_events(folder):
        for v in event.summary.value:
            if v.WhichOneof("value") == "simple_value":
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_generator_training_logs_its_own_loss_curve_to_tensorboard(tmp_path, standin_tasks):
    pytest.importorskip("tensorboardX")
    import jobs.train_generator as tg
    from cappy_core.config import load_yaml
    from jobs.cli import presets

    tiny = load_yaml(tg.GeneratorConfig, presets("generator")["tiny"])
    cfg = tg.GeneratorConfig(**{**tiny, "tasks": ["standin_tense"], "task_dir": [str(standin_tasks)], "updates": 6, "time_budget_s": 0, "eval_examples": 0,
                                "threads": 1, "out": str(tmp_path / "gen"), "report_to": "tensorboard"})
    lines: list[str] = []
    meta = tg.train_generator(cfg, log=lines.append)
    logged = read_tensorboard(tmp_path / "runs" / "tensorboard" / "gen")
    assert f"tensorboard: {tmp_path / 'runs' / 'tensorboard' / 'gen'}" in lines
    curve = meta["training"]["loss_curve"]  # the job's own record: [[update, loss rounded to 1e-4]]
    assert [s for s, _ in logged["train/loss"]] == list(range(1, 7)) == [u for u, _ in curve]
    assert [v for _, v in logged["train/loss"]] == pytest.approx([l for _, l in curve], abs=1e-4)
    assert logged["train/tokens_per_s"][0][1] == pytest.approx(meta["training"]["tokens_per_s"], rel=1e-6)
    assert not (tmp_path / "gen" / "tensorboard").exists()  # beside the generator folder, not in it


LOSSES, LRS = [0.9, 0.7, 0.4, 0.35], [0.0, 1e-3, 2e-3 / 3, 1e-3 / 3]


def scorer_like_run(tracker: tracking.Tracker, after_update=lambda update: None) -> None:
    """What a scorer worker logs: the eval before update 0, each update's loss and LR, a report
    (evals and throughput) at update 4."""
    tracking_reports.training_report(tracker, {"update": 0, "eval_mse": 0.5, "eval_spearman": 0.1})
    for i, (loss, lr) in enumerate(zip(LOSSES, LRS)):
        tracker.scalars({"train/loss": loss, "train/lr": lr}, i + 1)
        after_update(i + 1)
    tracking_reports.training_report(tracker, {"update": 4, "loss": 0.5, "lr": 0.0, "samples_per_s": 80.0,
                                       "eval_mse": 0.3, "eval_spearman": 0.4, "eval_pearson": None})


def test_tensorboard_events_are_readable_while_the_run_goes(tmp_path):
    pytest.importorskip("tensorboardX")
    seen: dict[int, dict] = {}
    with tracking.tracking("tensorboard", tmp_path, "finetune-tense", {"lr": 1e-3}, log=lambda s: None) as run, \
            tracking.Tracker(run) as tracker:
        assert run.where == str(tmp_path.resolve() / "tensorboard" / "finetune-tense")
        scorer_like_run(tracker)
        # tensorboardX writes from a thread of its own and flushes at each report: readable within moments
        deadline = time.monotonic() + 10
        while "train/samples_per_s" not in seen.setdefault("before close", {}) and time.monotonic() < deadline:
            time.sleep(0.05)
            seen["before close"] = read_tensorboard(Path(run.where))
    logged = read_tensorboard(Path(run.where))
    assert seen["before close"] == logged
    assert logged["train/loss"] == [(i + 1, pytest.approx(v)) for i, v in enumerate(LOSSES)]
    assert [v for _, v in logged["train/lr"]] == pytest.approx(LRS)
    assert logged["eval/spearman"] == [(0, pytest.approx(0.1)), (4, pytest.approx(0.4))]
    assert logged["train/samples_per_s"] == [(4, 80.0)] and "eval/pearson" not in logged  # None: not logged


def mlflow_runs(uri: str, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def test_mlflow_honours_the_tracking_uri_and_experiment_and_shows_the_run_live(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    store = (tmp_path / "elsewhere" / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-cappy")
    counts: list[tuple[str, int]] = []

    def read(update: int) -> None:  # the store as another process sees it, mid-run (logging is async: within 5 s)
        deadline = time.monotonic() + 5
        while True:
            client, (live,) = mlflow_runs(store, "team-cappy")
            n = len(client.get_metric_history(live.info.run_id, "train/loss"))
            if n >= update or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        counts.append((live.info.status, n))

    with tracking.tracking("mlflow", tmp_path / "job", "finetune-tense", {"lr": 1e-3, "tasks": ["tense"]},
                           log=lambda s: None) as run, tracking.Tracker(run) as tracker:
        scorer_like_run(tracker, after_update=read)
    assert counts == [("RUNNING", 1), ("RUNNING", 2), ("RUNNING", 3), ("RUNNING", 4)]
    assert not (tmp_path / "job" / "mlruns").exists()  # the URI, not the default file store
    client, (done,) = mlflow_runs(store, "team-cappy")
    history = client.get_metric_history(done.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(i + 1, pytest.approx(v)) for i, v in enumerate(LOSSES)]
    assert done.info.status == "FINISHED" and done.info.run_name == "finetune-tense"
    assert done.data.params["tasks"] == "['tense']" and done.data.metrics["eval/spearman"] == pytest.approx(0.4)


def test_mlflow_defaults_to_a_file_store_in_the_job_folder_and_marks_a_failed_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with pytest.raises(RuntimeError, match="worker died"):
        with tracking.tracking("mlflow", tmp_path, "pretrain-local", {}, log=lambda s: None) as run, \
                tracking.Tracker(run) as tracker:
            tracker.scalars({"train/loss": 1.0}, 1)
            raise RuntimeError("worker died")
    _, (failed,) = mlflow_runs((tmp_path / "mlruns").as_uri(), "cappy")
    assert failed.info.status == "FAILED" and failed.data.metrics == {"train/loss": 1.0}


SWEEP_RECORDS = {"tense": {"status": "ok", "metrics": {"cappy": 16.9, "beam4": 16.9, "cappy+lm+mbr": 18.1},
                           "training": {"samples_per_s": 9.0}},
                 "rephrase": {"status": "failed", "error": "x"}}


def sweep_summary(folder: Path) -> dict:
    """A report's summary (written files and the intervals against the best baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(2, 1)).savefig(folder / "summary.png")
    plt.close("all")
    (folder / "summary.md").write_text("| method | tense |\n|---|---:|\n| cappy | 16.9 |\n")
    iv = {"mean": 1.2, "low": 0.4, "high": 2.0, "half_width": 0.8}
    return {"mean": {"cappy": 16.9, "beam4": 16.9, "cappy+lm+mbr": 18.1}, "chart": str(folder / "summary.png"),
            "table": str(folder / "summary.md"),
            "intervals": {"baseline": "beam4", "methods": {"cappy+lm+mbr": {"mean": iv, "per_task": {"tense": iv}},
                                                           "cappy": {"mean": None, "per_task": {}}}}}


def run_sweep_tracker(kind: str, folder: Path) -> tracking.TrackingRun:
    with tracking.tracking(kind, folder, "sweep", {}, log=lambda s: None) as run, tracking.Tracker(run) as tracker:
        tracking_reports.sweep_run(tracker, sweep_summary(folder), SWEEP_RECORDS, {"tasks_s": 591.0})
    return run


def test_sweep_run_logs_task_metrics_means_stages_intervals_and_its_chart(tmp_path):
    pytest.importorskip("tensorboardX")
    run = run_sweep_tracker("tensorboard", tmp_path)
    logged = read_tensorboard(Path(run.where))
    assert logged["tense/cappy"] == [(0, pytest.approx(16.9))] and logged["mean/beam4"] == [(0, pytest.approx(16.9))]
    assert logged["mean/cappy_lm_mbr"] == [(0, pytest.approx(18.1))]  # tensorboardX: "+" becomes "_" too
    assert logged["stages/tasks_s"] == [(0, 591.0)] and logged["tense/training/samples_per_s"] == [(0, 9.0)]
    assert logged["intervals/cappy_lm_mbr/mean/low"] == [(0, pytest.approx(0.4))]
    assert logged["intervals/cappy_lm_mbr/tense/high"] == [(0, pytest.approx(2.0))]
    assert not any(tag.startswith(("rephrase/", "intervals/cappy/")) for tag in logged)


def test_sweep_run_in_mlflow_renames_what_mlflow_refuses_and_keeps_the_chart(tmp_path, monkeypatch):
    """MLflow refuses '+' in a metric name (the fused row, cappy+lm+mbr): it becomes '_', and the
    sweep's whole record arrives (a refused name ended the run after its first metric)."""
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_sweep_tracker("mlflow", tmp_path)
    client, (run,) = mlflow_runs((tmp_path / "mlruns").as_uri(), "cappy")
    interval = {f"intervals/cappy_lm_mbr/{w}/{k}": v for w in ("mean", "tense")
                for k, v in (("low", 0.4), ("mean", 1.2), ("high", 2.0))}
    assert run.data.metrics == {"tense/cappy": 16.9, "tense/beam4": 16.9, "tense/cappy_lm_mbr": 18.1,
                                "tense/training/samples_per_s": 9.0, "mean/cappy": 16.9, "mean/beam4": 16.9,
                                "mean/cappy_lm_mbr": 18.1, "stages/tasks_s": 591.0, **interval}
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["summary.md", "summary.png"]


def test_mlflow_keeps_one_async_batch_in_flight(tmp_path, monkeypatch):
    """MLflow runs queued async batches on a thread pool; two batches of one run at once raced in
    the file store ("File exists: .../metrics/tense", about one sweep record in 40). Each batch
    is waited on before the next is sent, and all at close."""
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    in_flight, most = [], [0]

    class Op:
        def wait(self):
            in_flight.remove(self)

    with tracking.tracking("mlflow", tmp_path, "sweep", {}, log=lambda s: None) as run, tracking.Tracker(run) as tracker:
        def log_batch(run_id, synchronous=True, metrics=()):
            assert not synchronous  # async still: the training loop does not wait for this batch
            in_flight.append(Op())
            most[0] = max(most[0], len(in_flight))
            return in_flight[-1]

        monkeypatch.setattr(tracker._ml, "log_batch", log_batch)
        for step in range(5):
            tracker.scalars({"a/b": float(step), "a/c": 1.0}, step)
        assert len(in_flight) == 1
    assert most[0] == 1 and not in_flight


def test_unknown_or_missing_tracker_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="--report-to 'comet'"):
        tracking.check_report_to("comet")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="--report-to wandb: the 'wandb' package is not installed"):
        tracking.check_report_to("wandb")


def test_wandb_online_without_a_key_is_refused_before_the_job(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb", reason="wandb is in the dev extra: pip install -e '.[dev]'")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(type(wandb.api), "api_key", property(lambda self: None), raising=False)
    with pytest.raises(ValueError, match="WANDB_MODE=online: no W&B key .*wandb login"):
        tracking.check_report_to("wandb")


def read_wandb(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value)]}`` from the history records of the offline run under ``folder``
    (``run-<id>.wandb``: a 7-byte header, then LevelDB log blocks of 32 KiB whose records,
    possibly split across blocks, are serialized ``Record`` protos)."""
    import json

    from wandb.proto import wandb_internal_pb2

    (path,) = folder.rglob("run-*.wandb")
    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    out: dict[str, list[tuple[int, float]]] = {}
    kinds: list[str] = []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (n, kind) == (0, 0):  # the rest of a block is padding
            pos += left
            continue
        buf = data[pos + 7:pos + 7 + n] if kind in (1, 2) else buf + data[pos + 7:pos + 7 + n]  # full/first: new
        pos += 7 + n
        if kind in (1, 4):  # full/last: a whole record
            record = wandb_internal_pb2.Record.FromString(buf)
            kinds.append(record.WhichOneof("record_type"))
            if kinds[-1] == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                for k, v in row.items():
                    if not k.startswith("_"):
                        out.setdefault(k, []).append((row["_step"], v))
    # the whole run, closed: a file read before W&B finished writing it would hold only its head
    assert kinds[:1] == ["header"] and kinds[-1:] == ["exit"], (path, len(data), kinds)
    return out


def test_wandb_offline_run_holds_the_curve_and_the_evals_from_update_0(tmp_path, monkeypatch, capfd):
    wandb = pytest.importorskip("wandb", reason="wandb is in the dev extra: pip install -e '.[dev]'")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))  # nothing written outside the test's folder
    # no network whatever the tracker asks for: offline, no login, no stored key, no W&B server
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "team-cappy")
    asked: list[dict] = []
    init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: asked.append(kw) or init(**kw))
    with tracking.tracking("wandb", tmp_path, "sweep", {}, log=lambda s: None) as outer, \
            tracking.Tracker(outer) as sweep:
        sweep.scalars({"stages/data_s": 1.0}, 0)
        # the sweep's generator training opens a second run in the same process and closes it
        with tracking.tracking("wandb", tmp_path, "finetune-tense", {"lr": 1e-3, "tasks": ["tense"]},
                               log=lambda s: None) as run, tracking.Tracker(run) as tracker:
            scorer_like_run(tracker)
        sweep.scalars({"stages/generator_s": 2.0}, 0)  # the sweep's run is still open
    # the tracker asks for offline mode when WANDB_MODE is unset, and the project WANDB_PROJECT names
    assert [(kw["mode"], kw["project"], kw["name"]) for kw in asked] == \
        [("offline", "team-cappy", "sweep"), ("offline", "team-cappy", "finetune-tense")]
    files = {p.parent.name.split("-")[-1]: p.parent for p in (tmp_path / "wandb").rglob("run-*.wandb")}
    assert set(files) == {outer.run_id, run.run_id}
    # wandb-core writes the run file asynchronously: the tracker waits for the writer, so the file is whole
    logged = read_wandb(files[run.run_id])
    assert logged["train/loss"] == [(i + 1, pytest.approx(v)) for i, v in enumerate(LOSSES)]
    assert [v for _, v in logged["train/lr"]] == pytest.approx(LRS)
    assert logged["eval/spearman"] == [(0, pytest.approx(0.1)), (4, pytest.approx(0.4))]
    assert logged["train/samples_per_s"] == [(4, 80.0)]
    assert read_wandb(files[outer.run_id]) == {"stages/data_s": [(0, 1.0)], "stages/generator_s": [(0, 2.0)]}
    # its console report (run summary, sync hints) only at --log-level debug; W&B's import-time notices
    # about other packages in use ("Detected [openai] in use") are not the run's
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("wandb:")]
    assert not [line for line in err if "Detected [" not in line and "Weave" not in line and "weave" not in line], err
