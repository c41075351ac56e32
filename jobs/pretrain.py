"""``cappy pretrain``: regression-pretrain the scorer on BIG-Bench tasks outside the 45.

    cappy pretrain --preset local
    cappy pretrain --tasks pretrain --examples data/bigbench-pretrain --samples data/samples \\
        --init roberta-large --num-workers 8 --use-gpu
    ray job submit --working-dir . -- python -m jobs.pretrain --preset cluster

Pipeline: config → pair mixture (multiple-choice tasks give exact 1/0 labels; generative ones
references, random negatives and, with ``--samples``, Rouge-L-labelled candidates; capped per
task; held-out slice by instruction; see ``cappy_core/labeling/pair_mixture.py``) written as Parquet under
the run → Ray Train (``jobs/train_scorer.py``) → the final scorer (a Hugging Face folder) and
``results.json`` with the resolved config. Rerunning the same command resumes the run from its
last checkpoint; ``--fresh`` starts over.

Examples come from ``--examples DIR`` (``cappy data prepare --tasks pretrain --out DIR``) or,
without it, straight from the BIG-Bench tasks on this machine (vendored or downloaded; fast for a few tasks; ~5 minutes for all of them).
"""

from __future__ import annotations

import sys
from cappy_core.config import ConfigError
from jobs.runtime import job_main
from jobs.train_scorer import PretrainConfig, explain, run_job

JOB = "pretrain"
DESCRIPTION = ("Regression-pretrain a Cappy scorer on BIG-Bench tasks outside the 45 evaluation tasks "
               "with Ray Train; rerun the same command to resume.")
EPILOG = """examples:
  cappy pretrain --preset local
  cappy pretrain --preset local --num-workers 1 --name pretrain-1w
  ray job submit --working-dir . -- python -m jobs.pretrain --preset cluster"""


def build_pairs(cfg: PretrainConfig, pairs_dir: str, log=print) -> tuple[str, str | None]:
    from cappy_core.data.tasks import GENERATIVE_45
    from cappy_core.labeling.pair_mixture import build_pair_mixture, load_examples, read_samples, write_pair_files

    def refuse(tasks):
        if tasks:
            raise ConfigError(f"{sorted(tasks)[:5]} {'is' if len(tasks) == 1 else 'are'} among the 45 evaluation "
                              "tasks; pretraining on them would leak the evaluation data (use `cappy finetune`)")

    refuse({t for t in cfg.tasks if t in GENERATIVE_45 or t == "all45"})
    examples, names = load_examples(cfg.tasks, cfg.splits, cfg.examples, cfg.cache_dir, log)
    refuse(set(names) & set(GENERATIVE_45))
    if not examples:
        raise ValueError(f"no examples in tasks {cfg.tasks} (splits {cfg.splits}): the dataset is empty")
    candidates = read_samples(cfg.samples, tasks=names, splits=cfg.splits) if cfg.samples else None
    log(f"examples: {len(examples)} from {len(names)} task(s)"
        + (f"; {len(candidates)} sampled candidates" if candidates is not None else ""))
    train, held = build_pair_mixture(examples, candidates, train_size=cfg.train_size,
                                     eval_size=cfg.eval_size, max_pairs_per_task=cfg.max_pairs_per_task,
                                     max_wrong_choices=cfg.max_wrong_choices, seed=cfg.schedule.seed)
    return write_pair_files(train, held, pairs_dir, log)


def run(cfg: PretrainConfig, log=print) -> dict:
    data_key = {k: getattr(cfg, k) for k in ("tasks", "splits", "examples", "samples", "max_pairs_per_task",
                                              "max_wrong_choices", "train_pairs", "eval_pairs")}
    return run_job(JOB, cfg, default_name="pretrain", data_key=data_key,
                   build_pairs=lambda pairs_dir: build_pairs(cfg, pairs_dir, log),
                   run_info={"tasks": cfg.tasks}, label=JOB, log=log)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return job_main(PretrainConfig, lambda cfg, _: run(cfg) and None, job=JOB, module="jobs.pretrain", argv=argv, prog=prog,
                    description=DESCRIPTION, epilog=EPILOG, explain=explain)


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
