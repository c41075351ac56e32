"""Scorer training throughput: the Ray Train loop vs the same loop in a plain process.

    python -m jobs.bench.train [--pairs 384] [--model minilm] [--max-length 128] [--threads 1] [--repeats 2]
                               [--compile] [--layouts] [--tasks ... --examples DIR]

Data: a pretraining pair mixture of a few small BIG-Bench tasks (the local preset's), written
once as Parquet. Timed on the SAME pairs, same config, one after the other:

- ``plain``: :func:`cappy_core.scorer.training.fit_scorer` on the pair file in this process (the same
  fit the Ray worker runs, fed from memory instead of Ray Data), ``--threads`` torch threads;
- ``ray_1w``: the ``cappy pretrain`` machinery (``run_training``: TorchTrainer, Ray Data feed via
  ``get_dataset_shard`` + ``iter_torch_batches``, one worker with ``--threads`` threads);
- ``ray_2w``: the same with 2 workers (gloo DDP) of ``--threads`` threads each;
- with ``--compile``, ``plain_compiled``: the plain loop on ``torch.compile(model, dynamic=True)``
  (inductor; its recompiles for new shapes after the first update count against it);
- with ``--layouts``, the ways to spend two cores outside Ray Train: ``plain_2t`` (one process,
  two threads) and ``two_procs_1t`` (two one-thread plain processes at once, their samples/s
  added: the sweep's two tasks finetuning side by side), each against ``plain_2t``.

Against the arithmetic limit: ``*_fraction_of_bound`` = samples/s × 3 × the forward FLOPs of a
pair at its real token length (:func:`cappy_core.scorer.model.flops_per_pair`; 6 × parameters ×
tokens plus attention; padding not counted, so padded tokens show as waste) ÷ ``matmul_fp32_flops``
(the best 1024² fp32 ``torch.matmul`` at ``--threads`` threads). Without BIG-Bench on the machine,
``--examples DIR`` reads the tasks from a ``cappy data prepare`` folder (any ``--task-dir`` tasks).

``plain`` and ``ray_1w`` alternate ``--repeats`` times and the best of each counts, so a burst of
other load hurts both alike. The default is one thread: on a shared 2-core machine one process
with two torch threads slows down many-fold whenever another process wants a core.

Samples/s is measured the same way in all three (:class:`cappy_core.scorer.training.Throughput`): from the
end of the first update to the last, without eval or checkpoint time, so model loading, Ray
start-up and the feed's first block are not counted; ``ratio_1w_vs_plain`` is the overhead of the
Ray loop itself (target ≥ 0.9). The machine's other load moves all numbers: run on a quiet one.

With a CUDA GPU (``--gpu``, default when one is visible), it adds a RoBERTa-large-shaped scorer
(random init from the config, no download) trained with bf16 autocast on synthetic tokens in
this process: samples/s and MFU = 3 × forward FLOPs per pair (:func:`cappy_core.scorer.model.
flops_per_pair`) × samples/s ÷ the best bf16 matmul FLOP/s measured on the same GPU.
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cappy_core.config import build_parser, resolve_and_run

LOCAL_TASKS = ["general_knowledge", "riddle_sense", "cause_and_effect", "physical_intuition", "snarks",
               "hindu_knowledge", "misconceptions", "strategyqa", "navigate", "periodic_elements"]


@dataclass
class TrainBenchConfig:
    pairs: int = field(default=384, metadata={"help": "training pairs per run"})
    model: str = field(default="minilm", metadata={"help": "scorer to train ('minilm', a folder, a hub id)"})
    max_length: int = field(default=128, metadata={"help": "pair truncation length"})
    micro_batch_size: int = field(default=16, metadata={"help": "pairs per forward pass per worker"})
    batch_size: int = field(default=32, metadata={"help": "pairs per update (all workers)"})
    threads: int = field(default=1, metadata={"help": "torch threads of the plain run and of each worker"})
    repeats: int = field(default=2, metadata={"help": "alternate plain / 1-worker runs this often; best of each"})
    two_workers: bool = field(default=True, metadata={"help": "also time 2 workers"})
    compile: bool = field(default=False, metadata={
        "help": "also time the plain loop with torch.compile(model, dynamic=True) (inductor), its compile and "
                "recompile time after the first update included, against the plain loop"})
    layouts: bool = field(default=False, metadata={
        "help": "also time the two ways to use 2 cores outside Ray Train: one process with 2 threads, and two "
                "1-thread processes at once (their samples/s added: two tasks finetuning side by side)"})
    tasks: list[str] = field(default_factory=lambda: list(LOCAL_TASKS), metadata={
        "help": "BIG-Bench tasks the pairs come from"})
    examples: Optional[str] = field(default=None, metadata={
        "help": "a `cappy data prepare` folder to read the tasks from (default: the task catalog: vendored, cached)"})
    gpu: Optional[bool] = field(default=None, metadata={
        "help": "also time a RoBERTa-large-shaped scorer in bf16 on the GPU (default: if CUDA is visible)"})
    gpu_seq_len: int = field(default=256, metadata={"help": "GPU part: tokens per pair"})
    gpu_batch: int = field(default=32, metadata={"help": "GPU part: pairs per step"})
    gpu_steps: int = field(default=20, metadata={"help": "GPU part: timed steps (after 3 warm-up)"})
    seed: int = field(default=0, metadata={"help": "pair sampling seed"})


def make_pairs(cfg: TrainBenchConfig, out_dir: Path) -> str:
    from cappy_core.labeling.pair_mixture import build_pair_mixture, load_examples, write_pairs

    examples, _ = load_examples(cfg.tasks, ["train", "validation"], cfg.examples, None, log=lambda *_: None)
    train, _ = build_pair_mixture(examples, train_size=cfg.pairs, max_pairs_per_task=max(64, cfg.pairs // 4),
                                  max_wrong_choices=4, seed=cfg.seed)
    return str(write_pairs(train, out_dir / "train.parquet"))


def flop_bound(cfg: TrainBenchConfig, pairs: str) -> dict:
    """What one training sample costs: 3 × the forward FLOPs of its pair at its real (unpadded)
    token length (:func:`cappy_core.scorer.model.flops_per_pair`: 2 × linear parameters × tokens
    + attention, i.e. 6 × parameters × tokens for a training step), averaged over the pairs; and
    the machine's fp32 matmul rate at ``--threads`` threads (the bound it is measured against)."""
    from cappy_core.labeling.pair_mixture import read_pair_columns
    from cappy_core.scorer.model import Scorer, flops_per_pair
    from cappy_core.flops import matmul_flops

    cols = read_pair_columns(pairs)
    scorer = Scorer.from_pretrained(cfg.model, device="cpu", max_length=cfg.max_length)
    lengths = [len(ids) for ids in scorer.encode(cols["instruction"], cols["response"])["input_ids"]]
    per_sample = 3.0 * sum(flops_per_pair(scorer.model.config, n) for n in lengths) / len(lengths)
    peak = matmul_flops(1024, threads=cfg.threads)
    return {"mean_tokens": sum(lengths) / len(lengths), "train_flops_per_sample": per_sample, "matmul_fp32_flops": peak}


