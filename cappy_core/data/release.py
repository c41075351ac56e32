"""What BIG-Bench 1.0.0 is, file by file: the release manifest every task file is checked against.

The project never trusts a task file for what its source says it is. The manifest
(``cappy_core/data/vendored/manifest.json``, package data, written by ``cappy data vendor``)
lists every ``benchmark_tasks/**/task.json`` of the release by path, with its sha256, its git
blob id (``sha1(b"blob <len>\\0" + bytes)``, what a GitHub tree lists) and its example count, and
describes the Parquet files vendored beside it. A downloaded file is used only if its sha256
equals the manifest's; the PyPI sdist as a whole is accepted when its own sha256 is the
published one (:data:`SDIST_SHA256`).

Manifest schema (JSON, keys sorted, written byte-identically for the same input)::

    format        1
    release       "bigbench 1.0.0"
    sdist_sha256  sha256 of the PyPI sdist the release was published as
    revision      google/BIG-bench commit whose task files are these (null: not known; the
                  GitHub sources then need ``--revision``)
    files         {"<task>/task.json" | "<task>/<subtask>/task.json":
                    {"sha256", "git_blob", "bytes", "examples"}}
    vendored      {"<task>": {"file": "tasks/<task>.parquet", "sha256" (of that file),
                    "records_sha256" (of its records, :func:`records_sha256`), "sizes":
                    {"train", "validation"}, "canaries": [...], "sources": [paths in files]}}
    left_out      {"<task>": why it is not vendored}

Tested in ``tests/core/test_vendor.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional

BIGBENCH_VERSION = "1.0.0"
#: sha256 of ``bigbench-1.0.0.tar.gz`` as PyPI published it (PyPI no longer serves it).
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
MANIFEST_FORMAT = 1
VENDORED_DIR = "vendored"  # under cappy_core/data/
MANIFEST_NAME = "manifest.json"


class FileRejected(ValueError):
    """A task file does not match the manifest (or is not in it); the message names it."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_blob_id(data: bytes) -> str:
    """The id git gives these bytes as a blob (GitHub's trees list it per file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    git_blob: str
    bytes: int
    examples: int


@dataclass
class Manifest:
    files: dict[str, FileEntry] = field(default_factory=dict)
    vendored: dict[str, dict] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    revision: Optional[str] = None
    path: Optional[Path] = None  # where it was read from (None: none shipped)

    @property
    def tasks(self) -> list[str]:
        """Top-level task names the release has (a folder with a task.json)."""
        return sorted({p.split("/")[0] for p in self.files})

    def task_files(self, task: str) -> list[str]:
        """The manifest paths of one task: its task.json and its subtasks'."""
        return sorted(p for p in self.files if p.split("/")[0] == task)

    def check(self, rel: str, data: bytes) -> None:
        """Raise :class:`FileRejected` unless ``data`` is the release's ``rel`` (the caller names
        the source)."""
        entry = self.files.get(rel)
        if entry is None:
            raise FileRejected(f"{rel} is not a file of bigbench {BIGBENCH_VERSION} per the manifest")
        got = sha256_bytes(data)
        if got != entry.sha256:
            raise FileRejected(f"{rel} has sha256 {got}, the manifest says {entry.sha256}: refused")

    def to_json(self) -> str:
        obj = {
            "format": MANIFEST_FORMAT, "release": f"bigbench {BIGBENCH_VERSION}", "sdist_sha256": SDIST_SHA256,
            "revision": self.revision,
            "files": {p: vars(e) for p, e in sorted(self.files.items())},
            "vendored": self.vendored, "left_out": self.left_out,
        }
        return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Optional[Path] = None) -> "Manifest":
        try:
            obj = json.loads(text)
            if obj.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {obj.get('format')!r}, expected {MANIFEST_FORMAT}")
            files = {p: FileEntry(**e) for p, e in obj["files"].items()}
            return cls(files=files, vendored=obj.get("vendored", {}), left_out=obj.get("left_out", {}),
                       revision=obj.get("revision"), path=path)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path or 'manifest'}: not a BIG-Bench release manifest: {e}") from e


def vendored_dir() -> Path:
    """The package folder of the vendored tasks and the manifest (it may not exist)."""
    return Path(str(resources.files("cappy_core.data"))) / VENDORED_DIR


def load_manifest(path: str | Path | None = None) -> Manifest:
    """The manifest shipped with the package (or the one at ``path``); an empty one when this
    build carries none (no copy of the release was at hand when it was built)."""
    p = Path(path) if path is not None else vendored_dir() / MANIFEST_NAME
    if not p.is_file():
        return Manifest()
    return Manifest.from_json(p.read_text(encoding="utf-8"), path=p)


def records_sha256(rows: Iterable[dict]) -> str:
    """A digest of prepared records (dicts of the :mod:`cappy_core.data.records` columns), the
    same whether they were read from a vendored Parquet file or prepared from task.json files."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()
