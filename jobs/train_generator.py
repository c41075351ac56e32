"""``cappy generator train``: train the embedded generator (byte-level BPE + small Llama) on BIG-Bench.

    cappy generator train                                  # ≤ 10 min on 2 CPU cores → <cache>/generator/bigbench-llama
    cappy generator train --tasks tense rephrase --time-budget-s 120 --out /tmp/gen
    ray job submit --working-dir . -- python -m jobs.train_generator --out /mnt/shared/cappy/generator/bigbench-llama

No generator weights can be fetched offline, so the project trains its own decoder-only model:
a byte-level BPE tokenizer (small vocabulary: CPU sampling stays fast) and a Llama (vLLM and
transformers both run it) on instruction → reference pairs of the BIG-Bench *train* splits (the
44 offline tasks of the paper's 45 by default). The pipeline, top to bottom:

1. config (defaults < ``--preset`` < ``--config YAML`` < flags);
2. data: each task's train split, capped at ``--max-per-task`` examples; validation examples of
   ``--eval-tasks`` for the final check;
3. tokenizer trained on a sample of that text; sequences ``<s>{instruction}\\n{reference}</s>``
   (instruction cut from the left); the loss covers every token by default (``--loss-on all``):
   modelling the instruction too helps a tiny model produce the words most of these tasks copy
   from it (measured on 6 tasks, 400 updates: greedy Rouge-L 8.6 vs 3.8 with the loss on the
   response only; 4 tasks, 300 updates: 16.5 vs 9.1; on all 44 tasks at 500 updates both ≈1);
4. :func:`cappy_core.training.train`, length-bucketed batches, bf16 autocast. With
   ``--time-budget-s`` (the whole run's wall clock: data, tokenizer, training, check, save) the
   first ``--calibration-updates`` updates measure the speed and the LR schedule is sized to the
   updates that fit; training also stops gracefully at the deadline;
5. check: greedy Rouge-L and the spread of sampled candidates on the validation examples;
6. save: a Hugging Face folder (safetensors + tokenizer + ``cappy_generator.json`` with config,
   steps, tokens/s, loss and the check's metrics), written atomically.

What to expect (quiet 2-core machine, defaults): ~2,000 updates at ~6.5k tokens/s in ~560 s;
on all 44 tasks the model stays weak: greedy Rouge-L ≈6.5 on the six small tasks of DESIGN.md's
headroom experiment, 4 samples spread ≈9.5 points, best of greedy + samples ≈12. A generator
trained on just the tasks a run evaluates (``--tasks``) is much stronger on them.

Runs in one process (a Ray job runs it on the head node: give ``--out`` on shared storage there).
The main job calls :func:`ensure_generator`, which trains once and reuses the folder afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cappy_core.config import ConfigError, add_dataclass_arguments, config_from_args, load_yaml, to_dict
from cappy_core.lm import DEFAULT_GENERATOR_NAME, default_generator_path, generator_metadata, is_generator_dir

__all__ = ["GeneratorConfig", "PRESETS", "default_generator_path", "ensure_generator", "train_generator", "main"]

# The six small tasks of DESIGN.md's headroom experiment, so the numbers compare with it.
EVAL_TASKS = ["simple_text_editing", "tense", "gender_inclusive_sentences_german", "rephrase",
              "word_sorting", "unnatural_in_context_learning"]


@dataclass
class GeneratorConfig:
    # where
    name: str = field(default=DEFAULT_GENERATOR_NAME, metadata={
        "help": "folder name under <cache>/generator/ (ignored with --out)"})
    out: Optional[str] = field(default=None, metadata={"help": "output folder (default <cache>/generator/<name>)"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "cache holding BIG-Bench and the generator (default $CAPPY_CACHE_DIR or ~/.cache/cappy)"})
    force: bool = field(default=False, metadata={"help": "retrain even if the output folder holds a generator"})
    preset: Optional[str] = field(default=None, metadata={
        "choices": ["cpu", "tiny"], "help": "cpu: the ≤10-min CPU default; tiny: seconds, for smoke tests"})
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
    updates: Optional[int] = field(default=None, metadata={
        "help": "optimizer updates (default: as many as fit --time-budget-s)"})
    time_budget_s: float = field(default=600.0, metadata={
        "help": "wall-clock budget of the whole run in seconds (0: none; then --updates is needed)"})
    eval_reserve_s: float = field(default=45.0, metadata={
        "help": "seconds of the budget kept for the final check and saving"})
    calibration_updates: int = field(default=40, metadata={
        "help": "with a time budget: the warmup updates, timed to size the LR schedule to the budget"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (weights stay fp32)"})
    threads: Optional[int] = field(default=None, metadata={
        "help": "torch threads (default: torch's choice; use 1 when sharing 2 cores with another job)"})
    device: Optional[str] = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)"})
    seed: int = field(default=0, metadata={"help": "seeds data order, references, init and sampling"})
    # final check
    eval_tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS), metadata={
        "help": "validation tasks for the greedy Rouge-L check"})
    eval_examples: int = field(default=32, metadata={"help": "validation examples per eval task (0: no check)"})
    eval_samples: int = field(default=4, metadata={"help": "sampled candidates per example for the spread"})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "new tokens per candidate in the check"})


PRESETS: dict[str, dict] = {
    "cpu": {},  # the dataclass defaults: ≤ 10 minutes on 2 CPU cores
    "tiny": dict(vocab_size=512, tokenizer_chars_per_task=20_000, hidden_size=64, num_layers=2, num_heads=2,
                 max_per_task=200, max_prompt_tokens=96, max_response_tokens=32, batch_size=8,
                 time_budget_s=60.0, eval_reserve_s=15.0, calibration_updates=5,
                 eval_examples=8, eval_samples=2, eval_max_new_tokens=16),
}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m jobs.train_generator",
        description="Train the embedded generator (byte-level BPE + small Llama) on BIG-Bench "
        "instruction → reference pairs and save it as a Hugging Face folder.",
        epilog="Examples:\n  cappy generator train\n"
        "  cappy generator train --preset tiny --out /tmp/tiny-gen\n"
        "  cappy generator train --tasks tense rephrase --time-budget-s 120 --force",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(p, GeneratorConfig)
    return p


def resolve_config(args: argparse.Namespace) -> GeneratorConfig:
    """defaults < preset < YAML < explicit flags (the preset may come from the YAML or a flag)."""
    explicit = config_from_args(GeneratorConfig, args)
    given = set(load_yaml(GeneratorConfig, args.config)) if getattr(args, "config", None) else set()
    given |= {f.name for f in dataclasses.fields(GeneratorConfig) if f.name in vars(args)}
    if explicit.preset is None:
        return explicit
    preset = PRESETS[explicit.preset]
    return dataclasses.replace(explicit, **{k: v for k, v in preset.items() if k not in given})


def output_path(cfg: GeneratorConfig) -> Path:
    return Path(cfg.out).expanduser() if cfg.out else default_generator_path(cfg.name, cfg.cache_dir)


def _check_config(cfg: GeneratorConfig) -> None:
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


def _check_writable(out: Path) -> None:
    """Fail before any work if the output cannot be written, or would destroy something that is
    not a generator."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_generator_dir(out):
        raise ConfigError(f"--out {out} is a non-empty folder that is not a generator; refusing to replace it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{out.name}.write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the generator to {out}: {e.strerror or e} ({parent})") from e


