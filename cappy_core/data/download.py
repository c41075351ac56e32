"""Where BIG-Bench task files come from, each checked against the release manifest before use.

``cappy data download`` tries these sources in order, each for the files the ones before it did
not deliver:

1. :class:`LocalCopy` (``--from PATH``): a folder of task files (``benchmark_tasks``, or a
   checkout holding ``bigbench/benchmark_tasks``) or an archive of one (``.tar.gz``, ``.tar``,
   ``.zip``: the old PyPI sdist, a GitHub tarball);
2. :class:`GitHubRaw`: google/BIG-bench's files, one request each, at the pinned revision;
3. :class:`GitHubTarball`: the same repository's tarball at that revision, streamed.

Every file is checked against the manifest (:mod:`cappy_core.data.release`) before it is
written to the cache; a file that differs is refused, named with both hashes. The one exception
is the PyPI sdist itself: when an archive's sha256 is the published one, its files are the
release by definition. Archives are only *read*: members are parsed as data, only
``benchmark_tasks/**/task.json`` is kept, nothing is extracted by name, and nothing from them is
run (no pip, no setup.py). Files land in ``<cache>/bigbench-1.0.0/benchmark_tasks/`` one by one,
atomically, so an interrupted download keeps what it verified and resumes.

Tested in ``tests/core/test_bigbench_sources.py``.
"""

from __future__ import annotations

import functools
import posixpath
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional

from cappy_core.data.cache import BigBenchNotFound, bigbench_dir
from cappy_core.data.release import SDIST_SHA256, FileRejected, Manifest, load_manifest, sha256_file
from cappy_core.io import atomic_path

TASKS_DIR = "benchmark_tasks"
#: bigbench's own formatting and split code, kept beside the tasks when the source is the
#: hash-checked sdist, so the tests can compare our loader with it (cappy never imports it).
REFERENCE_CODE = ("bigbench/api/json_task.py", "bigbench/bbseqio/bigbench_bridge.py")
RAW_URL = "https://raw.githubusercontent.com/google/BIG-bench/{revision}/bigbench/benchmark_tasks/{path}"
TARBALL_URL = "https://codeload.github.com/google/BIG-bench/tar.gz/{revision}"
TIMEOUT_S = 30.0  # a server silent this long (connect or read) has failed


class DownloadFailed(BigBenchNotFound):
    """Every source failed for some files; the message lists each source, why, and what to do."""


def task_rel(member: str) -> Optional[str]:
    """``"<task>/task.json"`` for an archive or folder path under ``benchmark_tasks/``, else None
    (also None for any path that would leave the folder)."""
    parts = member.replace("\\", "/").split("/")
    if TASKS_DIR not in parts or parts[-1] != "task.json":
        return None
    rel = parts[len(parts) - parts[::-1].index(TASKS_DIR):]
    if not 2 <= len(rel) <= 4 or any(p in ("", ".", "..") for p in rel):
        return None
    return "/".join(rel)


def _reference_name(member: str) -> Optional[str]:
    member = member.replace("\\", "/")
    return next((posixpath.basename(c) for c in REFERENCE_CODE if member.endswith("/" + c) or member == c), None)


# --- sources -----------------------------------------------------------------------------------

Accept = Callable[[str, bytes], None]  # (rel path, bytes): verify and keep, or raise FileRejected


