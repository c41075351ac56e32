"""Training the embedded generator within a wall-clock budget (what ``cappy generator train`` runs).

The steps, each a function with explicit arguments:

1. :func:`check_output_folder`: fail before any work if the folder cannot be written or holds
   something that is not a generator;
2. :func:`load_generator_data`: each task's BIG-Bench *train* split, less the last few train
   examples of each of the check's tasks, held out for the check (validation is never read, so a
   training choice made on the check was not made on the sweep's final table);
3. :func:`prepare_sequences`: the BPE tokenizer on a sample of that text, then one
   ``<s>{instruction}\\n{reference}</s>`` sequence per example (:mod:`cappy_core.generation.embedded_data`);
4. :func:`fit_generator`: a new small Llama trained by :func:`cappy_core.scorer.training.train` on
   length-bucketed batches, for a fixed number of updates or, with a deadline,
   :func:`train_within_budget` (the LR schedule sized to the updates that fit);
5. :func:`check_generator`: greedy Rouge-L and the spread of sampled candidates
   (:func:`cappy_core.generation.embedded_model.evaluate_generator`), then :func:`run_record` / :func:`summary_line`
   describe the run for ``cappy_generator.json`` and the log.

Tested in ``tests/core/test_lm.py`` and ``tests/jobs/test_train_generator.py``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cappy_core.config import ConfigError, SettingError
from cappy_core.generation.embedded_model import is_generator_dir

Log = Callable[[str], None]


def check_output_folder(out: Path) -> None:
    """Fail before any work if ``out`` cannot be written, or would destroy something that is
    not a generator."""
    if out.exists() and not out.is_dir():
        raise SettingError("out", f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_generator_dir(out):
        raise SettingError("out", f"{out} is a non-empty folder that is not a generator; refusing to replace it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{out.name}.write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the generator to {out}: {e.strerror or e} ({parent})") from e


@dataclass
class GeneratorData:
    train_by_task: dict[str, list]  # task -> train examples
    eval_by_task: dict[str, list]  # task -> the check's held-out train examples (with references)
    unavailable: dict[str, str]  # task -> why it is not available offline


def load_generator_data(tasks: Sequence[str], *, eval_tasks: Sequence[str], eval_examples: int,
                        task_dir: Sequence[str] = (), cache_dir: str | None = None,
                        log: Log = print) -> GeneratorData:
    """Train splits of ``tasks`` (``all45``, ``pretrain`` or names) and, for the check, the last
    ``eval_examples`` train examples of each of ``eval_tasks`` (at most a fifth of its train split;
    none when ``eval_examples`` is 0), held out: no training sequence has their instruction. From
    the BIG-Bench tasks on this machine (vendored, downloaded) plus ``task_dir`` folders. Tasks with
    too few examples are skipped (logged)."""
    from cappy_core.data.bigbench import TooFewExamples
    from cappy_core.data.catalog import TaskCatalog

    catalog = TaskCatalog.open(cache_dir, task_dir)
    names, unavailable = catalog.resolve(tasks)
    eval_names, _ = catalog.resolve(eval_tasks) if eval_examples > 0 else ([], {})
    splits: dict[str, dict] = {}
    for name in dict.fromkeys(names + eval_names):
        try:
            splits[name] = catalog.load(name)
        except TooFewExamples as e:
            log(f"skipped {name}: {e}")
    train_by_task = {t: splits[t]["train"] for t in names if t in splits}
    if not train_by_task:
        raise ConfigError(f"no training examples in tasks {list(tasks)}")
    eval_by_task = {}
    for t in eval_names:
        train = splits[t]["train"] if t in splits else []
        held = [e for e in train[len(train) - min(eval_examples, len(train) // 5):] if e.references]
        if held:
            eval_by_task[t] = held
            texts = {e.instruction for e in held}
            if t in train_by_task:  # and any duplicate of their instruction: it would leak the answer
                train_by_task[t] = [e for e in train_by_task[t] if e.instruction not in texts]
    return GeneratorData(train_by_task, eval_by_task, unavailable)


def prepare_sequences(train_by_task: Mapping[str, Sequence], *, vocab_size: int, tokenizer_chars_per_task: int,
                      max_per_task: int | None, max_prompt_tokens: int, max_response_tokens: int, seed: int,
                      log: Log = print, started: float | None = None) -> tuple[Any, list]:
    """``(tokenizer, sequences)``: a BPE tokenizer trained on a sample of the tasks' text, and
    the tokenised examples (at most ``max_per_task`` per task). The tokenizer's
    ``model_max_length`` becomes ``max_prompt_tokens`` (saved with it: what ``truncation=True``
    keeps by default). Logs the data line (``started``: ``time.monotonic()`` of the run, for the
    preparation time)."""
    from cappy_core.generation.embedded_data import encode_examples, mix_tasks, tokenizer_texts
    from cappy_core.generation.embedded_model import train_tokenizer

    t0 = time.monotonic()
    tokenizer = train_tokenizer(tokenizer_texts(train_by_task, max_chars_per_task=tokenizer_chars_per_task,
                                                seed=seed), vocab_size=vocab_size)
    t_tok = time.monotonic() - t0
    examples = mix_tasks(train_by_task, max_per_task=max_per_task, seed=seed)
    seqs = encode_examples(examples, tokenizer, max_prompt_tokens=max_prompt_tokens,
                           max_response_tokens=max_response_tokens, seed=seed)
    tokenizer.model_max_length = max_prompt_tokens
    prep_s = time.monotonic() - (t0 if started is None else started)
    mean_len = sum(len(s) for s in seqs) / len(seqs)
    log(f"data: {len(seqs)} sequences from {len(train_by_task)} tasks (mean {mean_len:.0f} tokens, "
        f"{sum(len(s.prompt) >= max_prompt_tokens for s in seqs) / len(seqs):.0%} prompts cut); "
        f"tokenizer {len(tokenizer)} tokens in {t_tok:.1f}s; prep {prep_s:.1f}s")
    return tokenizer, seqs


@dataclass
class FitResult:
    model: Any  # the trained LlamaForCausalLM, still on its training device
    state: Any  # cappy_core.scorer.train_state.TrainState
    stream: Any  # the LengthBucketedBatches it was fed (token counts)
    planned_updates: int
    seconds: float
    device: str

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 20 updates."""
        tail = self.state.losses[-20:]
        return sum(tail) / len(tail) if tail else float("nan")


