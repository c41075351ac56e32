"""The sweep's sample + label stage: ``cappy sample`` per split into the plan's candidates folder,
which lives in the stage cache (:func:`jobs.sweep_layout.candidates_dir`) and is linked from
``OUT/candidates``; a task's candidates there are reused only for the examples they were sampled
from. Tested in ``tests/jobs/test_sweep.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from cappy_core.io import write_json
from jobs.sweep_config import SweepConfig
from jobs.sweep_layout import SweepPlan


def sample(cfg: SweepConfig, plan: SweepPlan, out: Path, log) -> None:
    """Candidates for the plan's splits (train: finetuning and dev; validation: evaluation) of its
    sampled tasks, one ``cappy sample`` output per split under the plan's candidates folder (one
    folder per sampling settings: a changed setting samples anew there, instead of being refused)."""
    from jobs.sample_label import SampleConfig, run as run_sample

    cands = Path(plan.settings.candidates_dir)
    link_candidates(out, cands, log)
    for split, cap in plan.splits:
        keep_matching_examples(cands / split, plan.sampled, out / "data", split, log)
        log(f"-- {split} split")
        run_sample(SampleConfig(
            tasks=plan.sampled, splits=[split], data=str(out / "data"), out=str(Path(plan.settings.candidates_dir) / split),
            generator=plan.generator, backend=cfg.backend, sampling=cfg.sampling, max_examples_per_task=cap), log=log)


def link_candidates(out: Path, cands: Path, log) -> None:
    """Candidates in the stage cache: ``OUT/candidates/<folder>`` links to them, and they record
    OUT as their user (:func:`~cappy_core.stage_cache.mark_user`); says whether any are there to reuse."""
    from cappy_core.stage_cache import mark_user

    done = sum(1 for _ in cands.glob("*/*/*/part-*.done.json"))
    if out in cands.parents:
        return
    log(f"candidates: {'reuse' if done else 'sample into'} the stage cache's {cands}"
        + (f" ({done} finished shard(s) there)" if done else ""))
    link = out / "candidates" / cands.name
    if not link.exists() and not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(cands, target_is_directory=True)
    mark_user(cands, out)  # marks them used; `cappy cache prune` keeps them while this sweep runs


def keep_matching_examples(split_dir: Path, tasks: list[str], data: Path, split: str, log) -> None:
    """A task's candidates are reused only for the examples they were sampled from: each task's
    folder records its examples' fingerprint; a task whose examples changed is sampled anew."""
    import shutil

    from cappy_core.stage_cache import table_fingerprint
    from jobs.sweep_layout import EXAMPLES_RECORD

    for task in tasks:
        source = data / task / f"{split}.parquet"
        if not source.is_file():
            continue
        fingerprint, record = table_fingerprint(source), split_dir / task / EXAMPLES_RECORD
        if record.is_file() and json.loads(record.read_text()).get("examples") != fingerprint:
            log(f"{task} {split}: its examples changed since its candidates in {split_dir} were sampled: sampling anew")
            shutil.rmtree(split_dir / task)
        if not record.is_file():
            write_json(record, {"examples": fingerprint, "source": str(source)})
