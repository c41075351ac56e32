"""The sweep's bookkeeping of finished tasks: each task's result record is
``tasks_dir/<task>.json`` (:func:`result_record`, a failure with its error too), and a task counts
as finished when its record says ``ok`` and carries the digest (:func:`key_digest`) of the
settings that define its result (:func:`finished`), so a rerun computes only what is missing,
failed, or was computed with other settings. Tested in ``tests/jobs/test_sweep.py``."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

#: Raised when a task's result is computed differently: every earlier result is then recomputed.
RESULT_VERSION = 2


def key_digest(key: Mapping[str, Any]) -> str:
    """A short digest of the settings that define a task's result (the stage cache's digest)."""
    from cappy_core.stage_cache import digest

    return digest(key)


def result_path(tasks_dir: str | Path, task: str) -> Path:
    return Path(tasks_dir) / f"{task}.json"


def read_result(tasks_dir: str | Path, task: str) -> dict:
    """The task's result record, or ``{"task": task, "status": "missing"}``; a file that is not a
    record is an error naming it."""
    path = result_path(tasks_dir, task)
    if not path.is_file():
        return {"task": task, "status": "missing"}
    try:
        rec = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not a task result record ({e}); delete it to recompute the task") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: not a task result record (a JSON {type(rec).__name__}); delete it to recompute the task")
    return rec


def result_record(task: str, key: Mapping[str, Any], config: Mapping[str, Any],
                  result: Callable[[], Mapping[str, Any]], started: float) -> dict[str, Any]:
    """The task's result record: the sweep's bookkeeping (``key`` and its digest, the resolved
    ``config``, the wall time since ``started`` (``time.time()``)), then ``status: ok`` and what
    ``result()`` returns, or ``status: failed`` with the error ``result()`` raised (a wrapped
    error's ``cause`` when it has one, as Ray's task errors do) and the end of its traceback."""
    rec: dict[str, Any] = {"task": task, "key_digest": key_digest(key), "key": dict(key), "config": dict(config),
                           "wall_s": None}
    try:
        rec.update(status="ok", **result())
    except Exception as e:
        cause = getattr(e, "cause", None) or e
        rec.update(status="failed", error=f"{type(cause).__name__}: {cause}",
                   traceback="".join(traceback.format_exception(e))[-4000:])
    rec["wall_s"] = round(time.time() - started, 1)
    return rec


def finished(tasks_dir: str | Path, task: str, digest: str) -> dict | None:
    """The task's earlier result if it succeeded with the same settings, else None."""
    try:
        rec = json.loads(result_path(tasks_dir, task).read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("status") == "ok" and rec.get("key_digest") == digest else None


def stage_cache_line(stage_cache: str, records: Mapping[str, Mapping[str, Any]], ran: list[str]) -> str:
    """What the tasks that ``ran`` took from the stage cache instead of computing: their finetunes
    (``training.cache`` says ``reused KEY``) and scored tables (``scores_cache``, their zero-shot
    rows' ones included), as the sweep logs it. Tasks an earlier run finished are not counted."""
    reused = [t for t in ran if str((records[t].get("training") or {}).get("cache", "")).startswith("reused")]
    counts = [c for t in ran for c in (records[t].get("scores_cache"), (records[t].get("zero_shot") or {})
                                       .get("scores_cache")) if isinstance(c, Mapping)]
    tables = sum(c.get("reused", 0) for c in counts), sum(c.get("reused", 0) + c.get("stored", 0) for c in counts)
    return (f"stage cache {stage_cache}: {len(reused)} of {len(ran)} task finetune(s) reused"
            + (f" ({', '.join(reused)})" if reused else "") + f"; {tables[0]} of {tables[1]} scored table(s) reused")
