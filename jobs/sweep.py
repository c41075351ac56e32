"""``cappy sweep``: the main job. BIG-Bench generation with Cappy selection against seven baselines.

    cappy sweep --preset local                       # README's main command: offline, 2 CPU cores
    cappy sweep --preset paper                       # the 45 tasks (44 offline), GPU actors
    cappy sweep --preset local --tasks tense rephrase --train-size 256
    cappy sweep --tasks word_sorting --generator google/flan-t5-small --backend hf --scorer btan2/cappy-large
    ray job submit --working-dir . -- python -m jobs.sweep --preset paper --out /mnt/shared/sweep

Stages (each reuses what an earlier run left, so a rerun is cheap):

1. **data**: the BIG-Bench cache (``cappy data download`` if missing) → ``OUT/data/<task>/<split>
   .parquet`` (``cappy data prepare``);
2. **generator**: ``--generator`` (folder or hub id), or the embedded Llama trained once into
   the cache (``cappy generator train``) on ``--generator-tasks`` (default: the sweep's tasks);
3. **scorer init**: ``--scorer`` (folder, hub id or ``minilm``), or the scorer pretrained once
   into the cache with ``cappy pretrain --preset <pretrain-preset>`` on tasks outside the 45;
4. **sample + label** (``cappy sample``, Ray Data): candidates for the first
   ``--max-train-examples-per-task`` train instructions and ``--max-examples-per-task``
   validation instructions → ``OUT/candidates/{train,validation}``;
5. **per task**, one Ray task each with declared resources (``--cpus-per-task``,
   ``--gpus-per-task``), so a GPU cluster runs many side by side: finetune the scorer on the
   task's train pairs (references, random negatives and the Rouge-L-labelled train candidates;
   :func:`cappy_core.training.train` in the task's process), score the validation candidates,
   and evaluate (:mod:`cappy_core.evaluation`). Each task's result is written atomically to
   ``OUT/tasks/<task>.json`` as soon as it finishes; a failure is recorded there with its error
   and the sweep goes on;
6. **summary**: ``OUT/summary.md`` and ``OUT/summary.csv`` (per task and mean, Cappy against
   every baseline), ``OUT/summary.png`` (Cappy minus the best baseline per task, and the mean of
   each method), ``OUT/summary.json``.

Rerunning the same command computes only the tasks that are missing, failed, or were run with
other settings (no "running" marker is ever left behind to block a rerun); ``--redo`` recomputes
all. Metric: Rouge-L F1 (×100) of each method's pick against the best reference, averaged per
task; the summary is the unweighted mean over tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cappy_core.config import ConfigError, to_dict
from cappy_core.generation import PAPER_DECODING_NAMES
from jobs.train_scorer import build_parser, config_from_args, write_json

JOB = "sweep"
FAIL_ENV = "CAPPY_SWEEP_FAIL_TASKS"  # fault injection: comma-separated tasks whose Ray task raises
RESULT_VERSION = 1
DESCRIPTION = ("The main job: sample candidates for BIG-Bench tasks, finetune a Cappy scorer per task, and "
               "compare Cappy's pick with the generator's own baselines (beam, four samplers, self-scores). "
               "Rerun the same command to compute only missing or failed tasks.")
EPILOG = """examples:
  cappy sweep --preset local
  cappy sweep --preset local --tasks tense rephrase --out /tmp/sweep
  cappy sweep --preset paper --out /mnt/shared/sweep --num-actors 8
  cappy sweep --tasks word_sorting --generator google/flan-t5-small --backend hf --scorer btan2/cappy-large

