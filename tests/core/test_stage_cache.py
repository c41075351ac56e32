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
