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


@pytest.fixture(scope="session")
def ray_address() -> str:
    """One local Ray for the whole session (2 CPUs, no dashboard, loopback only, no token
    auth). Jobs run as subprocesses connect to it through ``RAY_ADDRESS`` instead of starting
    their own cluster. A stalled Ray Data pipeline fails instead of hanging."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                   object_store_memory=1_500_000_000, _node_ip_address="127.0.0.1")
    address = ctx.address_info["gcs_address"]
    os.environ["RAY_ADDRESS"] = address
    yield address
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