def fit_generator(tokenizer, seqs: Sequence, *, hidden_size: int, num_layers: int, num_heads: int,
                  intermediate_size: int | None, loss_on: str, batch_size: int, grad_accum_steps: int,
                  lr: float, warmup_ratio: float, weight_decay: float, max_grad_norm: float | None,
                  bf16: bool, seed: int, updates: int | None, calibration_updates: int,
                  deadline: float | None, device: str | None = None, log: Log = print,
                  on_update: Callable[[Any], None] | None = None) -> FitResult:
    """A new Llama sized by the arguments, trained on ``seqs`` (``loss_on``: ``all`` tokens or
    the ``response``): ``updates`` updates with a warmup of ``warmup_ratio``, or, when
    ``updates`` is None, as many as fit before ``deadline`` (:func:`train_within_budget`). The
    batch stream also stops at ``deadline``. Progress goes to a bar on stderr, and each update's
    ``info`` (update, loss, lr) to ``on_update``."""
    import torch
    from tqdm import tqdm

    from cappy_core.generation.embedded_data import LengthBucketedBatches
    from cappy_core.generation.embedded_model import new_llama
    from cappy_core.scorer.train_state import TrainState
    from cappy_core.scorer.training import causal_lm_loss, make_optimizer, train

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = new_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                      intermediate_size=intermediate_size, seed=seed).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    stream = LengthBucketedBatches(seqs, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                                   loss_on=loss_on, seed=seed, deadline=deadline)
    optimizer = make_optimizer(model, lr, weight_decay)
    state = TrainState()
    log(f"model: Llama {num_layers}×{hidden_size}, {n_params / 1e6:.1f}M parameters, "
        f"{torch.get_num_threads()} threads, {dev}, bf16={bf16}")
    bar = tqdm(desc="training generator", unit=" upd", file=sys.stderr, mininterval=1.0,
               total=updates or None, dynamic_ncols=True)
    t_train = time.monotonic()

    after_update = on_update

    def on_update(info) -> None:
        if after_update is not None:
            after_update(info)
        bar.update(1)
        secs = time.monotonic() - t_train
        bar.set_postfix(loss=f"{info.loss:.3f}", lr=f"{info.lr:.1e}", tok_s=f"{stream.tokens / secs:,.0f}",
                        refresh=False)

    common = dict(loss_fn=causal_lm_loss, grad_accum_steps=grad_accum_steps, bf16=bf16,
                  max_grad_norm=max_grad_norm, optimizer=optimizer, state=state, device=dev,
                  on_update=on_update)
    if updates is not None:
        bar.total = planned = updates
        train(model, stream, total_updates=updates, lr=lr, warmup_ratio=warmup_ratio, seed=seed, **common)
    else:
        planned = train_within_budget(model, stream, common, lr=lr, seed=seed, grad_accum_steps=grad_accum_steps,
                                      calibration_updates=calibration_updates, deadline=deadline, bar=bar, log=log)
    bar.close()
    seconds = time.monotonic() - t_train
    if state.update == 0:
        log("warning: no update fitted in the time budget (raise --time-budget-s); saving the untrained model")
    elif state.update < planned:
        log(f"time budget reached after {state.update} of {planned} updates")
    return FitResult(model, state, stream, planned, seconds, str(dev))


