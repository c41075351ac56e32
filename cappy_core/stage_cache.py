"""The stage cache: a stage's output kept under a digest of everything it depends on, so a run
with a new output folder reuses what an earlier run already computed with the same inputs.

``<cache>/stages/<stage>/<digest>/`` holds one output and ``stage.json`` (the key it was made
from). A key is a JSON-able dict: the stage's settings, and *fingerprints* of its inputs: a model
folder by the sha256 of its weight, config and tokenizer files (:func:`folder_fingerprint`; the
embedded scorer by its recorded sha256, a hub id by its name and revision), a Parquet file by its
rows (:func:`table_fingerprint`), plus :data:`CODE_VERSION` where the code's output changes.

Entries are written atomically (:func:`cappy_core.io.atomic_dir`): a reader finds a whole entry or
none. A reuse touches the entry, so :func:`entries` knows when each was last used and
:func:`prune_plan` picks the least recently used first (``cappy cache prune``). Used by the sweep
(:mod:`jobs.sweep`) for its sampled candidates and by
:func:`cappy_core.selection.task_eval.run_task` for each finetune and scored table
(:func:`cappy_core.selection.scored_tables.cached_scores`). Tested in
``tests/core/test_stage_cache.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

#: Bump when a stage's output for the same inputs changes (a fix in finetuning or sampling).
CODE_VERSION = 2  # 2: the fused AdamW step (the same updates up to float rounding)
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
        #: entries this object reused (a marked lookup) and stored, per stage: what a job reports.
        self.reused: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()

    def path(self, stage: str, key: Mapping[str, Any]) -> Optional[Path]:
        return None if self.root is None else self.root / stage / digest({**key, "code": CODE_VERSION})

    def lookup(self, stage: str, key: Mapping[str, Any], *, mark_used: bool = True) -> Optional[Path]:
        """The entry for ``key``, when a whole one is there; ``mark_used``: a reuse (:func:`touch`),
        not a plan looking ahead."""
        path = self.path(stage, key)
        if path is None or not (path / RECORD).is_file():
            return None
        if mark_used:
            self.mark_reused(stage, path)
        return path

    def mark_reused(self, stage: str, path: Path) -> None:
        """Count ``path`` (an entry :meth:`lookup` found without marking it) as reused, and touch it."""
        touch(path)
        self.reused[stage] += 1

    def counts(self, stage: str) -> dict[str, int]:
        """``{"reused": n, "stored": m}``: the entries of ``stage`` this object reused and stored."""
        return {"reused": self.reused[stage], "stored": self.stored[stage]}

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
        self.stored[stage] += 1


def default_root(cache_dir: str | os.PathLike | None) -> Path:
    """``<cache>/stages`` (the cache: ``--cache-dir``, ``$CAPPY_CACHE_DIR`` or ``~/.cache/cappy``)."""
    from cappy_core.data.cache import default_cache_dir

    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "stages"


# --- what the cache holds, and pruning it -----------------------------------------------------

#: An entry used (read or written) this recently may belong to a running job: never pruned.
IN_USE_S = 600.0


def touch(path: str | os.PathLike) -> None:
    """Mark an entry used now (its folder's mtime), for least-recently-used pruning."""
    with contextlib.suppress(OSError):
        os.utime(path)


#: ``<entry>/.users/<digest>.json``: an output folder that links to the entry (``{"out": ...}``);
#: while that output's lock is held (its job runs) the entry is in use.
USERS = ".users"


def mark_user(entry: str | os.PathLike, out: str | os.PathLike) -> None:
    """Record that output folder ``out`` reads ``entry`` (a sweep's candidates), which marks it
    used: pruning keeps the entry while a job holds ``out``'s lock, and names ``out`` when it removes it."""
    from cappy_core.io import write_json

    out = str(Path(out).expanduser().resolve())
    write_json(Path(entry) / USERS / f"{hashlib.sha256(out.encode()).hexdigest()[:16]}.json", {"out": out})


def users(entry: str | os.PathLike) -> list[tuple[str, bool]]:
    """The output folders recorded as reading ``entry``: ``(out, running)``, ``running`` when a job
    holds that output's lock now."""
    from cappy_core.io import lock_holder

    found = []
    for record in sorted((Path(entry) / USERS).glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            out = str(json.loads(record.read_text())["out"])
            found.append((out, Path(out).is_dir() and lock_holder(out) is not None))
    return found


@dataclass(frozen=True)
class Entry:
    """One cached stage output: ``<root>/<stage>/<name>``; ``last_used``: the newest mtime in it (a
    reuse touches the folder; a job writing into it touches its files); ``partial``: a temporary
    folder a writer left (a crash, or a write in progress) or a sampling folder with no finished shard."""

    stage: str
    path: Path
    bytes: int
    last_used: float
    partial: bool
    users: tuple[tuple[str, bool], ...] = ()  # :func:`users`

    @property
    def in_use(self) -> bool:
        return any(running for _, running in self.users)

    def protected(self, now: float) -> bool:
        """Never pruned: a running job reads it, or it was used in the last :data:`IN_USE_S`."""
        return self.in_use or now - self.last_used < IN_USE_S


def _scan(folder: Path) -> tuple[int, float]:
    size, newest = 0, folder.stat().st_mtime
    for base, dirs, files in os.walk(folder):
        for name, is_file in [(d, False) for d in dirs] + [(f, True) for f in files]:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(base, name))
                newest = max(newest, st.st_mtime)
                size += st.st_size if is_file else 0
    return size, newest


def entries(root: str | os.PathLike) -> list[Entry]:
    """Every entry under ``root`` (``<cache>/stages``), least recently used first."""
    root = Path(root).expanduser()
    found = []
    for stage_dir in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        for path in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            size, used = _scan(path)
            temporary = path.name.startswith(".")
            unfinished = not (path / RECORD).is_file() and not any(path.glob("*/*/*/part-*.done.json"))
            found.append(Entry(stage_dir.name, path, size, used, temporary or unfinished, tuple(users(path))))
    return sorted(found, key=lambda e: (e.last_used, str(e.path)))


def prune_plan(found: list[Entry], *, older_than_s: Optional[float] = None, max_bytes: Optional[int] = None,
               stages: Optional[set[str]] = None, now: Optional[float] = None) -> list[Entry]:
    """What to remove from ``found`` (least recently used first): of the ``stages`` named (all if
    None), every entry not used for ``older_than_s``, then the least recently used until the whole
    cache is at most ``max_bytes``. :meth:`Entry.protected` entries are kept whatever is asked;
    with neither limit, every other entry goes."""
    now = time.time() if now is None else now
    candidates = [e for e in found if (stages is None or e.stage in stages) and not e.protected(now)]
    if older_than_s is None and max_bytes is None:
        return candidates
    drop = [e for e in candidates if older_than_s is not None and now - e.last_used >= older_than_s]
    if max_bytes is not None:
        total = sum(e.bytes for e in found) - sum(e.bytes for e in drop)
        for e in candidates:
            if total <= max_bytes:
                break
            if e not in drop:
                drop.append(e)
                total -= e.bytes
    return sorted(drop, key=lambda e: (e.last_used, str(e.path)))


def remove(entry: Entry) -> None:
    """Delete one entry: renamed aside first, so a reader finds it whole or not at all."""
    aside = entry.path.with_name(f".{entry.path.name}.pruned-{os.getpid()}")
    os.replace(entry.path, aside)
    shutil.rmtree(aside)
