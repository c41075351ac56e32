"""``cappy data download``: BIG-Bench task files the package does not ship, verified, into the cache.

    cappy data download                                   # every task file the release manifest lists
    cappy data download --tasks pretrain                  # the paper preset's pretraining mixture
    cappy data download --from bigbench-1.0.0.tar.gz      # a local copy: the sdist, a tarball, a folder
    cappy data download --tasks tense --revision COMMIT   # GitHub at a commit you name

Sources, in order, each for what the ones before it did not deliver: ``--from PATH``; the raw
files of github.com/google/BIG-bench at the pinned revision; the same repository's tarball. Every
file is checked against the release manifest (sha256) before it is written; a file that differs is
refused and named with both hashes. Nothing from an archive is ever run. The six evaluation tasks
of the local preset and its pretraining tasks ship with the package when this build vendored them
(``cappy data vendor``); those need no download.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from cappy_core.config import CacheOptions
from jobs.runtime import job_main


@dataclass
class DownloadConfig(CacheOptions):
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "task names, 'pretrain' (the release's tasks outside the 45) or 'all45'; default: every file the "
                "release manifest lists that the package does not ship"})
    from_path: Optional[str] = field(default=None, metadata={
        "aliases": ("--from",), "metavar": "PATH", "help": "a local copy to take the files from first: bigbench-1.0.0.tar.gz (the PyPI sdist, sha256-checked), "
                "a GitHub tarball or zip, or a folder (benchmark_tasks/ or a checkout holding bigbench/benchmark_tasks/)"})
    revision: Optional[str] = field(default=None, metadata={
        "help": "google/BIG-bench commit for the GitHub sources (default: the one the manifest pins)"})
    offline: bool = field(default=False, metadata={"help": "use only --from; no network source"})
    timeout_s: float = field(default=30.0, metadata={"help": "a network source silent this long has failed"})


EPILOG = """Examples:
  cappy data download
  cappy data download --from ~/Downloads/bigbench-1.0.0.tar.gz
  cappy data download --tasks pretrain
  cappy data download --tasks word_sorting tense --from ~/BIG-bench --offline"""


DESCRIPTION = ("Fetch BIG-Bench 1.0.0 task files the package does not ship into the cache, each checked "
               "against the release manifest; tries --from PATH, then GitHub's raw files at the pinned "
               "revision, then its tarball. Files already in the cache are kept.")


def run(cfg: DownloadConfig) -> None:
    from cappy_core.data.catalog import TaskCatalog
    from cappy_core.data.download import download_tasks

    catalog = TaskCatalog.open(cfg.cache_dir)
    if cfg.tasks:
        names, unavailable = catalog.resolve(cfg.tasks, require=False)
        for why in unavailable.values():
            print(f"unavailable: {why}", file=sys.stderr)
        wanted: Optional[list[str]] = [t for t in names if t not in catalog]
        if not wanted:
            print(f"all {len(names)} tasks are on this machine already; nothing to download")
            return
    else:
        vendored = set(catalog.manifest.vendored)
        wanted = [t for t in catalog.manifest.tasks if t not in vendored] if catalog.manifest.files else None
    root = download_tasks(wanted, cache_dir=cfg.cache_dir, from_path=cfg.from_path, revision=cfg.revision,
                          network=not cfg.offline, timeout=cfg.timeout_s)
    print(f"BIG-Bench task files ready: {root}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return job_main(DownloadConfig, lambda cfg, _: run(cfg), job="download_data", module="jobs.download_data",
                    argv=argv, prog=prog, epilog=EPILOG, description=DESCRIPTION)


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
