"""Outputs on object storage: ``--out s3://...`` (``gs://``, ``memory://``, any URI pyarrow or fsspec knows).

The jobs write through local file operations (the O_EXCL lock, atomic renames, resuming from what
is on disk) that object stores do not offer. So for a URI the job works in a local **staging
folder**, ``$CAPPY_STAGING_DIR/<sha256 of the URI>`` (default ``CACHE/staging/...``, the cache of
``$CAPPY_CACHE_DIR`` or ``--cache-dir``), and :func:`locked_output` keeps it in step with the URI:

1. before the job starts, :meth:`StagedOutput.pull` copies what is at the URI into it (a rerun,
   here or on another machine, resumes and skips finished work exactly as it does locally);
2. the job runs on the staging folder and calls :func:`sync_outputs` each time it finishes a piece
   (a sampled shard, a sweep task); :meth:`StagedOutput.push` uploads the files changed since the
   last sync, and leaving :func:`locked_output` syncs a last time (after an error too; after
   Ctrl-C the next run's first sync uploads what was left);
3. nothing at the URI is ever deleted but the upload's own temporary objects: a file the job
   removed locally (``--overwrite``) stays at the URI until the job writes it again.

Only the process that entered :func:`locked_output` (the driver) touches the URI; Ray workers see
the staging folder only. The lock stays local (in the staging folder): two machines writing the
same URI are not locked against each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from cappy_core.io import LOCK_NAME, atomic_path, local_path, output_lock, write_json

logger = logging.getLogger(__name__)

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: What staging remembers of the last sync, ``.<folder>.cappy-sync.json`` beside the staging
#: folder: ``{relative path: {"local": sig, "remote": sig}}``.
SYNC_RECORD = ".cappy-sync.json"
#: Never uploaded or downloaded: the local lock, the sync record, and temporary names of atomic
#: writes and of uploads in flight (``.NAME.tmp-PID-HEX...``, io._temp_sibling's form).
_TEMP = re.compile(r"^\..*\.tmp-\d+-[0-9a-f]{8}")
_LOCAL_ONLY = {LOCK_NAME, LOCK_NAME + ".takeover", SYNC_RECORD}
#: Uploaded by the last sync only: the job's log grows all along, and uploading it again after
#: every shard of a long run would cost more than the outputs.
LAST_SYNC_ONLY = ("logs",)

_active: list["StagedOutput"] = []  # the staged outputs of the jobs running in this process


def scheme(value: str | None) -> Optional[str]:
    """The URI scheme of ``value`` in lower case, or None for a plain path."""
    m = _URI.match(value or "")
    return m.group(1).lower() if m else None


def is_remote(value: str | None) -> bool:
    """A URI that is not ``file://``: the job's output goes through staging."""
    return scheme(value) not in (None, "file")


def filesystem(uri: str, flag: str):
    """``(pyarrow FileSystem, path)`` for ``uri``: pyarrow's own filesystems first (S3, GCS, HDFS,
    as Ray resolves them), else fsspec's wrapped in ``pyarrow.fs.PyFileSystem``. A ``ValueError``
    naming ``flag`` when neither knows the scheme or its package is not installed."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # unknown to pyarrow, or built without it: fsspec may know it
        arrow_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    import fsspec.core

    name = scheme(uri)
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as e:  # a known scheme whose package is missing (s3fs, gcsfs, adlfs, ...)
        raise ValueError(f"{flag} {uri}: {name}:// needs a package that is not installed (fsspec: {e}; pyarrow: "
                         f"{arrow_error}). For s3:// or gs://: pip install s3fs / gcsfs, or a pyarrow built with "
                         "S3/GCS support (and check the network and credentials)") from e
    except ValueError as e:
        raise ValueError(f"{flag} {uri}: unknown scheme {name}:// (neither pyarrow.fs nor fsspec knows it; "
                         "give a local path, a file:// URI, or s3://, gs://, ... with s3fs / gcsfs installed)") from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def staging_dir(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder a job writes ``uri``'s output in: ``$CAPPY_STAGING_DIR/<digest>``, else
    ``<cache_dir or the cache>/staging/<digest>``; the same for every run of the same URI, so a
    rerun on this machine downloads only what changed at the URI."""
    from cappy_core.data.cache import default_cache_dir

    root = os.environ.get("CAPPY_STAGING_DIR")
    base = Path(root) if root else Path(cache_dir or default_cache_dir()) / "staging"
    return base.expanduser() / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _skip(rel: str) -> bool:
    parts = rel.split("/")
    return parts[-1] in _LOCAL_ONLY or any(_TEMP.match(p) for p in parts)


