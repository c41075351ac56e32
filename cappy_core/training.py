"""One training loop for everything that trains: the scorer (regression) and the generator (LM).

A plain function in one process (STYLE.md practice 6): the Ray Train wrapper in ``jobs/`` adds
only model preparation (DDP), the dataset shard and ``ray.train.report`` through ``on_update``.

* AdamW; the learning rate follows a linear warmup then linear decay computed per *optimizer
  update* (the reference code advanced its schedule once per 16 micro-steps, so its LR never
  reached the peak nor decayed; :func:`lr_at` is the schedule, tested on its own).
* Gradient accumulation: ``grad_accum_steps`` micro-batches per update, loss scaled by 1/k, DDP
  gradient sync only on the last micro-batch.
* Optional bf16 autocast, optional gradient clipping, seeded.
* The objective is a parameter: :func:`scorer_mse_loss` (MSE between the raw first logit and the
  label) or :func:`causal_lm_loss` (next-token cross-entropy).
* Resumable: :class:`TrainState` (update count, optimizer state) round-trips through
  ``state_dict`` so a restarted worker continues the same schedule.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


# --- objectives ------------------------------------------------------------------------------

def _model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def scorer_mse_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Cappy's objective: MSE between the raw first logit and the label (no sigmoid)."""
    logits = model(**_model_inputs(batch)).logits[:, 0]
    return F.mse_loss(logits.float(), batch["labels"].float())


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy; ``labels`` is ``input_ids`` with ignored positions set to -100."""
    logits = model(**_model_inputs(batch)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


OBJECTIVES: dict[str, LossFn] = {"mse": scorer_mse_loss, "causal_lm": causal_lm_loss}


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


@dataclass
class TrainState:
    update: int = 0
    samples: int = 0
    losses: list[float] = field(default_factory=list)  # one per update, for loss curves

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "samples": self.samples, "losses": list(self.losses)}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> "TrainState":
        return cls(update=int(d["update"]), samples=int(d["samples"]), losses=list(d.get("losses", [])))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8)


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
) -> TrainState:
    """Run optimizer updates ``state.update .. total_updates`` over ``batches`` (micro-batches).

    Stops early (returning the state) when ``batches`` runs out. ``on_update`` is called after
    every update: log, evaluate, checkpoint or ``ray.train.report`` there.
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
        state.losses.append(mean_loss)
        if on_update is not None:
            on_update(UpdateInfo(update=state.update, total_updates=total_updates, loss=mean_loss,
                                 lr=step_lr, grad_norm=grad_norm, samples=state.samples,
                                 seconds=time.perf_counter() - t0))
    return state
