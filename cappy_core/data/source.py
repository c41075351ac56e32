"""The offline BIG-Bench source: the ``bigbench==1.0.0`` sdist from PyPI, extracted once.

The PyPI source archive (~358 MB) holds every ``bigbench/benchmark_tasks/**/task.json``. We fetch
it with pip (the only network we use, and only in ``cappy data download``) in hash-checking
mode, so pip verifies its sha256 before running anything from it, verify it again,
extract just the task JSONs (+ ``task_metadata.json``) into the cache, and write a ``COMPLETE``
marker last. Everything else reads the extracted folder and never downloads.

Cache layout (``$CAPPY_CACHE_DIR``, default ``~/.cache/cappy``)::

    bigbench-1.0.0/
      bigbench-1.0.0.tar.gz        the archive (kept so a re-extract needs no network)
      benchmark_tasks/<task>/task.json, benchmark_tasks/<task>/<subtask>/task.json
      reference_code/json_task.py, reference_code/bigbench_bridge.py   (for tests only)
      COMPLETE                     JSON: version, sha256, number of files extracted
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from cappy_core.io import atomic_dir, atomic_path, write_text

BIGBENCH_VERSION = "1.0.0"
ARCHIVE_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
CACHE_LAYOUT = 2  # bump when the extracted layout changes: an older cache is re-extracted
NUM_TASK_FILES = 1041  # task.json files in bigbench 1.0.0 (tasks and subtasks)
_TASKS_PREFIX = "bigbench/benchmark_tasks/"
# The bigbench code that formats and splits examples, kept beside the tasks so tests can check
# our loader against it (cappy never imports it: it needs TensorFlow).
REFERENCE_CODE = ("bigbench/api/json_task.py", "bigbench/bbseqio/bigbench_bridge.py")

DOWNLOAD_HINT = "run `cappy data download` (fetches bigbench==1.0.0 from PyPI once, ~20 s, 358 MB)"


class BigBenchNotFound(FileNotFoundError):
    """The extracted BIG-Bench tasks are not in the cache; the message says what to run."""


class CorruptArchive(ValueError):
    """The cached archive does not match the published sha256 or cannot be read."""


def default_cache_dir() -> Path:
    """``$CAPPY_CACHE_DIR`` or ``~/.cache/cappy``."""
    env = os.environ.get("CAPPY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cappy"


def bigbench_dir(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"bigbench-{BIGBENCH_VERSION}"


def bigbench_task_root(cache_dir: str | Path | None = None) -> Path:
    """The extracted ``benchmark_tasks`` folder; raises :class:`BigBenchNotFound` if incomplete."""
    root = bigbench_dir(cache_dir)
    marker = root / "COMPLETE"
    try:
        layout = json.loads(marker.read_text()).get("layout")
    except (OSError, ValueError):
        layout = None
    if layout != CACHE_LAYOUT:
        raise BigBenchNotFound(
            f"BIG-Bench task files are not in the cache ({root}): {DOWNLOAD_HINT}, "
            "or set CAPPY_CACHE_DIR to a cache that has them."
        )
    return root / "benchmark_tasks"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_archive(path: Path) -> None:
    if not path.is_file():
        raise BigBenchNotFound(f"archive not found: {path}: {DOWNLOAD_HINT}")
    digest = sha256_of(path)
    if digest != ARCHIVE_SHA256:
        raise CorruptArchive(
            f"{path} is corrupt or not bigbench {BIGBENCH_VERSION} (sha256 {digest[:12]}…, expected "
            f"{ARCHIVE_SHA256[:12]}…): delete it and run `cappy data download --force`"
        )


def _pip_download(dest: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """``pip download --no-deps --no-binary :all: --require-hashes -r REQ`` into ``dest``, REQ
    pinning ``bigbench==1.0.0 --hash=sha256:ARCHIVE_SHA256``: pip checks the archive's hash as
    it arrives, before it builds the sdist's metadata (which runs the archive's setup.py), so
    nothing from an altered archive ever runs. ``pip_args``: extra options (tests: a local index)."""
    req = dest / "bigbench-requirement.txt"
    req.write_text(f"bigbench=={BIGBENCH_VERSION} --hash=sha256:{ARCHIVE_SHA256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
        "-r", str(req), "-d", str(dest), *pip_args,
    ]
    print(f"downloading bigbench=={BIGBENCH_VERSION} source archive (358 MB) with pip…", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archive = dest / ARCHIVE_NAME
    if proc.returncode != 0 or not archive.is_file():
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); pip said:\n{proc.stderr[-2000:]}\n"
            "If this machine has no access to PyPI, download the archive elsewhere and pass it with "
            "`cappy data download --archive PATH`."
        )
    return archive


def _extract_tasks(archive: Path, dest: Path, code_dest: Path) -> int:
    """Extract only ``benchmark_tasks/**/task.json``, ``task_metadata.json`` and the
    :data:`REFERENCE_CODE` files; returns the number of task.json files."""
    from tqdm import tqdm

    count = 0
    try:
        with tarfile.open(archive, "r:gz") as tar, tqdm(
            desc="extracting task JSONs", unit=" files", total=NUM_TASK_FILES + 1, file=sys.stderr
        ) as bar:
            for member in tar:
                name = member.name
                code = [c for c in REFERENCE_CODE if name.endswith("/" + c)]
                if code and member.isfile():
                    code_dest.mkdir(parents=True, exist_ok=True)
                    (code_dest / Path(code[0]).name).write_bytes(tar.extractfile(member).read())
                    continue
                i = name.find(_TASKS_PREFIX)
                if i < 0 or not member.isfile():
                    continue
                rel = name[i + len(_TASKS_PREFIX):]
                if not (rel.endswith("/task.json") or rel == "task_metadata.json"):
                    continue
                target = dest / rel
                if ".." in Path(rel).parts:
                    continue  # never write outside dest
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                count += 1
                bar.update(1)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorruptArchive(
            f"{archive} cannot be read ({e}): delete it and run `cappy data download --force`"
        ) from e
    return count - 1  # minus task_metadata.json


def download_bigbench(
    cache_dir: str | Path | None = None, *, force: bool = False, archive: str | Path | None = None,
    keep_archive: bool = True,
) -> Path:
    """Make sure the extracted tasks are in the cache; returns the ``benchmark_tasks`` folder.

    No network when the cache is complete (unless ``force``). ``archive`` uses a local copy of
    ``bigbench-1.0.0.tar.gz`` instead of pip.
    """
    root = bigbench_dir(cache_dir)
    if not force:
        try:
            return bigbench_task_root(cache_dir)
        except BigBenchNotFound:
            pass
    root.mkdir(parents=True, exist_ok=True)
    cached = root / ARCHIVE_NAME
    if archive is not None:
        verify_archive(Path(archive))
        if Path(archive).resolve() != cached.resolve():
            with atomic_path(cached) as tmp:
                shutil.copyfile(archive, tmp)
    elif force or not cached.is_file():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            got = _pip_download(Path(tmp))
            verify_archive(got)
            got.replace(cached)
    else:
        verify_archive(cached)  # a leftover archive from an interrupted run: check it first

    (root / "COMPLETE").unlink(missing_ok=True)
    with atomic_dir(root / "benchmark_tasks") as staging:
        count = _extract_tasks(cached, staging, root / "reference_code")
        if count != NUM_TASK_FILES:
            raise CorruptArchive(
                f"{cached}: extracted {count} task.json files, expected {NUM_TASK_FILES}: "
                "delete it and run `cappy data download --force`"
            )
    write_text(root / "COMPLETE", json.dumps({"version": BIGBENCH_VERSION, "sha256": ARCHIVE_SHA256,
                                              "task_files": count, "layout": CACHE_LAYOUT}) + "\n")
    if not keep_archive:
        cached.unlink(missing_ok=True)
    return root / "benchmark_tasks"
