"""BIG-Bench tasks → Parquet per task and split, with a manifest: what ``cappy data prepare`` does.

:func:`prepare_tasks` reads the tasks of :class:`~cappy_core.data.catalog.TaskCatalog` (the vendored
records, the download cache, optional extra task folders) and writes ``OUT/<task>/{train,validation}.parquet`` (schema:
:mod:`cappy_core.data.records`) and ``OUT/manifest.json``. Each file is written atomically and
existing files are kept unless ``overwrite``, so an interrupted run resumes where it stopped.

``manifest.json``: ``tasks`` (per task: split ``sizes``, ``kind``, ``subtasks``, ``source``
folder; a task kept from an earlier run without a manifest entry gets ``sizes`` and ``source``),
``config`` (the arguments of the last run), ``unavailable`` (tasks of the 45 not in the folders,
with how to add them) and ``skipped_too_few_examples``.

Tested in ``tests/core/test_vendor.py``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from cappy_core.io import write_json

MANIFEST = "manifest.json"


def prepare_tasks(tasks: Sequence[str], out: str | Path, *, task_dirs: Sequence[str] = (),
                  cache_dir: Optional[str] = None, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Write the tasks ``tasks`` (``all45``, ``pretrain`` or names) as Parquet under ``out``;
    returns the manifest written to ``out/manifest.json``. ``task_dirs`` add to / replace the
    cache's tasks; a missing one is :class:`FileNotFoundError`."""
    from tqdm import tqdm

    from cappy_core.data.bigbench import TooFewExamples, task_kind
    from cappy_core.data.catalog import TaskCatalog
    from cappy_core.data.records import SPLITS, read_examples, split_path, write_examples

    catalog = TaskCatalog.open(cache_dir, task_dirs)
    names, unavailable = catalog.resolve(tasks)
    out_dir = Path(out)
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"tasks": {}}
    manifest["config"] = {"tasks": list(tasks), "out": str(out), "task_dir": list(task_dirs),
                          "cache_dir": cache_dir, "overwrite": overwrite}
    written = kept = 0
    skipped: dict[str, str] = {}
    t0 = time.time()
    for name in tqdm(names, desc="preparing tasks", unit=" task", file=sys.stderr):
        paths = {s: split_path(out_dir, name, s) for s in SPLITS}
        if not overwrite and all(p.is_file() for p in paths.values()):
            kept += len(paths)
            if name not in manifest["tasks"]:
                sizes = {s: len(read_examples(p)) for s, p in paths.items()}
                manifest["tasks"][name] = {"sizes": sizes, "source": catalog.source(name)}
            continue
        try:
            splits = catalog.load(name)
        except TooFewExamples as e:
            skipped[name] = str(e)
            continue
        for s in SPLITS:
            write_examples(splits[s], paths[s])
            written += 1
        manifest["tasks"][name] = {
            "sizes": {s: len(splits[s]) for s in SPLITS},
            "kind": task_kind(splits["train"] + splits["validation"]),
            "subtasks": sorted({e.subtask for e in splits["train"]} - {""}),
            "source": catalog.source(name),
        }
    manifest["unavailable"] = unavailable
    manifest["skipped_too_few_examples"] = skipped
    write_json(manifest_path, manifest, indent=2)

    n_ex = sum(sum(manifest["tasks"][n]["sizes"].values()) for n in names if n in manifest["tasks"])
    log(f"prepared {len(names) - len(skipped)} tasks ({n_ex} examples) in {time.time() - t0:.1f}s: "
        f"{written} Parquet files written, {kept} already there, under {out_dir}/<task>/<split>.parquet")
    for why in unavailable.values():
        log(f"unavailable: {why}")
    for name, why in skipped.items():
        log(f"skipped {name}: {why} (the Hugging Face loader gives no train/validation split either)")
    return manifest
