"""The ``cappy`` command: a thin dispatcher to the job modules.

Each subcommand is a module in ``jobs/`` with ``main(argv, prog)``; the same module runs under
``ray job submit -- python -m jobs.<name>``. Modules are imported only when their command runs, so
``cappy --help`` stays fast and a missing optional dependency (vLLM) breaks only its command.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

#: Shipped presets: ``jobs/configs/<job>_<preset>.yaml``, each headed by the command that runs it.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def presets(job: str) -> dict[str, Path]:
    """The shipped presets of ``job`` (``cappy <job> --preset NAME``)."""
    from cappy_core.config import find_presets

    return find_presets(CONFIG_DIR, job)

# (words, module, one-line help). Longest match wins, so "data prepare" beats "data".
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("sweep",), "jobs.sweep",
     "the main job: sample, finetune a scorer per task, score, and compare Cappy with 7 baselines"),
    (("data", "download"), "jobs.download_data",
     "fetch the bigbench==1.0.0 source archive from PyPI once and extract its task JSONs"),
    (("data", "prepare"), "jobs.prepare_data",
     "write BIG-Bench tasks as Parquet per task and split (all45 | pretrain | NAME ...)"),
    (("generator", "train"), "jobs.train_generator",
     "train the embedded generator (BPE + small Llama) on BIG-Bench, saved under the cache"),
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
    lines += ["", "Run `cappy <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
        if argv[0] in groups:
            subs = [" ".join(w) for w, _, _ in COMMANDS if w[0] == argv[0]]
            print(f"cappy {argv[0]}: choose one of: {', '.join(subs)}", file=sys.stderr)
        else:
            print(f"cappy: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    words, module = best
    mod = importlib.import_module(module)
    return int(mod.main(argv[len(words):], prog="cappy " + " ".join(words)) or 0)


if __name__ == "__main__":
    sys.exit(main())
