"""``cappy data download``: fetch the bigbench==1.0.0 source archive once and extract its tasks.

    cappy data download                      # no-op when the cache is complete
    cappy data download --archive bigbench-1.0.0.tar.gz   # machines without PyPI access

The only step of the project that uses the network (pip, from PyPI). Everything else reads the
extracted cache (``$CAPPY_CACHE_DIR``, default ``~/.cache/cappy``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from cappy_core.config import USER_ERRORS, CacheOptions, build_parser, config_from_args, run_main


@dataclass
class DownloadConfig(CacheOptions):
    archive: Optional[str] = field(default=None, metadata={
        "help": "use this local bigbench-1.0.0.tar.gz instead of downloading"})
    force: bool = field(default=False, metadata={"help": "download and extract again even if cached"})
    keep_archive: bool = field(default=True, metadata={
        "help": "keep the 358 MB archive after extracting (a later --force needs no network)"})


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(
        DownloadConfig, prog=prog or "python -m jobs.download_data",
        description="Download the bigbench==1.0.0 source archive from PyPI (pip download "
                    "--no-binary), verify its sha256 and extract only benchmark_tasks/**/task.json into "
                    "the cache. Does nothing when the cache is already complete.")
    args = parser.parse_args(argv)

    def body() -> None:
        from cappy_core.data.source import download_bigbench

        cfg = config_from_args(DownloadConfig, args)
        root = download_bigbench(cfg.cache_dir, force=cfg.force, archive=cfg.archive,
                                 keep_archive=cfg.keep_archive)
        print(f"BIG-Bench tasks ready: {root}")

    # RuntimeError: pip could not fetch the archive (its message says what to do instead).
    return run_main(body, user_errors=USER_ERRORS + (RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
