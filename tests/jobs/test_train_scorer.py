"""``cappy pretrain`` / ``cappy finetune`` on Ray Train: shipped configs, bad input (no Ray
needed: refused before anything starts), and tiny runs as subprocesses on the session's Ray —
pretrain → finetune through the CLI, two finetunes at once, fault injection with resume, and
resume by rerunning."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cappy_core.config import build, build_parser, config_from_args, load_yaml
from cappy_core.fault_injection import FAIL_AT_UPDATE_ENV
from cappy_core.labeling.rouge import LabeledPair, pairs_to_table
from cappy_core.labeling.pair_mixture import write_pairs
from conftest import tiny_bert_scorer, REPO
from jobs import finetune, pretrain
from jobs.cli import CONFIG_DIR, presets

# Fast settings for a tiny model on 2 cores (one worker's share of CPU leaves room for Ray Data).
FAST = ["--max-length", "64", "--schedule.micro-batch-size", "8", "--schedule.batch-size", "16", "--cpus-per-worker", "0.25",
        "--torch-threads", "1", "--eval-batch-size", "32", "--max-failures", "1", "--log-every", "2"]


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) with the MiniLM tokenizer, no dropout."""
    return tiny_bert_scorer(tmp_path_factory.mktemp("tiny_scorer"), num_layers=2)