def train_within_budget(model, stream, common: dict, *, lr: float, seed: int, grad_accum_steps: int,
                        calibration_updates: int, deadline: float, bar, log: Log = print) -> int:
    """Train until ``deadline`` with an LR schedule sized to the updates that fit; returns the
    number of updates finally planned.

    The first ``calibration_updates`` updates are the linear warmup and time the speed (padded
    tokens per second: batches vary in length). Then the LR decays linearly to 0 at the planned
    end; after each quarter of what is left the speed is measured again and the end re-planned,
    the LR continuing from where it was (so a machine that slows down or speeds up, e.g. because
    another job started on it, still ends annealed).
    Each piece is one call of :func:`cappy_core.scorer.training.train`, whose schedule is linear within a
    call: ``warmup_ratio=1`` gives the ramp, ``warmup_ratio=0`` a line to 0 at ``total_updates``.
    ``common`` holds the other arguments of ``train`` (loss, optimizer, state, ...).
    """
    from cappy_core.scorer.training import train

    state = common["state"]
    per_update = stream.mean_padded_tokens_per_batch() * grad_accum_steps
    warmup = max(1, calibration_updates)

    def measure(run) -> float:
        t, tok = time.monotonic(), stream.padded_tokens
        run()
        return (stream.padded_tokens - tok) / max(1e-9, time.monotonic() - t)

    def plan(tokens_per_s: float) -> int:
        left = deadline - time.monotonic()
        return state.update + max(0, math.floor(0.97 * left * tokens_per_s / per_update))

    bar.total = warmup
    untimed = min(2, warmup - 1)  # the first updates pay one-off costs (allocation, kernel choice)
    for upto, s in ((untimed, seed), (warmup, None)):
        stream.max_batches = upto * grad_accum_steps
        rate = measure(lambda: train(model, stream, total_updates=warmup, lr=lr, warmup_ratio=1.0,
                                     seed=s, **common))
    total, lr_now = plan(rate), lr
    log(f"calibration: {state.update} warmup updates at {rate:,.0f} padded tokens/s → {total} updates planned")
    while state.update < total:
        start = state.update
        end = total if total - start < 40 else start + (total - start) // 4
        stream.max_batches = end * grad_accum_steps
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


