"""``cappy finetune``: finetune a (pretrained) scorer on one task's labelled pairs.

    cappy finetune --preset local --task auto_categorization
    cappy finetune --preset local --task auto_categorization --init ~/cappy_runs/pretrain-local/scorer
    ray job submit --working-dir . -- python -m jobs.finetune --preset paper --task word_sorting \\
        --samples /mnt/shared/samples

Pipeline: config → the task's *train* split (validation is the test set, never used here) →
:func:`cappy_core.labeling.rouge.build_training_pairs` rules (references 1.0, random negatives 0.0,
``--samples`` candidates with their Rouge-L labels) → held-out slice by instruction → train cut or
tiled to ``train_size`` → Ray Train (``jobs/train_scorer.py``) → the finetuned scorer and
``results.json``. The eval before training scores the *init* scorer on the same held-out pairs,
so the summary shows what finetuning changed.

Several tasks finetune concurrently on one cluster as separate jobs, each its own run name
(default ``finetune-<task>``) and resources::

    for t in word_sorting tense rephrase; do
      ray job submit --no-wait --working-dir . -- python -m jobs.finetune --preset paper --task $t
    done
"""

from __future__ import annotations

import sys
from cappy_core.config import ConfigError
from jobs.runtime import job_main
from jobs.train_scorer import FinetuneConfig, explain, run_job

JOB = "finetune"
DESCRIPTION = ("Finetune a Cappy scorer on one task's labelled pairs with Ray Train; "
               "rerun the same command to resume.")
EPILOG = """examples:
  cappy finetune --preset local --task auto_categorization
  cappy finetune --preset local --task tense --init ~/cappy_runs/pretrain-local/scorer
  ray job submit --working-dir . -- python -m jobs.finetune --preset paper --task word_sorting"""


def build_pairs(cfg: FinetuneConfig, pairs_dir: str, log=print) -> tuple[str, str | None]:
    from cappy_core.labeling.pair_mixture import build_pair_mixture, load_examples, read_samples, write_pair_files

    examples, names = load_examples([cfg.task], ["train"], cfg.examples, cfg.cache_dir, log)
    if not examples:
        raise ValueError(f"task {cfg.task!r} has no train examples: the dataset is empty")
    candidates = read_samples(cfg.samples, tasks=names, splits=["train"]) if cfg.samples else None
    log(f"examples: {len(examples)} train examples of {cfg.task}"
        + (f"; {len(candidates)} sampled candidates" if candidates is not None else ""))
    train, held = build_pair_mixture(examples, candidates, train_size=cfg.train_size,
                                     eval_size=cfg.eval_size, seed=cfg.schedule.seed)
    return write_pair_files(train, held, pairs_dir, log)


def run(cfg: FinetuneConfig, log=print) -> dict:
    if not cfg.task and not cfg.train_pairs:
        raise ConfigError("--task is required (or --train-pairs FILE)")
    data_key = {k: getattr(cfg, k) for k in ("task", "examples", "samples", "train_pairs", "eval_pairs")}
    return run_job(JOB, cfg, default_name=f"finetune-{cfg.task or 'pairs'}", data_key=data_key,
                   build_pairs=lambda pairs_dir: build_pairs(cfg, pairs_dir, log),
                   run_info={"task": cfg.task}, label=f"{JOB} {cfg.task or cfg.train_pairs}", log=log)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return job_main(FinetuneConfig, lambda cfg, _: run(cfg) and None, job=JOB, module="jobs.finetune", argv=argv, prog=prog,
                    description=DESCRIPTION, epilog=EPILOG, explain=explain)


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
