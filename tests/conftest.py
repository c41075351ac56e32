"""Shared fixtures. Tests run on CPU, offline, and start Ray at most once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"

# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def bigbench_root() -> Path:
    """The extracted BIG-Bench tasks. Missing cache is a failure, not a skip: the README's test
    command runs `cappy data download` first, so a missing cache means a broken setup."""
    from cappy_core.data.source import BigBenchNotFound, bigbench_task_root

    try:
        return bigbench_task_root()
    except BigBenchNotFound as e:
        pytest.fail(str(e), pytrace=False)
