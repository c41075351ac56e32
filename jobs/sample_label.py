"""``cappy sample``: sample candidates with an LLM and label them with Rouge-L, on Ray Data.

    cappy sample --tasks auto_categorization operators --generator PATH --backend vllm
    ray job submit --working-dir . -- python -m jobs.sample_label --tasks all45 \\
        --generator PATH_OR_HF_ID --backend vllm --gpus-per-actor 1 [--num-actors 8] \\
        [--data /mnt/shared/bb --out /mnt/shared/candidates]

Pipeline:

1. the driver reads the example Parquet written by ``cappy data prepare`` (``DATA/<task>/<split>
   .parquet``), cuts each file into shards of ``--shard-size`` instructions and keeps the shards
   without a completion record; rows it cannot use (empty instruction, a null field) are counted
   and reported, never dropped silently;
2. Ray Data: ``map_batches(CandidateStage)`` on an ``ActorPoolStrategy`` pool of
   ``--num-actors`` actors, each holding one generator (``--backend vllm|hf``, ``--gpus-per-actor``
   on a cluster, fractional CPUs on a laptop), emits one row per (instruction, decoding, sample);
3. ``map_batches(label_batch)``: stateless CPU tasks add the Rouge-L label (exactly rouge-score's)
   against the example's references (null when it has none);
4. the driver streams the labelled rows and, as soon as a shard has all its rows
   (instructions × candidates per instruction), writes ``OUT/<task>/<split>/part-NNNNN.parquet``
   atomically and then its completion record ``part-NNNNN.done.json``.

A rerun skips completed shards and redoes the others from scratch, so an interrupted job resumes
with exactly instructions × candidates rows and no duplicates (Ray Data's ``write_parquet``
cannot give that: it names files per block and has no per-input commit; shards, records and the
summary: ``cappy_core/shards.py``). Sampling seeds come
from (``--seed``, instruction id, decoding, sample), so a resumed run samples what an
uninterrupted one would. ``OUT/sample_config.json`` records the settings that define the output;
a rerun with different ones is refused (use a new ``--out`` or ``--overwrite``). Schema:
``cappy_core/candidates.py``.

Paths: only the driver reads ``--data`` and writes ``--out``. Under ``ray job submit
--working-dir .`` relative paths live in the job's copy of the working dir on the head node (the
default ``data/bigbench`` travels with it; outputs there are lost with it), so on a cluster give
``--out`` on shared storage, or a URI (``s3://``, ``gs://``, any scheme pyarrow or fsspec knows): the
driver then builds the output in a local staging folder, first filled from the URI, and uploads
each shard as it is written (:mod:`cappy_core.remote`). A local ``--generator`` folder must exist
at the same path on every node that runs an actor (shared storage), or name a hub id
(:func:`cappy_core.generation.resolve_generator` decides what the name means).

Ray 2.60 enables token authentication for Jobs: pass the cluster's token as Ray's docs say
(``RAY_AUTH_TOKEN`` / ``~/.ray/auth_token``) when submitting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa

from cappy_core.config import ConfigError, build_parser, config_from_args, run_main, to_dict
from cappy_core.generation import BACKENDS, MAX_NEW_TOKENS, MIN_NEW_TOKENS, PAPER_DECODING_NAMES, PAPER_NUM_SAMPLES

logger = logging.getLogger("jobs.sample_label")  # not __name__: "__main__" under python -m

#: Generator actors that may die in a row while loading the model before the job fails.
INIT_DEATHS = 3

# Settings that change what is written: a resumed run must use the same ones.
OUTPUT_DEFINING = ("generator", "backend", "decodings", "samples_per_decoding", "max_new_tokens", "min_new_tokens",
                   "max_prompt_tokens", "seed", "dtype", "shard_size", "max_examples_per_task")


@dataclass
class SampleConfig:
    tasks: list[str] = field(default_factory=lambda: ["all45"], metadata={
        "help": "'all45', 'pretrain' or task names, among the tasks prepared under --data"})
    splits: list[str] = field(default_factory=lambda: ["train", "validation"], metadata={"help": "splits to sample"})
    data: str = field(default="data/bigbench", metadata={"help": "folder written by `cappy data prepare`"})
    out: str = field(default="data/candidates", metadata={
        "help": "output folder, or a URI (s3://, gs://, ...: written in a local staging folder and uploaded "
                "shard by shard)"})
    generator: Optional[str] = field(default=None, metadata={
        "help": "generator: a Hugging Face folder or hub id (default: the embedded generator trained by "
                "`cappy generator train`)"})
    backend: str = field(default="vllm", metadata={"choices": list(BACKENDS),
                                                   "help": "vllm (decoder-only) or hf (transformers; also seq2seq)"})
    decodings: list[str] = field(default_factory=lambda: list(PAPER_DECODING_NAMES), metadata={
        "help": "decodings: greedy, beam<N>, sample, temp<T>, topk<K>, topp<P>"})
    samples_per_decoding: int = field(default=PAPER_NUM_SAMPLES, metadata={
        "help": "candidates per sampling decoding"})
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={"help": "most generated tokens"})
    min_new_tokens: int = field(default=MIN_NEW_TOKENS, metadata={"help": "fewest tokens before end-of-sequence"})
    max_prompt_tokens: Optional[int] = field(default=None, metadata={
        "help": "instructions keep their last N generator tokens (default: the length the embedded "
                "generator was trained on, from its cappy_generator.json; 512 for other models)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (per instruction, decoding and sample)"})
    max_examples_per_task: Optional[int] = field(default=None, metadata={
        "help": "use only the first N examples of each task and split (small runs)"})
    shard_size: int = field(default=256, metadata={"help": "instructions per output file (the unit of resume)"})
    batch_size: int = field(default=32, metadata={"help": "instructions per generator call"})
    batch_rows: int = field(default=64, metadata={"help": "--backend hf: candidate rows decoded in one batch (a "
                            "call's batch-size x 17 decodes at once: fewer steps of per-step overhead, more memory)"})
    decode_loop: str = field(default="shared", metadata={
        "help": "--backend hf: how a prompt's KV cache is kept while its candidates decode: shared (once "
                "for all of them; the default where the model allows it, else cached), cached (repeated "
                "per candidate), generate (model.generate per decoding)"})
    num_actors: int = field(default=1, metadata={"help": "generator actors (one model each)"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per generator actor (0 on CPU)"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per generator actor"})
    label_cpus: float = field(default=0.25, metadata={"help": "CPUs per Rouge-L labelling task"})
    label_tasks: int = field(default=2, metadata={"help": "most concurrent labelling tasks (Rouge-L is fast)"})
    dtype: str = field(default="auto", metadata={
        "help": "model dtype: auto (as the checkpoint was saved), float32, bfloat16, float16"})
    kv_cache_gb: Optional[float] = field(default=None, metadata={
        "help": "vLLM KV cache size in GiB (default: vLLM's; on CPU 10%% of RAM)"})
    gpu_memory_utilization: Optional[float] = field(default=None, metadata={
        "help": "vLLM memory fraction (on CPU: of RAM, default 0.1)"})
    allow_pickle: bool = field(default=False, metadata={
        "help": "accept a generator with only pickled weights (*.bin; unpickling runs code: only one you trust)"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "run the Python code shipped with the generator (only for a model you trust)"})
    overwrite: bool = field(default=False, metadata={
        "help": "redo every selected shard, even completed ones, and accept changed settings"})


EPILOG = """Examples:
  cappy sample --tasks auto_categorization operators --generator ~/gen --backend vllm
  cappy sample --tasks tense --generator ~/gen --backend hf --max-examples-per-task 32 --cpus-per-actor 0.5
  ray job submit --working-dir . -- python -m jobs.sample_label --tasks all45 \\
      --generator PATH_OR_HF_ID --backend vllm --gpus-per-actor 1 --num-actors 8"""


def honour_cpu_reservation() -> None:
    """Run torch on as many threads as the actor reserved CPUs. Ray sets ``OMP_NUM_THREADS`` to the
    reservation (at least 1), but torch ignores it when the driver's environment preloads libgomp
    (``LD_PRELOAD``, which starting a vLLM engine sets in its process): a 1-CPU actor then ran on every
    core, competing with the other actors and making its measured rate that of more cores."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


