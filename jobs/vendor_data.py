"""``cappy data vendor --from PATH``: write the BIG-Bench examples the package ships, from a copy of the release.

    cappy data vendor --from bigbench-1.0.0.tar.gz
    cappy data vendor --from ~/BIG-bench --revision COMMIT --out /tmp/vendored

For the project's maintainers: it reads every ``benchmark_tasks/**/task.json`` of the copy (a
folder or an archive; nothing in it is run) and writes ``manifest.json`` (every file with its
sha256, git blob id and example count) and one zstd Parquet file per vendored task, by default
into the package (``cappy_core/data/vendored``). Vendored: the local preset's six evaluation
tasks and ten pretraining tasks (required), then the rest of the paper's generative tasks while
the set stays within ``--max-mib``. A rerun on the same copy writes the same bytes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from cappy_core.config import build_parser, config_from_args, run_main


@dataclass
class VendorConfig:
    from_path: str = field(default="", metadata={
        "aliases": ("--from",), "metavar": "PATH",
        "help": "the copy: bigbench-1.0.0.tar.gz, a tarball or zip, or a folder of task files"})
    out: Optional[str] = field(default=None, metadata={
        "help": "output folder (default: the package's cappy_core/data/vendored)"})
    max_mib: float = field(default=64.0, metadata={"help": "budget for the vendored Parquet files, MiB"})
    revision: Optional[str] = field(default=None, metadata={
        "help": "the google/BIG-bench commit these files are, recorded for the GitHub download sources"})


def vendored_task_lists() -> tuple[list[str], list[str]]:
    """(required, optional): the local preset's evaluation and pretraining tasks; the other generative tasks."""
    from cappy_core.data.tasks import GENERATIVE_45, LOCAL_PRETRAIN_TASKS, LOCAL_TASKS, UNAVAILABLE_OFFLINE

    required = list(dict.fromkeys([*LOCAL_TASKS, *LOCAL_PRETRAIN_TASKS]))
    optional = [t for t in GENERATIVE_45 if t not in required and t not in UNAVAILABLE_OFFLINE]
    return required, optional


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(VendorConfig, prog=prog or "python -m jobs.vendor_data",
                          description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    args = parser.parse_args(argv)

    def body() -> None:
        from cappy_core.config import ConfigError
        from cappy_core.data.release import vendored_dir
        from cappy_core.data.vendor import vendor_release

        cfg = config_from_args(VendorConfig, args)
        if not cfg.from_path:
            raise ConfigError("give --from PATH: a copy of the BIG-Bench 1.0.0 release (archive or folder)")
        required, optional = vendored_task_lists()
        vendor_release(cfg.from_path, cfg.out or vendored_dir(), required=required, optional=optional,
                       max_bytes=int(cfg.max_mib * 2**20), revision=cfg.revision)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
