"""What every job does around its own work: ``main()`` (flags from its config dataclass, its
presets, one ``error:`` line and exit status 2 for bad input: :func:`job_main`), and one run per
output at a time with its log file beside the output (:func:`job_output`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any, Callable, Iterator, Optional

from cappy_core.config import build_parser, resolve_and_run, run_main, to_dict
from jobs.cli import presets


def job_main(cls: type, body: Callable[[Any, argparse.Namespace], Optional[int]], *, job: str, module: str,
             argv: list[str] | None, prog: str | None, description: str, epilog: str = "",
             explain: Callable[[BaseException], Optional[tuple[int, str]]] | None = None,
             add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """A job's ``main(argv, prog)``: parse ``argv`` with ``cls``'s flags (and the presets
    ``jobs/configs/<job>_*.yaml``, when it ships some), then ``body(config, args)`` under
    :func:`cappy_core.config.run_main` (``explain``: its hook for a failure of the job's own kind).
    ``add_arguments`` adds flags that are not settings (``--dry-run``); ``body`` reads them from ``args``."""
    shipped = presets(job)
    parser = build_parser(cls, prog=prog or f"python -m {module}", description=description, epilog=epilog,
                          presets=shipped or None, argv=sys.argv[1:] if argv is None else argv)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    return run_main(lambda: resolve_and_run(cls, args, shipped, lambda cfg: body(cfg, args)), explain=explain)


@contextlib.contextmanager
def job_output(target: str, flag: str, holder: str, job: str, config: Any, log: Callable[[str], None] = print,
               cache_dir: str | None = None, logger: logging.Logger | None = None) -> Iterator[tuple[str, Callable]]:
    """One run per output: ``target`` (a folder or a URI, named ``flag`` in errors) is locked for
    ``holder`` (a URI: staged in a local folder, uploaded as the job syncs and at the end), and the
    job's log file is written under it. Yields ``(local folder, log)``; the resolved ``config`` is
    the log file's first line (at debug)."""
    from cappy_core.remote import locked_output
    from jobs.log_file import log_file

    with locked_output(target, flag, holder, cache_dir=cache_dir, log=log) as local, \
            log_file(local, job, log) as file_log:
        (logger or logging.getLogger(f"jobs.{job}")).debug("config: %s", json.dumps(to_dict(config)))
        yield local, file_log