outputs (OUT): tasks/<task>.json per task, summary.md / summary.csv / summary.png / summary.json,
candidates/ (sampled and labelled), data/ (BIG-Bench Parquet), sweep_run.json (stage timings)"""

# DESIGN.md's headroom experiment: six small generative tasks a 7M-parameter model does something on.
LOCAL_TASKS = ["simple_text_editing", "tense", "gender_inclusive_sentences_german", "rephrase",
               "word_sorting", "unnatural_in_context_learning"]

# Settings that change a task's result: a finished task is recomputed when one of them differs.
RESULT_DEFINING = ("generator", "backend", "decodings", "samples_per_decoding", "max_new_tokens",
                   "max_examples_per_task", "max_train_examples_per_task", "scorer", "finetune", "train_size", "max_length", "lr",
                   "warmup_ratio", "weight_decay", "epochs", "batch_size", "micro_batch_size", "bf16", "seed",
                   "score_dtype")


@dataclass
class SweepConfig:
    tasks: list[str] = field(default_factory=lambda: list(LOCAL_TASKS), metadata={
        "help": "'all45' (the paper's 45 generative tasks; 44 offline) or task names"})
    task_dir: list[str] = field(default_factory=list, metadata={
        "help": "extra folders of BIG-Bench-format tasks (<dir>/<task>/task.json), e.g. for tellmewhy"})
    out: Optional[str] = field(default=None, metadata={
        "help": "output folder (default ~/cappy_runs/sweep-<preset>)"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "cache for BIG-Bench, the embedded generator and the pretrained scorer "
                "(default $CAPPY_CACHE_DIR or ~/.cache/cappy)"})
    redo: bool = field(default=False, metadata={"help": "recompute every task, even finished ones"})
    # generator
    generator: Optional[str] = field(default=None, metadata={
        "help": "generator folder or hub id (default: the embedded Llama, trained into the cache if missing)"})
    backend: str = field(default="vllm", metadata={
        "choices": ["vllm", "hf"], "help": "vllm (decoder-only) or hf (transformers; also seq2seq such as FLAN-T5)"})
    generator_tasks: list[str] = field(default_factory=lambda: ["sweep"], metadata={
        "help": "what the embedded generator trains on: 'sweep' (this sweep's tasks), 'all45' or task names"})
    generator_time_budget_s: float = field(default=480.0, metadata={
        "help": "wall-clock budget for training the embedded generator (when it is missing)"})
    # sampling
    max_examples_per_task: Optional[int] = field(default=40, metadata={
        "help": "evaluate on the first N validation instructions of each task (none: all)"})
    max_train_examples_per_task: Optional[int] = field(default=40, metadata={
        "help": "finetune on candidates for the first N train instructions of each task (none: all)"})
    decodings: list[str] = field(default_factory=lambda: list(PAPER_DECODING_NAMES), metadata={
        "help": "decodings; the paper's: beam4 + 4 samples each of sample, temp0.9, topk40, topp0.95 = 17"})
    samples_per_decoding: int = field(default=4, metadata={"help": "candidates per sampling decoding"})
    max_new_tokens: int = field(default=64, metadata={"help": "most generated tokens per candidate"})
    num_actors: int = field(default=1, metadata={"help": "generator actors (one model each)"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per generator actor"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per generator actor"})
    sample_batch_size: int = field(default=32, metadata={"help": "instructions per generator call"})
    # scorer
    scorer: Optional[str] = field(default=None, metadata={
        "help": "scorer to finetune from: a folder, a hub id (btan2/cappy-large) or 'minilm' "
                "(default: the scorer pretrained into the cache with `cappy pretrain --preset PRETRAIN_PRESET`)"})
    pretrain_preset: str = field(default="local", metadata={
        "help": "pretrain preset used when no --scorer is given and none is cached"})
    finetune: bool = field(default=True, metadata={
        "help": "finetune per task (--no-finetune: score with the init scorer as is)"})
    train_size: int = field(default=512, metadata={"help": "finetuning pairs per task (cut or tiled)"})
    max_length: int = field(default=128, metadata={"help": "scorer pair truncation length in tokens"})
    lr: float = field(default=1e-4, metadata={"help": "finetuning peak learning rate"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of updates of linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=1, metadata={"help": "passes over the finetuning pairs"})
    batch_size: int = field(default=16, metadata={"help": "pairs per optimizer update"})
    micro_batch_size: int = field(default=8, metadata={"help": "pairs per forward pass"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for finetuning"})
    score_dtype: str = field(default="float32", metadata={
        "choices": ["float32", "bfloat16"], "help": "dtype for scoring the validation candidates"})
    seed: int = field(default=0, metadata={"help": "seeds sampling, pairs and finetuning"})
    keep_scorers: bool = field(default=False, metadata={
        "help": "save each task's finetuned scorer under OUT/tasks/<task>/scorer"})
    # per-task resources
    cpus_per_task: float = field(default=1.0, metadata={"help": "CPUs reserved per task (finetune + score)"})
    gpus_per_task: float = field(default=0.0, metadata={"help": "GPUs per task (fractions pack tasks on a GPU)"})
    torch_threads: int = field(default=1, metadata={"help": "torch threads per task on CPU"})


# --- one task (runs as a Ray task; plain Python, no Ray inside) -------------------------------

def _validation_groups(table) -> tuple[list[list[Any]], list[str], int]:
    """Candidates grouped by instruction (file order = decoding order); instructions without
    references (null labels) are left out and counted."""
    from cappy_core.evaluation import ScoredCandidate

    cols = table.select(["instruction_id", "decoding", "sample_idx", "label", "logprob_sum", "logprob_mean",
                         "score"]).to_pydict()
    groups: dict[str, list[ScoredCandidate]] = {}
    unlabeled: set[str] = set()
    for i, iid in enumerate(cols["instruction_id"]):
        if cols["label"][i] is None:
            unlabeled.add(iid)
            continue
        groups.setdefault(iid, []).append(ScoredCandidate(
            decoding=cols["decoding"][i], sample_idx=cols["sample_idx"][i], rouge=cols["label"][i],
            logprob_sum=cols["logprob_sum"][i], logprob_mean=cols["logprob_mean"][i], score=cols["score"][i]))
    return list(groups.values()), list(groups), len(unlabeled - set(groups))


def run_task(task: str, spec: dict) -> dict:
    """Finetune, score and evaluate one task; returns its result record (without status)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cappy_core.candidates import read_candidates
    from cappy_core.data.records import read_examples, split_path
    from cappy_core.evaluation import evaluate_task
    from cappy_core.pretrain_data import build_pair_mixture, read_samples, tile, write_pairs
    from cappy_core.scorer import Scorer
    from jobs.train_scorer import TrainScorerConfig, fit_in_process, worker_config

    import transformers

    if task in spec.get("fail_tasks", ()):
        raise RuntimeError(f"injected failure for task {task} ({FAIL_ENV})")
    transformers.logging.set_verbosity_error()  # load reports, once per task process
    timings: dict[str, float] = {}
    t = time.monotonic()
    device = "cuda" if spec["gpus_per_task"] > 0 and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(spec["torch_threads"])
    task_dir = Path(spec["out"]) / "tasks" / task
    task_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, Any] = {}
    train_info: dict[str, Any] = {}
    if spec["finetune"]:
        examples = read_examples(split_path(spec["data"], task, "train"))
        if spec["max_train_examples_per_task"] is not None:
            examples = examples[:spec["max_train_examples_per_task"]]  # the instructions that were sampled
        cands = read_samples(Path(spec["candidates"]) / "train", tasks=[task], splits=["train"])
        # cut or tiled to train_size, as the finetune job does
        built, _ = build_pair_mixture(examples, cands, train_size=None, eval_size=0, seed=spec["seed"])
        train = tile(built, spec["train_size"])
        sizes.update(train_examples=len(examples), train_candidates=len(cands), train_pairs_built=len(built),
                     train_pairs=len(train))
        train_file = write_pairs(train, task_dir / "train_pairs.parquet")
        tcfg = TrainScorerConfig(**{k: spec[k] for k in (
            "train_size", "max_length", "lr", "warmup_ratio", "weight_decay", "epochs", "batch_size",
            "micro_batch_size", "bf16", "seed")}, init=spec["init"], num_workers=1, eval_size=0,
            torch_threads=spec["torch_threads"], checkpoint_every=10**9, log_every=10**9)
        c = worker_config(tcfg, len(train), 0, {"job": "sweep", "task": task})
        timings["pairs_s"] = time.monotonic() - t
        t = time.monotonic()
        scorer, state, rate = fit_in_process(c, str(train_file), device=device)
        timings["finetune_s"] = time.monotonic() - t
        k = max(1, len(state.losses) // 10)
        train_info = {"updates": state.update, "pairs": state.samples, "samples_per_s": rate,
                      "loss_first_tenth": sum(state.losses[:k]) / k, "loss_last_tenth": sum(state.losses[-k:]) / k}
        if spec["score_dtype"] == "bfloat16":
            scorer.dtype = "bfloat16"
        if spec["keep_scorers"]:
            scorer.save_pretrained(task_dir / "scorer")
    else:
        scorer = Scorer.from_pretrained(spec["init"], dtype=spec["score_dtype"], device=device,
                                        max_length=spec["max_length"])
    t = time.monotonic()
    val_dir = Path(spec["candidates"]) / "validation"
    val = read_candidates(val_dir, tasks=[task], splits=["validation"])
    if val.num_rows == 0:
        raise ValueError(f"task {task}: no validation candidates under {val_dir}")
    scores = scorer.score(val["instruction"].to_pylist(), val["text"].to_pylist())
    val = val.append_column("score", pa.array(scores, pa.float64()))
    tmp = task_dir / "validation_scored.parquet.tmp"
    pq.write_table(val, tmp)
    tmp.replace(task_dir / "validation_scored.parquet")
    timings["score_s"] = time.monotonic() - t
    groups, _, unlabeled = _validation_groups(val)
    if not groups:
        raise ValueError(f"task {task}: no validation instruction has references to evaluate against")
    metrics = evaluate_task(groups)
    sizes.update(validation_instructions=len(groups), validation_candidates=sum(map(len, groups)),
                 validation_unlabeled_instructions=unlabeled)
    return {"metrics": metrics, "sizes": sizes, "training": train_info, "timings": timings, "device": device,
            **_where()}


def _where() -> dict:
    """Which node and process ran the task (the multi-node test checks that work spread)."""
    import socket

    where = {"hostname": socket.gethostname(), "pid": os.getpid(), "node_id": None}
    try:
        import ray

        if ray.is_initialized():
            where["node_id"] = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return where


# --- the driver -------------------------------------------------------------------------------

def out_dir(cfg: SweepConfig, preset: str | None) -> Path:
    return Path(cfg.out or f"~/cappy_runs/sweep-{preset or 'custom'}").expanduser().resolve()


def result_key(cfg: SweepConfig, generator: str, init: str) -> dict:
    """What defines a task's result; a finished task whose key differs is recomputed."""
    key = {k: getattr(cfg, k) for k in RESULT_DEFINING}
    key.update(generator=generator, scorer=init, version=RESULT_VERSION)
    return key


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_result_path(out: Path, task: str) -> Path:
    return out / "tasks" / f"{task}.json"


def finished(out: Path, task: str, digest: str) -> dict | None:
    """The task's earlier result if it succeeded with the same settings, else None."""
    path = task_result_path(out, task)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("status") == "ok" and rec.get("key_digest") == digest else None


def ensure_data(cfg: SweepConfig, out: Path, log) -> list[str]:
    """BIG-Bench in the cache, then the sweep's tasks as Parquet under OUT/data; returns the tasks."""
    from cappy_core.data.source import BigBenchNotFound, bigbench_task_root, download_bigbench
    from jobs.prepare_data import PrepareConfig, prepare

    try:
        bigbench_task_root(cfg.cache_dir)
    except BigBenchNotFound:
        log("BIG-Bench is not in the cache: fetching bigbench==1.0.0 from the package index (`cappy data download`)")
        download_bigbench(cfg.cache_dir)
    manifest = prepare(PrepareConfig(tasks=cfg.tasks, out=str(out / "data"), task_dir=cfg.task_dir,
                                     cache_dir=cfg.cache_dir), log=log)
    from cappy_core.data.tasks import resolve_tasks

    tasks, _ = resolve_tasks(cfg.tasks, list(manifest["tasks"]))
    if not tasks:
        raise FileNotFoundError(f"none of the tasks {cfg.tasks} could be prepared (see the lines above)")
    return tasks


def ensure_generator_for(cfg: SweepConfig, tasks: list[str], log) -> str:
    """``--generator`` as given, or the embedded generator for these tasks (trained once, cached)."""
    if cfg.generator:  # checked now, not after the data and scorer stages
        from jobs.sample_label import SampleConfig, resolve_generator

        return resolve_generator(SampleConfig(generator=cfg.generator, backend=cfg.backend))
    from jobs.train_generator import GeneratorConfig, ensure_generator

    train_tasks = sorted(tasks) if cfg.generator_tasks == ["sweep"] else list(cfg.generator_tasks)
    if train_tasks == ["all45"]:
        name = "bigbench-llama"
    else:  # one cached generator per task set
        name = "bigbench-llama-" + hashlib.sha256(" ".join(train_tasks).encode()).hexdigest()[:8]
    gcfg = GeneratorConfig(name=name, cache_dir=cfg.cache_dir, tasks=train_tasks, task_dir=list(cfg.task_dir),
                           time_budget_s=cfg.generator_time_budget_s, eval_tasks=sorted(tasks)[:6],
                           eval_examples=16, seed=cfg.seed)
    return str(ensure_generator(config=gcfg, log=log))


def ensure_scorer_init(cfg: SweepConfig, log) -> str:
    """``--scorer`` as given, or the scorer pretrained once into the cache (pretrain job, Ray Train)."""
    if cfg.scorer:  # checked now, not in every task after sampling
        from jobs.train_scorer import check_init

        check_init(cfg.scorer, flag="--scorer")
        return cfg.scorer
    from cappy_core.config import load_yaml
    from cappy_core.data.source import default_cache_dir
    from jobs.pretrain import PretrainConfig, run as run_pretrain
    from jobs.train_scorer import presets

    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    path = cache / "scorer" / f"pretrain-{cfg.pretrain_preset}"
    if (path / "config.json").is_file():
        log(f"using the pretrained scorer at {path}")
        return str(path)
    known = presets("pretrain")
    if cfg.pretrain_preset not in known:
        raise ConfigError(f"--pretrain-preset {cfg.pretrain_preset!r}: unknown; choose from {sorted(known)}")
    log(f"no pretrained scorer at {path}: pretraining one (`cappy pretrain --preset {cfg.pretrain_preset}`)")
    values = load_yaml(PretrainConfig, known[cfg.pretrain_preset])
    values.update(output=str(path), storage_path=str(cache / "runs"), cache_dir=cfg.cache_dir)
    run_pretrain(PretrainConfig(**values), log=log)
    return str(path)


def sample(cfg: SweepConfig, tasks: list[str], out: Path, generator: str, log) -> None:
    """Candidates for the train instructions (finetuning) and the validation ones (evaluation):
    two `cappy sample` outputs, ``OUT/candidates/{train,validation}``, as their sizes differ."""
    from jobs.sample_label import SampleConfig, run as run_sample

    splits = [("train", cfg.max_train_examples_per_task)] if cfg.finetune else []
    for split, cap in splits + [("validation", cfg.max_examples_per_task)]:
        log(f"-- {split} split")
        run_sample(SampleConfig(
            tasks=tasks, splits=[split], data=str(out / "data"), out=str(out / "candidates" / split),
            generator=generator, backend=cfg.backend, decodings=list(cfg.decodings),
            samples_per_decoding=cfg.samples_per_decoding, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
            max_examples_per_task=cap, batch_size=cfg.sample_batch_size, num_actors=cfg.num_actors,
            gpus_per_actor=cfg.gpus_per_actor, cpus_per_actor=cfg.cpus_per_actor), log=log)


def run_tasks(cfg: SweepConfig, tasks: list[str], out: Path, spec: dict, key: dict, log) -> dict[str, dict]:
    """One Ray task per sweep task; each result is written the moment it arrives."""
    import ray
    from tqdm import tqdm

    remote = ray.remote(run_task).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None,
                                         max_retries=0, name="sweep_task")
    started = {remote.remote(t, spec): (t, time.time()) for t in tasks}
    results: dict[str, dict] = {}
    bar = tqdm(total=len(tasks), desc="tasks", unit=" task", file=sys.stderr)
    pending = list(started)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        task, t0 = started[ready[0]]
        rec: dict[str, Any] = {"task": task, "key_digest": key_digest(key), "key": key,
                               "config": to_dict(cfg), "wall_s": None}
        try:
            rec.update(status="ok", **ray.get(ready[0]))
        except Exception as e:  # recorded, and the sweep goes on
            cause = getattr(e, "cause", None) or e
            rec.update(status="failed", error=f"{type(cause).__name__}: {cause}",
                       traceback="".join(traceback.format_exception(e))[-4000:])
            log(f"task {task} failed: {rec['error']}")
        rec["wall_s"] = round(time.time() - t0, 1)
        write_json(task_result_path(out, task), rec)
        results[task] = rec
        bar.update(1)
        if rec["status"] == "ok":
            m = rec["metrics"]
            bar.write(f"{task}: cappy {m.get('cappy', float('nan')):.1f}, beam4 {m.get('beam4', float('nan')):.1f}, "
                      f"oracle {m['oracle']:.1f} ({rec['wall_s']:.0f}s)")
    bar.close()
    return results


