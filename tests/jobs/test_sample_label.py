"""`cappy sample` end to end on the session's local Ray (subprocesses), with a tiny generator:
labelled output, exact resume after a kill, bad input, and the vLLM backend when installed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cappy_core.labeling.candidates import CANDIDATE_SCHEMA, read_candidates
from cappy_core.data.records import EXAMPLE_SCHEMA, Example, split_path, write_examples
from conftest import REPO

FAST = ["--sampling.max-new-tokens", "6", "--sampling.cpus-per-actor", "0.5", "--label-cpus", "0.25", "--dtype", "float32"]


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "jobs.sample_label", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cappy_core.generation.embedded_model import tiny_generator

    return tiny_generator(tmp_path_factory.mktemp("gen") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two tasks × two splits of 5 examples; one example has no references (label stays null),
    one has an empty instruction and one a null instruction (both skipped and counted)."""
    root = tmp_path_factory.mktemp("data")
    for task in ("alpha", "beta"):
        for split in ("train", "validation"):
            ex = [Example(task, "", split, i, f"Q: {task} {split} question {i}: what comes after {i}?\nA:",
                          [f"{i + 1}", f"number {i + 1}"]) for i in range(5)]
            if task == "alpha" and split == "train":
                ex[1].references = []
                ex[3].instruction = "  "
            write_examples(ex, split_path(root, task, split))
    rows = pq.read_table(split_path(root, "beta", "validation")).to_pylist()
    rows[4]["instruction"] = None
    nullable = pa.schema([f.with_nullable(f.name == "instruction") for f in EXAMPLE_SCHEMA])
    pq.write_table(pa.Table.from_pylist(rows, schema=nullable), split_path(root, "beta", "validation"))
    return root


@pytest.mark.slow
def test_hf_job_labels_resumes_exactly_after_a_kill(tmp_path, tiny, data, ray_address):
    out = tmp_path / "out"
    # 5 candidates per instruction (17 in the vLLM test): beam2, 2 plain samples, 2 top-k samples
    args = ["--tasks", "alpha", "beta", "--data", str(data), "--out", str(out), "--generator", str(tiny),
            "--backend", "hf", "--shard-size", "2", "--sampling.batch-size", "2", "--sampling.decodings", "beam2", "sample", "topk5",
            "--sampling.samples-per-decoding", "2", *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.sample_label", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def generated_shards():
        return [f for f in out.rglob("*.done.json") if json.loads(f.read_text())["rows"] > 0]

    deadline = time.time() + 300
    while not generated_shards() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a lost driver: no chance to clean up
    proc.communicate(timeout=60)
    done_first = len(list(out.rglob("*.done.json")))
    # 2 tasks × 2 splits × 3 shards (5 rows, shards of 2)
    assert 1 <= done_first < 12, "the kill should land after the first shard and before the last"
    assert (out / ".cappy.lock").is_file()  # the killed run's lock stays behind ...

    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / ".cappy.lock").exists()  # ... and the rerun took it over, then released it
    assert f"{12 - done_first} shards written, {done_first} already done" in proc.stdout
    assert "skipped 1 (empty instruction), 1 (missing field)" in proc.stdout
    assert "total 18 instructions, 90 rows" in proc.stdout  # (20 examples - 2 skipped) × 5
    t = read_candidates(out)
    assert t.schema == CANDIDATE_SCHEMA and t.num_rows == 18 * 5
    keys = Counter(zip(t["instruction_id"].to_pylist(), t["decoding"].to_pylist(), t["sample_idx"].to_pylist()))
    assert max(keys.values()) == 1
    per_instruction = Counter(t["instruction_id"].to_pylist())
    assert set(per_instruction.values()) == {5} and "alpha/train/3" not in per_instruction
    assert "beta/validation/4" not in per_instruction
    rows = t.to_pylist()
    no_refs = [r for r in rows if r["instruction_id"] == "alpha/train/1"]
    assert len(no_refs) == 5 and all(r["label"] is None for r in no_refs)
    from cappy_core.labeling.rouge import rouge_l

    labelled = [r for r in rows if r["label"] is not None]
    assert len(labelled) == 17 * 5
    for r in labelled[::7]:
        i = r["example_idx"]
        assert r["label"] == rouge_l(r["text"], [f"{i + 1}", f"number {i + 1}"])
    assert [(r["decoding"], r["sample_idx"]) for r in rows[:5]] == [
        ("beam2", 0), ("sample", 0), ("sample", 1), ("topk5", 0), ("topk5", 1)]
    rec = json.loads((out / "alpha" / "train" / "part-00001.done.json").read_text())
    assert rec["skipped"] == {"empty instruction": 1} and rec["instructions"] == 1 and rec["rows"] == 5

    # Everything done: a rerun writes nothing; other settings are refused.
    proc = run(*args)
    assert proc.returncode == 0 and "0 shards written, 12 already done" in proc.stdout
    proc = run(*args, "--sampling.seed", "1")
    assert proc.returncode == 2 and "other settings" in proc.stderr and "seed: 0 -> 1" in proc.stderr