def _load_data(cfg: GeneratorConfig, log: Callable[[str], None]):
    from cappy_core.data.bigbench import TooFewExamples, find_tasks, load_task
    from cappy_core.data.source import bigbench_task_root
    from cappy_core.data.tasks import resolve_tasks

    roots = [bigbench_task_root(cfg.cache_dir)] + [Path(d).expanduser() for d in cfg.task_dir]
    for r in roots[1:]:
        if not r.is_dir():
            raise FileNotFoundError(f"--task-dir {r}: no such folder")
    located = find_tasks(roots)
    names, unavailable = resolve_tasks(cfg.tasks, located)
    eval_names, _ = resolve_tasks(cfg.eval_tasks, located) if cfg.eval_examples > 0 else ([], {})
    splits: dict[str, dict] = {}
    for name in dict.fromkeys(names + eval_names):
        try:
            splits[name] = load_task(located[name], name)
        except TooFewExamples as e:
            log(f"skipped {name}: {e}")
    train_by_task = {t: splits[t]["train"] for t in names if t in splits}
    if not train_by_task:
        raise ConfigError(f"no training examples in tasks {cfg.tasks}")
    import random

    eval_by_task = {}
    for t in eval_names:
        if t in splits:
            val = [e for e in splits[t]["validation"] if e.references]
            eval_by_task[t] = random.Random(0).sample(val, min(cfg.eval_examples, len(val)))
    return train_by_task, eval_by_task, unavailable


