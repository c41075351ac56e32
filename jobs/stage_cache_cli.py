"""``cappy cache list`` and ``cappy cache prune``: what the stage cache holds, and freeing it.

    cappy cache list
    cappy cache prune --max-size 20G --dry-run
    cappy cache prune --older-than 14

The stage cache (``<cache>/stages``: ``--cache-dir``, ``$CAPPY_CACHE_DIR`` or ``~/.cache/cappy``)
keeps each sweep's sampled candidates (``sampling/``), every finetuned scorer (``finetune/``,
90 MB for MiniLM, 1.4 GB for RoBERTa-large) and every scored table (``scores/``, one float per
candidate) under a digest of their inputs (:mod:`cappy_core.stage_cache`); it only grows. ``prune`` removes the least recently used entries
first; it never removes one a running sweep reads, nor one used in the last 10 minutes. A removed
entry is only recomputed: a later sweep that needs it samples, finetunes or scores again. An old sweep
folder whose ``candidates/`` linked to removed candidates keeps its tables; rerunning it samples anew.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from cappy_core.config import CacheOptions, SettingError
from jobs.runtime import job_main

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``500M``, ``20G``, ``1.5T``, ``0`` (bytes; K/M/G/T are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise SettingError("max_size", f"{text!r} is not a size (e.g. 500M, 20G, 1.5T)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} T"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


@dataclass
class CacheListConfig(CacheOptions):
    pass


@dataclass
class CachePruneConfig(CacheOptions):
    older_than: Optional[float] = field(default=None, metadata={
        "metavar": "DAYS", "help": "remove entries not used for this many days"})
    max_size: Optional[str] = field(default=None, metadata={
        "metavar": "SIZE", "help": "then remove the least recently used until the stage cache is at most SIZE "
                                   "(500M, 20G; 0 empties it)"})
    stage: list[str] = field(default_factory=list, metadata={
        "choices": ["sampling", "finetune", "scores"], "repeatable": True,
        "help": "prune only these stages (default all)"})
    all: bool = field(default=False, metadata={"help": "remove every entry not in use"})
    dry_run: bool = field(default=False, metadata={"help": "list what would be removed, remove nothing"})


def _line(e, now: float) -> str:
    flags = (" partial" if e.partial else "") + (" in-use" if e.in_use else "")
    outs = f"  used by {', '.join(o for o, _ in e.users)}" if e.users else ""
    return f"  {e.stage:<9} {e.path.name:<28} {human(e.bytes):>9}  {_age(now - e.last_used):<12}{flags}{outs}"


def _root(cfg: CacheOptions):
    """``<cache>/stages``; a cache path that is a file, or holds a file as ``stages``, is an error."""
    from cappy_core.stage_cache import default_root

    root = default_root(cfg.cache_dir)
    for path in (root.parent, root):
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"--cache-dir: {path} is not a folder (the cache holds its stage cache in "
                                     f"{root.name}/)")
    return root


def list_entries(cfg: CacheOptions, log=print) -> list:
    from cappy_core.stage_cache import entries

    root, now = _root(cfg), time.time()
    if not root.is_dir():
        log(f"no stage cache at {root}: nothing cached yet")
        return []
    found = entries(root)
    log(f"stage cache {root}: {len(found)} entries, {human(sum(e.bytes for e in found))} "
        "(least recently used first)")
    for e in found:
        log(_line(e, now))
    return found


def prune(cfg: CachePruneConfig, log=print) -> list:
    """Remove (or with ``dry_run`` list) the entries ``cfg`` selects; returns them."""
    from cappy_core.stage_cache import IN_USE_S, entries, prune_plan, remove

    if cfg.older_than is None and cfg.max_size is None and not cfg.all:
        raise ValueError("say what to prune: --older-than DAYS, --max-size SIZE, or --all (`cappy cache list` "
                         "shows the entries)")
    if cfg.all and (cfg.older_than is not None or cfg.max_size is not None):
        raise SettingError("all", "removes every entry not in use: drop --older-than / --max-size",
                           related=("older_than", "max_size"))
    if cfg.older_than is not None and cfg.older_than < 0:
        raise SettingError("older_than", f"is {cfg.older_than} days: give a number >= 0")
    root, now = _root(cfg), time.time()
    if not root.is_dir():
        log(f"no stage cache at {root}: nothing to prune")
        return []
    found = entries(root)
    drop = prune_plan(found, older_than_s=None if cfg.older_than is None else cfg.older_than * 86400,
                      max_bytes=None if cfg.max_size is None else parse_size(cfg.max_size),
                      stages=set(cfg.stage) or None, now=now)
    kept = [e for e in found if e.protected(now)]
    verb = "would remove" if cfg.dry_run else "removing"
    log(f"stage cache {root}: {len(found)} entries, {human(sum(e.bytes for e in found))}; {verb} {len(drop)}, "
        f"{human(sum(e.bytes for e in drop))}" + (f" ({len(kept)} in use or used in the last "
                                                  f"{IN_USE_S / 60:.0f} min: kept)" if kept else ""))
    for e in drop:
        log(_line(e, now))
        if not cfg.dry_run:
            remove(e)
    linked = sorted({o for e in drop if e.stage == "sampling" for o, _ in e.users})
    if linked and not cfg.dry_run:
        log(f"candidates removed that these sweep folders link to (their tables stay; a rerun samples anew): "
            f"{', '.join(linked)}")
    return drop


def _done(_entries: list) -> int:  # a job's exit status: what was listed or removed was printed
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``cappy cache list|prune`` (``prog`` names which), or ``python -m jobs.stage_cache_cli [list|prune]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = (prog or "").rsplit(" ", 1)[-1]
    if command not in ("list", "prune"):  # `python -m jobs.stage_cache_cli [list|prune] ...`: list by default
        command = argv.pop(0) if argv and argv[0] in ("list", "prune") else "list"
        prog = f"{prog or 'python -m jobs.stage_cache_cli'} {command}"
    if command == "prune":
        return job_main(CachePruneConfig, lambda cfg, _: _done(prune(cfg)), job="cache",
                        module="jobs.stage_cache_cli", argv=argv, prog=prog,
                        description="Remove stage-cache entries, least recently used first; never one a running "
                                    "sweep reads, nor one used in the last 10 minutes. A removed entry is only "
                                    "recomputed: the next sweep that needs it samples or finetunes again.",
                        epilog="Examples:\n  cappy cache prune --max-size 20G --dry-run\n"
                               "  cappy cache prune --older-than 14 --stage finetune")
    return job_main(CacheListConfig, lambda cfg, _: _done(list_entries(cfg)), job="cache",
                    module="jobs.stage_cache_cli", argv=argv, prog=prog,
                    description="Every stage-cache entry: stage, key, size, when last used, and the sweep folders "
                                "that read it (least recently used first; `cappy cache prune` frees the disk).",
                    epilog="Example:\n  cappy cache list --cache-dir /mnt/shared/cappy")


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))