def check_generator(model, tokenizer, eval_by_task: Mapping[str, Sequence], *, max_prompt_tokens: int,
                    max_new_tokens: int, num_samples: int, seed: int, deadline: float | None,
                    log: Log = print) -> dict:
    """The quality check (:func:`cappy_core.generation.embedded_model.evaluate_generator`) on ``eval_by_task``; ``{}``
    without examples. Tasks not started 5 s before ``deadline`` are skipped (logged)."""
    from cappy_core.generation.embedded_model import evaluate_generator

    if not eval_by_task:
        return {}
    metrics = evaluate_generator(model, tokenizer, eval_by_task, max_prompt_tokens=max_prompt_tokens,
                                 max_new_tokens=max_new_tokens, num_samples=num_samples, seed=seed,
                                 deadline=None if deadline is None else deadline - 5)
    if metrics["skipped_tasks"]:
        log(f"time budget: the check skipped {', '.join(metrics['skipped_tasks'])} (raise --eval-reserve-s)")
    return metrics


def run_record(fit: FitResult, tokenizer, seqs: Sequence, data: GeneratorData, metrics: dict, *,
               config: dict, max_prompt_tokens: int, prep_seconds: float) -> dict:
    """What ``cappy_generator.json`` says about a trained generator (``config``: the job's
    resolved settings)."""
    import torch
    import transformers

    from cappy_core.flops import decoder_train_flops_per_token, matmul_flops

    state, stream, model = fit.state, fit.stream, fit.model
    stride = max(1, len(state.losses) // 200)
    n_tokens = sum(len(s) for s in seqs)
    # against the arithmetic limit: useful (unpadded) training FLOP/s over the matmul rate at these threads
    per_token = decoder_train_flops_per_token(model, n_tokens / len(seqs))
    cuda = fit.device.startswith("cuda")
    peak = matmul_flops(device=fit.device, dtype=torch.bfloat16 if cuda else None)
    return {
        "kind": "cappy-embedded-generator",
        "prompt_format": "<s>{instruction}\\n{response}</s>",
        "max_prompt_tokens": max_prompt_tokens,
        "config": config,
        "tasks": sorted(data.train_by_task),
        "unavailable_tasks": sorted(data.unavailable),
        "model": {"architecture": "LlamaForCausalLM", "parameters": sum(p.numel() for p in model.parameters()),
                  "vocab_size": len(tokenizer), "hidden_size": model.config.hidden_size,
                  "num_layers": model.config.num_hidden_layers, "num_heads": model.config.num_attention_heads},
        "data": {"sequences": len(seqs), "mean_tokens": n_tokens / len(seqs), "epochs": stream.tokens / n_tokens},
        "training": {
            "updates": state.update, "planned_updates": fit.planned_updates, "sequences_seen": state.samples,
            "tokens": stream.tokens, "loss_tokens": stream.loss_tokens, "padded_tokens": stream.padded_tokens,
            "tokens_per_s": stream.tokens / fit.seconds, "seconds": fit.seconds, "final_loss": fit.final_loss,
            "loss_curve": [[i + 1, round(l, 4)] for i, l in enumerate(state.losses)][::stride],
            "threads": torch.get_num_threads(), "device": fit.device,
            "train_flops_per_token": per_token, "matmul_flops": peak,
            "fraction_of_bound": stream.tokens / fit.seconds * per_token / peak,
        },
        "prep_seconds": prep_seconds,
        "eval": metrics,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def summary_line(out: Path, record: dict, total_seconds: float) -> str:
    """The one line ``cappy generator train`` ends with."""
    tr, metrics = record["training"], record["eval"]
    line = (f"generator saved to {out}: {record['model']['parameters'] / 1e6:.1f}M params, {tr['updates']} updates "
            f"({tr['sequences_seen']} sequences) in {tr['seconds']:.0f}s at {tr['tokens_per_s']:,.0f} tokens/s "
            f"({tr['fraction_of_bound']:.2f} of the matmul bound), "
            f"final loss {tr['final_loss']:.3f}; total {total_seconds:.0f}s")
    if metrics:
        cfg = record["config"]
        line += (f"; greedy Rouge-L {metrics['greedy_rouge_l']:.1f}, {metrics['num_samples']} samples "
                 f"{metrics['sample_rouge_l']:.1f} (spread {metrics['sample_spread']:.1f}, oracle "
                 f"{metrics['oracle_rouge_l']:.1f}) on {len(metrics['tasks'])} tasks × ≤{cfg['eval_examples']} held-out train "
                 "examples")
    return line
