"""Scorer throughput on real BIG-Bench pairs: the naive pad-to-512 path vs ours, and FLOP/s.

    python -m jobs.bench.scorer [--pairs 256] [--batch-size 128] [--max-tokens 1024] [--threads T]

Pairs: validation instructions of a few of the 45 generative tasks, each with its own first
reference (a positive) and another example's reference (a negative), interleaved across tasks.
Paths timed on the SAME pairs (after one warm-up batch each):

- ``ref_pad512``: the straightforward way: batches of ``--ref-batch-size`` (32) in input order,
  every batch padded to 512 tokens, fp32, tokenised per batch;
- ``bucketed_fp32`` / ``bucketed_bf16``: :meth:`Scorer.score` end to end (tokenise once, sort by
  length, at most ``--batch-size`` pairs and ``--max-tokens`` padded tokens per batch, each
  padded only to its own longest; defaults are the library's).

FLOP/s: ``matmul_fp32_flops`` is the best of several ``torch.matmul`` runs of a 1024² square at
the same thread count (the machine's dense fp32 peak as torch sees it); ``scorer_fp32_flops`` is
the useful forward FLOPs (:func:`flops_per_pair` on each pair's real token length, padding not
counted) divided by the bucketed fp32 time. Prints one JSON line.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from cappy_core.config import build_parser, resolve_and_run, run_main
from cappy_core.flops import matmul_flops

DEFAULT_TASKS = ["tense", "rephrase", "simple_text_editing", "word_sorting",
                 "gender_inclusive_sentences_german", "unnatural_in_context_learning",
                 "sentence_ambiguity", "chinese_remainder_theorem"]


@dataclass
class ScorerBenchConfig:
    pairs: int = field(default=256, metadata={"help": "number of (instruction, response) pairs"})
    batch_size: int = field(default=128, metadata={"help": "bucketed path: most pairs per batch"})
    max_tokens: Optional[int] = field(default=1024, metadata={
        "help": "bucketed path: most padded tokens per batch (null in YAML: no budget)"})
    ref_batch_size: int = field(default=32, metadata={"help": "pad-512 path: pairs per batch"})
    threads: Optional[int] = field(default=None, metadata={"help": "torch threads (default: torch's)"})
    scorer: str = field(default="minilm", metadata={"help": "scorer to load"})
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS), metadata={
        "help": "BIG-Bench tasks whose validation examples give the pairs"})
    task_root: Optional[str] = field(default=None, metadata={
        "help": "an extra folder of BIG-Bench tasks (<dir>/<task>/task.json) besides the vendored and cached ones"})
    ref_pairs: Optional[int] = field(default=None, metadata={
        "help": "time the pad-512 path on only the first N pairs (its cost per pair does not "
                "depend on content); default: all"})
    reps: int = field(default=3, metadata={"help": "bucketed paths: best of this many runs"})
    bf16: bool = field(default=True, metadata={"help": "also time the bf16 path"})
    seed: int = field(default=0, metadata={"help": "pair sampling seed"})


def bench_pairs(catalog, tasks: list[str], n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` pairs interleaved across ``tasks``: (instruction, own reference), (instruction,
    another example's reference), ... from each task's validation split."""
    rng = random.Random(seed)
    catalog.resolve(tasks)
    per_task = []
    for task in tasks:
        val = [e for e in catalog.load(task)["validation"] if e.references]
        refs = [r for e in val for r in e.references]
        pairs = []
        for e in val:
            pairs.append((e.instruction, e.references[0]))
            others = [r for r in refs if r not in e.references]
            if others:
                pairs.append((e.instruction, rng.choice(others)))
        per_task.append(pairs)
    out: list[tuple[str, str]] = []
    while len(out) < n and any(per_task):
        for pairs in per_task:
            if pairs and len(out) < n:
                out.append(pairs.pop(0))
    if len(out) < n:
        raise ValueError(f"only {len(out)} pairs in tasks {tasks}; ask for fewer or add tasks")
    return [i for i, _ in out], [r for _, r in out]


