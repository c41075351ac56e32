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

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cappy_core.config import ConfigError
from jobs.runtime import job_main


@dataclass
class ScoreConfig:
    scorer: str = field(default="minilm", metadata={
        "help": "'minilm' (embedded, untrained head), a checkpoint folder, or a hub id"})
    instruction: Optional[str] = field(default=None, metadata={"help": "the instruction"})
    response: list[str] = field(default_factory=list, metadata={
        "help": "a candidate response; repeat the flag for several", "repeatable": True, "metavar": "TEXT"})
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


def write_scores(rows: list[dict], out: str | None) -> None:
    """JSONL to stdout, or ``out`` (``.parquet``, else JSONL) written atomically."""
    from cappy_core.io import write_parquet, write_text

    if out is None:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return
    path = Path(out)
    if path.suffix == ".parquet":
        import pyarrow as pa

        write_parquet(pa.Table.from_pylist(rows), path)
    else:
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} scores to {path}", file=sys.stderr)


def format_table(instruction: str, responses: list[str], scores: list[float], pick: int) -> str:
    lines = [f"instruction: {instruction}", f"{'':2}{'#':>3}  {'score':>10}  response"]
    for i, (r, s) in enumerate(zip(responses, scores)):
        lines.append(f"{'*' if i == pick else ' ':2}{i:>3}  {s:>10.6f}  {r}")
    lines.append(f"pick: {pick} ({responses[pick]!r}, score {scores[pick]:.6f})")
    return "\n".join(lines)


def run(cfg: ScoreConfig) -> None:
    if cfg.pairs is None and (cfg.instruction is None or not cfg.response):
        raise ConfigError("nothing to score: give --instruction TEXT and at least one "
                          "--response TEXT (or --pairs FILE)")
    if cfg.pairs is not None and (cfg.instruction is not None or cfg.response):
        raise ConfigError("give either --pairs or --instruction/--response, not both")

    from cappy_core.data.records import read_text_pairs
    from cappy_core.scorer.model import Scorer, quiet_transformers, select_best

    quiet_transformers()
    if cfg.pairs is not None:
        instructions, responses = read_text_pairs(cfg.pairs)
    scorer = Scorer.from_pretrained(cfg.scorer, dtype=cfg.dtype, device=cfg.device,
                                    max_length=cfg.max_length, allow_pickle=cfg.allow_pickle, seed=cfg.seed)
    kwargs = dict(batch_size=cfg.batch_size, max_tokens=cfg.max_tokens)
    if cfg.pairs is not None:
        scores = scorer.score(instructions, responses, **kwargs)
        write_scores([{"instruction": i, "response": r, "score": s}
                      for i, r, s in zip(instructions, responses, scores)], cfg.out)
        return
    scores = scorer.score([cfg.instruction] * len(cfg.response), cfg.response, **kwargs)
    pick = select_best(scores)
    if cfg.json:
        print(json.dumps({"scorer": cfg.scorer, "instruction": cfg.instruction,
                          "responses": cfg.response, "scores": scores, "pick": pick,
                          "best_response": cfg.response[pick]}, ensure_ascii=False))
    else:
        print(format_table(cfg.instruction, cfg.response, scores, pick))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return job_main(ScoreConfig, lambda cfg, _: run(cfg), job="score", module="jobs.score", argv=argv, prog=prog,
                    description="Score (instruction, response) pairs with a Cappy scorer.")


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
