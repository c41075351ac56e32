"""``cappy dev-report``: the dev figures a sweep's settings are chosen on, and two sweeps compared on them.

    cappy dev-report --out ~/cappy_runs/sweep-local                    # the dev table of one sweep
    cappy dev-report --out ~/cappy_runs/sweep-smol --against ~/cappy_runs/sweep-smol-plain
                                                                       # two settings, paired on dev

Dev is the last ``--dev-examples-per-task`` sampled *train* instructions of each task, held out of
finetuning (the fused selector's weights are fitted there). The report reads ``OUT/tasks/*.json``
only: validation is never read, so a choice made from it (a prompt format, a loss, a number of
epochs) was not made on the final table's data. Paired intervals resample dev instructions within
each task (2,000 resamples, seeded): the same outputs print the same report.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from cappy_core.config import SettingError
from jobs.runtime import job_main


@dataclass
class DevReportConfig:
    out: Optional[str] = field(default=None, metadata={"metavar": "OUT", "help": "a `cappy sweep` output folder"})
    against: Optional[str] = field(default=None, metadata={
        "metavar": "OUT", "help": "a second sweep output: each method's dev Rouge-L in --out minus in this one, on "
                                  "the dev instructions both hold out, with paired 95%% intervals"})


EPILOG = """Examples:
  cappy dev-report --out ~/cappy_runs/sweep-local
  cappy sweep --preset smol --sampling.prompt-format plain --out ~/cappy_runs/smol-plain
  cappy dev-report --out ~/cappy_runs/sweep-smol --against ~/cappy_runs/smol-plain"""


def run(cfg: DevReportConfig) -> None:
    from cappy_core.selection.dev_report import compare_dev, dev_records, dev_table

    if not cfg.out:
        raise SettingError("out", "give the sweep output to report on")
    records, without = dev_records(cfg.out)
    print(f"# dev report: {cfg.out}\n\n{dev_table(records)['markdown']}")
    if without:
        print(f"\nNot in the table (finished without dev picks recorded: rerun them): {', '.join(without)}")
    if cfg.against:
        other, _ = dev_records(cfg.against)
        print(f"\n## against {cfg.against}\n\n{compare_dev(records, other, names=('out', 'against'))['markdown']}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return job_main(DevReportConfig, lambda cfg, _: run(cfg), job="dev_report", module="jobs.dev_report", argv=argv,
                    prog=prog, epilog=EPILOG,
                    description="Print a sweep's dev table (held-out train instructions; validation is not read) "
                                "with each selector's paired interval against the best dev baseline, and with "
                                "--against, every method's dev difference between two sweeps.")


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
