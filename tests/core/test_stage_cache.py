"""The stage cache (cappy_core/stage_cache.py): what keys an entry, and that an entry is whole or absent."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cappy_core.stage_cache import StageCache, folder_fingerprint, table_fingerprint


def model_folder(path, weights: bytes = b"w" * 100):
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "config.json").write_text('{"hidden_size": 8}')
    (path / "README.md").write_text("a card is not the model")
    return path


def test_a_model_is_its_files_not_its_path(tmp_path):
    a = model_folder(tmp_path / "a")
    copy = shutil.copytree(a, tmp_path / "copy")
    assert folder_fingerprint(a) == folder_fingerprint(copy)
    (copy / "README.md").write_text("edited card")  # not part of the model
    assert folder_fingerprint(a) == folder_fingerprint(copy)
    (copy / "model.safetensors").write_bytes(b"v" * 100)  # retrained: another model
    assert folder_fingerprint(a) != folder_fingerprint(copy)
    assert folder_fingerprint("minilm").startswith("minilm:53aa5117")  # the embedded weights' recorded hash
    assert folder_fingerprint("org/model@abc123") == "org/model@abc123"  # a hub id as given
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model files"):
        folder_fingerprint(tmp_path / "empty")


def test_a_table_is_its_rows_not_its_bytes(tmp_path):
    t = pa.table({"instruction": ["q1", "q2"], "response": ["a", "b"], "label": [0.5, 1.0]})
    pq.write_table(t, tmp_path / "x.parquet", compression="zstd")
    pq.write_table(t, tmp_path / "y.parquet", compression="none", row_group_size=1)
    assert (tmp_path / "x.parquet").read_bytes() != (tmp_path / "y.parquet").read_bytes()
    assert table_fingerprint(tmp_path / "x.parquet") == table_fingerprint(tmp_path / "y.parquet") == table_fingerprint(t)
    changed = t.set_column(2, "label", pa.array([0.5, 0.9]))
    assert table_fingerprint(changed) != table_fingerprint(t)
    assert table_fingerprint(changed, ["instruction", "response"]) == table_fingerprint(t, ["instruction", "response"])


def test_an_entry_is_whole_or_absent_and_keyed_by_everything(tmp_path):
    cache = StageCache(tmp_path / "stages")
    key = {"init": "sha256:aa", "pairs": "rows:bb", "schedule": {"lr": 1e-4}}
    assert cache.lookup("finetune", key) is None
    with pytest.raises(RuntimeError):
        with cache.fill("finetune", key) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert cache.lookup("finetune", key) is None and not list((tmp_path / "stages" / "finetune").iterdir())
    with cache.fill("finetune", key) as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    hit = cache.lookup("finetune", key)
    assert hit is not None and (hit / "model.safetensors").read_bytes() == b"whole"
    assert cache.lookup("finetune", {**key, "schedule": {"lr": 2e-4}}) is None  # any input changed: no entry
    assert cache.lookup("sampling", key) is None  # stages do not share entries
    off = StageCache(None)  # --no-cache
    assert off.lookup("finetune", key) is None
    with off.fill("finetune", key) as tmp:
        assert tmp is None


class CountingScorer:
    """A scorer stub: a fixed score per text, the calls counted, ``fingerprint`` its weights' name."""

    def __init__(self, weights: str = "w1"):
        self.weights, self.calls = weights, 0

    def fingerprint(self) -> str:
        return self.weights

    def score(self, instructions, texts):
        self.calls += 1
        return [float(len(t)) + 0.125 * (self.weights == "w2") for t in texts]


def test_scores_are_computed_once_per_scorer_and_pairs_and_a_damaged_entry_is_recomputed(tmp_path):
    from cappy_core.selection.scored_tables import SCORES_STAGE, cached_scores, score_table

    table = pa.table({"instruction": ["q1", "q1", "q2"], "text": ["a", "bbb", "cc"], "label": [0.1, 0.2, 0.3]})
    scorer = CountingScorer()
    first = StageCache(tmp_path / "stages")
    assert cached_scores(scorer, table, first) == [1.0, 3.0, 2.0] and scorer.calls == 1
    assert (first.reused[SCORES_STAGE], first.stored[SCORES_STAGE]) == (0, 1)
    rerun = StageCache(tmp_path / "stages")  # a later job: the same scorer and pairs are read back
    scored = score_table(scorer, table.set_column(2, "label", pa.array([0.9, 0.8, 0.7])), "s", rerun)
    assert scored["s"].to_pylist() == [1.0, 3.0, 2.0] and scorer.calls == 1  # labels are not part of the key
    assert (rerun.reused[SCORES_STAGE], rerun.stored[SCORES_STAGE]) == (1, 0)
    other = CountingScorer("w2")  # other weights, or another text: scored anew
    assert cached_scores(other, table, rerun) == [1.125, 3.125, 2.125] and other.calls == 1
    assert cached_scores(scorer, table.set_column(1, "text", pa.array(["a", "bbb", "c"])), rerun)[2] == 1.0
    assert scorer.calls == 2
    entry = next(p for p in (tmp_path / "stages" / SCORES_STAGE).iterdir()
                 if pq.read_table(p / "scores.parquet").num_rows == 3 and
                 pq.read_table(p / "scores.parquet")["score"].to_pylist() == [1.0, 3.0, 2.0])
    pq.write_table(pa.table({"score": [1.0]}), entry / "scores.parquet")  # damaged: one row for three
    again = StageCache(tmp_path / "stages")
    assert cached_scores(scorer, table, again) == [1.0, 3.0, 2.0] and scorer.calls == 3
    assert (again.reused[SCORES_STAGE], again.stored[SCORES_STAGE]) == (0, 1)
    assert pq.read_table(entry / "scores.parquet")["score"].to_pylist() == [1.0, 3.0, 2.0]  # replaced whole
    (entry / "scores.parquet").write_bytes(b"not parquet")  # unreadable: the same
    assert cached_scores(scorer, table, StageCache(tmp_path / "stages")) == [1.0, 3.0, 2.0] and scorer.calls == 4
    assert pq.read_table(entry / "scores.parquet")["score"].to_pylist() == [1.0, 3.0, 2.0]
    (tmp_path / "a-file").write_text("")  # a cache that cannot be written: the scores still come back
    assert cached_scores(scorer, table, StageCache(tmp_path / "a-file" / "stages")) == [1.0, 3.0, 2.0]
    off = CountingScorer()
    assert cached_scores(off, table, StageCache(None)) == [1.0, 3.0, 2.0] and off.calls == 1  # --no-cache
    assert cached_scores(off, table) == [1.0, 3.0, 2.0] and off.calls == 2


