"""Atomic writes: a reader sees the old file (or folder) or the new one whole, never a part.

Every output of the project goes through here: each write goes to a temporary name *in the same
folder* (so the final rename stays on one filesystem and is atomic), unique per process and call
(two processes never share a temp name), and is renamed over the target only when complete. A
failed write removes its temporary and leaves the target as it was.

* :func:`atomic_path`: the general form, a context manager that yields the temporary path for
  any writer (``pq.write_table``, ``fig.savefig``, ``save_file``, ...);
* :func:`write_text`, :func:`write_json`, :func:`write_parquet`: the common cases;
* :func:`atomic_dir`: build a folder under a temporary name, then put it in place of ``dest``
  (an existing ``dest`` is moved aside first and removed only once the new one is in place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


def _temp_sibling(path: Path) -> Path:
    # Hidden, same folder, unique per process and call; keeps the suffix so writers that pick a
    # format from it (savefig, write_table) still do.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path`` (parents are
    created); on an exception remove it and re-raise, leaving ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> Path:
    """JSON with a trailing newline; values JSON cannot hold (paths, numpy scalars) as strings."""
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def write_parquet(table: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``pyarrow.parquet.write_table(table, path, **kwargs)``, atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; on success it replaces ``dest``.

    An existing ``dest`` is renamed aside, the new folder renamed into place, and only then is
    the old one deleted: at no moment is there neither. On an exception the temporary folder is
    removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(dest)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = None
    if dest.exists() or dest.is_symlink():
        old = _temp_sibling(dest.with_name(dest.name + "-old"))
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        _remove(tmp)
        raise
    if old is not None:
        _remove(old)
