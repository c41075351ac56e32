"""Atomic writes: a reader sees the old file (or folder) or the new one whole, never a part.

Every output of the project goes through here: each write goes to a temporary name *in the same
folder* (so the final rename stays on one filesystem and is atomic), unique per process and call
(two processes never share a temp name), and is renamed over the target only when complete. A
failed write removes its temporary and leaves the target as it was.

* :func:`atomic_path`: the general form, a context manager that yields the temporary path for
  any writer (``pq.write_table``, ``fig.savefig``, ``save_file``, ...);
* :func:`write_text`, :func:`write_json`, :func:`write_parquet`: the common cases;
* :func:`atomic_dir`: build a folder under a temporary name, then put it in place of ``dest``
  (an existing ``dest`` is moved aside first and removed only once the new one is in place);
* :func:`output_lock`: one job at a time per output folder (or file): a second run refuses at
  once, naming the holder; a lock left by a killed run on this host is taken over;
* :func:`local_path` / :func:`with_local_paths`: path options accept ``file://`` URIs; other
  schemes (``s3://``, ...) are refused clearly instead of becoming a local ``./s3:/...`` folder
  (``--out`` of the sweep and the sampler goes through :mod:`cappy_core.remote` instead).

Tested in ``tests/core/test_io_lock.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator


def _temp_sibling(path: Path) -> Path:
    # Hidden, same folder, unique per process and call; keeps the suffix so writers that pick a
    # format from it (savefig, write_table) still do.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


#: Errors of a full or failing disk: re-raised naming the output being written (a writer such
#: as pyarrow's reports only "[Errno 28] No space left on device", or the temporary name).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _naming(e: BaseException, target: Path) -> BaseException:
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
        return OSError(e.errno, f"writing {target}: {e.strerror or os.strerror(e.errno)}")
    return e


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path`` (parents are
    created); on an exception remove it and re-raise, leaving ``path`` untouched (a full disk's
    error then names ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        named = _naming(e, path)
        if named is e:
            raise
        raise named from e


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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the OS, libc or filesystem cannot (the caller then renames the old one aside first)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; on success it replaces ``dest``.

    An existing ``dest`` is swapped with the new folder in one step where the OS can
    (``renameat2``: a reader never finds ``dest`` missing), else renamed aside before the new
    folder is renamed into place; the old one is deleted only after the new one is in place.
    On an exception the temporary folder is removed and ``dest`` is left as it was (a full
    disk's error then names ``dest``).
    """
    dest = Path(dest)
    here = Path.cwd().resolve()
    if dest.resolve() == here or dest.resolve() in here.parents:  # '.', '..', an absolute ancestor
        raise ValueError(f"refusing to replace {dest}: it is or contains the working directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(dest)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        _remove(tmp)
        named = _naming(e, dest)
        if named is e:
            raise
        raise named from e
    if (dest.exists() or dest.is_symlink()) and _exchange(tmp, dest):
        _remove(tmp)  # now the old folder: a reader of dest saw the old one, then the new one, never neither
        return
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


# --- one job per output ----------------------------------------------------------------------

#: The lock file inside a locked folder (a locked *file* gets ``.NAME.lock`` beside it).
LOCK_NAME = ".cappy.lock"


class OutputLocked(OSError):
    """Another live run holds the output's lock (an ``OSError``: the CLI reports it as a user error)."""


def lock_path_for(target: str | os.PathLike, *, file: bool = False) -> Path:
    """Where the lock of ``target`` lives: ``target/.cappy.lock`` for a folder, ``.NAME.lock``
    beside it for a file (``file=True``)."""
    target = Path(target).expanduser()
    return target.with_name(f".{target.name}.lock") if file else target / LOCK_NAME


def _proc_start(pid: int) -> str | None:
    # The kernel's start time of ``pid`` (clock ticks since boot): tells a live holder from a
    # new process that reused its pid. None where /proc is missing (then the pid alone decides).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict) -> bool:
    try:
        pid = int(holder["pid"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except (KeyError, TypeError, ValueError):
        return False  # unreadable pid: not a lock this code wrote
    started = holder.get("proc_start")
    return started is None or _proc_start(pid) in (None, started)


def _describe(holder: dict) -> str:
    return (f"{holder.get('job') or 'a cappy job'} on host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {holder.get('started')}")


def lock_holder(target: str | os.PathLike, *, file: bool = False) -> dict | None:
    """Who holds ``target``'s lock now (:func:`output_lock`): its holder record, or None when the
    lock is free or its holder is dead (same host). A holder on another host counts as live."""
    holder = _read_holder(lock_path_for(target, file=file))
    if holder is None or holder.get("unreadable"):
        return None
    if holder.get("writing") or holder.get("host") != socket.gethostname():
        return holder
    return holder if _alive(holder) else None


def _read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Created but not yet (or never) written: a run that died between O_EXCL and write,
        # or one writing right now. Stale only once it is old.
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"pid": None, "host": socket.gethostname(), "unreadable": True} if age > 10 else {"writing": True}


def _try_create(path: Path, info: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: Path, stale: dict) -> None:
    """Remove a stale lock, at most one process at a time: under a guard file (itself taken with
    O_EXCL) the lock is read again and removed only if it is still the stale one, so a
    process that judged it stale a moment late cannot remove the lock a new run just took."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > 60:  # left by a process killed mid-takeover
                guard.unlink()
        return
    os.close(fd)
    try:
        if _read_holder(path) == stale:
            path.unlink()
    finally:
        with contextlib.suppress(FileNotFoundError):
            guard.unlink()


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, job: str = "", *, file: bool = False) -> Iterator[Path]:
    """Hold the lock of output ``target`` (a folder, created if missing, or with ``file=True`` a
    file) while the block runs; yields the lock file's path.

    The lock file holds host, pid, process start time and start date, and is created with
    ``O_CREAT | O_EXCL``, so of two runs exactly one gets it; the other raises
    :class:`OutputLocked` at once naming the holder. A lock whose process is gone (same host,
    pid dead or reused) is taken over; one from another host is never guessed stale: the
    error says which file to delete once that run is known to be dead. Released on exit, only
    if it is still this run's.
    """
    path = lock_path_for(target, file=file)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    info = {"job": job, "host": host, "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": uuid.uuid4().hex}
    for _ in range(50):
        if _try_create(path, info):
            break
        holder = _read_holder(path)
        if holder is None:
            continue  # released meanwhile
        if holder.get("writing"):
            time.sleep(0.05)
            continue
        if holder.get("host") == host and not _alive(holder):
            _take_over(path, holder)
            continue
        where = "" if holder.get("host") == host else (
            f"; if that run is dead, delete {path} (a lock from another host is never assumed stale)")
        raise OutputLocked(f"{Path(target)} is in use by {_describe(holder)} (lock {path}): wait for it to "
                           f"finish or use another output{where}")
    else:
        raise OutputLocked(f"could not take the lock {path}: it keeps changing hands")
    try:
        yield path
    finally:
        if _read_holder(path) == info:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# --- path options ----------------------------------------------------------------------------

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def local_path(value: str | None, flag: str) -> str | None:
    """A path option as a local path: a plain path as given, a ``file://`` URI as its path
    (decoded by ``pyarrow.fs``). Any other scheme (``s3://``, ``gs://``, ``hdfs://``, ...) is a
    ``ValueError`` naming ``flag``: these jobs write through local file operations (O_EXCL
    locks, atomic renames) that object stores do not offer."""
    if value is None:
        return None
    m = _URI.match(value)
    if not m:
        return value
    if m.group(1).lower() == "file":
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(value)[1]
    raise ValueError(f"{flag} {value}: {m.group(1)}:// is not supported (only local paths and file:// URIs: the "
                     "jobs lock and rename files in place, which object stores cannot do); mount the bucket on "
                     "every node (cluster/README) and give the mount path")


def with_local_paths(cfg: Any, *names: str) -> Any:
    """A copy of the config dataclass ``cfg`` with its path fields ``names`` (a value or a list)
    through :func:`local_path`."""
    changes = {}
    for name in names:
        value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        changes[name] = [local_path(v, flag) for v in value] if isinstance(value, list) else local_path(value, flag)
    return dataclasses.replace(cfg, **changes)
