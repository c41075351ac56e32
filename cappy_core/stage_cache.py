"""The stage cache: a stage's output kept under a digest of everything it depends on, so a run
with a new output folder reuses what an earlier run already computed with the same inputs.

``<cache>/stages/<stage>/<digest>/`` holds one output and ``stage.json`` (the key it was made
from). A key is a JSON-able dict: the stage's settings, and *fingerprints* of its inputs: a model
folder by the sha256 of its weight, config and tokenizer files (:func:`folder_fingerprint`; the
embedded scorer by its recorded sha256, a hub id by its name and revision), a Parquet file by its
rows (:func:`table_fingerprint`), plus :data:`CODE_VERSION` where the code's output changes.

Entries are written atomically (:func:`cappy_core.io.atomic_dir`): a reader finds a whole entry or
none. Used by the sweep (:mod:`jobs.sweep`) for its sampled candidates and by
:func:`cappy_core.selection.task_eval.run_task` for each finetune. Tested in
``tests/core/test_stage_cache.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

#: Bump when a stage's output for the same inputs changes (a fix in finetuning or sampling).
CODE_VERSION = 1
RECORD = "stage.json"
_MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "merges.txt", "vocab.json", "special_tokens_map.json", "generation_config.json")


def digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


_HASHED: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a model's weights hashed once per process


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    sig = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if sig not in _HASHED:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHED[sig] = h.hexdigest()
    return _HASHED[sig]


def folder_fingerprint(name_or_path: str | os.PathLike) -> str:
    """What a model *is*: for a folder, the sha256 of its weight, config and tokenizer files
    together; ``minilm`` by the embedded weights' recorded sha256; anything else (a hub id,
    ``REPO@REVISION``) as given."""
    path = Path(name_or_path).expanduser()
    if str(name_or_path) == "minilm":
        from cappy_core.scorer.embedded import EMBEDDED_SHA256

        return f"minilm:{EMBEDDED_SHA256}"
    if not path.is_dir():
        return str(name_or_path)
    files = sorted({p for pattern in _MODEL_FILES for p in path.glob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"{path}: no model files to fingerprint (no *.safetensors / config.json)")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{_file_sha256(p)}\n".encode())
    return "sha256:" + h.hexdigest()


def table_fingerprint(path_or_table: Any, columns: Optional[list[str]] = None) -> str:
    """The sha256 of a Parquet file's (or an Arrow table's) rows, the named columns in order, not
    of its bytes: the same rows written by another pyarrow version fingerprint the same."""
    import pyarrow.parquet as pq

    table = (pq.read_table(path_or_table, columns=columns) if isinstance(path_or_table, (str, os.PathLike))
             else path_or_table.select(columns) if columns else path_or_table)
    h = hashlib.sha256(json.dumps(table.column_names).encode())
    for name in table.column_names:
        h.update(json.dumps(table.column(name).to_pylist(), default=str).encode())
    return "rows:" + h.hexdigest()


class StageCache:
    """``<root>/<stage>/<digest>``; ``root`` None is a cache that holds nothing and keeps nothing
    (``--no-cache``)."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root).expanduser() if root else None

    def path(self, stage: str, key: Mapping[str, Any]) -> Optional[Path]:
        return None if self.root is None else self.root / stage / digest({**key, "code": CODE_VERSION})

    def lookup(self, stage: str, key: Mapping[str, Any]) -> Optional[Path]:
        """The entry for ``key``, when a whole one is there."""
        path = self.path(stage, key)
        return path if path is not None and (path / RECORD).is_file() else None

    @contextlib.contextmanager
    def fill(self, stage: str, key: Mapping[str, Any]) -> Iterator[Optional[Path]]:
        """A temporary folder to write the entry into, put in place whole when the block ends
        without an error (None when the cache is off)."""
        path = self.path(stage, key)
        if path is None:
            yield None
            return
        from cappy_core.io import atomic_dir

        with atomic_dir(path) as tmp:
            yield tmp
            (tmp / RECORD).write_text(json.dumps({"stage": stage, "key": key, "code": CODE_VERSION},
                                                 indent=2, default=str) + "\n")


def default_root(cache_dir: str | os.PathLike | None) -> Path:
    """``<cache>/stages`` (the cache: ``--cache-dir``, ``$CAPPY_CACHE_DIR`` or ``~/.cache/cappy``)."""
    from cappy_core.data.cache import default_cache_dir

    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "stages"
