"""``cappy score``: score (instruction, response) pairs with a Cappy scorer and print the pick.

    cappy score --scorer minilm --instruction "Translate to French: cat" \\
        --response chat --response chien [--dtype bfloat16] [--json]
    cappy score --scorer CKPT --pairs pairs.parquet --out scores.jsonl

With ``--instruction``/``--response`` it prints every candidate's score and the pick (highest
score, ties to the first), as a table or, with ``--json``, one JSON object. With ``--pairs FILE``
(Parquet or JSONL with columns ``instruction`` and ``response``) it scores every row and writes
``instruction, response, score`` as JSONL to stdout, or to ``--out`` (``.parquet`` or ``.jsonl``).
Runs in one process; under ``ray job submit -- python -m jobs.score ...`` it runs on the head.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cappy_core.config import ConfigError, add_dataclass_arguments, config_from_args


@dataclass
class ScoreConfig:
    scorer: str = field(default="minilm", metadata={
        "help": "'minilm' (embedded, untrained head), a checkpoint folder, or a hub id"})
    instruction: Optional[str] = field(default=None, metadata={"help": "the instruction"})
    response: list[str] = field(default_factory=list, metadata={
        "help": "a candidate response; repeat the flag for several"})
    pairs: Optional[str] = field(default=None, metadata={
        "help": "Parquet/JSONL file with columns instruction, response (instead of --instruction)"})
    out: Optional[str] = field(default=None, metadata={
        "help": "with --pairs: write scores here (.parquet or .jsonl) instead of stdout"})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "bfloat16"],
                                                    "help": "compute dtype"})
    device: Optional[str] = field(default=None, metadata={"help": "cpu, cuda, ... (default: auto)"})
    max_length: Optional[int] = field(default=None, metadata={
        "help": "pair truncation length (default: the checkpoint's, else 512)"})
    batch_size: int = field(default=128, metadata={"help": "most pairs per batch"})
    max_tokens: Optional[int] = field(default=1024, metadata={
        "help": "most padded tokens per batch (CPU-tuned; raise on a GPU)"})
    allow_pickle: bool = field(default=False, metadata={
        "help": "accept checkpoints whose weights are only pytorch_model.bin"})
    seed: int = field(default=0, metadata={"help": "initialises a head missing from the checkpoint"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Score (instruction, response) pairs with a Cappy scorer.",
        conflict_handler="resolve")
    add_dataclass_arguments(parser, ScoreConfig)
    # Repeatable: `--response A --response B` (and `--response A B`) accumulate.
    parser.add_argument("--response", dest="response", action="extend", nargs="+",
                        metavar="TEXT", default=argparse.SUPPRESS,
                        help="a candidate response; repeat the flag for several")
    return parser


def read_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """``instruction`` and ``response`` columns of a Parquet or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such pairs file: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path, columns=None).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"{path}: expected a .parquet or .jsonl file")
    for i, row in enumerate(rows):
        if "instruction" not in row or "response" not in row:
            raise ValueError(f"{path}: row {i} lacks an 'instruction' or 'response' column")
    return [r["instruction"] for r in rows], [r["response"] for r in rows]


def write_scores(rows: list[dict], out: str | None) -> None:
    if out is None:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
    print(f"wrote {len(rows)} scores to {path}", file=sys.stderr)


def format_table(instruction: str, responses: list[str], scores: list[float], pick: int) -> str:
    lines = [f"instruction: {instruction}", f"{'':2}{'#':>3}  {'score':>10}  response"]
    for i, (r, s) in enumerate(zip(responses, scores)):
        lines.append(f"{'*' if i == pick else ' ':2}{i:>3}  {s:>10.6f}  {r}")
    lines.append(f"pick: {pick} ({responses[pick]!r}, score {scores[pick]:.6f})")
    return "\n".join(lines)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        cfg = config_from_args(ScoreConfig, args)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if cfg.pairs is None and (cfg.instruction is None or not cfg.response):
        print(f"{prog}: error: nothing to score: give --instruction TEXT and at least one "
              "--response TEXT (or --pairs FILE)", file=sys.stderr)
        return 2
    if cfg.pairs is not None and (cfg.instruction is not None or cfg.response):
        print(f"{prog}: error: give either --pairs or --instruction/--response, not both",
              file=sys.stderr)
        return 2

    _quiet_transformers()
    from cappy_core.scorer import Scorer, select_best

    try:
        if cfg.pairs is not None:
            instructions, responses = read_pairs(cfg.pairs)
        scorer = Scorer.from_pretrained(cfg.scorer, dtype=cfg.dtype, device=cfg.device,
                                        max_length=cfg.max_length, allow_pickle=cfg.allow_pickle,
                                        seed=cfg.seed)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    kwargs = dict(batch_size=cfg.batch_size, max_tokens=cfg.max_tokens)

    if cfg.pairs is not None:
        scores = scorer.score(instructions, responses, **kwargs)
        write_scores([{"instruction": i, "response": r, "score": s}
                      for i, r, s in zip(instructions, responses, scores)], cfg.out)
        return 0

    scores = scorer.score([cfg.instruction] * len(cfg.response), cfg.response, **kwargs)
    pick = select_best(scores)
    if cfg.json:
        print(json.dumps({"scorer": cfg.scorer, "instruction": cfg.instruction,
                          "responses": cfg.response, "scores": scores, "pick": pick,
                          "best_response": cfg.response[pick]}, ensure_ascii=False))
    else:
        print(format_table(cfg.instruction, cfg.response, scores, pick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