def train_config(cfg: TrainBenchConfig, workers: int, threads: int, storage: Path, name: str):
    from cappy_core.scorer.schedule import ScorerSchedule
    from jobs.pretrain import PretrainConfig

    schedule = ScorerSchedule(lr=5e-5, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size // workers,
                              seed=cfg.seed)
    return PretrainConfig(init=cfg.model, name=name, storage_path=str(storage), output=str(storage / name / "out"),
                          train_size=cfg.pairs, eval_size=0, max_length=cfg.max_length, schedule=schedule,
                          num_workers=workers, cpus_per_worker=0.5, torch_threads=threads,
                          checkpoint_every=10 ** 6, log_every=10 ** 6, max_failures=0)


def time_ray(cfg: TrainBenchConfig, pairs: str, workers: int, threads: int, storage: Path, name: str) -> dict:
    from cappy_core.scorer.runs import resolve_paths
    from jobs.scorer_trainer import run_training

    tc = train_config(cfg, workers, threads, storage, f"bench-{name}")
    t = time.time()
    outcome = run_training(tc, resolve_paths(tc.name, tc.storage_path, output=tc.output), pairs, None,
                           run_info={"job": "bench"}, log=lambda *_: None)
    return {"samples_per_s": outcome.samples_per_s, "updates": outcome.updates, "wall_s": time.time() - t}