class CandidateStage:
    """Ray Data actor stage: one generator per actor; one input row → one row per candidate."""

    def __init__(self, backend: str, generator: str, generator_kwargs: dict, decodings: tuple,
                 max_new_tokens: int, min_new_tokens: int, seed: int):
        from cappy_core.generation import load_generator

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # engine start logs ~100 lines per actor
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        if os.environ.get("TRANSFORMERS_VERBOSITY", "error") not in ("info", "debug"):  # --log-level debug shows them
            from cappy_core.scorer import quiet_transformers

            quiet_transformers()  # the weight-loading bar of every actor would print between the progress bars
        if backend == "hf":
            honour_cpu_reservation()
        self.gen = load_generator(backend, generator, **generator_kwargs)
        self.decodings = decodings
        self.kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, seed=seed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cappy_core.candidates import expand_with_candidates

        started = time.time()
        cands = self.gen.generate(batch["instruction"].to_pylist(), self.decodings,
                                  keys=batch["instruction_id"].to_pylist(), **self.kw)
        return expand_with_candidates(batch, cands, started)


def check_config(cfg: SampleConfig) -> None:
    for name in ("shard_size", "batch_size", "num_actors", "label_tasks", "samples_per_decoding", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.max_examples_per_task is not None and cfg.max_examples_per_task < 0:
        raise ConfigError("--max-examples-per-task must be >= 0")
    from cappy_core.generation import DECODE_LOOPS

    if cfg.decode_loop not in DECODE_LOOPS:
        raise ConfigError(f"--decode-loop must be one of {', '.join(DECODE_LOOPS)}, got {cfg.decode_loop!r}")
    bad_splits = [s for s in cfg.splits if s not in ("train", "validation")]
    if bad_splits:
        raise ConfigError(f"unknown split(s) {bad_splits}: use train and/or validation")


def run(cfg: SampleConfig, log=print) -> dict:
    """Sample, label and write; returns the summary (also printed). One run per ``--out`` at a
    time: a second one refuses at once, naming the holder (:func:`cappy_core.io.output_lock`)."""
    from cappy_core.io import with_local_paths
    from cappy_core.remote import locked_output
    from jobs.log_file import log_file

    check_config(cfg)
    cfg = with_local_paths(cfg, "data")
    with locked_output(cfg.out, "--out", "cappy sample", log=log) as out:  # a URI: staged, uploaded per shard
        cfg = dataclasses.replace(cfg, out=out)
        with log_file(cfg.out, "sample", log) as log:
            logger.debug("config: %s", json.dumps(to_dict(cfg)))
            return _run_locked(cfg, log)


def _run_locked(cfg: SampleConfig, log) -> dict:
    from cappy_core import shards as sh
    from cappy_core.candidates import CANDIDATE_SCHEMA
    from cappy_core.data.tasks import resolve_tasks
    from cappy_core.generation import candidates_per_instruction, decodings_from_names, resolve_generator
    from cappy_core.remote import sync_outputs

    decodings = decodings_from_names(cfg.decodings, cfg.samples_per_decoding)
    per_instruction = candidates_per_instruction(decodings)
    tasks, unavailable = resolve_tasks(cfg.tasks, sh.prepared_tasks(cfg.data))
    for why in unavailable.values():
        log(f"not prepared under {cfg.data}, skipped: {why}")
    if not tasks:
        raise FileNotFoundError(f"none of the tasks {cfg.tasks} is prepared under {cfg.data}")
    resolved = resolve_generator(cfg.generator, cfg.backend)
    generator = resolved.path
    if cfg.max_prompt_tokens is None:
        cfg = dataclasses.replace(cfg, max_prompt_tokens=resolved.max_prompt_tokens)
    sh.check_settings(cfg.out, {**to_dict(cfg), "generator": generator}, OUTPUT_DEFINING, overwrite=cfg.overwrite)
    todo, done = sh.plan_shards(cfg.data, cfg.out, tasks, cfg.splits, shard_size=cfg.shard_size,
                                max_examples_per_task=cfg.max_examples_per_task, overwrite=cfg.overwrite)

    meta = {"generator": generator, "backend": cfg.backend, "decodings": list(cfg.decodings),
            "candidates_per_instruction": per_instruction}
    t0 = time.time()
    timing = {"generation_began": None}
    written = [sh.write_shard(cfg.out, s, CANDIDATE_SCHEMA.empty_table(), meta) for s in todo if not s.rows.num_rows]
    sync_outputs()
    todo = [s for s in todo if s.rows.num_rows]
    if todo:
        written += _sample_shards(cfg, todo, generator, decodings, per_instruction, meta, timing)
    t_end = time.time()
    began = timing["generation_began"]
    summary = sh.summarize([rec for *_, rec in done], written, per_instruction=per_instruction, seconds=t_end - t0,
                           seconds_after_load=t_end - began if began else None, out=cfg.out,
                           backend=cfg.backend, generator=generator)
    for line in sh.summary_lines(summary, written):
        log(line)
    return summary


def _sample_shards(cfg, todo, generator, decodings, per_instruction, meta, timing) -> list[dict]:
    """Run the Ray Data pipeline over ``todo``; write each shard the moment all its rows arrived."""
    import pyarrow.compute as pc
    import ray
    from tqdm import tqdm

    from cappy_core.candidates import add_labels
    from cappy_core.remote import sync_outputs
    from cappy_core.shards import write_shard
    from jobs.log_file import init_ray

    gen_kwargs: dict = {"max_prompt_tokens": cfg.max_prompt_tokens, "dtype": cfg.dtype,
                        "allow_pickle": cfg.allow_pickle, "trust_remote_code": cfg.trust_remote_code}
    if cfg.backend == "hf":
        gen_kwargs["batch_rows"] = cfg.batch_rows
        gen_kwargs["decode_loop"] = cfg.decode_loop
    if cfg.backend == "vllm":
        gen_kwargs["max_model_len"] = cfg.max_prompt_tokens + cfg.max_new_tokens
        if cfg.kv_cache_gb is not None:
            gen_kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gb * (1 << 30))
        if cfg.gpu_memory_utilization is not None:
            gen_kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    init_ray()  # ray.init, and Ray's driver log kept in the log file
    if "RAY_DATA_MAX_CONSECUTIVE_ACTOR_INIT_DEATHS" not in os.environ:
        # Ray Data fails the job when a generator actor dies while loading its model (its default,
        # 0); one killed there (preempted, OOM) is replaced, a model that never loads still fails.
        ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = INIT_DEATHS
    ds = ray.data.from_arrow([s.rows for s in todo])
    ds = ds.map_batches(
        CandidateStage, batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        fn_constructor_kwargs=dict(backend=cfg.backend, generator=generator, generator_kwargs=gen_kwargs,
                                   decodings=decodings, max_new_tokens=cfg.max_new_tokens,
                                   min_new_tokens=cfg.min_new_tokens, seed=cfg.seed))
    # Rouge-L labels: stateless CPU tasks
    ds = ds.map_batches(add_labels, batch_format="pyarrow", num_cpus=cfg.label_cpus,
                        compute=ray.data.TaskPoolStrategy(size=cfg.label_tasks))

    expected = {s.key: s.rows.num_rows * per_instruction for s in todo}
    shards = {s.key: s for s in todo}
    parts: dict[str, list[pa.Table]] = defaultdict(list)
    got: Counter = Counter()
    written = []
    bar = tqdm(total=len(todo), desc="shards written", unit=" shard", file=sys.stderr)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if batch.num_rows == 0:
            continue
        began = pc.min(batch["_t0"]).as_py()
        if timing["generation_began"] is None or began < timing["generation_began"]:
            timing["generation_began"] = began
        keys = batch["shard"].to_pylist()
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            part = batch.take(idx)
            parts[key].append(part)
            got[key] += part.num_rows
            if got[key] > expected[key]:
                raise RuntimeError(f"shard {key} got {got[key]} rows, more than the {expected[key]} expected")
            if got[key] == expected[key]:
                written.append(write_shard(cfg.out, shards[key], pa.concat_tables(parts.pop(key)), meta))
                sync_outputs()  # an --out URI gets each shard as it is finished
                bar.update(1)
    bar.close()
    missing = [k for k in expected if got[k] != expected[k]]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) incomplete after the pipeline finished, e.g. {missing[0]}: "
                           f"{got[missing[0]]} of {expected[missing[0]]} rows")
    return written


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(
        SampleConfig, prog=prog or "python -m jobs.sample_label", epilog=EPILOG,
        description="Sample candidates for BIG-Bench instructions with an LLM (vLLM or transformers) on Ray "
                    "Data, label each with Rouge-L against the references, write Parquet per task and split.")
    args = parser.parse_args(argv)

    def body() -> None:
        run(config_from_args(SampleConfig, args))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
