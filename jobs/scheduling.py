"""The task-timeout scheduler: Ray tasks that each yield once when they start running, then
their result, awaited as they end, each cancelled once it has *run* (not waited in the queue)
longer than a timeout. The sweep's per-task stage runs on it (:func:`jobs.sweep.run_tasks`)."""

from __future__ import annotations

import functools
import time


def wait_for_tasks(generators: dict, timeout_s: float = 0.0):
    """Yield ``(task, get_result)`` for each streaming Ray task of ``generators``
    (``{ObjectRefGenerator: task}``, each yielding once when it starts, then its result) as it
    ends. A task running longer than ``timeout_s`` (0: no limit) is cancelled with its worker
    killed (a hung task does not return on its own), and its ``get_result`` raises TimeoutError."""
    import ray

    pending, started = list(generators), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=1.0 if timeout_s else None)
        for gen in ready:
            task = generators[gen]
            if gen not in started:  # its first item: the task began running
                started[gen] = time.time()
                try:
                    ray.get(next(gen))
                except Exception as e:  # it failed before it began (its worker died, ...)
                    yield task, functools.partial(_raise, e)
                    continue
                pending.append(gen)
                continue
            ref = next(gen, None)
            yield task, functools.partial(_second_item, ref, task)
        now = time.time()
        for gen in [g for g in pending if g in started and timeout_s and now - started[g] > timeout_s]:
            ray.cancel(gen, force=True)
            pending.remove(gen)
            yield generators[gen], functools.partial(_raise, TimeoutError(
                f"task {generators[gen]} ran longer than --task-timeout-s {timeout_s:g} s and was cancelled "
                "(a rerun retries it)"))


def _raise(e: BaseException):
    raise e


def _second_item(ref, task: str) -> dict:
    import ray

    if ref is None:
        raise RuntimeError(f"task {task} ended without a result")
    return ray.get(ref)
