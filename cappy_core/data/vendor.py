"""A copy of the BIG-Bench 1.0.0 release → the manifest and the Parquet records shipped in the package.

What ``cappy data vendor --from PATH`` does, deterministically (a rerun on the same copy writes
the same bytes):

1. read every ``benchmark_tasks/**/task.json`` of the copy (a folder or an archive; nothing is
   run, nothing extracted by name) and list each in the manifest: sha256, git blob id, size,
   example count;
2. prepare the chosen tasks exactly as ``cappy data prepare`` does (formatting and split of the
   Hugging Face loader, :mod:`cappy_core.data.bigbench`) and write each as one zstd Parquet file,
   ``tasks/<task>.parquet`` (schema :mod:`cappy_core.data.records`, train rows then validation
   rows), with the canary strings of its task.json files in the file's metadata and the manifest;
3. keep the whole set within ``max_bytes``: the required tasks always, then as many of the rest
   as fit, smallest first; the manifest names every task left out and why.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import pyarrow.parquet as pq

from cappy_core.data.records import SPLITS, examples_to_table
from cappy_core.data.release import (MANIFEST_NAME, FileEntry, Manifest, git_blob_id, records_sha256,
                                     sha256_bytes, sha256_file)
from cappy_core.io import atomic_path, write_text

PARQUET_OPTIONS = dict(compression="zstd", compression_level=19, use_dictionary=True, write_statistics=False)
CANARY_KEY = b"bigbench_canaries"


def _examples_in(data: bytes) -> int:
    try:
        obj = json.loads(data)
    except ValueError:
        return 0
    ex = obj.get("examples") if isinstance(obj, dict) else None
    return len(ex) if isinstance(ex, list) else 0


def _canaries(files: dict[str, bytes], paths: Sequence[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        try:
            c = json.loads(files[p]).get("canary")
        except (ValueError, AttributeError):
            c = None
        if isinstance(c, str) and c not in out:
            out.append(c)
    return out


def write_task_parquet(rows: list, canaries: list[str], path: Path) -> None:
    """One task's prepared records (train then validation) as zstd Parquet, canaries in its metadata."""
    table = examples_to_table(rows)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           CANARY_KEY: json.dumps(canaries, ensure_ascii=False).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **PARQUET_OPTIONS)


def read_canaries(path: str | Path) -> list[str]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(CANARY_KEY, b"[]"))


def splits_sha256(splits: dict[str, list]) -> str:
    """:func:`records_sha256` of one task's prepared splits, train rows then validation rows."""
    return records_sha256(examples_to_table([e for s in SPLITS for e in splits[s]]).to_pylist())


def vendor_release(
    from_path: str | Path, out_dir: str | Path, *, required: Sequence[str], optional: Sequence[str] = (),
    max_bytes: int = 64 << 20, revision: Optional[str] = None, log: Callable[[str], None] = print,
) -> Manifest:
    """Write ``out_dir/manifest.json`` and ``out_dir/tasks/<task>.parquet`` from the copy at
    ``from_path``; returns the manifest. ``required`` tasks must be in the copy; ``optional``
    ones are vendored while the set stays within ``max_bytes``."""
    from cappy_core.data.bigbench import TaskFormatError, TooFewExamples, load_task
    from cappy_core.data.download import read_task_files, write_task_tree

    files, is_sdist = read_task_files(from_path)
    log(f"{from_path}: {len(files)} task.json files"
        + (" (the published PyPI sdist: sha256 checked)" if is_sdist else
           " (not the published sdist: the manifest will record these files as the release; use a copy you trust)"))
    manifest = Manifest(revision=revision)
    for rel, data in files.items():
        manifest.files[rel] = FileEntry(sha256=sha256_bytes(data), git_blob=git_blob_id(data), bytes=len(data),
                                        examples=_examples_in(data))
    have = set(manifest.tasks)
    absent = [t for t in required if t not in have]
    if absent:
        raise FileNotFoundError(f"{from_path}: required task(s) not in this copy: {', '.join(absent)}")
    for t in optional:
        if t not in have:
            manifest.left_out[t] = "not in this copy of the release"

    out = Path(out_dir)
    tasks_out = out / "tasks"
    tasks_out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_task_tree(files, Path(tmp))  # by our own relative paths, checked by task_rel
        for task in list(dict.fromkeys([*required, *[t for t in optional if t in have]])):
            try:
                splits = load_task(root, task)
            except (TooFewExamples, TaskFormatError) as e:
                why = str(e).replace(str(root) + "/", "")  # name the file in the copy, not the temp folder
                if task in required:
                    raise type(e)(f"{from_path}: {why}") from e
                manifest.left_out[task] = why
                continue
            rows = [e for s in SPLITS for e in splits[s]]
            sources = manifest.task_files(task)
            canaries = _canaries(files, sources)
            path = tasks_out / f"{task}.parquet"
            write_task_parquet(rows, canaries, path)
            sizes[task] = path.stat().st_size
            manifest.vendored[task] = {
                "file": f"tasks/{task}.parquet", "sha256": sha256_file(path),
                "records_sha256": splits_sha256(splits),
                "sizes": {s: len(splits[s]) for s in SPLITS}, "canaries": canaries, "sources": sources,
            }
    total = sum(sizes.values())
    for task in sorted((t for t in sizes if t not in required), key=lambda t: (-sizes[t], t)):
        if total <= max_bytes:
            break
        total -= sizes.pop(task)
        (tasks_out / f"{task}.parquet").unlink()
        del manifest.vendored[task]
        manifest.left_out[task] = f"left out to keep the vendored set within {max_bytes / 2**20:.0f} MiB"
    if total > max_bytes:
        raise ValueError(f"the required tasks alone take {total / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB budget")
    for stale in tasks_out.glob("*.parquet"):
        if stale.stem not in manifest.vendored:
            stale.unlink()
    write_text(out / MANIFEST_NAME, manifest.to_json())
    log(f"vendored {len(manifest.vendored)} tasks, {total / 2**20:.1f} MiB, into {tasks_out}; manifest of "
        f"{len(manifest.files)} files: {out / MANIFEST_NAME}"
        + (f"; left out: {', '.join(sorted(manifest.left_out))}" if manifest.left_out else ""))
    return manifest


def check_vendored(manifest: Manifest, vendored: Path, task_root: Optional[Path] = None) -> dict[str, str]:
    """``{task: problem}`` for every vendored task whose file or records differ from the
    manifest, or (``task_root``: a folder of the release's task files) from the records prepared
    from those files now. Empty when all agree."""
    from cappy_core.data.bigbench import load_task

    problems: dict[str, str] = {}
    for task, entry in sorted(manifest.vendored.items()):
        path = vendored / entry["file"]
        if not path.is_file():
            problems[task] = f"{path}: missing"
            continue
        if sha256_file(path) != entry["sha256"]:
            problems[task] = f"{path}: sha256 differs from the manifest"
            continue
        got = records_sha256(pq.read_table(path).to_pylist())
        if got != entry["records_sha256"]:
            problems[task] = f"{path}: records digest {got} != manifest {entry['records_sha256']}"
        elif task_root is not None:
            fresh = splits_sha256(load_task(task_root, task))
            if fresh != got:
                problems[task] = f"records prepared from {task_root / task} ({fresh}) differ from the vendored ({got})"
    return problems

