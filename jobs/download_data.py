"""``cappy data download``: fetch the bigbench==1.0.0 source archive once and extract its tasks.

    cappy data download                      # no-op when the cache is complete
    cappy data download --archive bigbench-1.0.0.tar.gz   # machines without PyPI access

The only step of the project that uses the network (pip, from PyPI). Everything else reads the
extracted cache (``$CAPPY_CACHE_DIR``, default ``~/.cache/cappy``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Optional

from cappy_core.config import ConfigError, add_dataclass_arguments, config_from_args


@dataclass
class DownloadConfig:
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "cache folder (default $CAPPY_CACHE_DIR or ~/.cache/cappy)"})
    archive: Optional[str] = field(default=None, metadata={
        "help": "use this local bigbench-1.0.0.tar.gz instead of downloading"})
    force: bool = field(default=False, metadata={"help": "download and extract again even if cached"})
    keep_archive: bool = field(default=True, metadata={
        "help": "keep the 358 MB archive after extracting (a later --force needs no network)"})


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog or "python -m jobs.download_data",
        description="Download the bigbench==1.0.0 source archive from PyPI (pip download "
        "--no-binary), verify its sha256 and extract only benchmark_tasks/**/task.json into the "
        "cache. Does nothing when the cache is already complete.",
    )
    add_dataclass_arguments(p, DownloadConfig)
    args = p.parse_args(argv)
    from cappy_core.data.source import BigBenchNotFound, CorruptArchive, download_bigbench

    try:
        cfg = config_from_args(DownloadConfig, args)
        root = download_bigbench(cfg.cache_dir, force=cfg.force, archive=cfg.archive,
                                 keep_archive=cfg.keep_archive)
    except (ConfigError, BigBenchNotFound, CorruptArchive, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"BIG-Bench tasks ready: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