def time_plain(cfg: TrainBenchConfig, pairs: str, storage: Path, threads: int | None = None,
               compiled: bool = False) -> dict:
    import torch

    from cappy_core.labeling.pair_mixture import read_pair_columns
    from cappy_core.scorer.model import Scorer
    from cappy_core.scorer.training import Throughput, fit_scorer

    threads = threads or cfg.threads
    tc = train_config(cfg, 1, threads, storage, "plain")
    torch.set_num_threads(threads)
    t = time.time()
    schedule = tc.schedule
    scorer = Scorer.from_pretrained(tc.init, dtype="bfloat16" if schedule.bf16 else "float32", device="cpu",
                                    max_length=tc.max_length, seed=schedule.seed, for_training=True)
    meter, rate = Throughput(1), [0.0]
    model = torch.compile(scorer.model, dynamic=True) if compiled else None  # None: scorer.model
    state = fit_scorer(scorer, read_pair_columns(pairs), schedule, device="cpu", model=model,
                       on_update=lambda info: rate.__setitem__(0, meter.tick(info.samples)))
    return {"samples_per_s": rate[0], "updates": state.update, "wall_s": time.time() - t}


def _one_thread_rate(cfg: TrainBenchConfig, pairs: str, storage: str) -> float:
    """A child process's one-thread plain run (:func:`time_layouts`)."""
    return time_plain(cfg, pairs, Path(storage), threads=1)["samples_per_s"]


def time_layouts(cfg: TrainBenchConfig, pairs: str, storage: Path) -> dict:
    """The 2-core layouts on the same pairs: ``plain_2t`` (one process, two torch threads) and
    ``two_procs_1t`` (two one-thread processes training at once, samples/s added), best of
    ``--repeats`` each, alternated."""
    import multiprocessing

    two_threads, side_by_side = [], []
    ctx = multiprocessing.get_context("spawn")
    for _ in range(cfg.repeats):
        two_threads.append(time_plain(cfg, pairs, storage, threads=2)["samples_per_s"])
        with ctx.Pool(2) as pool:
            side_by_side.append(sum(pool.starmap(_one_thread_rate, [(cfg, pairs, str(storage))] * 2)))
    return {"plain_2t_samples_per_s": max(two_threads), "two_procs_1t_samples_per_s": max(side_by_side),
            "plain_2t_runs": [round(x, 3) for x in two_threads],
            "two_procs_1t_runs": [round(x, 3) for x in side_by_side]}