def test_bad_input_is_a_clear_error(tmp_path, tiny, data):
    base = ["--data", str(data), "--out", str(tmp_path / "o"), "--backend", "hf"]
    proc = run("--tasks", "alpha", "--generator", str(tmp_path / "nope"), *base)
    assert proc.returncode == 2 and "no such folder" in proc.stderr
    proc = run("--tasks", "gamma", "--generator", str(tiny), *base)
    assert proc.returncode == 2 and "unknown task 'gamma'" in proc.stderr
    # the run's full log under OUT: its config (debug) and the traceback, which the terminal does not show
    first = proc.stdout.splitlines()[0]  # (the run before wrote one too: one per run)
    assert first.startswith(f"log file: {tmp_path / 'o' / 'logs' / 'sample-'}") and first.endswith(".log")
    text = Path(first.removeprefix("log file: ")).read_text()
    assert "DEBUG jobs.sample_label: config: {" in text and '"tasks": ["gamma"]' in text
    assert "ERROR jobs.log_file: sample failed" in text and "Traceback" in text
    assert "config:" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    proc = run("--tasks", "alpha", "--generator", str(tiny), "--sampling.decodings", "beam4", "nucleus", *base)
    assert proc.returncode == 2 and "unknown decoding 'nucleus'" in proc.stderr
    proc = run("--tasks", "alpha", "--generator", str(tiny), "--decode-loop", "paged", *base)
    # the flag declares its choices (shown in --help): argparse refuses the value, naming them
    assert proc.returncode == 2 and "--decode-loop: invalid choice: 'paged'" in proc.stderr
    assert "'shared', 'cached', 'generate'" in proc.stderr
    bad = tmp_path / "bad"
    t = pq.read_table(split_path(data, "alpha", "train")).drop_columns(["references"])
    (bad / "alpha").mkdir(parents=True)
    pq.write_table(t, split_path(bad, "alpha", "train"))
    pq.write_table(t, split_path(bad, "alpha", "validation"))
    proc = run("--tasks", "alpha", "--generator", str(tiny), "--data", str(bad), "--out", str(tmp_path / "o2"),
               "--backend", "hf")
    assert proc.returncode == 2 and "missing column(s) ['references']" in proc.stderr


