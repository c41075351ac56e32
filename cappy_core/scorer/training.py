"""One training loop for everything that trains: the scorer (regression) and the generator (LM).

A plain function in one process: the Ray Train wrapper in ``jobs/`` adds
only model preparation (DDP), the dataset shard and ``ray.train.report`` through ``on_update``.

* AdamW; the learning rate follows a linear warmup then linear decay computed per *optimizer
  update* (the reference code advanced its schedule once per 16 micro-steps, so its LR never
  reached the peak nor decayed; :func:`lr_at` is the schedule, tested on its own).
* Gradient accumulation: ``grad_accum_steps`` micro-batches per update, loss scaled by 1/k, DDP
  gradient sync only on the last micro-batch.
* Optional bf16 autocast, optional gradient clipping, seeded.
* The objective is a parameter of :func:`train`: :func:`scorer_loss` (one of
  :data:`SCORER_LOSSES` on the raw first logit: the paper's MSE, a listwise softmax
  cross-entropy over one instruction's candidates, or both) or :func:`causal_lm_loss`
  (next-token cross-entropy).
* Resumable: :mod:`cappy_core.scorer.train_state` (the run's state and the optimizer's beside a
  checkpoint, no pickles).
* Scorer batches: :mod:`cappy_core.scorer.batches` (length- or instruction-grouped, rank-sliced,
  resumable).
* :func:`fit_scorer`: the scorer's whole fit (collator, windows, resume skip, loss, loop) from a
  :class:`ScorerSchedule`, the one entry point of the Ray Train worker, the sweep's per-task
  finetuning and the benchmark, so all of them see identical batches and updates.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cappy_core.scorer.batches import (PairWindowCollator, first_window, iter_micro_batches, micro_batches_per_epoch,
                                       pack_instructions, table_windows)
from cappy_core.scorer.schedule import SCORER_LOSS_NAMES, ScorerSchedule
from cappy_core.scorer.train_state import TrainState

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


# --- objectives ------------------------------------------------------------------------------

def _model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy; ``labels`` is ``input_ids`` with ignored positions set to -100."""
    logits = model(**_model_inputs(batch)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


def listwise_loss(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None,
                  tau: float) -> torch.Tensor:
    """Softmax cross-entropy between each instruction's scores and ``softmax(label / tau)``.

    ``groups`` holds one instruction id per row; a group of ``n >= 2`` rows contributes
    ``-Σ softmax(labels/tau) · log_softmax(scores)`` over its rows, and the loss is the mean over
    those groups. A lone row has nothing to be ranked against and contributes nothing (a batch of
    lone rows gives 0, still attached to the graph so every parameter gets a gradient)."""
    if groups is None:
        raise ValueError("the listwise loss needs the batch's 'group' ids (PairWindowCollator emits them)")
    terms = []
    for g in torch.unique(groups):
        rows = (groups == g).nonzero(as_tuple=True)[0]
        if rows.numel() < 2:
            continue
        target = torch.softmax(labels[rows] / tau, dim=0)
        terms.append(-(target * torch.log_softmax(scores[rows], dim=0)).sum())
    return torch.stack(terms).mean() if terms else scores.sum() * 0.0


#: Scorer objectives by name (:data:`~cappy_core.scorer.schedule.SCORER_LOSS_NAMES`), each
#: ``(scores, labels, groups, schedule) -> loss`` on the raw first logit (no sigmoid) of a
#: micro-batch. ``mse`` is the paper's.
SCORER_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": lambda scores, labels, groups, s: F.mse_loss(scores, labels),
    "listwise": lambda scores, labels, groups, s: listwise_loss(scores, labels, groups, s.listwise_tau),
    "listwise+mse": lambda scores, labels, groups, s: (listwise_loss(scores, labels, groups, s.listwise_tau)
                                                       + s.mse_weight * F.mse_loss(scores, labels)),
}
assert tuple(SCORER_LOSSES) == SCORER_LOSS_NAMES


