"""``python -m jobs.bench.serve``: the flags, the run, its targets checked, ONE JSON line on stdout
(Ray's own notes go to stderr) and exit status 1 when a target is missed."""

from __future__ import annotations

import argparse
import json
import sys

from cappy_core.config import add_dataclass_arguments, config_from_args
from jobs.bench import serve as package
from jobs.bench.serve.config import ServeBenchConfig, log
from jobs.bench.serve.runner import run
from jobs.bench.serve.targets import check_targets


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m jobs.bench.serve",
                                     description=package.__doc__.splitlines()[0])
    add_dataclass_arguments(parser, ServeBenchConfig)
    cfg = config_from_args(ServeBenchConfig, parser.parse_args(argv))
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray prints worker/raylet notes to stdout: keep it for the JSON
    try:
        result = run(cfg)
    finally:
        sys.stdout = stdout
    result["targets"] = check_targets(result)
    result["failed_targets"] = sorted(k for k, ok in result["targets"].items() if not ok)
    print(json.dumps(result))
    if result["failed_targets"]:
        log(f"targets missed: {', '.join(result['failed_targets'])}")
        return 1
    return 0


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
