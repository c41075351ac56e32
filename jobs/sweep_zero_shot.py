"""The sweep's zero-shot stage (``cappy sweep --zero-shot``): one Ray task per task, each
:func:`cappy_core.selection.zero_shot.run_zero_shot` (a selector finetuned on the other tasks,
the task picked as serve would pick it), written to ``OUT/tasks/_zero_shot/<task>/result.json``
as it arrives. A result recorded for the same settings and tasks is kept; a failed task is logged
and the others go on (its rows are missing from the table, and the report says so)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from cappy_core.selection.zero_shot import ZERO_SHOT_DIR, run_zero_shot
from jobs.sweep_config import SweepConfig
from jobs.sweep_layout import SweepPlan


def finished_zero_shot(tasks_dir: str | Path, task: str, digest: str) -> bool:
    """Whether ``task``'s zero-shot result was recorded with these settings (the sweep's digest)."""
    try:
        rec = json.loads((Path(tasks_dir) / ZERO_SHOT_DIR / task / "result.json").read_text())
    except (OSError, ValueError):
        return False
    return rec.get("sweep_digest") == digest


def run_zero_shot_stage(cfg: SweepConfig, plan: SweepPlan, tasks: list[str], log: Callable[[str], None]) -> list[str]:
    """Run the zero-shot rows of every task not recorded with these settings; returns the tasks
    that failed. ``plan.settings`` are the sweep's own (the scorer init, not a shared finetune)."""
    import ray
    from tqdm import tqdm

    from jobs.log_file import init_ray

    todo = [t for t in tasks if cfg.redo or not finished_zero_shot(plan.settings.tasks_dir, t, plan.digest)]
    log(f"{len(tasks) - len(todo)} task(s) already have zero-shot rows with these settings; {len(todo)} to run "
        f"(each: a finetune on the other {len(tasks) - 1} task(s)' pairs)")
    if not todo:
        return []
    init_ray()
    remote = ray.remote(run_zero_shot).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None,
                                                max_retries=cfg.task_retries, name="run_zero_shot")
    refs = {remote.remote(t, tasks, plan.settings, plan.digest, use_gpu=cfg.gpus_per_task > 0,
                          torch_threads=cfg.torch_threads): t for t in todo}
    failed = []
    with tqdm(total=len(todo), desc="zero-shot", unit=" task", file=sys.stderr) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            task = refs[done[0]]
            try:
                rec = ray.get(done[0])
                reused = str(rec["training"].get("cache", "")).startswith("reused")
                bar.write(f"{task} zero-shot: " + ", ".join(f"{row} {v:.1f}" for row, v in _means(rec).items())
                          + (" (finetune reused from the stage cache)" if reused else ""))
            except Exception as e:  # the others go on; the report names what is missing
                failed.append(task)
                log(f"task {task}: zero-shot rows failed: {type(getattr(e, 'cause', None) or e).__name__}: "
                    f"{getattr(e, 'cause', None) or e}")
            bar.update(1)
    return failed


def _means(rec: dict) -> dict[str, float]:
    values = list(rec["validation"].values())
    return {row: sum(v[row] for v in values) / len(values) for row in (values[0] if values else {})}

