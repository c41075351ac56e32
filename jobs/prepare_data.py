"""``cappy data prepare``: BIG-Bench tasks → Parquet per task and split.

    cappy data prepare --tasks all45 --out data/bigbench
    ray job submit --working-dir . -- python -m jobs.prepare_data --tasks all45 --out /mnt/shared/bb

Reads the extracted BIG-Bench cache (``cappy data download``) plus optional ``--task-dir``
folders, and writes ``OUT/<task>/{train,validation}.parquet`` (schema: docs/data.md) and
``OUT/manifest.json``. Each file is written atomically and existing files are kept unless
``--overwrite``, so an interrupted run resumes where it stopped. Plain Python: parsing the JSONs
takes seconds, so there is nothing to distribute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cappy_core.config import ConfigError, add_dataclass_arguments, config_from_args, to_dict


@dataclass
class PrepareConfig:
    tasks: list[str] = field(default_factory=lambda: ["all45"], metadata={
        "help": "'all45' (the paper's generative tasks), 'pretrain' (every other JSON task) or task names"})
    out: str = field(default="data/bigbench", metadata={"help": "output folder"})
    task_dir: list[str] = field(default_factory=list, metadata={
        "help": "extra folders of BIG-Bench-format tasks (<dir>/<task>/task.json); they add to / replace the cache's"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "cache holding the extracted BIG-Bench (default $CAPPY_CACHE_DIR or ~/.cache/cappy)"})
    overwrite: bool = field(default=False, metadata={"help": "rewrite files that already exist"})


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m jobs.prepare_data",
        description="Write BIG-Bench tasks as Parquet, one file per task and split, with the "
        "Hugging Face BIG-bench loader's formatting and train/validation split.",
        epilog="Examples:\n  cappy data prepare --tasks all45 --out data/bigbench\n"
        "  cappy data prepare --tasks tense word_sorting --out /tmp/bb\n"
        "  cappy data prepare --tasks tellmewhy --task-dir ~/BIG-bench/bigbench/benchmark_tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(p, PrepareConfig)
    return p


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Run the preparation; returns the manifest written to ``OUT/manifest.json``."""
    from tqdm import tqdm

    from cappy_core.data.bigbench import TooFewExamples, find_tasks, load_task, task_kind
    from cappy_core.data.records import SPLITS, read_examples, split_path, write_examples
    from cappy_core.data.source import bigbench_task_root
    from cappy_core.data.tasks import resolve_tasks

    roots = [bigbench_task_root(cfg.cache_dir)] + [Path(d).expanduser() for d in cfg.task_dir]
    for r in roots[1:]:
        if not r.is_dir():
            raise FileNotFoundError(f"--task-dir {r}: no such folder")
    located = find_tasks(roots)
    names, unavailable = resolve_tasks(cfg.tasks, located)
    out = Path(cfg.out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"tasks": {}}
    manifest["config"] = to_dict(cfg)
    written = kept = 0
    skipped: dict[str, str] = {}
    t0 = time.time()
    for name in tqdm(names, desc="preparing tasks", unit=" task", file=sys.stderr):
        paths = {s: split_path(out, name, s) for s in SPLITS}
        if not cfg.overwrite and all(p.is_file() for p in paths.values()):
            kept += len(paths)
            if name not in manifest["tasks"]:
                sizes = {s: len(read_examples(p)) for s, p in paths.items()}
                manifest["tasks"][name] = {"sizes": sizes, "source": str(located[name])}
            continue
        try:
            splits = load_task(located[name], name)
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
            "source": str(located[name]),
        }
    manifest["unavailable"] = unavailable
    manifest["skipped_too_few_examples"] = skipped
    out.mkdir(parents=True, exist_ok=True)
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(manifest_path)

    n_ex = sum(sum(manifest["tasks"][n]["sizes"].values()) for n in names if n in manifest["tasks"])
    log(f"prepared {len(names) - len(skipped)} tasks ({n_ex} examples) in {time.time() - t0:.1f}s: "
        f"{written} Parquet files written, {kept} already there, under {out}/<task>/<split>.parquet")
    for name, why in unavailable.items():
        log(f"unavailable: {why}")
    for name, why in skipped.items():
        log(f"skipped {name}: {why} (the Hugging Face loader gives no train/validation split either)")
    return manifest


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = config_from_args(PrepareConfig, args)
        prepare(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
