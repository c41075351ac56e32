"""Candidate sampling throughput: vLLM backend, transformers backend, and the whole Ray Data job.

    python -m jobs.bench.sampling [--instructions 32] [--max-new-tokens 32] [--batch-size 16]

Same tiny random Llama (``cappy_core.lm.tiny_generator``, or ``--generator PATH``), same
instructions (BIG-Bench-like ``Q: … A:`` prompts of varied length), the paper's 17 decodings:

- (a) ``vllm``: :class:`VLLMGenerator` called directly, batch by batch, in this process;
- (b) ``hf``: :class:`TransformersGenerator` called directly, the same way;
- (c) ``job``: ``jobs.sample_label.run`` with the vLLM backend (one generator actor, Rouge-L
  labelling stage, Parquet written per shard) on a local Ray (or ``RAY_ADDRESS``).

Rates are candidates per second once the model is loaded: for (a) and (b) from the first
``generate`` call to the last; for (c) from the moment the actor's first ``generate`` call began
to the last shard written by the driver (so (c) pays for Ray Data's transfers, the labelling
stage and the Parquet writes, not for starting Ray, the actor or the engine). End-to-end rates,
loading included, are reported too (``*_e2e``). Prints one JSON line with (b)/(a) and (c)/(a) (target: (c)/(a) >= 0.85). The three
paths run one after another; on a shared machine numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("apple pear fig plum grape lemon cherry melon river stone cloud table window garden "
         "seven twelve ninety quickly slowly bright quiet").split()


def make_instructions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
        out.append(f"Q: Sort these words alphabetically: {words}\nA:")
    return out


def time_direct(gen, instructions: list[str], batch_size: int, **kw) -> tuple[float, int]:
    """(seconds, candidates) of generating for all instructions in batches, as an actor does."""
    keys = [f"bench/train/{i}" for i in range(len(instructions))]
    t0, n = time.perf_counter(), 0
    for i in range(0, len(instructions), batch_size):
        out = gen.generate(instructions[i:i + batch_size], keys=keys[i:i + batch_size], **kw)
        n += sum(len(c) for c in out)
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--instructions", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="instructions per generator call (all paths)")
    p.add_argument("--generator", default=None, help="HF folder (default: a fresh tiny random Llama)")
    p.add_argument("--kv-cache-gb", type=float, default=0.25)
    p.add_argument("--skip-hf", action="store_true", help="skip (b), the slowest path")
    args = p.parse_args(argv)
    # stdout is the JSON line: vLLM logs (stdout by default) go to stderr, warnings only
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="cappy-bench-sampling-"))
    try:
        res = _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res))
    return 0


def _run(args, tmp: Path) -> dict:
    from cappy_core.data.records import Example, split_path, write_examples
    from cappy_core.generation import PAPER_DECODINGS, candidates_per_instruction, load_generator
    from cappy_core.lm import tiny_generator

    model = args.generator or str(tiny_generator(tmp / "tiny"))
    instructions = make_instructions(args.instructions)
    kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=3)
    res: dict = {"bench": "sampling", "generator": args.generator or "tiny random Llama (2×64, 352-token BPE)",
                 "instructions": len(instructions), "candidates_per_instruction": candidates_per_instruction(PAPER_DECODINGS),
                 "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "cpus": os.cpu_count()}

    t = time.perf_counter()
    gen = load_generator("vllm", model, dtype="float32", kv_cache_memory_bytes=int(args.kv_cache_gb * (1 << 30)),
                         max_model_len=512 + args.max_new_tokens)
    res["a_load_s"] = round(time.perf_counter() - t, 1)
    secs, n = time_direct(gen, instructions, args.batch_size, **kw)
    gen.close()
    del gen
    res["a_vllm_cands_per_s"] = round(n / secs, 2)
    res["a_vllm_e2e_cands_per_s"] = round(n / (secs + res["a_load_s"]), 2)

    if not args.skip_hf:
        t = time.perf_counter()
        gen = load_generator("hf", model, dtype="float32")
        res["b_load_s"] = round(time.perf_counter() - t, 1)
        secs, n = time_direct(gen, instructions, args.batch_size, **kw)
        res["b_hf_cands_per_s"] = round(n / secs, 2)
        del gen

    from jobs.sample_label import SampleConfig, run

    examples = [Example("bench", "", "train", i, text, [" ".join(sorted(text.split(": ")[1].split()[:-1]))])
                for i, text in enumerate(instructions)]
    write_examples(examples, split_path(tmp / "data", "bench", "train"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = SampleConfig(tasks=["bench"], splits=["train"], data=str(tmp / "data"), out=str(tmp / "out"),
                       generator=model, backend="vllm", max_new_tokens=args.max_new_tokens, dtype="float32",
                       batch_size=args.batch_size, shard_size=args.batch_size, kv_cache_gb=args.kv_cache_gb,
                       cpus_per_actor=1.0, label_cpus=0.25)
    summary = run(cfg, log=lambda msg: print(msg, file=sys.stderr))
    res["c_wall_s"] = summary["seconds"]
    res["c_load_s"] = round(summary["seconds"] - summary["seconds_after_load"], 1)
    res["c_job_cands_per_s"] = round(summary["new_rows"] / summary["seconds_after_load"], 2)
    res["c_job_e2e_cands_per_s"] = round(summary["new_rows"] / summary["seconds"], 2)

    a = res["a_vllm_cands_per_s"]
    if "b_hf_cands_per_s" in res:
        res["b_over_a"] = round(res["b_hf_cands_per_s"] / a, 3)
    res["c_over_a"] = round(res["c_job_cands_per_s"] / a, 3)
    res["c_over_a_e2e"] = round(res["c_job_e2e_cands_per_s"] / res["a_vllm_e2e_cands_per_s"], 3)
    res["load_avg_1m"] = round(os.getloadavg()[0], 1)
    return res


if __name__ == "__main__":
    sys.exit(main())
