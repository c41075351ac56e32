"""Fault injection for tests and drills: the one place that reads the fault variables.

Production code asks here whether to fail; nothing else reads these variables. Both are read in
the *driver* (the process the user starts) and passed on explicitly, so the Ray workers and
tasks that act on them need no environment of their own.

* ``CAPPY_FAIL_AT_UPDATE=K``: a scorer training run (``cappy pretrain`` / ``cappy finetune``)
  raises right after optimizer update ``K`` in an attempt that did not start from a checkpoint,
  so Ray Train restarts the worker group and resumes (``--fail-at-update K`` does the same).
* ``CAPPY_SWEEP_FAIL_TASKS=a,b``: the sweep's Ray task for each named task raises before doing
  any work, so the sweep records it as failed, finishes the others, and a rerun retries it.
* ``CAPPY_SWEEP_HANG_TASKS=a,b``: the sweep's Ray task for each named task hangs (sleeps) before
  doing any work, so ``--task-timeout-s`` cancels it and records it as failed.
* ``CAPPY_SWEEP_DIE_TASKS=a,b``: the sweep's Ray task for each named task kills its own worker
  process (as the OOM killer would) before doing any work, in every attempt, so Ray retries it
  ``--task-retries`` times and the sweep records it as failed.

Tested in ``tests/jobs/test_train_scorer.py`` and ``tests/jobs/test_sweep.py``.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

FAIL_AT_UPDATE_ENV = "CAPPY_FAIL_AT_UPDATE"
SWEEP_FAIL_TASKS_ENV = "CAPPY_SWEEP_FAIL_TASKS"
SWEEP_HANG_TASKS_ENV = "CAPPY_SWEEP_HANG_TASKS"
SWEEP_DIE_TASKS_ENV = "CAPPY_SWEEP_DIE_TASKS"


class InjectedFault(RuntimeError):
    """Raised where a test asked for a failure."""


def fail_at_update(explicit: Optional[int] = None) -> Optional[int]:
    """The update after which training must fail: ``explicit`` if given, else the variable."""
    if explicit is not None:
        return explicit
    env = os.environ.get(FAIL_AT_UPDATE_ENV)
    if not env:
        return None
    try:
        return int(env)
    except ValueError:
        raise ValueError(f"{FAIL_AT_UPDATE_ENV}={env!r} is not an integer") from None


def _tasks(env: str) -> list[str]:
    return [t for t in os.environ.get(env, "").split(",") if t.strip()]


def sweep_faults() -> tuple[list[str], list[str], list[str]]:
    """``(fail, hang, die)``: the sweep tasks that must raise, hang, or kill their worker (empty
    unless the variables are set); the driver reads them and passes them to its Ray tasks."""
    return _tasks(SWEEP_FAIL_TASKS_ENV), _tasks(SWEEP_HANG_TASKS_ENV), _tasks(SWEEP_DIE_TASKS_ENV)


def check_update(update: int, fail_at: Optional[int]) -> None:
    if fail_at is not None and update == fail_at:
        raise InjectedFault(f"injected fault after update {update} ({FAIL_AT_UPDATE_ENV} / fail_at_update)")


def check_task(task: str, fail_tasks: Sequence[str], hang_tasks: Sequence[str] = (),
               die_tasks: Sequence[str] = ()) -> None:
    if task in die_tasks:
        os._exit(1)  # no cleanup, no exception: the worker process is gone
    if task in fail_tasks:
        raise InjectedFault(f"injected failure for task {task} ({SWEEP_FAIL_TASKS_ENV})")
    while task in hang_tasks:  # until cancelled
        time.sleep(1)