def test_an_hf_generator_actor_runs_torch_on_the_cpus_it_reserved(tiny, monkeypatch):
    """Ray gives a 1-CPU actor OMP_NUM_THREADS=1; torch ignores it when libgomp is preloaded (a vLLM
    engine started in the driver sets LD_PRELOAD), so the stage sets torch's threads itself."""
    import torch

    from cappy_core.generation import decodings_from_names
    from jobs.candidate_stage import CandidateStage

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        stage = CandidateStage("hf", str(tiny), {"dtype": "float32"}, decodings_from_names(["greedy"], 1),
                               max_new_tokens=4, min_new_tokens=1, seed=0)
        assert torch.get_num_threads() == 1
        batch = pa.table({"instruction": ["a b", "c"], "instruction_id": ["t/0", "t/1"]})
        assert stage(batch).num_rows == 2  # one greedy candidate each
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS")  # no reservation said: torch's own setting stays
        CandidateStage("hf", str(tiny), {"dtype": "float32"}, decodings_from_names(["greedy"], 1),
                       max_new_tokens=4, min_new_tokens=1, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_vllm_job_17_candidates_match_hf_beam(tmp_path, tiny, data, ray_address):
    pytest.importorskip("vllm")
    out = tmp_path / "vllm"
    proc = run("--tasks", "beta", "--splits", "train", "--data", str(data), "--generator", str(tiny),
               "--max-examples-per-task", "3", "--backend", "vllm", "--out", str(out), "--kv-cache-gb", "0.125", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sampled 3 instructions × 17 candidates = 51 rows" in proc.stdout
    rows = read_candidates(out).to_pylist()
    assert len(rows) == 51 and all(r["label"] is not None for r in rows)
    from cappy_core.generation import decodings_from_names, load_generator

    hf = load_generator("hf", tiny, dtype="float32")
    instructions = [r["instruction"] for r in rows if r["decoding"] == "beam4"]
    expected = hf.generate(instructions, decodings_from_names(["beam4"]), max_new_tokens=6, min_new_tokens=3)
    assert [(r["text"], r["num_tokens"]) for r in rows if r["decoding"] == "beam4"] == \
        [(c[0].text, c[0].num_tokens) for c in expected]


@pytest.mark.slow  # two sampling runs (~25 s each here); tests/core/test_remote.py covers the sync quickly
def test_out_uri_writes_a_local_runs_shards_one_upload_per_shard_and_a_rerun_resumes(
        tmp_path, tiny, data, ray_address, monkeypatch):
    """`--out memory://...`: fsspec's in-process filesystem, reached through pyarrow as S3 would be
    (Ray workers cannot see it: only the driver may touch the URI)."""
    import fsspec

    from cappy_core import remote
    from cappy_core.generation import SamplingSpec
    from jobs.sample_label import SampleConfig, run as run_sample

    monkeypatch.setenv("CAPPY_STAGING_DIR", str(tmp_path / "staging"))
    mem, root = fsspec.filesystem("memory"), f"/bucket/{tmp_path.name}/run"
    mem.pipe(f"{root}/NOTES.txt", b"the user's own file")
    uploads = []
    push = remote.StagedOutput.push

    def counted(self, last=True):
        uploads.append(push(self, last))
        return uploads[-1]

    monkeypatch.setattr(remote.StagedOutput, "push", counted)
    sampling = SamplingSpec(batch_size=2, decodings=["beam2", "sample"], samples_per_decoding=1, max_new_tokens=6,
                            cpus_per_actor=0.5)
    kw = dict(tasks=["alpha"], splits=["train"], data=str(data), generator=str(tiny), backend="hf", shard_size=2,
              sampling=sampling, label_cpus=0.25, dtype="float32")
    run_sample(SampleConfig(out=str(tmp_path / "local"), **kw), log=lambda _: None)
    assert uploads == []  # a local --out: no staging, no sync
    summary = run_sample(SampleConfig(out=f"memory:/{root}", **kw), log=lambda _: None)
    assert summary["shards_written"] == 3 and summary["rows"] == 4 * 2  # 5 examples, 1 blank; beam2 + 1 sample
    # each shard uploaded when written (shard + record, the log growing too), then a last sync
    assert len([n for n in uploads if n >= 2]) >= 3, uploads

    local = sorted(p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("part-*"))
    assert len(local) == 6  # 3 shards + their records
    at_uri = sorted(p.removeprefix(root + "/") for p in mem.find(root))
    assert [p for p in at_uri if "/part-" in p] == local
    assert "sample_config.json" in at_uri and "NOTES.txt" in at_uri and any(p.startswith("logs/") for p in at_uri)
    assert not [p for p in at_uri if ".tmp-" in p or ".cappy" in p]  # no temporaries, no lock
    assert mem.cat(f"{root}/NOTES.txt") == b"the user's own file"
    for name in (p for p in local if p.endswith(".parquet")):
        remote_bytes = mem.cat(f"{root}/{name}")
        assert pq.read_table(pa.BufferReader(remote_bytes)).equals(pq.read_table(tmp_path / "local" / name))
        assert remote_bytes == (tmp_path / "local" / name).read_bytes()

    # another machine (a fresh staging folder) reruns: everything is downloaded, nothing resampled
    import shutil

    shutil.rmtree(tmp_path / "staging")
    again = run_sample(SampleConfig(out=f"memory:/{root}", **kw), log=lambda _: None)
    assert again["shards_written"] == 0 and again["shards_already_done"] == 3 and again["rows"] == 8
    assert mem.cat(f"{root}/NOTES.txt") == b"the user's own file"