def time_ref_pad512(scorer, instructions, responses, batch_size: int) -> float:
    """Seconds for the naive path: input order, pad every batch to 512, fp32."""
    import torch

    def run(ins, res):
        with torch.inference_mode():
            for s in range(0, len(ins), batch_size):
                enc = scorer.tokenizer(ins[s:s + batch_size], res[s:s + batch_size],
                                       truncation="longest_first", max_length=512,
                                       padding="max_length", return_tensors="pt")
                scorer.model(**enc).logits[:, 0].tolist()

    run(instructions[:2], responses[:2])  # warm-up
    t = time.perf_counter()
    run(instructions, responses)
    return time.perf_counter() - t


def time_bucketed(scorer, instructions, responses, batch_size: int, max_tokens, reps: int) -> float:
    """Best-of-``reps`` seconds for :meth:`Scorer.score` over all pairs (after a warm-up)."""
    scorer.score(instructions[:32], responses[:32], batch_size=batch_size, max_tokens=max_tokens)
    best = float("inf")
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        scorer.score(instructions, responses, batch_size=batch_size, max_tokens=max_tokens)
        best = min(best, time.perf_counter() - t)
    return best


def run(cfg: ScorerBenchConfig) -> None:
    import torch

    from cappy_core.data.catalog import TaskCatalog
    from cappy_core.scorer.model import Scorer, flops_per_pair, quiet_transformers

    quiet_transformers()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()

    catalog = TaskCatalog.open(task_dirs=[cfg.task_root] if cfg.task_root else ())
    instructions, responses = bench_pairs(catalog, cfg.tasks, cfg.pairs, cfg.seed)
    distinct = list(dict.fromkeys(zip(instructions, responses)))  # Scorer.score scores a repeated pair once:
    instructions, responses = [i for i, _ in distinct], [r for _, r in distinct]  # time and count each once
    scorer = Scorer.from_pretrained(cfg.scorer, device="cpu")
    lengths = [len(x) for x in scorer.encode(instructions, responses)["input_ids"]]
    useful_flops = sum(flops_per_pair(scorer.model.config, t) for t in lengths)
    n = len(instructions)

    n_ref = min(n, cfg.ref_pairs or n)
    ref_s = time_ref_pad512(scorer, instructions[:n_ref], responses[:n_ref], cfg.ref_batch_size)
    fp32_s = time_bucketed(scorer, instructions, responses, cfg.batch_size, cfg.max_tokens,
                           cfg.reps)
    bf16_rate = None
    if cfg.bf16:
        bf16 = Scorer(scorer.model, scorer.tokenizer, dtype="bfloat16",
                      max_length=scorer.max_length)
        bf16_rate = n / time_bucketed(bf16, instructions, responses, cfg.batch_size,
                                      cfg.max_tokens, cfg.reps)
    peak = matmul_flops(1024)
    achieved = useful_flops / fp32_s
    result = {
        "bench": "scorer",
        "pairs": n,
        "threads": threads,
        "ref_pairs": n_ref,
        "ref_batch_size": cfg.ref_batch_size,
        "batch_size": cfg.batch_size,
        "max_tokens": cfg.max_tokens,
        "ref_pad512_pairs_per_s": round(n_ref / ref_s, 2),
        "bucketed_fp32_pairs_per_s": round(n / fp32_s, 2),
        "bucketed_bf16_pairs_per_s": None if bf16_rate is None else round(bf16_rate, 2),
        "speedup_bucketed_vs_ref": round((n / fp32_s) / (n_ref / ref_s), 2),
        "matmul_fp32_flops": round(peak, -6),
        "scorer_fp32_flops": round(achieved, -6),
        "flops_fraction": round(achieved / peak, 3),
        "mean_tokens": round(sum(lengths) / n, 1),
        "max_tokens_seen": max(lengths),
    }
    print(json.dumps(result))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(ScorerBenchConfig, prog=prog or "python -m jobs.bench.scorer",
                          description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    return run_main(lambda: resolve_and_run(ScorerBenchConfig, args, None, run))  # --print-config: the YAML, no run


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
