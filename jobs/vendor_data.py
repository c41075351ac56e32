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

from jobs.runtime import job_main


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
    check: bool = field(default=False, metadata={
        "help": "write nothing: compare the vendored files with the manifest (sha256 and records digest) and, "
                "with --from, with the records prepared from that copy now; one line per task"})


def vendored_task_lists() -> tuple[list[str], list[str]]:
    """(required, optional): the local preset's evaluation and pretraining tasks; the other generative tasks."""
    from cappy_core.data.tasks import GENERATIVE_45, LOCAL_PRETRAIN_TASKS, LOCAL_TASKS, UNAVAILABLE_OFFLINE

    required = list(dict.fromkeys([*LOCAL_TASKS, *LOCAL_PRETRAIN_TASKS]))
    optional = [t for t in GENERATIVE_45 if t not in required and t not in UNAVAILABLE_OFFLINE]
    return required, optional


def check(cfg: VendorConfig) -> int:
    """``--check``: 0 when every vendored task agrees with the manifest (and the copy), else 1."""
    import tempfile
    from pathlib import Path

    from cappy_core.data.download import read_task_files, write_task_tree
    from cappy_core.data.release import MANIFEST_NAME, load_manifest, vendored_dir
    from cappy_core.data.vendor import check_vendored

    folder = Path(cfg.out) if cfg.out else vendored_dir()
    manifest = load_manifest(folder / MANIFEST_NAME)
    if not manifest.vendored:
        print(f"{folder}: no vendored tasks (no manifest, or it lists none)")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        root = write_task_tree(read_task_files(cfg.from_path)[0], Path(tmp)) if cfg.from_path else None
        problems = check_vendored(manifest, folder, root)
    for task, entry in sorted(manifest.vendored.items()):
        state = problems.get(task, "same records" + (" as prepared from the copy" if root else " as the manifest"))
        print(f"{task}: {entry['records_sha256'][:16]} {state}")
    print(f"{len(manifest.vendored) - len(problems)} of {len(manifest.vendored)} vendored tasks agree")
    return 1 if problems else 0


def run(cfg: VendorConfig) -> int | None:
    from cappy_core.config import ConfigError
    from cappy_core.data.release import vendored_dir
    from cappy_core.data.vendor import vendor_release

    if cfg.check:
        return check(cfg)
    if not cfg.from_path:
        raise ConfigError("give --from PATH: a copy of the BIG-Bench 1.0.0 release (archive or folder)")
    required, optional = vendored_task_lists()
    vendor_release(cfg.from_path, cfg.out or vendored_dir(), required=required, optional=optional,
                   max_bytes=int(cfg.max_mib * 2**20), revision=cfg.revision)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return job_main(VendorConfig, lambda cfg, _: run(cfg), job="vendor_data", module="jobs.vendor_data", argv=argv,
                    prog=prog, description="Write the BIG-Bench records the package ships (one zstd Parquet file "
                    "per task) and the release manifest (every task.json with its sha256, git blob id and example "
                    "count) from a copy of the release; a rerun writes the same bytes. Nothing in the copy is run.")


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