def run(cfg: SweepConfig, preset: str | None = None, log=print) -> dict:
    """The whole sweep; returns the summary (also written under OUT)."""
    import ray

    from jobs.sweep_report import write_reports

    for name in ("train_size", "batch_size", "micro_batch_size", "epochs", "torch_threads", "max_length"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.batch_size % cfg.micro_batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size "
                          f"{cfg.micro_batch_size}")
    out = out_dir(cfg, preset)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t_all = t = time.monotonic()

    def stage(name: str) -> None:
        nonlocal t
        stages[name] = round(time.monotonic() - t, 1)
        t = time.monotonic()

    log(f"== sweep into {out}")
    tasks = ensure_data(cfg, out, log)
    stage("data_s")
    log(f"== generator ({len(tasks)} tasks: {', '.join(tasks)})")
    generator = ensure_generator_for(cfg, tasks, log)
    stage("generator_s")
    log("== scorer init")
    init = ensure_scorer_init(cfg, log)
    stage("scorer_init_s")
    key = result_key(cfg, generator, init)
    digest = key_digest(key)
    todo = [t for t in tasks if cfg.redo or finished(out, t, digest) is None]
    log(f"== {len(tasks) - len(todo)} task(s) already finished with these settings; {len(todo)} to run")
    if todo:
        if not ray.is_initialized():
            ray.init()
        log("== sample + label (train and validation candidates)")
        sample(cfg, todo, out, generator, log)
        stage("sampling_s")
        log(f"== finetune, score and evaluate: {len(todo)} Ray task(s), {cfg.cpus_per_task} CPU"
            + (f" + {cfg.gpus_per_task} GPU" if cfg.gpus_per_task else "") + " each")
        spec = {**to_dict(cfg), "out": str(out), "data": str(out / "data"), "candidates": str(out / "candidates"),
                "init": init, "fail_tasks": [t for t in os.environ.get(FAIL_ENV, "").split(",") if t]}
        run_tasks(cfg, todo, out, spec, key, log)
        stage("tasks_s")
    records = {}
    for task in tasks:
        path = task_result_path(out, task)
        records[task] = json.loads(path.read_text()) if path.is_file() else {"task": task, "status": "missing"}
    summary = write_reports(out, records, log=log)
    stage("report_s")
    stages["total_s"] = round(time.monotonic() - t_all, 1)
    write_json(out / "sweep_run.json", {"config": to_dict(cfg), "preset": preset, "generator": generator,
                                        "scorer_init": init, "tasks": tasks, "ran": todo, "stages": stages})
    log(f"stage times (s): {json.dumps(stages)}")
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from cappy_core.data.source import BigBenchNotFound
    from cappy_core.data.tasks import UnknownTaskError

    parser = build_parser(SweepConfig, JOB, prog, description=DESCRIPTION, epilog=EPILOG)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(SweepConfig, args, JOB)
        summary = run(cfg, preset=args.preset)
    except (ConfigError, UnknownTaskError, BigBenchNotFound, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if not summary.get("failed") else 1


if __name__ == "__main__":
    sys.exit(main())