def scorer_loss(schedule: ScorerSchedule) -> LossFn:
    """The :func:`train` objective of ``schedule.loss``: the model's first logit per pair (fp32)
    against the batch's ``labels`` (and ``group`` ids for the listwise losses)."""
    objective = SCORER_LOSSES[schedule.loss]

    def loss_fn(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        scores = model(**_model_inputs(batch)).logits[:, 0].float()
        return objective(scores, batch["labels"].float(), batch.get("group"), schedule)

    return loss_fn


def accum_steps(schedule: ScorerSchedule, world_size: int = 1) -> int:
    """Micro-batches per update on each rank: ``batch_size / (micro_batch_size · world_size)``."""
    per_step = schedule.micro_batch_size * world_size
    if schedule.batch_size % per_step:
        raise ValueError(f"batch_size {schedule.batch_size} is not a multiple of micro_batch_size x num_workers "
                         f"= {schedule.micro_batch_size} x {world_size} = {per_step}")
    return schedule.batch_size // per_step


def plan_updates(rows: int, schedule: ScorerSchedule, world_size: int = 1) -> tuple[int, int]:
    """``(grad_accum_steps, total_updates)`` for ``rows`` training pairs cut into global
    micro-batches (the tail short of one is dropped). ``ValueError`` if that makes no update."""
    return _plan(micro_batches_per_epoch(rows, schedule.micro_batch_size, world_size), rows, schedule, world_size)


def plan_pair_updates(pairs: Mapping[str, Sequence[Any]], schedule: ScorerSchedule,
                      world_size: int = 1) -> tuple[int, int]:
    """:func:`plan_updates` for these pair columns: with ``group_by_instruction`` the number of
    micro-batches depends on the instructions (:func:`pack_instructions` over the epoch), else
    only on the row count."""
    rows = len(pairs["label"])
    if not schedule.group_by_instruction:
        return plan_updates(rows, schedule, world_size)
    plan = pack_instructions(pairs["instruction"], pairs["response"], schedule.micro_batch_size, world_size,
                             schedule.seed)
    return _plan(len(plan), rows, schedule, world_size)


def _plan(batches_per_epoch: int, rows: int, schedule: ScorerSchedule, world_size: int) -> tuple[int, int]:
    accum = accum_steps(schedule, world_size)
    total = batches_per_epoch * schedule.epochs // accum
    if total < 1:
        raise ValueError(f"{rows} training pairs make no full update of batch_size {schedule.batch_size}")
    return accum, total


def window_rows(schedule: ScorerSchedule, world_size: int = 1) -> int:
    """Rows per collator window: ``bucket_window`` global micro-batches (what a Ray Data shard
    is asked for per batch)."""
    return schedule.micro_batch_size * world_size * schedule.bucket_window


# --- schedule and optimizer ------------------------------------------------------------------

def warmup_updates(total_updates: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_updates * warmup_ratio))


def lr_at(update: int, total_updates: int, warmup: int, peak_lr: float) -> float:
    """LR for the ``update``-th optimizer update (0-based), as transformers'
    ``get_linear_schedule_with_warmup``: ramps 0 → peak over ``warmup`` updates, then linearly
    to 0 at ``total_updates``."""
    if update < warmup:
        return peak_lr * update / max(1, warmup)
    return peak_lr * max(0.0, (total_updates - update) / max(1, total_updates - warmup))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only (not biases / norms), as nanoGPT and transformers' Trainer do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- the loop --------------------------------------------------------------------------------

@dataclass
class UpdateInfo:
    """What ``on_update`` sees after every optimizer update."""

    update: int  # updates done so far (1-based after the first)
    total_updates: int
    loss: float  # mean micro-batch loss of this update
    lr: float  # the LR this update used
    grad_norm: float | None
    samples: int  # samples seen so far (this process)
    seconds: float  # wall time since the loop started


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) on CPU and CUDA: on CPU the default per-tensor
    loop took 20% of a MiniLM update at 32-token pairs, the fused step 4% (batch 16, 1 thread)."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8, fused=fused or None)


def scorer_optimizer(model: torch.nn.Module, schedule: ScorerSchedule) -> torch.optim.Optimizer:
    """The scorer's AdamW as ``schedule`` says (the Ray Train worker and :func:`fit_scorer` alike)."""
    return make_optimizer(model, schedule.lr, schedule.weight_decay, betas=(0.9, schedule.adam_beta2))


def _batch_size(batch: Batch) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    return 0


def train(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    loss_fn: LossFn,
    total_updates: int,
    lr: float,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    grad_accum_steps: int = 1,
    bf16: bool = False,
    max_grad_norm: float | None = None,
    seed: int | None = 0,
    optimizer: torch.optim.Optimizer | None = None,
    state: TrainState | None = None,
    device: torch.device | str | None = None,
    on_update: Callable[[UpdateInfo], None] | None = None,
    reduce_loss: Callable[[float], float] | None = None,
) -> TrainState:
    """Run optimizer updates ``state.update .. total_updates`` over ``batches`` (micro-batches).

    Stops early (returning the state) when ``batches`` runs out. ``on_update`` is called after
    every update: log, evaluate, checkpoint or ``ray.train.report`` there. ``reduce_loss`` maps
    each update's mean micro-batch loss to the value recorded in ``state.losses`` and passed to
    ``on_update`` (data-parallel workers pass an all-reduce mean so the curve is the global loss).
    """
    if total_updates < 1:
        raise ValueError(f"total_updates must be >= 1, got {total_updates}")
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if seed is not None:
        torch.manual_seed(seed)
    state = state or TrainState()
    optimizer = optimizer or make_optimizer(model, lr, weight_decay)
    warmup = warmup_updates(total_updates, warmup_ratio)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    model.train()
    t0 = time.perf_counter()
    it: Iterator[Batch] = iter(batches)
    while state.update < total_updates:
        step_lr = lr_at(state.update, total_updates, warmup, lr)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        micro_losses = []
        for micro in range(grad_accum_steps):
            try:
                batch = next(it)
            except StopIteration:
                if micro:  # a partial accumulation would take an update with a wrong scale
                    optimizer.zero_grad(set_to_none=True)
                return state
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            last = micro == grad_accum_steps - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast:
                    loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at update {state.update}")
                (loss / grad_accum_steps).backward()
            micro_losses.append(float(loss.detach()))
            state.samples += _batch_size(batch)
        grad_norm = None
        if max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.update += 1
        mean_loss = sum(micro_losses) / len(micro_losses)
        if reduce_loss is not None:
            mean_loss = float(reduce_loss(mean_loss))
        state.losses.append(mean_loss)
        if on_update is not None:
            on_update(UpdateInfo(update=state.update, total_updates=total_updates, loss=mean_loss,
                                 lr=step_lr, grad_norm=grad_norm, samples=state.samples,
                                 seconds=time.perf_counter() - t0))
    return state


