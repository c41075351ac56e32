"""``cappy sample``: sample candidates with an LLM and label them with Rouge-L, on Ray Data.

    cappy sample --tasks auto_categorization operators --generator PATH --backend vllm
    ray job submit --working-dir . -- python -m jobs.sample_label --tasks all45 \\
        --generator PATH_OR_HF_ID --backend vllm --sampling.gpus-per-actor 1 [--sampling.num-actors 8] \\
        [--data /mnt/shared/bb --out /mnt/shared/candidates]

Pipeline:

1. the driver reads the example Parquet written by ``cappy data prepare`` (``DATA/<task>/<split>
   .parquet``), cuts each file into shards of ``--shard-size`` instructions and keeps the shards
   without a completion record; rows it cannot use (empty instruction, a null field) are counted
   and reported, never dropped silently;
2. Ray Data: ``map_batches(CandidateStage)`` (:mod:`jobs.candidate_stage`) on an ``ActorPoolStrategy`` pool of
   ``--sampling.num-actors`` actors, each holding one generator (``--backend vllm|hf``, ``--sampling.gpus-per-actor``
   on a cluster, fractional CPUs on a laptop), emits one row per (instruction, decoding, sample);
3. ``map_batches(label_batch)``: stateless CPU tasks add the Rouge-L label (exactly rouge-score's)
   against the example's references (null when it has none);
4. the driver streams the labelled rows and, as soon as a shard has all its rows
   (instructions × candidates per instruction), writes ``OUT/<task>/<split>/part-NNNNN.parquet``
   atomically and then its completion record ``part-NNNNN.done.json``.

A rerun skips completed shards and redoes the others from scratch, so an interrupted job resumes
with exactly instructions × candidates rows and no duplicates (Ray Data's ``write_parquet``
cannot give that: it names files per block and has no per-input commit; shards, records and the
summary: ``cappy_core/generation/shards.py``). Sampling seeds come
from (``--sampling.seed``, instruction id, decoding, sample), so a resumed run samples what an
uninterrupted one would. ``OUT/sample_config.json`` records the settings that define the output;
a rerun with different ones is refused (use a new ``--out`` or ``--overwrite``). Schema:
``cappy_core/labeling/candidates.py``.

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
import logging
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa

from cappy_core.config import SettingError, key_values
from cappy_core.generation import BACKENDS, DECODE_LOOPS, SamplingSpec
from jobs.runtime import job_main, job_output

logger = logging.getLogger("jobs.sample_label")  # not __name__: "__main__" under python -m

#: Generator actors that may die in a row while loading the model before the job fails.
INIT_DEATHS = 3


@dataclass
class SampleConfig:
    """``cappy sample``'s settings; those marked ``"key"`` (and the sampling section's own) define
    the candidates, so a resumed output must have been written with the same ones."""

    tasks: list[str] = field(default_factory=lambda: ["all45"], metadata={
        "help": "'all45', 'pretrain' or task names, among the tasks prepared under --data"})
    splits: list[str] = field(default_factory=lambda: ["train", "validation"], metadata={
        "choices": ["train", "validation"], "help": "splits to sample"})
    data: str = field(default="data/bigbench", metadata={"help": "folder written by `cappy data prepare`"})
    out: str = field(default="data/candidates", metadata={
        "help": "output folder, or a URI (s3://, gs://, ...: written in a local staging folder and uploaded "
                "shard by shard)"})
    generator: Optional[str] = field(default=None, metadata={"key": True,
        "help": "generator: a Hugging Face folder or hub id (default: the embedded generator trained by "
                "`cappy generator train`)"})
    backend: str = field(default="vllm", metadata={"key": True, "choices": list(BACKENDS),
                                                   "help": "vllm (decoder-only) or hf (transformers; also seq2seq)"})
    sampling: SamplingSpec = field(default_factory=SamplingSpec, metadata={
        "key": True, "help": "how candidates are drawn (decodings, samples, tokens, seed) and spread (batches, actors)"})
    max_prompt_tokens: Optional[int] = field(default=None, metadata={"key": True,
        "help": "instructions keep their last N generator tokens (default: the length the embedded "
                "generator was trained on, from its cappy_generator.json; 512 for other models)"})
    max_examples_per_task: Optional[int] = field(default=None, metadata={"key": True,
        "help": "use only the first N examples of each task and split (small runs)"})
    shard_size: int = field(default=256, metadata={"key": True, "help": "instructions per output file (the unit of resume)"})
    decode_loop: str = field(default="shared", metadata={"choices": list(DECODE_LOOPS),
        "help": "--backend hf: how a prompt's KV cache is kept while its candidates decode: shared (once "
                "for all of them; the default where the model allows it, else cached), cached (repeated "
                "per candidate), generate (model.generate per decoding)"})
    label_cpus: float = field(default=0.25, metadata={"help": "CPUs per Rouge-L labelling task"})
    label_tasks: int = field(default=2, metadata={"help": "most concurrent labelling tasks (Rouge-L is fast)"})
    dtype: str = field(default="auto", metadata={"key": True,
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

    def __post_init__(self) -> None:
        for name in ("shard_size", "label_tasks"):  # the sampling section checks its own
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_examples_per_task is not None and self.max_examples_per_task < 0:
            raise SettingError("max_examples_per_task", f"must be >= 0, got {self.max_examples_per_task}")
        if self.decode_loop not in DECODE_LOOPS:
            raise SettingError("decode_loop", f"must be one of {', '.join(DECODE_LOOPS)}, got {self.decode_loop!r}")
        bad = [s for s in self.splits if s not in ("train", "validation")]
        if bad:
            raise SettingError("splits", f"{bad}: unknown; use train and/or validation")


EPILOG = """Examples:
  cappy sample --tasks auto_categorization operators --generator ~/gen --backend vllm
  cappy sample --tasks tense --generator ~/gen --backend hf --max-examples-per-task 32 --sampling.cpus-per-actor 0.5
  ray job submit --working-dir . -- python -m jobs.sample_label --tasks all45 \\
      --generator PATH_OR_HF_ID --backend vllm --sampling.gpus-per-actor 1 --sampling.num-actors 8"""


def run(cfg: SampleConfig, log=print) -> dict:
    """Sample, label and write; returns the summary (also printed). One run per ``--out`` at a
    time: a second one refuses at once, naming the holder (:func:`cappy_core.io.output_lock`);
    a URI ``--out`` is staged locally and uploaded shard by shard."""
    from cappy_core.io import with_local_paths

    cfg = with_local_paths(cfg, "data")
    with job_output(cfg.out, "--out", "cappy sample", "sample", cfg, log, logger=logger) as (out, log):
        return _run_locked(dataclasses.replace(cfg, out=out), log)


def _run_locked(cfg: SampleConfig, log) -> dict:
    from cappy_core.generation import shards as sh
    from cappy_core.labeling.candidates import CANDIDATE_SCHEMA
    from cappy_core.data.tasks import resolve_tasks
    from cappy_core.generation import candidates_per_instruction, decodings_from_names, resolve_generator
    from cappy_core.remote import sync_outputs

    sampling = cfg.sampling
    decodings = decodings_from_names(sampling.decodings, sampling.samples_per_decoding)
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
    # what changes the candidates (the fields marked "key"): a resumed output must have the same ones
    defining = [*key_values(cfg, flat_sections=True), "generator"]
    sh.check_settings(cfg.out, {**key_values(cfg, marker=None, flat_sections=True), "generator": generator}, defining,
                      overwrite=cfg.overwrite)
    todo, done = sh.plan_shards(cfg.data, cfg.out, tasks, cfg.splits, shard_size=cfg.shard_size,
                                max_examples_per_task=cfg.max_examples_per_task, overwrite=cfg.overwrite)

    meta = {"generator": generator, "backend": cfg.backend, "decodings": list(sampling.decodings),
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

    from cappy_core.labeling.candidates import add_labels
    from cappy_core.generation import GeneratorSpec
    from jobs.candidate_stage import CandidateStage
    from cappy_core.remote import sync_outputs
    from cappy_core.generation.shards import write_shard
    from jobs.log_file import init_ray

    gen_kwargs = GeneratorSpec(
        generator, cfg.backend, max_prompt_tokens=cfg.max_prompt_tokens, dtype=cfg.dtype,
        allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code, batch_rows=cfg.sampling.batch_rows,
        decode_loop=cfg.decode_loop, max_model_len=cfg.max_prompt_tokens + cfg.sampling.max_new_tokens,
        kv_cache_memory_bytes=None if cfg.kv_cache_gb is None else int(cfg.kv_cache_gb * (1 << 30)),
        gpu_memory_utilization=cfg.gpu_memory_utilization).backend_kwargs()
    init_ray()  # ray.init, and Ray's driver log kept in the log file
    if "RAY_DATA_MAX_CONSECUTIVE_ACTOR_INIT_DEATHS" not in os.environ:
        # Ray Data fails the job when a generator actor dies while loading its model (its default,
        # 0); one killed there (preempted, OOM) is replaced, a model that never loads still fails.
        ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = INIT_DEATHS
    # One block per generator call, not per shard: a free actor takes the next call, so at the end no
    # actor idles while another works through a whole shard (the tasks' shards differ in size).
    size = cfg.sampling.batch_size
    ds = ray.data.from_arrow([s.rows.slice(i, size) for s in todo for i in range(0, s.rows.num_rows, size)])
    ds = ds.map_batches(
        CandidateStage, batch_format="pyarrow", batch_size=cfg.sampling.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.sampling.num_actors),
        num_cpus=cfg.sampling.cpus_per_actor, num_gpus=cfg.sampling.gpus_per_actor or None,
        fn_constructor_kwargs=dict(backend=cfg.backend, generator=generator, generator_kwargs=gen_kwargs,
                                   decodings=decodings, max_new_tokens=cfg.sampling.max_new_tokens,
                                   min_new_tokens=cfg.sampling.min_new_tokens, seed=cfg.sampling.seed,
                                   prompt_format=cfg.sampling.prompt_format))
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
    return job_main(SampleConfig, lambda cfg, _: run(cfg) and None, job="sample", module="jobs.sample_label",
                    argv=argv, prog=prog, epilog=EPILOG,
                    description="Sample candidates for BIG-Bench instructions with an LLM (vLLM or transformers) on "
                                "Ray Data, label each with Rouge-L against the references, write Parquet per task "
                                "and split.")


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