def _aged(path, seconds_ago: float) -> None:
    """Every file and folder under ``path`` last touched ``seconds_ago``."""
    import os
    import time

    when = time.time() - seconds_ago
    for p in [*path.rglob("*"), path]:
        os.utime(p, (when, when), follow_symlinks=False)


def test_prune_removes_the_least_recently_used_and_never_what_a_running_sweep_reads(tmp_path):
    import time

    from cappy_core.io import output_lock
    from cappy_core.stage_cache import IN_USE_S, entries, mark_user, prune_plan, remove

    cache, day = StageCache(tmp_path / "stages"), 86400
    ages = {}
    for i, age in enumerate((30 * day, 3 * day, 1 * day, 60.0)):  # the last was used a minute ago
        with cache.fill("finetune", {"i": i}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"w" * 1000)
        ages[cache.path("finetune", {"i": i}).name] = age
    sampling = tmp_path / "stages" / "sampling" / "sampling-abc"
    (sampling / "train" / "t1" / "t").mkdir(parents=True)
    (sampling / "train" / "t1" / "t" / "part-0.parquet").write_bytes(b"p" * 5000)
    (sampling / "train" / "t1" / "t" / "part-0.done.json").write_text("{}")
    out = tmp_path / "sweep_out"
    out.mkdir()
    mark_user(sampling, out)
    for e in entries(tmp_path / "stages"):
        _aged(e.path, ages.get(e.path.name, 40 * day))
    found = entries(tmp_path / "stages")
    assert [e.stage for e in found] == ["sampling", "finetune", "finetune", "finetune", "finetune"]  # oldest first
    assert found[0].users == ((str(out.resolve()), False),) and not found[0].in_use and not found[0].partial
    assert all(e.bytes >= 1000 for e in found) and found[0].bytes >= 5000
    now = time.time()

    def names(plan):
        return [e.path.name for e in plan]

    # --older-than: entries not used for that long; the minute-old one never, even with --all
    assert names(prune_plan(found, older_than_s=10 * day, now=now)) == names(found[:2])
    assert names(prune_plan(found, older_than_s=2.5 * day, now=now)) == names(found[:3])
    assert names(prune_plan(found, now=now)) == names(found[:4])  # --all keeps the one used < IN_USE_S ago
    assert found[4].last_used > now - IN_USE_S
    # --max-size: least recently used until the total fits
    total = sum(e.bytes for e in found)
    assert names(prune_plan(found, max_bytes=total - found[0].bytes, now=now)) == names(found[:1])
    assert names(prune_plan(found, max_bytes=total - found[0].bytes - 1, now=now)) == names(found[:2])
    assert names(prune_plan(found, max_bytes=0, stages={"finetune"}, now=now)) == names(found[1:4])
    with output_lock(out, "cappy sweep"):  # a sweep into OUT runs: its candidates are in use
        busy = entries(tmp_path / "stages")
        assert busy[0].in_use and busy[0].users == ((str(out.resolve()), True),)
        assert names(prune_plan(busy, max_bytes=0, now=now)) == names(found[1:4])
    remove(found[1])
    assert not found[1].path.exists() and cache.lookup("finetune", {"i": 0}) is None
    assert [e.path.name for e in entries(tmp_path / "stages")] == names(found[:1] + found[2:])
    assert not list(found[1].path.parent.glob(".*"))  # nothing left aside
    hit = cache.lookup("finetune", {"i": 1})  # a reuse marks the entry used now
    assert hit is not None
    assert next(e for e in entries(tmp_path / "stages") if e.path == hit).last_used > now - 5
