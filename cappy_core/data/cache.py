"""The cache folder: downloaded BIG-Bench task files, the embedded generator, the pretrained scorer.

``$CAPPY_CACHE_DIR``, default ``~/.cache/cappy``. BIG-Bench files a download verified
(:mod:`cappy_core.data.download`) sit under::

    bigbench-1.0.0/
      benchmark_tasks/<task>/task.json, benchmark_tasks/<task>/<subtask>/task.json
      reference_code/json_task.py, reference_code/bigbench_bridge.py   (from the sdist; tests only)

A file is written there only after its sha256 matched the release manifest, one file at a time,
so whatever the folder holds is the release's.

Tested in ``tests/core/test_bigbench_data.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cappy_core.data.release import BIGBENCH_VERSION


class BigBenchNotFound(FileNotFoundError):
    """No source holds the tasks asked for; the message says how to get them."""


def default_cache_dir() -> Path:
    """``$CAPPY_CACHE_DIR`` or ``~/.cache/cappy``."""
    env = os.environ.get("CAPPY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cappy"


def bigbench_dir(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"bigbench-{BIGBENCH_VERSION}"