class LocalCopy:
    """A folder or an archive on this machine (``--from PATH``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.name = f"--from {self.path}"
        self.reference_code: dict[str, bytes] = {}  # file name -> bytes, as :meth:`fetch` passes them

    @functools.cached_property
    def is_sdist(self) -> bool:
        """Whether this is the published PyPI sdist (its sha256 checked): its files are the release."""
        return self.path.is_file() and sha256_file(self.path) == SDIST_SHA256

    def _folder_root(self) -> Path:
        for root in (self.path, self.path / TASKS_DIR, self.path / "bigbench" / TASKS_DIR):
            if root.is_dir() and any((d / "task.json").is_file() for d in root.iterdir() if d.is_dir()):
                return root
        raise FileNotFoundError(f"{self.path}: no <task>/task.json under it, nor under "
                                f"{TASKS_DIR}/ or bigbench/{TASKS_DIR}/")

    def members(self) -> Iterator[tuple[str, bytes]]:
        """``(path inside the copy, bytes)`` of every task.json and reference-code file."""
        p = self.path
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_dir():
            root = self._folder_root()
            for f in sorted(root.rglob("task.json")):
                yield f"{TASKS_DIR}/{f.relative_to(root).as_posix()}", f.read_bytes()
            return
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                for info in z.infolist():
                    if not info.is_dir() and (task_rel(info.filename) or _reference_name(info.filename)):
                        yield info.filename, z.read(info)
            return
        try:
            with tarfile.open(p, "r:*") as tar:
                yield from _tar_members(tar)
        except (tarfile.TarError, EOFError, OSError) as e:
            why = "empty file" if p.stat().st_size == 0 else str(e).splitlines()[0].rstrip(":")
            raise ValueError(f"{p}: not a readable .tar.gz, .tar or .zip archive ({why})") from e

    def fetch(self, wanted: Callable[[str], bool], accept: Accept) -> dict[str, str]:
        failures: dict[str, str] = {}
        for member, data in self.members():
            rel = task_rel(member)
            if rel is None:
                if name := _reference_name(member):
                    self.reference_code[name] = data
                continue
            if not wanted(rel):
                continue
            try:
                accept(rel, data)
            except FileRejected as e:
                failures[rel] = str(e)
        return failures


def _tar_members(tar: tarfile.TarFile) -> Iterator[tuple[str, bytes]]:
    for m in tar:
        if m.isfile() and (task_rel(m.name) or _reference_name(m.name)):
            f = tar.extractfile(m)  # the member's bytes only: nothing is written by its name
            assert f is not None
            yield m.name, f.read()


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (https or a test's loopback)
        return r.read()


def _why(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"cannot connect ({e.reason})"
    if isinstance(e, TimeoutError):
        return "no answer (timed out)"
    return f"{type(e).__name__}: {e}"


class GitHubRaw:
    """google/BIG-bench's files, one HTTP request each, at ``revision``."""

    def __init__(self, revision: str, url: str = RAW_URL, timeout: float = TIMEOUT_S, workers: int = 8):
        self.revision, self.url, self.timeout, self.workers = revision, url, timeout, workers
        self.name = f"GitHub raw files at {revision} ({url.split('{')[0]}...)"

    def fetch_paths(self, paths: list[str], accept: Accept) -> dict[str, str]:
        failures: dict[str, str] = {}

        def one(rel: str) -> None:
            url = self.url.format(revision=self.revision, path=rel)
            try:
                accept(rel, _get(url, self.timeout))
            except FileRejected as e:
                failures[rel] = str(e)
            except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
                failures[rel] = f"{url}: {_why(e)}"

        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(one, paths))
        return failures


class GitHubTarball:
    """The repository's tarball at ``revision``, streamed; only the wanted task files are read."""

    def __init__(self, revision: str, url: str = TARBALL_URL, timeout: float = TIMEOUT_S):
        self.revision, self.url, self.timeout = revision, url, timeout
        self.name = f"GitHub tarball at {revision} ({url.format(revision=revision)})"

    def fetch(self, wanted: Callable[[str], bool], accept: Accept) -> dict[str, str]:
        url = self.url.format(revision=self.revision)
        failures: dict[str, str] = {}
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:  # noqa: S310
                with tarfile.open(fileobj=r, mode="r|*") as tar:
                    for m in tar:
                        rel = task_rel(m.name) if m.isfile() else None
                        if rel is None or not wanted(rel):
                            continue
                        f = tar.extractfile(m)
                        assert f is not None
                        try:
                            accept(rel, f.read())
                        except FileRejected as e:
                            failures[rel] = str(e)
        except (OSError, ValueError, tarfile.TarError, EOFError) as e:
            raise OSError(f"{url}: {_why(e)}") from e
        return failures


# --- the download -------------------------------------------------------------------------------

def expected_files(manifest: Manifest, tasks: Optional[list[str]]) -> list[str]:
    """The manifest paths of ``tasks`` (all the release's files for None); unknown tasks raise."""
    if tasks is None:
        return sorted(manifest.files)
    unknown = [t for t in tasks if not manifest.task_files(t)]
    if unknown and manifest.files:
        raise ValueError(f"not in bigbench 1.0.0 per the release manifest: {', '.join(unknown)} "
                         "(add such a task with --task-dir DIR, DIR/<task>/task.json)")
    return sorted(p for t in tasks for p in manifest.task_files(t))


