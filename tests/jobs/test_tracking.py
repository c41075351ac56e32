"""``--report-to``: what a job logs to TensorBoard / MLflow is its own curve and metrics, read back
from the files the tracker wrote (offline, local)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from jobs import tracking


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` from the event files under ``folder`` (TFRecord framing:
    length, its CRC, the serialized Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
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


RESULTS = {"config": {"schedule": {"lr": 1e-3, "warmup_ratio": 0.25}}, "losses": [0.9, 0.7, 0.4, 0.35], "seconds": 12.5,
           "samples_per_s": 80.0, "evals": [{"update": 0, "mse": 0.5, "spearman": 0.1},
                                            {"update": 4, "mse": 0.3, "spearman": 0.4}]}


def test_scorer_run_logs_loss_lr_evals_and_throughput(tmp_path):
    pytest.importorskip("tensorboardX")
    where = tracking.report("tensorboard", tmp_path, "finetune-tense", {"lr": 1e-3},
                            lambda t: tracking.scorer_run(t, RESULTS, total_updates=4), log=lambda s: None)
    logged = read_tensorboard(where)
    assert logged["train/loss"] == [(i + 1, pytest.approx(v)) for i, v in enumerate(RESULTS["losses"])]
    # the schedule the loop used: one warmup update (ceil(4 x 0.25)) from 0, then linear to 0
    assert [v for _, v in logged["train/lr"]] == pytest.approx([0.0, 1e-3, 2e-3 / 3, 1e-3 / 3])
    assert logged["eval/spearman"] == [(0, pytest.approx(0.1)), (4, pytest.approx(0.4))]
    assert logged["train/samples_per_s"] == [(4, 80.0)]


def test_mlflow_file_store_holds_the_same_curve(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets; restored afterwards
    where = tracking.report("mlflow", tmp_path, "finetune-tense", {"lr": 1e-3, "tasks": ["tense"]},
                            lambda t: tracking.scorer_run(t, RESULTS, total_updates=4), log=lambda s: None)
    client = mlflow.MlflowClient(tracking_uri=where.resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("cappy").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(i + 1, pytest.approx(v)) for i, v in enumerate(RESULTS["losses"])]
    assert run.data.params["tasks"] == "['tense']" and run.info.run_name == "finetune-tense"


SWEEP_RECORDS = {"tense": {"status": "ok", "metrics": {"cappy": 16.9, "beam4": 16.9, "cappy+lm+mbr": 18.1},
                           "training": {"samples_per_s": 9.0}},
                 "rephrase": {"status": "failed", "error": "x"}}
SWEEP_SUMMARY = {"mean": {"cappy": 16.9, "beam4": 16.9, "cappy+lm+mbr": 18.1}}


def test_sweep_run_logs_task_metrics_means_and_stages(tmp_path):
    pytest.importorskip("tensorboardX")
    where = tracking.report("tensorboard", tmp_path, "sweep", {}, lambda t: tracking.sweep_run(
        t, SWEEP_SUMMARY, SWEEP_RECORDS, {"tasks_s": 591.0}), log=lambda s: None)
    logged = read_tensorboard(where)
    assert logged["tense/cappy"] == [(0, pytest.approx(16.9))] and logged["mean/beam4"] == [(0, pytest.approx(16.9))]
    assert logged["mean/cappy_lm_mbr"] == [(0, pytest.approx(18.1))]  # tensorboardX: "+" becomes "_" too
    assert logged["stages/tasks_s"] == [(0, 591.0)] and logged["tense/training/samples_per_s"] == [(0, 9.0)]
    assert not any(tag.startswith("rephrase/") for tag in logged)


def test_sweep_run_in_mlflow_renames_what_mlflow_refuses(tmp_path, monkeypatch):
    """MLflow refuses '+' in a metric name (the fused row, cappy+lm+mbr): it becomes '_', and the
    sweep's whole record arrives (a refused name ended the run after its first metric)."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    where = tracking.report("mlflow", tmp_path, "sweep", {}, lambda t: tracking.sweep_run(
        t, SWEEP_SUMMARY, SWEEP_RECORDS, {"tasks_s": 591.0}), log=lambda s: None)
    client = mlflow.MlflowClient(tracking_uri=where.resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("cappy").experiment_id])
    assert run.data.metrics == {"tense/cappy": 16.9, "tense/beam4": 16.9, "tense/cappy_lm_mbr": 18.1,
                                "tense/training/samples_per_s": 9.0, "mean/cappy": 16.9, "mean/beam4": 16.9,
                                "mean/cappy_lm_mbr": 18.1, "stages/tasks_s": 591.0}


def test_unknown_or_missing_tracker_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="--report-to 'comet'"):
        tracking.check_report_to("comet")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="--report-to wandb: the 'wandb' package is not installed"):
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


def test_wandb_offline_run_holds_the_same_curve_and_the_evals_from_update_0(tmp_path, monkeypatch, capfd):
    wandb = pytest.importorskip("wandb", reason="wandb is in the dev extra: pip install -e '.[dev]'")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))  # nothing written outside the test's folder
    # no network whatever the tracker asks for: offline, no login, no stored key, no W&B server
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    asked: list[dict] = []
    init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: asked.append(kw) or init(**kw))
    where = tracking.report("wandb", tmp_path, "finetune-tense", {"lr": 1e-3, "tasks": ["tense"]},
                            lambda t: tracking.scorer_run(t, RESULTS, total_updates=4), log=lambda s: None)
    # wandb-core writes the run file asynchronously: run.finish() alone can return before its last
    # records reach the disk (about half of the reads then found a partial file); the tracker waits
    # for the writer, so the file is whole the moment report() returns
    assert [kw["mode"] for kw in asked] == ["offline"]  # the tracker itself asks for offline mode
    assert where == tmp_path / "wandb"
    assert [p.parent.name.startswith("offline-run-") for p in where.rglob("run-*.wandb")] == [True]
    logged = read_wandb(where)
    assert logged["train/loss"] == [(i + 1, pytest.approx(v)) for i, v in enumerate(RESULTS["losses"])]
    assert [v for _, v in logged["train/lr"]] == pytest.approx([0.0, 1e-3, 2e-3 / 3, 1e-3 / 3])
    # logged after the losses but kept: W&B would drop step 0 once step 4 was written
    assert logged["eval/spearman"] == [(0, pytest.approx(0.1)), (4, pytest.approx(0.4))]
    assert logged["train/samples_per_s"] == [(4, 80.0)]
    # its console report (run summary, sync hints) only at --log-level debug; W&B's import-time notices
    # about other packages in use ("Detected [openai] in use") are not the run's
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("wandb:")]
    assert not [line for line in err if "Detected [" not in line and "Weave" not in line and "weave" not in line], err