def synthetic_pairs(n: int, seed: int = 0) -> list[LabeledPair]:
    import random

    rng = random.Random(seed)
    words = "apple pear fig plum kiwi lime date grape melon berry".split()
    out = []
    for i in range(n):  # four responses per instruction
        q = random.Random(seed * 100003 + i // 4)
        instr = f"Q{i // 4}: sort " + " ".join(q.sample(words, q.randint(2, 8)))
        out.append(LabeledPair(instr, " ".join(rng.sample(words, rng.randint(1, 6))), rng.random(), "candidate", "t"))
    return out


def run_job(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


# --- configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_command(path):
    import importlib

    job, preset = path.stem.split("_", 1)
    module, cls_name = {"pretrain": ("pretrain", "PretrainConfig"), "finetune": ("finetune", "FinetuneConfig"),
                        "sweep": ("sweep", "SweepConfig"), "generator": ("train_generator", "GeneratorConfig")}[job]
    cls = getattr(importlib.import_module(f"jobs.{module}"), cls_name)
    cfg = build(cls, load_yaml(cls, path))
    first = path.read_text().splitlines()[0]
    assert re.match(rf"# ray job submit --working-dir \. -- python -m jobs\.{module} --preset {preset}\b", first), first
    assert preset in presets(job)
    if job == "generator":
        return
    s = cfg.schedule  # the one recipe section, checked by ScorerSchedule and the job's config when built
    assert s.batch_size % (s.micro_batch_size * getattr(cfg, "num_workers", 1)) == 0
    if preset == "local" and job != "sweep":
        assert not cfg.use_gpu and cfg.cpus_per_worker < 1  # Ray Data must keep a CPU on 2 cores
    if preset == "paper":
        assert (s.lr, s.batch_size, s.epochs, cfg.train_size, s.warmup_ratio) == (2e-5, 128, 1, 102400, 0.1)


# --- bad input (refused in the driver, before Ray starts) -------------------------------------

def bad_pairs_file(tmp_path: Path, label) -> Path:
    table = pairs_to_table(synthetic_pairs(6)).set_column(3, "label", pa.array([0.1, 0.2, 0.3, label, 0.5, 0.6]))
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("label", [1.5, float("nan"), -0.5])
def test_bad_labels_name_the_file_and_row(tmp_path, capsys, tiny_scorer, label):
    path = bad_pairs_file(tmp_path, label)
    rc = finetune.main(["--train-pairs", str(path), "--init", tiny_scorer, "--storage-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(path) in err and "row 3 (0-based)" in err and "not in [0, 1]" in err
    assert "Traceback" not in err


def test_empty_dataset_is_a_clear_error(tmp_path, capsys, tiny_scorer):
    path = write_pairs([], tmp_path / "empty.parquet")
    rc = pretrain.main(["--train-pairs", str(path), "--init", tiny_scorer, "--storage-path", str(tmp_path)])
    assert rc == 2 and "empty" in capsys.readouterr().err


@pytest.mark.parametrize("init", ["./no/such/scorer", "/definitely/missing/folder"])
def test_unknown_init_path_is_a_clear_error(tmp_path, init):
    proc = run_job(["-m", "jobs.pretrain", "--init", init, "--train-pairs", "x.parquet",
                    "--storage-path", str(tmp_path)], timeout=120)
    assert proc.returncode == 2
    assert "error: --init" in proc.stderr and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_config_errors_are_clear(tmp_path, capsys, tiny_scorer):
    base = ["--init", tiny_scorer, "--storage-path", str(tmp_path)]
    assert finetune.main(["--task", "auto_categorization", "--schedule.batch-size", "10", "--schedule.micro-batch-size", "4", *base]) == 2
    assert capsys.readouterr().err == "error: --schedule.batch-size 10 must be a multiple of --schedule.micro-batch-size 4\n"
    assert finetune.main(["--task", "auto_categorization", "--num-workers", "3", *base]) == 2  # 128 over 3 x 32
    assert "--schedule.batch-size 128 must be a multiple of --schedule.micro-batch-size x --num-workers = 32 x 3" \
        in capsys.readouterr().err
    assert pretrain.main(["--tasks", "word_sorting", *base]) == 2
    assert "45 evaluation tasks" in capsys.readouterr().err
    assert finetune.main(base) == 2
    assert "--task is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the recipe's choices are the flag's: argparse refuses, naming them
        finetune.main(["--task", "auto_categorization", "--schedule.loss", "hinge", *base])
    assert e.value.code == 2 and "--schedule.loss: invalid choice: 'hinge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.main(["--preset", "nope"])


def test_push_to_hub_fails_before_training_without_network(tmp_path, capsys, tiny_scorer, monkeypatch):
    import huggingface_hub.constants as hub

    base = ["--task", "tense", "--init", tiny_scorer, "--storage-path", str(tmp_path), "--push-to-hub"]
    assert finetune.main([*base, "not a repo"]) == 2
    assert "expected a model repo id OWNER/NAME" in capsys.readouterr().err
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert pretrain.main(["--tasks", "implicatures", *base[2:], "me/cappy"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert finetune.main([*base, "me/cappy"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    # a token but no route to the hub: an unreachable local endpoint stands in for no network
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    assert finetune.main([*base, "me/cappy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --push-to-hub me/cappy: cannot reach the Hugging Face hub") and "Traceback" not in err
    assert not any(tmp_path.glob("finetune-*"))  # nothing was trained


def test_push_to_hub_private_creates_a_private_repo(tmp_path, monkeypatch):
    """``--private`` reaches ``create_repo(private=True)`` (a stand-in HfApi: no network)."""
    import huggingface_hub

    from jobs.hub import push_to_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo, **kw):
            calls.append(("create", repo, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    for flags, private in (([], False), (["--private"], True)):
        cfg = config_from_args(finetune.FinetuneConfig, build_parser(finetune.FinetuneConfig, prog="finetune",
                                                                        description="").parse_args(
            ["--task", "tense", "--push-to-hub", "me/cappy", *flags]))
        assert cfg.private is private
        calls.clear()
        url = push_to_hub(str(tmp_path), cfg.push_to_hub, log=lambda m: None, private=cfg.private)
        assert url == "https://huggingface.co/me/cappy" and calls[0][0] == "create"
        assert calls[0][2]["private"] is private and calls[1][1] == "me/cappy"


def test_unknown_task_and_bad_sample_labels(tmp_path, capsys, tiny_scorer, standin_tasks):
    from cappy_core.data.prepare import prepare_tasks

    base = ["--init", tiny_scorer, "--storage-path", str(tmp_path)]
    assert finetune.main(["--task", "auto_categorisation", *base]) == 2
    assert "auto_categorization" in capsys.readouterr().err  # the close match is suggested
    samples = tmp_path / "samples"
    samples.mkdir()
    prepare_tasks(["standin_tense"], tmp_path / "examples", task_dirs=[str(standin_tasks)], log=lambda m: None)
    rows = {"task": ["standin_tense"] * 2, "subtask": ["", ""], "split": ["train"] * 2,
            "example_idx": [0, 1], "instruction": ["a", "b"], "text": ["x", "y"], "label": [0.5, 2.0],
            "decoding": ["beam4", "sample"], "sample_idx": [0, 0]}
    pq.write_table(pa.table(rows), samples / "part-00000.parquet")
    assert finetune.main(["--task", "standin_tense", "--examples", str(tmp_path / "examples"), "--samples",
                          str(samples), *base]) == 2
    err = capsys.readouterr().err
    assert "part-00000.parquet: row 1 (0-based): label 2.0 is not in [0, 1]" in err


# --- tiny runs on the session's Ray ----------------------------------------------------------

SUMMARY = re.compile(r"^(pretrain|finetune \S+): (\d+)/(\d+) updates in \d+s, loss [\d.]+ -> [\d.]+; "
                     r"eval before: mse [\d.]+.*pairwise_acc [\d.]+.*; after: .*; scorer -> (\S+)$", re.M)


@pytest.mark.slow
def test_pretrain_then_finetune_two_tasks_at_once_through_the_cli(tmp_path, tiny_scorer, ray_address, standin_tasks):
    from cappy_core.data.prepare import prepare_tasks
    from cappy_core.scorer.model import Scorer

    examples = str(tmp_path / "examples")  # stand-in tasks (tests/fake_release.py), prepared as `cappy data prepare` does
    prepare_tasks(["standin_colors", "standin_sums", "standin_tense", "standin_rephrase"], examples,
                  task_dirs=[str(standin_tasks)], log=lambda m: None)
    storage = str(tmp_path / "runs")
    proc = run_job(["-m", "jobs.cli", "pretrain", "--preset", "local", "--init", tiny_scorer, "--examples", examples,
                    "--tasks", "standin_colors", "standin_sums", "--max-pairs-per-task", "60",
                    "--train-size", "96", "--eval-size", "24", "--checkpoint-every", "3",
                    "--storage-path", storage, *FAST, "--num-workers", "1", "--report-to", "tensorboard"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = SUMMARY.search(proc.stdout)
    assert m and m.group(1) == "pretrain" and m.group(2) == m.group(3) == "6", proc.stdout[-2000:]
    # the default level: our workers' progress lines, not Ray Train's INFO lines ("Reporting training result")
    assert "[train] starting: 6 updates" in proc.stdout and "Reporting training result" not in proc.stdout + proc.stderr
    pretrained = Path(m.group(4))
    assert pretrained == tmp_path / "runs" / "pretrain-local" / "scorer"
    res = results(pretrained)
    assert res["updates"] == 6 and len(res["losses"]) == 6
    assert [e["update"] for e in res["evals"]] == [0, 3, 6]
    assert {"mse", "pearson", "spearman", "pairwise_acc"} <= set(res["evals"][-1])
    assert not (pretrained / "optimizer.safetensors").exists()
    meta = Scorer.from_pretrained(pretrained).metadata["metadata"]
    assert meta["update"] == 6 and meta["metrics"]["eval_n"] == res["evals"][-1]["n"]
    # --report-to tensorboard: the job's own loss curve and evals, read back from the event files
    from test_tracking import read_tensorboard

    logged = read_tensorboard(tmp_path / "runs" / "pretrain-local" / "tensorboard" / "pretrain-local")
    assert logged["train/loss"] == [(i + 1, pytest.approx(v, rel=1e-6)) for i, v in enumerate(res["losses"])]
    assert [s for s, _ in logged["eval/mse"]] == [0, 3, 6]
    assert logged["eval/mse"][-1][1] == pytest.approx(res["evals"][-1]["mse"], rel=1e-6)
    # the model card says what the scorer was trained on
    card = (pretrained / "README.md").read_text()
    assert "| training data | tasks: standin_colors, standin_sums |" in card  # not BIG-Bench's: no hub dataset
    assert "google/bigbench" not in card
    n_train, n_eval = (pq.read_metadata(res[k]).num_rows for k in ("train_pairs", "eval_pairs"))
    assert f"| training pairs | {n_train:,} ({n_eval:,} held out) |" in card, card
    assert "| loss | mse |" in card and "| updates | 6 of 6 |" in card

    procs = {task: subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "finetune", "--preset", "local", "--task", task,
         "--init", str(pretrained), "--examples", examples, "--train-size", "48", "--eval-size", "16", "--checkpoint-every", "2",
         "--storage-path", storage, *FAST, "--num-workers", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for task in ("standin_tense", "standin_rephrase")}
    for task, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        m = SUMMARY.search(out)
        assert m and m.group(1) == f"finetune {task}" and m.group(2) == m.group(3) == "3", out[-2000:]
        res = results(Path(m.group(4)))
        assert res["config"]["init"] == str(pretrained) and res["paths"]["name"] == f"finetune-{task}"
        assert len(res["evals"]) == 3 and res["evals"][0]["update"] == 0


@pytest.mark.slow
def test_fault_resumes_from_checkpoint_and_loss_curve_continues(tmp_path, tiny_scorer, ray_address, capsys,
                                                                monkeypatch):
    """Two DDP workers; one raises after update 5 on its first attempt; the group restarts from
    the update-4 checkpoint and finishes all 8 updates. The loss curve (all-reduced over ranks)
    equals an uninterrupted run of the same loop in a plain process on the same global batches,
    and the eval history continues. Rerunning the command resumes the (finished) run from
    storage; rerunning it with a different config under the same name is refused."""
    from dataclasses import replace

    from cappy_core.labeling.pair_mixture import read_pair_columns
    from cappy_core.scorer.model import Scorer
    from cappy_core.scorer.training import fit_scorer

    pairs = write_pairs(synthetic_pairs(128), tmp_path / "train.parquet")
    held = write_pairs(synthetic_pairs(24, seed=2), tmp_path / "eval.parquet")
    args = ["--train-pairs", str(pairs), "--eval-pairs", str(held), "--init", tiny_scorer,
            "--storage-path", str(tmp_path / "runs"), "--name", "fault", "--eval-size", "24",
            "--checkpoint-every", "4", *FAST, "--num-workers", "2"]
    proc = run_job(["-m", "jobs.finetune", *args, "--report-to", "mlflow"], env={FAIL_AT_UPDATE_ENV: "5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected fault after update 5" in proc.stdout + proc.stderr
    output = tmp_path / "runs" / "fault" / "scorer"
    res = results(output)
    assert res["updates"] == 8 and len(res["losses"]) == 8 and res["resumed_at"] == [4]
    assert [e["update"] for e in res["evals"]] == [0, 4, 8]  # the eval history survives the restart
    # --report-to mlflow: the restarted worker group logs into the same run, which ends FINISHED
    from test_tracking import mlflow_runs

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (MLflow 3 reads a file store only with it)
    client, (run,) = mlflow_runs((tmp_path / "runs" / "fault" / "mlruns").as_uri(), "cappy")
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert run.info.status == "FINISHED" and sorted(losses) == list(range(1, 9))
    assert [losses[u] for u in range(1, 9)] == pytest.approx(res["losses"], rel=1e-6)
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "eval/mse")}) == [0, 4, 8]
    assert json.loads((output / "cappy_output.json").read_text())["run"] == "fault"  # marked as the job's own
    assert not (tmp_path / "runs" / "fault" / ".cappy.lock").exists()  # the run folder's lock was released

    cfg = config_from_args(finetune.FinetuneConfig,
                           build_parser(finetune.FinetuneConfig, prog="finetune", description="").parse_args(args))
    schedule = cfg.schedule
    scorer = Scorer.from_pretrained(tiny_scorer, dtype="float32", device="cpu", max_length=cfg.max_length,
                                    seed=schedule.seed)
    plain = replace(schedule, micro_batch_size=2 * schedule.micro_batch_size)  # one process, same global batches
    state = fit_scorer(scorer, read_pair_columns(pairs), plain, device="cpu")
    assert state.update == 8
    assert res["losses"] == pytest.approx(state.losses, rel=1e-4)

    exported = tmp_path / "exported"  # a rerun exports the finished run again, here to its own --output
    again = run_job(["-m", "jobs.finetune", *args, "--output", str(exported)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming run 'fault'" in again.stdout and SUMMARY.search(again.stdout)
    assert results(exported)["losses"] == res["losses"] and (exported / "cappy_output.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.parquet", "exported", "runs", "train.parquet"]
    assert finetune.main(args + ["--schedule.lr", "1e-3"]) == 2
    assert "different config (lr: 2e-05 -> 0.001)" in capsys.readouterr().err


@pytest.mark.slow
def test_mlflow_store_shows_the_training_run_while_it_goes(tmp_path, tiny_scorer, ray_address, monkeypatch):
    """`--report-to mlflow` with MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME set: the store, read
    from here while the job runs, already holds the run (RUNNING) and a growing loss curve."""
    import time

    pairs = write_pairs(synthetic_pairs(384), tmp_path / "train.parquet")
    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_NAME": "live",
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "pretrain", "--train-pairs", str(pairs), "--init",
                             tiny_scorer, "--storage-path", str(tmp_path / "runs"), "--eval-size", "0", *FAST,
                             "--schedule.epochs", "2", "--checkpoint-every", "12", "--report-to", "mlflow"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from test_tracking import mlflow_runs

    seen: list[int] = []  # the loss curve's length at each read that found the job still running
    try:
        while proc.poll() is None:
            _, runs = mlflow_runs(store, "live")
            if runs and runs[0].info.status == "RUNNING":
                client = mlflow_runs(store, "live")[0]
                n = len(client.get_metric_history(runs[0].info.run_id, "train/loss"))
                if proc.poll() is None and n and (not seen or n > seen[-1]):
                    seen.append(n)
            time.sleep(0.2)
        out = proc.stdout.read()
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert f"mlflow: {store} (experiment live, run " in out
    client, (run,) = mlflow_runs(store, "live")
    total = len(client.get_metric_history(run.info.run_id, "train/loss"))
    assert run.info.status == "FINISHED" and total == results(tmp_path / "runs" / "pretrain" / "scorer")["updates"]
    assert len(seen) >= 2 and 0 < seen[0] < seen[-1] <= total, (seen, total)  # read mid-run, and growing
    assert not (tmp_path / "runs" / "pretrain" / "mlruns").exists()  # the URI, not the run folder's store


@pytest.mark.slow
def test_a_starved_data_feed_fails_instead_of_hanging(tmp_path, tiny_scorer, ray_address):
    """One worker holding both CPUs of the session's Ray leaves none for Ray Data's read: the
    feed makes no progress and the run fails with an error that says what to do."""
    pairs = write_pairs(synthetic_pairs(64), tmp_path / "train.parquet")
    proc = run_job(["-m", "jobs.finetune", "--train-pairs", str(pairs), "--init", tiny_scorer,
                    "--storage-path", str(tmp_path / "runs"), "--eval-size", "0", *FAST,
                    "--cpus-per-worker", "2", "--max-failures", "0", "--data-timeout-s", "5"])
    assert proc.returncode == 1
    assert "Ray Data feed made no progress" in proc.stderr and "--cpus-per-worker" in proc.stderr


def test_uri_storage_path_and_output_go_to_ray_train_and_through_staging(tmp_path, capsys, tiny_scorer, monkeypatch):
    """`--storage-path memory://...` (fsspec's in-process filesystem through pyarrow, S3's code
    path): Ray Train gets the URI's filesystem and path; the run's own files (run record, pairs,
    log, exported scorer) are built in a staging folder and uploaded; a `--output` URI is
    uploaded after the export. Training itself is stubbed: Ray Train workers in other
    processes cannot see an in-process filesystem (they can see S3)."""
    import fsspec
    import pyarrow.fs as pafs

    from cappy_core.io import atomic_dir, write_json
    from cappy_core.scorer.runs import OUTPUT_MARKER, TrainOutcome
    from jobs import scorer_trainer, train_scorer

    monkeypatch.setenv("CAPPY_STAGING_DIR", str(tmp_path / "staging"))
    mem, root = fsspec.filesystem("memory"), f"/bucket/{tmp_path.name}"
    seen = {}

    def fake_training(cfg, paths, train_file, eval_file, run_info, log, before_fit, progress=True, tracking=None):
        seen["storage"] = scorer_trainer.ray_storage(paths)
        before_fit()
        seen["uploaded_before_fit"] = sorted(p.removeprefix(root + "/") for p in mem.find(root))
        with atomic_dir(paths["output"]) as tmp:
            (tmp / "model.safetensors").write_bytes(b"weights")
            write_json(tmp / OUTPUT_MARKER, {"job": "pretrain"})
        return TrainOutcome(output=paths["output"], updates=1, total_updates=1, seconds=0.1, losses=[0.5], evals=[],
                            checkpoint_path=f"{root}/runs/r/checkpoint_000000")

    monkeypatch.setattr(train_scorer, "run_training", fake_training)
    pairs = write_pairs(synthetic_pairs(8), tmp_path / "pairs.parquet")
    base = ["--train-pairs", str(pairs), "--init", tiny_scorer, "--name", "r", "--eval-size", "0"]
    assert pretrain.main([*base, "--storage-path", f"memory:/{root}/runs"]) == 0, capsys.readouterr().err
    path, fs = seen["storage"]
    assert path == f"{root}/runs" and isinstance(fs, pafs.PyFileSystem)
    assert "runs/r/cappy_run.json" in seen["uploaded_before_fit"]
    at_uri = sorted(p.removeprefix(f"{root}/runs/r/") for p in mem.find(f"{root}/runs/r"))
    assert {"cappy_run.json", "scorer/model.safetensors", "scorer/results.json", f"scorer/{OUTPUT_MARKER}"} <= set(at_uri)
    assert any(p.startswith("logs/pretrain-") for p in at_uri) and not [p for p in at_uri if ".tmp-" in p]

    # --output URI: exported into its own staging folder, then uploaded; a foreign folder is refused
    assert pretrain.main([*base, "--storage-path", str(tmp_path / "runs"), "--output", f"memory:/{root}/out"]) == 0
    assert mem.cat(f"{root}/out/model.safetensors") == b"weights" and mem.exists(f"{root}/out/results.json")
    mem.pipe(f"{root}/theirs/notes.txt", b"not a scorer")
    capsys.readouterr()
    assert pretrain.main([*base, "--name", "s", "--storage-path", str(tmp_path / "runs"),
                          "--output", f"memory:/{root}/theirs"]) == 2
    assert "non-empty folder that this job did not write" in capsys.readouterr().err
    assert mem.find(f"{root}/theirs") == [f"{root}/theirs/notes.txt"]
    assert pretrain.main([*base, "--storage-path", f"memory:/{root}/runs", "--fresh"]) == 2
    assert "the job never deletes at a URI" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_train_checkpoints_through_a_non_native_pyarrow_filesystem_and_the_scorer_reaches_the_uri(
        tmp_path, tiny_scorer, ray_address, monkeypatch, capsys):
    """The real fit with a URI --storage-path: Ray Train gets ``storage_filesystem`` (fsspec's
    local filesystem wrapped in pyarrow's PyFileSystem, what s3fs / gcsfs give, visible to the
    workers' processes) and checkpoints through it; the run's own files go to memory://."""
    import fsspec
    import pyarrow.fs as pafs

    from jobs import scorer_trainer

    monkeypatch.setenv("CAPPY_STAGING_DIR", str(tmp_path / "staging"))
    mem, root = fsspec.filesystem("memory"), f"/bucket/{tmp_path.name}"
    ckpts = tmp_path / "bucket" / "runs"
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("file")))
    monkeypatch.setattr(scorer_trainer, "ray_storage", lambda paths: (str(ckpts), fs))
    pairs = write_pairs(synthetic_pairs(32), tmp_path / "pairs.parquet")
    args = ["--train-pairs", str(pairs), "--init", tiny_scorer, "--name", "r", "--eval-size", "0",
            "--train-size", "32", "--checkpoint-every", "2", "--storage-path", f"memory:/{root}/runs", *FAST]
    assert pretrain.main(args) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (ckpts / "r").glob("checkpoint_*"))  # Ray Train wrote through the filesystem
    res = json.loads(mem.cat(f"{root}/runs/r/scorer/results.json"))
    assert res["updates"] == 2 and mem.exists(f"{root}/runs/r/scorer/model.safetensors")
    assert mem.exists(f"{root}/runs/r/cappy_run.json")


def test_ray_trains_sigint_handler_does_not_outlive_the_fit():
    """Ray Train's fit() installs a SIGINT handler of its own and leaves it behind: the sweep, which
    pretrains before it samples, then ignored Ctrl-C. run_training fits inside keeping_sigint_handler."""
    import signal

    from jobs.scorer_trainer import keeping_sigint_handler

    def ours(signum, frame):
        raise KeyboardInterrupt

    def ray_trains(signum, frame):  # what fit() leaves: "Gracefully aborting the training run", nothing else
        pass

    before = signal.signal(signal.SIGINT, ours)
    try:
        with keeping_sigint_handler():
            signal.signal(signal.SIGINT, ray_trains)
        assert signal.getsignal(signal.SIGINT) is ours
        with pytest.raises(RuntimeError), keeping_sigint_handler():  # restored on an error too
            signal.signal(signal.SIGINT, ray_trains)
            raise RuntimeError("fit failed")
        assert signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, before)
    import inspect

    from jobs.scorer_trainer import run_training
    assert "with keeping_sigint_handler():" in inspect.getsource(run_training)