def train_generator(cfg: GeneratorConfig, log: Callable[[str], None] = print) -> dict:
    """Train and save the generator described by ``cfg``; returns its metadata."""
    t_start = time.monotonic()
    _check_config(cfg)
    out = output_path(cfg)
    _check_writable(out)
    deadline = t_start + cfg.time_budget_s if cfg.time_budget_s > 0 else None
    train_deadline = deadline - cfg.eval_reserve_s if deadline is not None else None

    import torch
    import transformers
    from tqdm import tqdm

    from cappy_core.generator_data import LengthBucketedBatches, encode_examples, mix_tasks, tokenizer_texts
    from cappy_core.lm import evaluate_generator, new_llama, save_generator, train_tokenizer
    from cappy_core.training import TrainState, causal_lm_loss, make_optimizer, train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # --- data and tokenizer
    train_by_task, eval_by_task, unavailable = _load_data(cfg, log)
    for why in unavailable.values():
        log(f"unavailable: {why}")
    t0 = time.monotonic()
    tokenizer = train_tokenizer(tokenizer_texts(train_by_task, max_chars_per_task=cfg.tokenizer_chars_per_task,
                                                seed=cfg.seed), vocab_size=cfg.vocab_size)
    t_tok = time.monotonic() - t0
    examples = mix_tasks(train_by_task, max_per_task=cfg.max_per_task, seed=cfg.seed)
    seqs = encode_examples(examples, tokenizer, max_prompt_tokens=cfg.max_prompt_tokens,
                           max_response_tokens=cfg.max_response_tokens, seed=cfg.seed)
    # Saved with the tokenizer: what `truncation=True` keeps by default, the prompt length trained on.
    tokenizer.model_max_length = cfg.max_prompt_tokens
    prep_s = time.monotonic() - t_start
    mean_len = sum(len(s) for s in seqs) / len(seqs)
    log(f"data: {len(seqs)} sequences from {len(train_by_task)} tasks (mean {mean_len:.0f} tokens, "
        f"{sum(len(s.prompt) >= cfg.max_prompt_tokens for s in seqs) / len(seqs):.0%} prompts cut); "
        f"tokenizer {len(tokenizer)} tokens in {t_tok:.1f}s; prep {prep_s:.1f}s")

    # --- model and training
    model = new_llama(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                      intermediate_size=cfg.intermediate_size, seed=cfg.seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    stream = LengthBucketedBatches(seqs, batch_size=cfg.batch_size, pad_id=tokenizer.pad_token_id,
                                   loss_on=cfg.loss_on, seed=cfg.seed, deadline=train_deadline)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    state = TrainState()
    log(f"model: Llama {cfg.num_layers}×{cfg.hidden_size}, {n_params / 1e6:.1f}M parameters, "
        f"{torch.get_num_threads()} threads, {device}, bf16={cfg.bf16}")
    bar = tqdm(desc="training generator", unit=" upd", file=sys.stderr, mininterval=1.0,
               total=cfg.updates or None, dynamic_ncols=True)
    t_train = time.monotonic()

    def on_update(info) -> None:
        bar.update(1)
        secs = time.monotonic() - t_train
        bar.set_postfix(loss=f"{info.loss:.3f}", lr=f"{info.lr:.1e}", tok_s=f"{stream.tokens / secs:,.0f}",
                        refresh=False)

    common = dict(loss_fn=causal_lm_loss, grad_accum_steps=cfg.grad_accum_steps, bf16=cfg.bf16,
                  max_grad_norm=cfg.max_grad_norm, optimizer=optimizer, state=state, device=device,
                  on_update=on_update)
    if cfg.updates is not None:
        bar.total = planned = cfg.updates
        train(model, stream, total_updates=cfg.updates, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, seed=cfg.seed,
              **common)
    else:
        planned = _train_within_budget(model, stream, common, cfg=cfg, deadline=train_deadline, bar=bar, log=log)
    bar.close()
    train_s = time.monotonic() - t_train
    if state.update == 0:
        log("warning: no update fitted in the time budget (raise --time-budget-s); saving the untrained model")
    elif state.update < planned:
        log(f"time budget reached after {state.update} of {planned} updates")
    tail = state.losses[-20:]
    final_loss = sum(tail) / len(tail) if tail else float("nan")

    # --- check and save
    metrics = {}
    if eval_by_task:
        metrics = evaluate_generator(model, tokenizer, eval_by_task, max_prompt_tokens=cfg.max_prompt_tokens,
                                     max_new_tokens=cfg.eval_max_new_tokens, num_samples=cfg.eval_samples,
                                     seed=cfg.seed, deadline=None if deadline is None else deadline - 5)
        if metrics["skipped_tasks"]:
            log(f"time budget: the check skipped {', '.join(metrics['skipped_tasks'])} (raise --eval-reserve-s)")
    stride = max(1, len(state.losses) // 200)
    metadata = {
        "kind": "cappy-embedded-generator",
        "prompt_format": "<s>{instruction}\\n{response}</s>",
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "config": to_dict(cfg),
        "tasks": sorted(train_by_task),
        "unavailable_tasks": sorted(unavailable),
        "model": {"architecture": "LlamaForCausalLM", "parameters": n_params, "vocab_size": len(tokenizer),
                  "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads},
        "data": {"sequences": len(seqs), "mean_tokens": mean_len, "epochs": stream.tokens / sum(len(s) for s in seqs)},
        "training": {
            "updates": state.update, "planned_updates": planned, "sequences_seen": state.samples,
            "tokens": stream.tokens, "loss_tokens": stream.loss_tokens, "padded_tokens": stream.padded_tokens,
            "tokens_per_s": stream.tokens / train_s, "seconds": train_s, "final_loss": final_loss,
            "loss_curve": [[i + 1, round(l, 4)] for i, l in enumerate(state.losses)][::stride],
            "threads": torch.get_num_threads(), "device": str(device),
        },
        "prep_seconds": prep_s,
        "eval": metrics,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    model.to("cpu")
    metadata["total_seconds"] = time.monotonic() - t_start
    save_generator(model, tokenizer, out, metadata=metadata)
    total_s = time.monotonic() - t_start
    line = (f"generator saved to {out}: {n_params / 1e6:.1f}M params, {state.update} updates "
            f"({state.samples} sequences) in {train_s:.0f}s at {stream.tokens / train_s:,.0f} tokens/s, "
            f"final loss {final_loss:.3f}; total {total_s:.0f}s")
    if metrics:
        line += (f"; greedy Rouge-L {metrics['greedy_rouge_l']:.1f}, {cfg.eval_samples} samples "
                 f"{metrics['sample_rouge_l']:.1f} (spread {metrics['sample_spread']:.1f}, oracle "
                 f"{metrics['oracle_rouge_l']:.1f}) on {len(metrics['tasks'])} tasks × ≤{cfg.eval_examples}")
    log(line)
    return metadata


def _train_within_budget(model, stream, common: dict, *, cfg: GeneratorConfig, deadline: float, bar, log) -> int:
    """Train until ``deadline`` with an LR schedule sized to the updates that fit; returns the
    number of updates finally planned.

    The first ``calibration_updates`` updates are the linear warmup and time the speed (padded
    tokens per second: batches vary in length). Then the LR decays linearly to 0 at the planned
    end; after each quarter of what is left the speed is measured again and the end re-planned,
    the LR continuing from where it was (so a machine that slows down or speeds up, e.g. because
    another job started on it, still ends annealed).
    Each piece is one call of :func:`cappy_core.training.train`, whose schedule is linear within a
    call: ``warmup_ratio=1`` gives the ramp, ``warmup_ratio=0`` a line to 0 at ``total_updates``.
    """
    from cappy_core.training import train

    state = common["state"]
    per_update = stream.mean_padded_tokens_per_batch() * cfg.grad_accum_steps
    warmup = max(1, cfg.calibration_updates)

    def measure(run) -> float:
        t, tok = time.monotonic(), stream.padded_tokens
        run()
        return (stream.padded_tokens - tok) / max(1e-9, time.monotonic() - t)

    def plan(tokens_per_s: float) -> int:
        left = deadline - time.monotonic()
        return state.update + max(0, math.floor(0.97 * left * tokens_per_s / per_update))

    bar.total = warmup
    untimed = min(2, warmup - 1)  # the first updates pay one-off costs (allocation, kernel choice)
    for upto, seed in ((untimed, cfg.seed), (warmup, None)):
        stream.max_batches = upto * cfg.grad_accum_steps
        rate = measure(lambda: train(model, stream, total_updates=warmup, lr=cfg.lr, warmup_ratio=1.0,
                                     seed=seed, **common))
    total, lr_now = plan(rate), cfg.lr
    log(f"calibration: {state.update} warmup updates at {rate:,.0f} padded tokens/s → {total} updates planned")
    while state.update < total:
        start = state.update
        end = total if total - start < 40 else start + (total - start) // 4
        stream.max_batches = end * cfg.grad_accum_steps
        bar.total = total
        bar.refresh()
        rate = measure(lambda: train(model, stream, total_updates=total, lr=lr_now * total / (total - start),
                                     warmup_ratio=0.0, seed=None, **common))
        if state.update < end or end == total:
            break  # deadline, or done
        lr_now *= (total - state.update) / (total - start)
        new_total = plan(rate)
        if abs(new_total - total) > 0.02 * total:
            log(f"re-planned at update {state.update}: {rate:,.0f} padded tokens/s → {new_total} updates")
        total = new_total
    stream.max_batches = None
    return total


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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from cappy_core.data.source import BigBenchNotFound
    from cappy_core.data.tasks import UnknownTaskError

    try:
        cfg = resolve_config(args)
        out = output_path(cfg)
        if is_generator_dir(out) and not cfg.force:
            print(f"a generator is already at {out}; nothing to do (--force retrains)")
            return 0
        train_generator(cfg)
    except (ConfigError, UnknownTaskError, BigBenchNotFound, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