# --- the scorer's fit ------------------------------------------------------------------------

def fit_scorer(scorer: Any, pairs: Mapping[str, Sequence[Any]] | None, schedule: ScorerSchedule, *,
               windows: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None,
               total_updates: int | None = None, world_size: int = 1, rank: int = 0,
               model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
               state: TrainState | None = None, device: torch.device | str | None = None,
               on_update: Callable[[UpdateInfo], None] | None = None,
               reduce_loss: Callable[[float], float] | None = None) -> TrainState:
    """Train ``scorer`` (a :class:`cappy_core.scorer.model.Scorer`) per ``schedule``; returns the state.

    Data: ``pairs`` (columns ``instruction``, ``response``, ``label``, as
    :func:`cappy_core.labeling.pair_mixture.read_pair_columns` returns) cut into windows of
    :func:`window_rows`, or ``windows()``, which starts one pass of raw row windows of that size
    (a Ray Data shard's ``iter_batches``; then ``total_updates`` is required). Every rank of
    ``world_size`` gets the same rows and :class:`PairWindowCollator` takes its share. With a
    ``state`` from a checkpoint, the micro-batches its updates consumed are skipped and the
    dropout seed moves on. ``model`` is what trains (e.g. the DDP-wrapped ``scorer.model``);
    ``optimizer`` is built over it unless given (give it to load saved moments first).
    ``on_update`` / ``reduce_loss`` go to :func:`train`. The model is left in eval mode.
    Raises ``RuntimeError`` if the data ran out before ``total_updates``.
    """
    if (pairs is None) == (windows is None):
        raise ValueError("fit_scorer needs exactly one of pairs and windows")
    if pairs is not None:
        if total_updates is None:
            total_updates = plan_pair_updates(pairs, schedule, world_size)[1]
        rows = window_rows(schedule, world_size)
        windows = lambda: table_windows(pairs, rows)  # noqa: E731
    elif total_updates is None:
        raise ValueError("fit_scorer with windows needs total_updates")
    accum = accum_steps(schedule, world_size)
    raw = windows
    if schedule.group_by_instruction:
        raw = lambda: first_window(windows())  # noqa: E731
    model = scorer.model if model is None else model
    state = TrainState() if state is None else state
    scorer.model.train()
    if optimizer is None:
        optimizer = scorer_optimizer(model, schedule)
    collator = PairWindowCollator(scorer.tokenizer, max_length=scorer.max_length,
                                  micro_batch_size=schedule.micro_batch_size, world_size=world_size, rank=rank,
                                  sort_by_length=schedule.bucket_window > 1, seed=schedule.seed,
                                  group_by_instruction=schedule.group_by_instruction)
    batches = iter_micro_batches(lambda: (collator.micro_batches(w) for w in raw()), epochs=schedule.epochs,
                                 skip=state.update * accum)
    train(model, batches, loss_fn=scorer_loss(schedule), total_updates=total_updates, lr=schedule.lr,
          warmup_ratio=schedule.warmup_ratio, weight_decay=schedule.weight_decay, grad_accum_steps=accum,
          bf16=schedule.bf16, max_grad_norm=schedule.max_grad_norm, seed=schedule.seed + state.update,
          optimizer=optimizer, state=state, device=device, on_update=on_update, reduce_loss=reduce_loss)
    scorer.model.eval()
    if state.update < total_updates:
        raise RuntimeError(f"the training data ran out after {state.update} of {total_updates} updates")
    return state


def mean_over_ranks(x: float, device: torch.device | str = "cpu") -> float:
    """The mean of ``x`` over the ranks of the ``torch.distributed`` group, reduced on ``device``
    (the rank's GPU with nccl). As ``reduce_loss`` of :func:`train` for data-parallel workers,
    the recorded loss is the global one."""
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


class Throughput:
    """Training samples/s over all ranks, from the end of the first update of this attempt (so
    model loading, the data feed's start-up and the first step's warm-up are excluded) and
    without the time spent in eval and checkpoints (:meth:`paused`)."""

    def __init__(self, world_size: int = 1):
        self.world = world_size
        self.t0: float | None = None
        self.s0 = 0
        self.pause = 0.0

    def tick(self, samples: int) -> float:
        """Call after every update with this rank's samples so far; returns samples/s."""
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.s0 = now, samples
            return 0.0
        return (samples - self.s0) * self.world / max(now - self.t0 - self.pause, 1e-9)

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.pause += time.perf_counter() - t