def download_tasks(
    tasks: Optional[list[str]] = None, *, cache_dir: str | Path | None = None, from_path: str | Path | None = None,
    revision: Optional[str] = None, network: bool = True, manifest: Optional[Manifest] = None,
    raw_url: str = RAW_URL, tarball_url: str = TARBALL_URL, timeout: float = TIMEOUT_S,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> Path:
    """Put the task files of ``tasks`` (None: every file of the release) into the cache, verified;
    returns the cache's ``benchmark_tasks`` folder. Files already there are kept. Raises
    :class:`DownloadFailed` naming every source tried and why it failed."""
    from tqdm import tqdm

    manifest = manifest if manifest is not None else load_manifest()
    revision = revision or manifest.revision
    dest = bigbench_dir(cache_dir) / TASKS_DIR
    missing = {p for p in expected_files(manifest, tasks) if not (dest / p).is_file()}
    if manifest.files and not missing:
        return dest
    task_set = set(tasks) if tasks is not None else None
    got: set[str] = set()
    state = {"trusted": False}  # whether the source being read is the hash-checked sdist

    def wanted(rel: str) -> bool:
        return (rel in missing) if manifest.files else (task_set is None or rel.split("/")[0] in task_set)

    def accept(rel: str, data: bytes) -> None:
        if not state["trusted"]:
            manifest.check(rel, data)
        with atomic_path(dest / rel) as tmp:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        missing.discard(rel)
        got.add(rel)
        bar.update(1)

    def done() -> bool:
        return not missing if manifest.files else bool(got)

    sources: list = [LocalCopy(from_path)] if from_path is not None else []
    tried: list[str] = []
    if network and not manifest.files:
        tried.append("GitHub google/BIG-bench (raw files, then the tarball): skipped: the release manifest lists "
                     "no files to check them against")
    elif network and not revision:
        tried.append("GitHub google/BIG-bench (raw files, then the tarball): skipped: no pinned revision "
                     "(the release manifest records none); pass --revision COMMIT")
    elif network:
        sources += [GitHubRaw(revision, raw_url, timeout), GitHubTarball(revision, tarball_url, timeout)]
    with tqdm(desc="BIG-Bench task files", unit=" file", total=len(missing) or None, file=sys.stderr,
              disable=not sources) as bar:
        for src in sources:
            if done():
                break
            n0, t0 = len(got), time.time()
            try:
                if isinstance(src, GitHubRaw):
                    failures = src.fetch_paths(sorted(missing), accept)
                else:
                    state["trusted"] = isinstance(src, LocalCopy) and src.is_sdist
                    failures = src.fetch(wanted, accept)
            except (OSError, ValueError) as e:
                tried.append(f"{src.name}: {e}")
                continue
            finally:
                state["trusted"] = False
            log(f"{src.name}: {len(got) - n0} task files verified and kept ({time.time() - t0:.1f}s)")
            if isinstance(src, LocalCopy) and src.is_sdist:
                _keep_reference_code(src.reference_code, bigbench_dir(cache_dir) / "reference_code")
            if not done():
                tried.append(_failure_line(src.name, failures, sorted(missing)))
    if done():
        return dest
    raise DownloadFailed(_failure_message(tried, tasks, len(missing), manifest))


def _failure_line(name: str, failures: dict[str, str], still: list[str]) -> str:
    if not failures and not still:  # no manifest, nothing matched: there is no file to name
        return f"{name}: no task.json of the requested tasks in it"
    shown = [failures[p] if p in failures else f"{p}: not in this source" for p in (sorted(failures) + [
        p for p in still if p not in failures])[:5]]
    more = len(set(failures) | set(still)) - len(shown)
    return f"{name}: " + "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def _failure_message(tried: list[str], tasks: Optional[list[str]], n_missing: int, manifest: Manifest) -> str:
    what = f"tasks {', '.join(tasks)}" if tasks else "the BIG-Bench 1.0.0 task files"
    lines = [f"could not get {what}" + (f" ({n_missing} files still missing)" if n_missing else "") + "."]
    if not manifest.files:
        lines.append("This build of cappy carries no release manifest (no copy of BIG-Bench 1.0.0 was at hand "
                     "when it was built), so only the published PyPI sdist can be verified.")
    lines.append("Sources tried, in order:")
    lines += [f"  {i}. {t}" for i, t in enumerate(tried, 1)] or ["  (none)"]
    lines.append("Way forward: get a copy of the release (bigbench-1.0.0.tar.gz, sha256 "
                 f"{SDIST_SHA256}, or a google/BIG-bench checkout) onto this machine and run "
                 "`cappy data download --from PATH`.")
    return "\n".join(lines)


def _keep_reference_code(files: dict[str, bytes], dest: Path) -> None:
    for name, data in files.items():
        dest.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest / name) as tmp:
            tmp.write_bytes(data)


def write_task_tree(files: dict[str, bytes], root: Path) -> Path:
    """``files`` (``{"<task>/task.json": bytes}``, paths from :func:`task_rel`) as a task folder
    under ``root``, for :func:`cappy_core.data.bigbench.load_task`; returns ``root``."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_task_files(path: str | Path) -> tuple[dict[str, bytes], bool]:
    """Every ``<task>/.../task.json`` of a folder or archive, as bytes, and whether the archive is
    the published sdist (for ``cappy data vendor``)."""
    src = LocalCopy(path)
    files = {rel: data for m, data in src.members() if (rel := task_rel(m))}
    if not files:
        raise FileNotFoundError(f"{path}: holds no benchmark_tasks/<task>/task.json")
    return dict(sorted(files.items())), src.is_sdist