def gpu_bench(cfg: TrainBenchConfig) -> dict:
    """RoBERTa-large-shaped scorer, random init, bf16 autocast, synthetic tokens, one GPU."""
    import torch
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    from cappy_core.scorer.model import flops_per_pair
    from cappy_core.scorer.training import ScorerSchedule, scorer_loss, train

    dev = torch.device("cuda")
    conf = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                         intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(conf).to(dev)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    n, b, s = cfg.gpu_steps + 3, cfg.gpu_batch, cfg.gpu_seq_len
    batches = [{"input_ids": torch.randint(3, 50000, (b, s), generator=g).to(dev),
                "attention_mask": torch.ones(b, s, dtype=torch.long, device=dev),
                "labels": torch.rand(b, generator=g).to(dev)} for _ in range(n)]
    marks: list[float] = []

    def on_update(info):
        torch.cuda.synchronize()
        marks.append(time.perf_counter())

    train(model, batches, loss_fn=scorer_loss(ScorerSchedule()), total_updates=n, lr=2e-5, bf16=True, device=dev,
          on_update=on_update)
    rate = b * (len(marks) - 3) / (marks[-1] - marks[2])
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    torch.matmul(a, a)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        torch.matmul(a, a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    peak = 2.0 * 8192 ** 3 / best
    achieved = 3.0 * flops_per_pair(conf, s) * rate
    return {"gpu": torch.cuda.get_device_name(0), "gpu_roberta_large_bf16_samples_per_s": rate,
            "gpu_seq_len": s, "gpu_batch": b, "gpu_matmul_bf16_flops": peak,
            "gpu_train_flops": achieved, "gpu_mfu": achieved / peak}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(TrainBenchConfig, prog=prog or "python -m jobs.bench.train",
                          description=__doc__.split("\n")[0])
    # --print-config: the YAML, no run
    return int(resolve_and_run(TrainBenchConfig, parser.parse_args(argv), None, run) or 0)


def run(cfg: TrainBenchConfig) -> int:
    os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "600")
    import ray

    from jobs.local_ray import init_local_ray

    out: dict = {"bench": "train", "model": cfg.model, "pairs": cfg.pairs, "max_length": cfg.max_length,
                 "batch_size": cfg.batch_size, "micro_batch_size": cfg.micro_batch_size, "threads": cfg.threads,
                 "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="cappy-bench-train-") as tmp:
        storage = Path(tmp)
        pairs = make_pairs(cfg, storage)
        bound = flop_bound(cfg, pairs)
        if not ray.is_initialized():
            init_local_ray(include_dashboard=False, log_to_driver=False)
        plains, ones = [], []
        for r in range(cfg.repeats):
            plains.append(time_plain(cfg, pairs, storage))
            ones.append(time_ray(cfg, pairs, 1, cfg.threads, storage, f"1w-{r}"))
        plain = max(plains, key=lambda x: x["samples_per_s"])
        one = max(ones, key=lambda x: x["samples_per_s"])
        out.update(plain_samples_per_s=plain["samples_per_s"], ray_1w_samples_per_s=one["samples_per_s"],
                   ratio_1w_vs_plain=one["samples_per_s"] / plain["samples_per_s"],
                   plain_runs=[round(x["samples_per_s"], 3) for x in plains],
                   ray_1w_runs=[round(x["samples_per_s"], 3) for x in ones],
                   ray_1w_wall_s=one["wall_s"], updates=one["updates"], mean_tokens=bound["mean_tokens"],
                   matmul_fp32_flops=round(bound["matmul_fp32_flops"], -6),
                   # useful training FLOP/s (padding not counted) over the matmul rate at the same threads
                   plain_fraction_of_bound=plain["samples_per_s"] * bound["train_flops_per_sample"]
                   / bound["matmul_fp32_flops"],
                   ray_1w_fraction_of_bound=one["samples_per_s"] * bound["train_flops_per_sample"]
                   / bound["matmul_fp32_flops"])
        if cfg.compile:  # best of --repeats, against the best plain run above
            runs = [time_plain(cfg, pairs, storage, compiled=True)["samples_per_s"] for _ in range(cfg.repeats)]
            out.update(plain_compiled_samples_per_s=max(runs), plain_compiled_runs=[round(x, 3) for x in runs],
                       compiled_vs_plain=max(runs) / plain["samples_per_s"])
        if cfg.two_workers:
            two = time_ray(cfg, pairs, 2, cfg.threads, storage, "2w")
            out.update(ray_2w_samples_per_s=two["samples_per_s"], ray_2w_wall_s=two["wall_s"],
                       speedup_2w_vs_1w=two["samples_per_s"] / one["samples_per_s"])
        if cfg.layouts:  # against one process with two threads, the baseline of a 2-core machine
            out.update(time_layouts(cfg, pairs, storage))
            base = out["plain_2t_samples_per_s"]
            out.update(two_procs_1t_vs_plain_2t=out["two_procs_1t_samples_per_s"] / base,
                       plain_1t_vs_plain_2t=plain["samples_per_s"] / base)
            if cfg.two_workers:
                out["ray_2w_vs_plain_2t"] = out["ray_2w_samples_per_s"] / base
    use_gpu = cfg.gpu
    if use_gpu is None:
        import torch

        use_gpu = torch.cuda.is_available()
    if use_gpu:
        out.update(gpu_bench(cfg))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}), flush=True)
    return 0


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
