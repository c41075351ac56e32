"""``cappy data prepare``: BIG-Bench tasks → Parquet per task and split.

    cappy data prepare --tasks all45 --out data/bigbench
    ray job submit --working-dir . -- python -m jobs.prepare_data --tasks all45 --out /mnt/shared/bb

Reads the BIG-Bench tasks on this machine (vendored with the package, or ``cappy data download``ed) plus optional ``--task-dir``
folders, and writes ``OUT/<task>/{train,validation}.parquet`` (schema: README, "Data formats") and
``OUT/manifest.json`` (:func:`cappy_core.data.prepare.prepare_tasks`). Each file is written
atomically and existing files are kept unless ``--overwrite``, so an interrupted run resumes where
it stopped. Plain Python: parsing the JSONs takes seconds, so there is nothing to distribute.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from cappy_core.config import CacheOptions
from jobs.runtime import job_main


@dataclass
class PrepareConfig(CacheOptions):
    tasks: list[str] = field(default_factory=lambda: ["all45"], metadata={
        "help": "'all45' (the paper's generative tasks), 'pretrain' (every other JSON task) or task names"})
    out: str = field(default="data/bigbench", metadata={"help": "output folder"})
    task_dir: list[str] = field(default_factory=list, metadata={
        "help": "extra folders of BIG-Bench-format tasks (<dir>/<task>/task.json); they add to / replace the cache's"})
    overwrite: bool = field(default=False, metadata={"help": "rewrite files that already exist"})


EPILOG = """Examples:
  cappy data prepare --tasks all45 --out data/bigbench
  cappy data prepare --tasks tense word_sorting --out /tmp/bb
  cappy data prepare --tasks tellmewhy --task-dir ~/BIG-bench/bigbench/benchmark_tasks"""


def run(cfg: PrepareConfig) -> None:
    from cappy_core.data.prepare import prepare_tasks

    prepare_tasks(cfg.tasks, cfg.out, task_dirs=cfg.task_dir, cache_dir=cfg.cache_dir, overwrite=cfg.overwrite)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return job_main(PrepareConfig, lambda cfg, _: run(cfg), job="prepare_data", module="jobs.prepare_data",
                    argv=argv, prog=prog, epilog=EPILOG,
                    description="Write BIG-Bench tasks as Parquet, one file per task and split, with the "
                                "Hugging Face BIG-bench loader's formatting and train/validation split.")


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
