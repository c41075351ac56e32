"""``cappy generator train``: train the embedded generator (byte-level BPE + small Llama) on BIG-Bench.

    cappy generator train                                  # ≤ 10 min on 2 CPU cores → <cache>/generator/bigbench-llama
    cappy generator train --tasks tense rephrase --time-budget-s 120 --out /tmp/gen
    ray job submit --working-dir . -- python -m jobs.train_generator --out /mnt/shared/cappy/generator/bigbench-llama

No generator weights can be fetched offline, so the project trains its own decoder-only model:
a byte-level BPE tokenizer (small vocabulary: CPU sampling stays fast) and a Llama (vLLM and
transformers both run it) on instruction → reference pairs of the BIG-Bench *train* splits (the
44 offline tasks of the paper's 45 by default). The pipeline, top to bottom:

1. config (defaults < ``--preset`` (``jobs/configs/generator_{cpu,tiny}.yaml``) < ``--config YAML``
   < flags);
2. data: each task's train split, capped at ``--max-per-task`` examples, less the last
   ``--eval-examples`` train examples of each ``--eval-tasks`` task, held out for the final check
   (validation is never read);
3. tokenizer trained on a sample of that text; sequences ``<s>{instruction}\\n{reference}</s>``
   (instruction cut from the left); the loss covers every token by default (``--loss-on all``):
   modelling the instruction too helps a tiny model produce the words most of these tasks copy
   from it (6 tasks, 400 updates: greedy Rouge-L 8.6 vs 3.8 with the loss on the response only;
   4 tasks, 300 updates: 16.5 vs 9.1; on all 44 tasks at 500 updates both ≈1; measured when the
   check still read validation examples). Replay it on held-out train examples with the two
   commands ``cappy generator train --tasks ... --loss-on all|response --out DIR`` and their
   check lines; on the five stand-in tasks of ``tests/fake_release.py`` (1,500 updates): 88.4
   (all) vs 89.6 (response), too close to move the default, which BIG-Bench's copying tasks set;
4. :func:`cappy_core.generation.embedded_training.fit_generator`: length-bucketed batches, bf16 autocast. With
   ``--time-budget-s`` (the whole run's wall clock: data, tokenizer, training, check, save) the
   first ``--calibration-updates`` updates measure the speed and the LR schedule is sized to the
   updates that fit; training also stops gracefully at the deadline;
5. check: greedy Rouge-L and the spread of sampled candidates on the held-out train examples;
6. save: a Hugging Face folder (safetensors + tokenizer + ``cappy_generator.json`` with config,
   steps, tokens/s, loss and the check's metrics), written atomically.

What to expect (quiet 2-core machine, defaults): ~2,000 updates at ~6.5k tokens/s in ~560 s;
on all 44 tasks the model stays weak: greedy Rouge-L ≈6.5 on the six small tasks of the local sweep's
headroom experiment, 4 samples spread ≈9.5 points, best of greedy + samples ≈12. A generator
trained on just the tasks a run evaluates (``--tasks``) is much stronger on them.

Runs in one process (a Ray job runs it on the head node: give ``--out`` on shared storage there).
The main job calls :func:`ensure_generator`, which trains once and reuses the folder afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cappy_core.config import (CacheOptions, ConfigError, build_parser, config_from_args, resolve_and_run, run_main,
                               to_dict)
from cappy_core.data.tasks import LOCAL_TASKS
from cappy_core.generation.embedded_model import DEFAULT_GENERATOR_NAME, default_generator_path, generator_metadata, is_generator_dir
from jobs.tracking import TrackingOptions, check_report_to

__all__ = ["GeneratorConfig", "ensure_generator", "parse_config", "train_generator", "main"]


@dataclass
class GeneratorConfig(CacheOptions, TrackingOptions):
    # where
    name: str = field(default=DEFAULT_GENERATOR_NAME, metadata={
        "help": "folder name under <cache>/generator/ (ignored with --out)"})
    out: Optional[str] = field(default=None, metadata={"help": "output folder (default <cache>/generator/<name>)"})
    force: bool = field(default=False, metadata={"help": "retrain even if the output folder holds a generator"})
    # data
    tasks: list[str] = field(default_factory=lambda: ["all45"], metadata={
        "help": "training tasks: 'all45' (the 44 offline ones), 'pretrain' or names (train splits)"})
    task_dir: list[str] = field(default_factory=list, metadata={
        "help": "extra folders of BIG-Bench-format tasks (<dir>/<task>/task.json)"})
    max_per_task: Optional[int] = field(default=1000, metadata={
        "help": "at most this many training examples per task (seeded sample)"})
    max_prompt_tokens: int = field(default=160, metadata={
        "help": "instructions are cut from the left to this many tokens (BOS included)"})
    max_response_tokens: int = field(default=64, metadata={"help": "references are cut to this many tokens"})
    loss_on: str = field(default="all", metadata={
        "choices": ["response", "all"],
        "help": "train on every token, or on the reference tokens (+EOS) only (measured: 'all' is better here)"})
    # tokenizer and model
    vocab_size: int = field(default=4096, metadata={"help": "byte-level BPE vocabulary size"})
    tokenizer_chars_per_task: int = field(default=200_000, metadata={
        "help": "characters of each task's text the tokenizer is trained on"})
    hidden_size: int = field(default=192, metadata={"help": "Llama hidden size"})
    num_layers: int = field(default=4, metadata={"help": "Llama layers"})
    num_heads: int = field(default=3, metadata={"help": "attention heads (hidden_size must divide)"})
    intermediate_size: Optional[int] = field(default=None, metadata={"help": "MLP size (default 4 × hidden)"})
    # optimisation
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer update"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.05, metadata={
        "help": "share of --updates spent warming up (with a time budget: --calibration-updates)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "gradient clipping"})
    updates: Optional[int] = field(default=1500, metadata={
        "help": "optimizer updates: a fixed number, so the same command trains the same generator on any "
                "machine (none: as many as fit --time-budget-s)"})
    time_budget_s: float = field(default=0.0, metadata={
        "help": "wall-clock cap of the whole run in seconds (0: none). With --updates training stops at the "
                "cap if it comes first; without, the LR schedule is sized to the updates that fit (then "
                "results depend on the machine's speed)"})
    eval_reserve_s: float = field(default=45.0, metadata={
        "help": "seconds of the budget kept for the final check and saving"})
    calibration_updates: int = field(default=40, metadata={
        "help": "with a time budget: the warmup updates, timed to size the LR schedule to the budget"})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast (weights stay fp32): faster on GPUs and CPUs with native bf16 (AMX, "
                "AVX512-BF16), ~40x slower on AVX2-only CPUs, so off by default"})
    threads: Optional[int] = field(default=None, metadata={
        "help": "torch threads (default: torch's choice; use 1 when sharing 2 cores with another job)"})
    device: Optional[str] = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)"})
    seed: int = field(default=0, metadata={"help": "seeds data order, references, init and sampling"})
    # final check
    eval_tasks: list[str] = field(default_factory=lambda: list(LOCAL_TASKS), metadata={
        "help": "tasks for the greedy Rouge-L check (on held-out train examples)"})
    eval_examples: int = field(default=32, metadata={"help": "train examples per eval task held out of training for the quality check (its last ones, at "
                                "most a fifth of its train split; validation is never read; 0: no check)"})
    eval_samples: int = field(default=4, metadata={"help": "sampled candidates per example for the spread"})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "new tokens per candidate in the check"})


EPILOG = """Examples:
  cappy generator train
  cappy generator train --preset tiny --out /tmp/tiny-gen
  cappy generator train --tasks tense rephrase --time-budget-s 120 --force"""


def output_path(cfg: GeneratorConfig) -> Path:
    return Path(cfg.out).expanduser() if cfg.out else default_generator_path(cfg.name, cfg.cache_dir)


def check_config(cfg: GeneratorConfig) -> None:
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    if cfg.time_budget_s <= 0 and not cfg.updates:
        raise ConfigError("without a time budget (--time-budget-s 0) give --updates")
    if cfg.time_budget_s > 0 and cfg.time_budget_s <= cfg.eval_reserve_s:
        raise ConfigError(f"--time-budget-s {cfg.time_budget_s} leaves nothing after --eval-reserve-s "
                          f"{cfg.eval_reserve_s}")
    for name in ("vocab_size", "batch_size", "grad_accum_steps", "max_prompt_tokens", "max_response_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def train_generator(cfg: GeneratorConfig, log: Callable[[str], None] = print) -> dict:
    """Train and save the generator described by ``cfg``; returns its metadata."""
    from cappy_core.generation import embedded_training as gt

    t_start = time.monotonic()
    check_config(cfg)
    check_report_to(cfg.report_to)
    out = output_path(cfg)
    gt.check_output_folder(out)
    deadline = t_start + cfg.time_budget_s if cfg.time_budget_s > 0 else None
    train_deadline = deadline - cfg.eval_reserve_s if deadline is not None else None
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = gt.load_generator_data(cfg.tasks, eval_tasks=cfg.eval_tasks, eval_examples=cfg.eval_examples,
                                  task_dir=cfg.task_dir, cache_dir=cfg.cache_dir, log=log)
    for why in data.unavailable.values():
        log(f"unavailable: {why}")
    tokenizer, seqs = gt.prepare_sequences(
        data.train_by_task, vocab_size=cfg.vocab_size, tokenizer_chars_per_task=cfg.tokenizer_chars_per_task,
        max_per_task=cfg.max_per_task, max_prompt_tokens=cfg.max_prompt_tokens,
        max_response_tokens=cfg.max_response_tokens, seed=cfg.seed, log=log, started=t_start)
    prep_s = time.monotonic() - t_start
    from jobs.tracking import Tracker, tracking

    # beside the generator folder, not in it: the folder is written atomically and read by vLLM
    with tracking(cfg.report_to, out.parent / "runs", out.name, to_dict(cfg), log) as run, Tracker(run) as tracker:
        return _fit_check_save(cfg, gt, data, tokenizer, seqs, out, t_start, prep_s, deadline, train_deadline,
                               tracker, log)


def _fit_check_save(cfg, gt, data, tokenizer, seqs, out, t_start, prep_s, deadline, train_deadline, tracker,
                    log) -> dict:
    """Training (each update's loss and LR to ``tracker`` as it is made), the check, the folder."""
    fit = gt.fit_generator(
        tokenizer, seqs, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, loss_on=cfg.loss_on, batch_size=cfg.batch_size,
        grad_accum_steps=cfg.grad_accum_steps, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16, seed=cfg.seed,
        updates=cfg.updates, calibration_updates=cfg.calibration_updates, deadline=train_deadline,
        device=cfg.device, log=log,
        on_update=lambda info: tracker.scalars({"train/loss": info.loss, "train/lr": info.lr}, info.update))
    metrics = gt.check_generator(fit.model, tokenizer, data.eval_by_task, max_prompt_tokens=cfg.max_prompt_tokens,
                                 max_new_tokens=cfg.eval_max_new_tokens, num_samples=cfg.eval_samples,
                                 seed=cfg.seed, deadline=deadline, log=log)
    metadata = gt.run_record(fit, tokenizer, seqs, data, metrics, config=to_dict(cfg),
                             max_prompt_tokens=cfg.max_prompt_tokens, prep_seconds=prep_s)
    fit.model.to("cpu")
    metadata["total_seconds"] = time.monotonic() - t_start
    from cappy_core.generation.embedded_model import save_generator

    save_generator(fit.model, tokenizer, out, metadata=metadata)
    log(gt.summary_line(out, metadata, time.monotonic() - t_start))
    training = metadata.get("training", {})
    tracker.scalars({"train/tokens_per_s": training.get("tokens_per_s"), "train/seconds": training.get("seconds"),
                     **{f"eval/{k}": v for k, v in (metadata.get("eval") or {}).items()}}, fit.state.update)
    return metadata


def ensure_generator(path: str | Path | None = None, *, config: GeneratorConfig | None = None,
                     log: Callable[[str], None] = print) -> Path:
    """The generator folder at ``path`` (default ``<cache>/generator/<name>``): reused when it is
    already there, trained with ``config`` (default: the ≤10-min CPU config) when it is not."""
    config = config or GeneratorConfig()
    path = Path(path).expanduser() if path is not None else output_path(config)
    if is_generator_dir(path):
        meta = generator_metadata(path)
        log(f"using the generator at {path} ({meta.get('training', {}).get('updates', '?')} updates, "
            f"greedy Rouge-L {meta.get('eval', {}).get('greedy_rouge_l', float('nan')):.1f})")
        return path
    log(f"no generator at {path}: training one (`cappy generator train`)")
    train_generator(dataclasses.replace(config, out=str(path)), log=log)
    return path


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> tuple[argparse.Namespace, dict]:
    """``(args, presets)``: the parsed command line."""
    from jobs.cli import presets

    shipped = presets("generator")
    parser = build_parser(
        GeneratorConfig, prog=prog or "python -m jobs.train_generator", presets=shipped, epilog=EPILOG,
        argv=sys.argv[1:] if argv is None else argv,
        description="Train the embedded generator (byte-level BPE + small Llama) on BIG-Bench "
                    "instruction → reference pairs and save it as a Hugging Face folder.")
    return parser.parse_args(argv), shipped


def parse_config(argv: list[str] | None = None, prog: str | None = None) -> GeneratorConfig:
    """defaults < ``--preset`` < ``--config`` YAML < flags."""
    args, shipped = parse_args(argv, prog)
    return config_from_args(GeneratorConfig, args, shipped)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    def train(cfg: GeneratorConfig) -> int:
        out = output_path(cfg)
        if is_generator_dir(out) and not cfg.force:
            print(f"a generator is already at {out}; nothing to do (--force retrains)")
            return 0
        train_generator(cfg)
        return 0

    def body() -> int:
        args, shipped = parse_args(argv, prog)
        return int(resolve_and_run(GeneratorConfig, args, shipped, train) or 0)

    return run_main(body)


if __name__ == "__main__":
    from jobs.cli import quiet_pipe

    sys.exit(quiet_pipe(main))  # `| head` ends it quietly