def _sig(size: Any, mtime: Any) -> list:
    return [int(size), None if mtime is None else str(mtime)]


class StagedOutput:
    """A URI's output built in a local folder (:func:`staging_dir`) and copied to it by
    :meth:`pull` and :meth:`push`."""

    def __init__(self, uri: str, flag: str, local: Path, fs, root: str, only: Optional[tuple[str, ...]] = None):
        self.uri, self.flag, self.local, self.fs, self.root = uri, flag, Path(local), fs, root.rstrip("/")
        self.only = only  # sync only these top-level names (a Ray Train run folder: not its checkpoints)
        # beside the folder, not in it: a job may replace the folder whole (an exported scorer)
        self._record_path = self.local.parent / f".{self.local.name}{SYNC_RECORD}"
        try:
            self.record: dict[str, dict] = json.loads(self._record_path.read_text())
        except (FileNotFoundError, ValueError):
            self.record = {}

    @classmethod
    def open(cls, uri: str, flag: str, cache_dir: str | os.PathLike | None = None, *,
             local: str | os.PathLike | None = None, only: Optional[tuple[str, ...]] = None) -> "StagedOutput":
        fs, root = filesystem(uri, flag)
        return cls(uri, flag, Path(local) if local else staging_dir(uri, cache_dir), fs, root, only)

    def _synced(self, rel: str) -> bool:
        return not _skip(rel) and (self.only is None or rel.split("/", 1)[0] in self.only)

    def _local_sig(self, path: Path) -> list:
        st = path.stat()
        return _sig(st.st_size, st.st_mtime_ns)

    def _remote_files(self) -> dict[str, list]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        files = {}
        for info in infos:
            rel = info.path[len(self.root):].lstrip("/")
            if info.type == pafs.FileType.File and self._synced(rel):
                files[rel] = _sig(info.size, info.mtime)
        return files

    def _save_record(self) -> None:
        write_json(self._record_path, self.record)

    def pull(self) -> int:
        """Make the staging folder what the URI holds; the number of files downloaded.

        A file changed at the URI since the last sync (or unknown here) is downloaded; one this
        machine changed and did not upload yet is kept (the next push uploads it); one synced
        before and since removed at the URI is removed here too (so deleting at the URI makes a
        rerun recompute it). Local files the URI never had are kept."""
        import pyarrow.fs as pafs

        self.local.mkdir(parents=True, exist_ok=True)
        remote, n = self._remote_files(), 0
        for rel, rsig in remote.items():
            dest, entry = self.local / rel, self.record.get(rel)
            local_sig = self._local_sig(dest) if dest.is_file() else None
            if entry and local_sig is not None and entry["remote"] == rsig:
                continue  # unchanged at the URI: the local copy is as new or newer
            with atomic_path(dest) as tmp:
                pafs.copy_files(f"{self.root}/{rel}", str(tmp), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
            self.record[rel] = {"local": self._local_sig(dest), "remote": rsig}
            n += 1
        for rel in [r for r in self.record if r not in remote]:  # removed at the URI since the last sync
            dest = self.local / rel
            if dest.is_file() and self._local_sig(dest) == self.record[rel]["local"]:
                dest.unlink()
            del self.record[rel]
        self._save_record()
        return n

    def push(self, last: bool = True) -> int:
        """Upload the staging folder's files that changed since the last sync; the number uploaded
        (``last=False``: not :data:`LAST_SYNC_ONLY`).

        Each file goes to a temporary name beside its target and is then moved over it, so a
        reader of the URI sees the old file or the new one whole: on a file system (``file://``,
        HDFS) the move is a rename; on S3/GCS it is a server-side copy, and a single object PUT
        is atomic there anyway. Nothing else at the URI is deleted."""
        import pyarrow.fs as pafs

        n = 0
        for folder, dirs, names in os.walk(self.local):
            dirs[:] = sorted(d for d in dirs if not _TEMP.match(d))
            for name in sorted(names):
                path = Path(folder) / name
                rel = path.relative_to(self.local).as_posix()
                if not self._synced(rel) or not path.is_file():
                    continue
                if not last and rel.split("/", 1)[0] in LAST_SYNC_ONLY:
                    continue
                sig = self._local_sig(path)
                if self.record.get(rel, {}).get("local") == sig:
                    continue
                target = f"{self.root}/{rel}"
                parent, base = target.rsplit("/", 1)
                tmp = f"{parent}/.{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                self.fs.create_dir(parent, recursive=True)
                try:
                    pafs.copy_files(str(path), tmp, source_filesystem=pafs.LocalFileSystem(),
                                    destination_filesystem=self.fs)
                    self.fs.move(tmp, target)
                except BaseException:
                    with contextlib.suppress(Exception):
                        self.fs.delete_file(tmp)  # only our own temporary object
                    raise
                info = self.fs.get_file_info(target)
                self.record[rel] = {"local": sig, "remote": _sig(info.size, info.mtime)}
                n += 1
        if n:
            self._save_record()
        return n


def sync_outputs() -> None:
    """Upload what the jobs running in this process finished so far (a no-op without a URI
    output, and in Ray workers). An upload that fails here is logged and retried at the next
    sync; the last sync, when the job ends, raises."""
    for staged in list(_active):
        try:
            staged.push(last=False)
        except Exception as e:  # a network blip must not end an hours-long job: the next sync retries
            logger.warning("uploading to %s failed, retried at the next sync: %s", staged.uri, e)


@contextlib.contextmanager
def locked_output(value: str, flag: str, job: str, *, cache_dir: str | os.PathLike | None = None,
                  log: Callable[[str], None] = print, local: str | os.PathLike | None = None,
                  only: Optional[tuple[str, ...]] = None, file: bool = False) -> Iterator[str]:
    """The local folder a job writes ``value`` (``flag``'s value) in, under the output's lock.

    A local path or ``file://`` URI: that folder. Another URI: its staging folder, first filled
    from the URI, uploaded as :func:`sync_outputs` is called and once more on exit (after a
    failure too, so what finished is kept). The lock (:func:`cappy_core.io.output_lock`; with
    ``file=True`` beside the folder, for a folder the job replaces whole) is taken before anything
    is downloaded. ``local``: the staging folder, instead of :func:`staging_dir`'s; ``only``:
    sync only these top-level names."""
    if not is_remote(value):
        path = local_path(value, flag)
        with output_lock(path, job, file=file):
            yield path
        return
    staged = StagedOutput.open(value, flag, cache_dir, local=local, only=only)
    with output_lock(staged.local, job, file=file):
        t0 = time.time()
        n = staged.pull()
        log(f"{flag} {value}: working in {staged.local} ({n} file(s) downloaded in {time.time() - t0:.1f} s); "
            "finished outputs are uploaded as they complete")
        _active.append(staged)
        try:
            yield str(staged.local)
        except Exception:
            try:  # keep what finished before the failure
                staged.push()
            except Exception as e:  # and the job's own error
                logger.warning("uploading to %s after the failure failed: %s", value, e)
            raise
        # (Ctrl-C ends at once, uploading nothing: the next run's syncs upload what is left here)
        finally:
            _active.remove(staged)
        log(f"uploaded {staged.push()} file(s) to {value}")
