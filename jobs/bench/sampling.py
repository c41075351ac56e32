"""Candidate sampling throughput of every sampling path, side by side on the same instructions.

    python -m jobs.bench.sampling [--instructions 48] [--paths PATH ...] [--profile]

The generator is the local sweep's embedded generator (``cappy sweep --preset local`` trains and
caches it; ``--generator PATH`` for another, ``--generator smollm2`` for SmolLM2-135M-Instruct,
``--generator tiny`` for a tiny random Llama). The instructions are the first train instructions
of the sweep's six tasks, round-robin (BIG-Bench must be on this machine: vendored, or ``cappy data
download``; ``--examples DIR`` reads a ``cappy data prepare`` folder instead), as the generator's
prompt format makes them (``--prompt-format``; smollm2: its chat template). The paper's 17
decodings, 64 new tokens at most.
Paths, run one after another in this process:

- ``vllm``: :class:`VLLMGenerator` called directly, ``--batch-size`` instructions per call;
- ``hf-generate``: :class:`TransformersGenerator` with ``decode_loop="generate"`` (one
  ``model.generate`` per sampling decoding: the transformers path before the cached loop);
- ``hf-cached``: :class:`TransformersGenerator` with its KV-cached loop, each prompt's cache
  repeated for its 17 rows (``decode_loop="cached"``: the default before the shared prompt);
- ``hf``: :class:`TransformersGenerator` with its KV-cached loop, each prompt's keys and values
  stored once for its rows, beams decoded in the same batch as samples (``decode_loop="shared"``,
  the default);
- ``job-vllm`` / ``job-hf-cached`` / ``job-hf``: the whole Ray Data job (``jobs.sample_label.run``:
  one generator actor, Rouge-L labelling stage, Parquet per shard) with that backend and decode
  loop. ``job-vllm`` is what the local sweep sampled with before the hf backend became its default
  on CPU, ``job-hf-cached`` what it sampled with before the shared prompt cache. Their Ray workers
  start in the environment this benchmark started with (a vLLM engine started by the ``vllm``
  path changes the process's), so the generator actor runs one thread, as in the sweep.

Rates are candidates/s and generated tokens/s once the model is loaded and has run one untimed
call on two instructions (for the jobs: from the actor's first ``generate`` to the last shard
written). ``flop_fraction`` is the share of the
forward-pass FLOP bound reached: (prompt tokens + generated tokens) × 2 × parameters per second,
over the fp32 matmul FLOP/s this machine measures at the same thread count (``matmul_flops``).
One JSON line on stdout; ``--vllm-dtype bfloat16`` reproduces vLLM's own "auto" on a CPU (what
the sampler used before it loaded checkpoints in their saved dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cappy_core.flops import matmul_flops
from cappy_core.generation.prompts import PROMPT_FORMATS

PATHS = ("vllm", "hf-generate", "hf-cached", "hf", "job-vllm", "job-hf-cached", "job-hf")


def bench_instructions(n: int, examples: str | None = None) -> list[str]:
    """The first train instructions of the local sweep's tasks (or of every task in a ``cappy data
    prepare`` folder, ``examples``), round-robin."""
    from cappy_core.data.catalog import TaskCatalog
    from cappy_core.data.tasks import LOCAL_TASKS

    if examples:
        from cappy_core.labeling.pair_mixture import load_examples

        root = Path(examples).expanduser()
        tasks = sorted(p.name for p in root.iterdir() if (p / "train.parquet").is_file()) if root.is_dir() else []
        if not tasks:
            raise SystemExit(f"--examples {root}: no task folder with a train.parquet (write one with `cappy data prepare`)")
        loaded, _ = load_examples(tasks, ["train"], str(root), None, log=lambda *_: None)
        per_task = [[e.instruction for e in loaded if e.task == t] for t in tasks]
        return [x for k in range(n) for x in (p[k] for p in per_task if k < len(p))][:n]
    catalog = TaskCatalog.open()
    catalog.resolve(LOCAL_TASKS)  # missing ones: a clear error, with how to get them
    per_task = [[e.instruction for e in catalog.load(t)["train"]] for t in LOCAL_TASKS]
    out = [x for k in range(n) for x in (p[k] for p in per_task if k < len(p))]
    return out[:n]


def local_sweep_generator() -> str:
    from jobs.sweep_layout import sweep_models

    path = sweep_models("local")[0]  # the sweep's own rule: its embedded generator for its tasks
    if not (path / "config.json").is_file():
        raise SystemExit(f"the local sweep's embedded generator is not at {path}: run `cappy sweep --preset local` "
                         "(it trains it), or pass --generator PATH (or --generator tiny)")
    return str(path)


def time_direct(gen, instructions: list[str], batch_size: int, **kw) -> tuple[float, int, int]:
    """(seconds, candidates, generated tokens) for all instructions in batches, as an actor does."""
    keys = [f"bench/train/{i}" for i in range(len(instructions))]
    t0, n, toks = time.perf_counter(), 0, 0
    for i in range(0, len(instructions), batch_size):
        out = gen.generate(instructions[i:i + batch_size], keys=keys[i:i + batch_size], **kw)
        n += sum(len(c) for c in out)
        toks += sum(x.num_tokens for c in out for x in c)
    return time.perf_counter() - t0, n, toks


def operator_shares(prof, top: int = 8) -> dict[str, float]:
    """The ``top`` torch operators by self CPU time, each as a share of the profiled total."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return {e.key: round(e.self_cpu_time_total / total, 3) for e in events[:top]}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--instructions", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="instructions per generator call (all paths)")
    p.add_argument("--batch-rows", type=int, default=640, help="hf paths: candidate rows decoded in one batch "
                   "(default: the local sweep's, one generator call of 32 instructions x (16 samples + 4 beams))")
    p.add_argument("--generator", default=None, help="HF folder, smollm2 (SmolLM2-135M-Instruct, fetched and "
                   "converted on first use), or 'tiny' (default: the local sweep's)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=None, help="plain: the instruction as it is; "
                   "chat: as one user message through the chat template (default: chat for a generator whose "
                   "cappy_generator.json says so, such as smollm2, else plain)")
    p.add_argument("--examples", default=None, metavar="DIR", help="instructions from a `cappy data prepare` folder "
                   "(its tasks' train splits, round-robin) instead of the local sweep's tasks")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--threads", type=int, default=1, help="torch threads of the direct paths (the actor's: 1)")
    p.add_argument("--vllm-dtype", default="auto", help="dtype for the vLLM paths (auto = as saved)")
    p.add_argument("--kv-cache-gb", type=float, default=0.25)
    p.add_argument("--profile", action="store_true", help="run the hf path under torch.profiler and report "
                   "each top operator's share of its self CPU time (profile_hf; the rates of a profiled run "
                   "are a little lower)")
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
    import torch

    from cappy_core.data.records import Example, split_path, write_examples
    from cappy_core.generation import PAPER_DECODINGS, GeneratorSpec, candidates_per_instruction
    from cappy_core.generation.embedded_model import generator_metadata, tiny_generator

    if args.generator == "tiny":
        model = str(tiny_generator(tmp / "tiny"))
    elif args.generator:
        from cappy_core.generation import resolve_generator

        try:  # the project's one rule for a generator name: a clear error for a wrong path
            model = resolve_generator(args.generator, "hf").path
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
    else:
        model = local_sweep_generator()
    max_prompt = int(generator_metadata(model).get("max_prompt_tokens", 512))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cappy_core.generation.prompts import format_instruction

    params = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(model).parameters())
    tok = AutoTokenizer.from_pretrained(model)
    prompt_format = args.prompt_format or generator_metadata(model).get("prompt_format", "plain")
    instructions = [format_instruction(t, tok, prompt_format)
                    for t in bench_instructions(args.instructions, args.examples)]
    kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=3)
    prompt_tokens = sum(min(len(tok(t + "\n")["input_ids"]), max_prompt) for t in instructions)
    bound = matmul_flops(512, reps=20, threads=args.threads)
    res: dict = {"bench": "sampling", "generator": model, "params": params, "instructions": len(instructions),
                 "prompt_format": prompt_format, "prompt_tokens": prompt_tokens,
                 "candidates_per_instruction": candidates_per_instruction(PAPER_DECODINGS),
                 "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                 "batch_rows": args.batch_rows, "threads": args.threads,
                 "cpus": os.cpu_count(), "matmul_flops": round(bound / 1e9, 1), "paths": {}}

    def record(path: str, secs: float, n: int, toks: int, load_s: float) -> None:
        flops = 2 * params * (prompt_tokens + toks) / secs
        res["paths"][path] = {"cands_per_s": round(n / secs, 2), "gen_tokens_per_s": round(toks / secs, 1),
                              "flop_fraction": round(flops / bound, 4), "load_s": round(load_s, 1),
                              "seconds": round(secs, 1)}
        print(f"{path}: {res['paths'][path]}", file=sys.stderr)

    torch.set_num_threads(args.threads)
    # Starting a vLLM engine sets LD_PRELOAD (libgomp) and KMP_* in this process's environment; Ray
    # workers started later inherit it, and their torch then ignores the OMP_NUM_THREADS=1 Ray gives
    # a 1-CPU actor (the job paths ran on two threads against a one-thread bound). The job paths get
    # the environment this run started with.
    environment = dict(os.environ)
    for path in [x for x in args.paths if not x.startswith("job-")]:
        t = time.perf_counter()
        backend = "vllm" if path == "vllm" else "hf"
        gen = GeneratorSpec(model, backend, max_prompt_tokens=max_prompt,
                            dtype=args.vllm_dtype if backend == "vllm" else "float32",
                            decode_loop={"hf-generate": "generate", "hf-cached": "cached"}.get(path, "shared"),
                            batch_rows=args.batch_rows, max_model_len=max_prompt + args.max_new_tokens,
                            kv_cache_memory_bytes=int(args.kv_cache_gb * (1 << 30))).load()
        load_s = time.perf_counter() - t
        time_direct(gen, instructions[:2], args.batch_size, **kw)  # warm-up: allocator, kernels (untimed)
        if args.profile and path == "hf":  # where the cached loop's time goes, by torch operator
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                secs, n, toks = time_direct(gen, instructions, args.batch_size, **kw)
            res["profile_hf"] = operator_shares(prof)
        else:
            secs, n, toks = time_direct(gen, instructions, args.batch_size, **kw)
        gen.close()
        record(path, secs, n, toks, load_s)

    jobs = [x for x in args.paths if x.startswith("job-")]
    if jobs:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from cappy_core.generation import SamplingSpec
        from jobs.sample_label import SampleConfig, run

        examples = [Example("bench", "", "train", i, text, ["x"]) for i, text in enumerate(instructions)]
        write_examples(examples, split_path(tmp / "data", "bench", "train"))
        os.environ.clear()
        os.environ.update(environment)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        for path in jobs:
            backend, _, loop = path.removeprefix("job-").partition("-")
            out = tmp / path
            cfg = SampleConfig(tasks=["bench"], splits=["train"], data=str(tmp / "data"), out=str(out),
                               generator=model, backend=backend,
                               sampling=SamplingSpec(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                                     batch_rows=args.batch_rows, cpus_per_actor=1.0),
                               dtype=args.vllm_dtype if backend == "vllm" else "float32", shard_size=args.batch_size,
                               decode_loop=loop or "shared", kv_cache_gb=args.kv_cache_gb, label_cpus=0.25)
            summary = run(cfg, log=lambda msg: print(msg, file=sys.stderr))
            toks = sum(pc.sum(pq.read_table(f, columns=["num_tokens"])["num_tokens"]).as_py()
                       for f in sorted(out.rglob("part-*.parquet")))
            record(path, summary["seconds_after_load"], summary["new_rows"], toks,
                   summary["seconds"] - summary["seconds_after_load"])
    rates = {k: v["cands_per_s"] for k, v in res["paths"].items()}
    for new, old in (("hf", "hf-generate"), ("hf", "hf-cached"), ("hf", "vllm"), ("job-hf", "job-vllm"),
                     ("job-hf", "job-hf-cached")):
        if new in rates and old in rates:
            res[f"{new}_over_{old}"] = round(rates[new] / rates[old], 2)
    res["load_avg_1m"] = round(os.getloadavg()[0], 1)
    return res


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
