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
* Resumable: :class:`TrainState` (update count, samples, loss curve, eval history) round-trips
  through ``state_dict``; :func:`save_train_state` / :func:`load_train_state` write it and the
  optimizer state beside a checkpoint as JSON + safetensors (no pickles), so a restarted worker
  continues the same schedule with the same Adam moments.
* Scorer batches: :class:`PairWindowCollator` turns a window of shuffled (instruction, response,
  label) rows into this rank's tokenised micro-batches, grouping rows of similar length
  (dynamic padding) or keeping each instruction's rows in one micro-batch;
  :func:`iter_micro_batches` chains windows, epochs and the resume skip.
* :func:`fit_scorer`: the scorer's whole fit (collator, windows, resume skip, loss, loop) from a
  :class:`ScorerSchedule`, the one entry point of the Ray Train worker, the sweep's per-task
  finetuning and the benchmark, so all of them see identical batches and updates.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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


#: Scorer objectives by name, each ``(scores, labels, groups, schedule) -> loss`` on the raw first
#: logit (no sigmoid) of a micro-batch. ``mse`` is the paper's.
SCORER_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": lambda scores, labels, groups, s: F.mse_loss(scores, labels),
    "listwise": lambda scores, labels, groups, s: listwise_loss(scores, labels, groups, s.listwise_tau),
    "listwise+mse": lambda scores, labels, groups, s: (listwise_loss(scores, labels, groups, s.listwise_tau)
                                                       + s.mse_weight * F.mse_loss(scores, labels)),
}


@dataclass(frozen=True)
class ScorerSchedule:
    """The scorer's training recipe: optimizer, schedule, batches, precision, seed and loss."""

    lr: float = 2e-5  # peak learning rate (AdamW)
    warmup_ratio: float = 0.1  # fraction of updates of linear warmup
    weight_decay: float = 0.0  # matrices only
    epochs: int = 1
    batch_size: int = 128  # pairs per optimizer update over all ranks
    micro_batch_size: int = 32  # pairs per forward pass per rank
    max_grad_norm: float | None = None
    bf16: bool = False  # bf16 autocast
    seed: int = 0  # seeds dropout and the batch order (the head init is the scorer loader's)
    bucket_window: int = 8  # global micro-batches per length-grouping window (1: no grouping)
    loss: str = "mse"  # a name in SCORER_LOSSES
    listwise_tau: float = 0.3  # temperature of the listwise target softmax(label / tau)
    mse_weight: float = 0.0  # for loss "listwise+mse": loss = listwise + mse_weight * mse
    group_by_instruction: bool = False  # micro-batches keep one instruction's pairs together

    def __post_init__(self) -> None:
        if self.loss not in SCORER_LOSSES:
            raise ValueError(f"unknown scorer loss {self.loss!r}; choose from {sorted(SCORER_LOSSES)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.listwise_tau > 0:
            raise ValueError(f"listwise_tau must be > 0, got {self.listwise_tau}")
        for name in ("epochs", "batch_size", "micro_batch_size", "bucket_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


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


@dataclass
class TrainState:
    update: int = 0
    samples: int = 0
    losses: list[float] = field(default_factory=list)  # one per update, for loss curves
    #: eval results, one dict per evaluation (``{"update": u, **metrics}``), kept across restarts
    evals: list[dict[str, Any]] = field(default_factory=list)
    #: the update count at each resume from a checkpoint (a restart after a failure or a rerun)
    resumes: list[int] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "samples": self.samples, "losses": list(self.losses),
                "evals": [dict(e) for e in self.evals], "resumes": list(self.resumes)}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> "TrainState":
        return cls(update=int(d["update"]), samples=int(d["samples"]), losses=list(d.get("losses", [])),
                   evals=[dict(e) for e in d.get("evals", [])], resumes=[int(u) for u in d.get("resumes", [])])


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


# --- resumable state beside a checkpoint (JSON + safetensors, never pickles) -----------------

TRAIN_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors (``"<param>.<name>"``,
    e.g. ``"3.exp_avg"``) and a JSON-ready rest (param groups and non-tensor per-param values)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, per_param in sd["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    groups, tuple_keys = [], set()
    for g in sd["param_groups"]:
        out = {}
        for k, v in g.items():
            if isinstance(v, tuple):
                tuple_keys.add(k)
                v = list(v)
            out[k] = v
        groups.append(out)
    return tensors, {"param_groups": groups, "scalars": scalars, "tuple_keys": sorted(tuple_keys)}


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_to_tensors`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    tuple_keys = set(meta.get("tuple_keys", []))
    groups = [{k: (tuple(v) if k in tuple_keys else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_train_state(directory: str | os.PathLike, state: TrainState,
                     optimizer: torch.optim.Optimizer | None = None,
                     extra: Mapping[str, Any] | None = None) -> None:
    """Write ``trainer_state.json`` (the :class:`TrainState`, optimizer hyperparameters and
    ``extra``) and ``optimizer.safetensors`` (Adam moments) into ``directory``."""
    from safetensors.torch import save_file

    from cappy_core.io import atomic_path, write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"state": state.state_dict(), "extra": dict(extra or {})}
    if optimizer is not None:
        tensors, meta = optimizer_state_to_tensors(optimizer)
        info["optimizer"] = meta
        with atomic_path(directory / OPTIMIZER_FILE) as tmp:
            save_file(tensors, str(tmp))
    write_json(directory / TRAIN_STATE_FILE, info)


def load_train_state(directory: str | os.PathLike,
                     optimizer: torch.optim.Optimizer | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Read what :func:`save_train_state` wrote; loads the Adam moments into ``optimizer`` when
    given (it must be built over the same parameters in the same order). Returns
    ``(state, extra)``."""
    directory = Path(directory)
    path = directory / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {TRAIN_STATE_FILE} (not a training checkpoint)")
    info = json.loads(path.read_text())
    if optimizer is not None:
        if "optimizer" not in info or not (directory / OPTIMIZER_FILE).is_file():
            raise FileNotFoundError(f"{directory}: no optimizer state ({OPTIMIZER_FILE})")
        from safetensors.torch import load_file

        tensors = load_file(str(directory / OPTIMIZER_FILE))
        optimizer.load_state_dict(optimizer_state_from_tensors(tensors, info["optimizer"]))
    return TrainState.from_state_dict(info["state"]), dict(info.get("extra", {}))


# --- scorer batches: length-grouped or instruction-grouped, rank-sliced, resumable ------------

def _window_rng(seed: int, instructions: Sequence[str], responses: Sequence[str]) -> np.random.Generator:
    """Seeded by ``seed`` and the window's first row: the same on every rank and every run."""
    first = (str(instructions[0]) + "\x00" + str(responses[0])).encode("utf-8", "replace")
    return np.random.default_rng([seed, zlib.crc32(first)])


def pack_instructions(instructions: Sequence[str], responses: Sequence[str], micro_batch_size: int,
                      world_size: int = 1, seed: int = 0) -> list[list[np.ndarray]]:
    """The instruction-grouped plan of a window (:class:`PairWindowCollator` with
    ``group_by_instruction``): global micro-batches, each one row-index array per rank.

    The window's instructions (groups of rows) are packed largest first (ties in seeded random
    order), each into the fullest micro-batch that still has room for it within
    ``micro_batch_size`` rows; a group larger than that is a micro-batch of its own. The
    micro-batches are shuffled (same seeding) and dealt out ``world_size`` at a time; the last
    ``count mod world_size`` are left out. So every row is used at most once (all of them on one
    rank) and an instruction's rows are never split."""
    if len(instructions) == 0:
        return []
    rows_of: dict[str, list[int]] = {}
    for i, x in enumerate(instructions):
        rows_of.setdefault(str(x), []).append(i)
    groups = list(rows_of.values())
    rng = _window_rng(seed, instructions, responses)
    order = sorted(rng.permutation(len(groups)), key=lambda j: -len(groups[j]))  # stable: ties stay random
    batches: list[list[int]] = []
    open_by_room: list[list[int]] = [[] for _ in range(micro_batch_size + 1)]  # open batches by free rows
    for j in order:
        rows = groups[j]
        room = next((r for r in range(len(rows), micro_batch_size) if open_by_room[r]), None)
        if room is None:
            batches.append([])
            b, room = len(batches) - 1, micro_batch_size
        else:
            b = open_by_room[room].pop()
        batches[b].extend(rows)
        if room > len(rows):
            open_by_room[room - len(rows)].append(b)
    shuffled = [np.asarray(batches[i]) for i in rng.permutation(len(batches))]
    return [shuffled[i * world_size:(i + 1) * world_size] for i in range(len(shuffled) // world_size)]


class PairWindowCollator:
    """One window of pair rows → this rank's tokenised micro-batches.

    A window holds consecutive rows of the (already shuffled) pair stream; ``G =
    micro_batch_size · world_size`` rows make one *global* micro-batch. Every rank receives the
    same window and makes the same decisions from its content alone, so the ranks agree without
    talking. :meth:`plan` cuts the window into global micro-batches, one row-index array per rank:

    * default: keep the first ``⌊rows/G⌋·G`` rows (a short window drops its tail); with
      ``sort_by_length``, order them by character length (instruction + response, longest first,
      stable) and cut into global micro-batches of ``G`` rows, so each batch pads to a similar
      length, then shuffle the order of those batches with a generator seeded from ``seed`` and
      the window's first row, so long and short batches alternate at random but identically on
      every rank and every run; without it, consecutive rows in order. Rank ``r`` takes rows
      ``r·B .. (r+1)·B`` of each global batch;
    * ``group_by_instruction``: :func:`pack_instructions`, so every row is used and an
      instruction's rows stay in one micro-batch of at most ``micro_batch_size`` rows (unless
      it alone is larger); ``sort_by_length`` is ignored.

    Each micro-batch is ``tokenizer(instructions, responses, truncation="longest_first",
    max_length=..., padding="longest")`` with a float32 ``labels`` tensor and a ``group`` tensor
    (int64 id of each row's instruction within the micro-batch, for the listwise losses).
    Callable from several threads: the tokenizer runs under a lock. Input: a mapping with numpy
    arrays ``instruction``, ``response``, ``label``.
    """

    def __init__(self, tokenizer: Any, *, max_length: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, sort_by_length: bool = True, seed: int = 0,
                 group_by_instruction: bool = False):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.micro_batch_size = int(micro_batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.sort_by_length = sort_by_length
        self.seed = int(seed)
        self.group_by_instruction = group_by_instruction
        self._lock = threading.Lock()

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    def plan(self, instructions: Sequence[str], responses: Sequence[str]) -> list[list[np.ndarray]]:
        """Row indices of each global micro-batch of this window: one array per rank."""
        if self.group_by_instruction:
            return pack_instructions(instructions, responses, self.micro_batch_size, self.world_size, self.seed)
        g, b = self.global_batch, self.micro_batch_size
        k = len(instructions) // g
        if k == 0:
            return []
        keep = np.arange(k * g)
        if not self.sort_by_length or k == 1:
            chunks = [keep[i * g:(i + 1) * g] for i in range(k)]
        else:
            lengths = np.array([len(instructions[i]) + len(responses[i]) for i in keep])
            order = keep[np.argsort(-lengths, kind="stable")]
            chunks = [order[i * g:(i + 1) * g] for i in range(k)]
            chunks = [chunks[i] for i in _window_rng(self.seed, instructions, responses).permutation(k)]
        return [[c[r * b:(r + 1) * b] for r in range(self.world_size)] for c in chunks]

    def tokenize(self, instructions: Sequence[str], responses: Sequence[str],
                 labels: Sequence[float]) -> dict[str, torch.Tensor]:
        instructions = [str(x) for x in instructions]
        with self._lock:
            enc = self.tokenizer(instructions, [str(x) for x in responses], truncation="longest_first",
                                 max_length=self.max_length, padding="longest", return_tensors="pt")
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out["labels"] = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        out["group"] = torch.as_tensor(np.unique(np.asarray(instructions), return_inverse=True)[1].astype(np.int64))
        return out

    def micro_batches(self, batch: Mapping[str, Any]) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the window ``batch``, tokenised one at a time."""
        instructions, responses = batch["instruction"], batch["response"]
        labels = np.asarray(batch["label"], dtype=np.float32)
        for ranks in self.plan(instructions, responses):
            mine = ranks[self.rank]
            yield self.tokenize([instructions[i] for i in mine], [responses[i] for i in mine], labels[mine])

    def __call__(self, batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        return list(self.micro_batches(batch))


def micro_batches_per_epoch(rows: int, micro_batch_size: int, world_size: int = 1) -> int:
    """Global micro-batches one pass over ``rows`` pair rows gives (the tail is dropped)."""
    return rows // (micro_batch_size * world_size)


def table_windows(columns: Mapping[str, Sequence[Any]], window_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive windows of ``window_rows`` rows of column arrays: the plain-process
    counterpart of Ray Data's ``iter_batches(batch_size=window_rows)``."""
    arrays = {k: np.asarray(v, dtype=object if k != "label" else np.float64) for k, v in columns.items()}
    n = len(next(iter(arrays.values()))) if arrays else 0
    for start in range(0, n, window_rows):
        yield {k: v[start:start + window_rows] for k, v in arrays.items()}


def iter_micro_batches(windows: Callable[[], Iterable[Iterable[Batch]]], *, epochs: int = 1,
                       skip: int = 0) -> Iterator[Batch]:
    """Flatten collated windows into micro-batches over ``epochs`` passes, skipping the first
    ``skip`` micro-batches (those consumed before a restart: ``updates_done · grad_accum``).
    ``windows()`` starts one pass over the data and must give the same windows every time."""
    seen = 0
    for _ in range(epochs):
        for window in windows():
            for mb in window:
                if seen >= skip:
                    yield mb
                seen += 1


def _one_window(windows: Iterable[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """All rows of a pass as one window (the instruction-grouped plan spans the whole epoch)."""
    parts = list(windows)
    if not parts:
        return []
    return [{k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}]


# --- the scorer's fit ------------------------------------------------------------------------

def fit_scorer(scorer: Any, pairs: Mapping[str, Sequence[Any]] | None, schedule: ScorerSchedule, *,
               windows: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None,
               total_updates: int | None = None, world_size: int = 1, rank: int = 0,
               model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
               state: TrainState | None = None, device: torch.device | str | None = None,
               on_update: Callable[[UpdateInfo], None] | None = None,
               reduce_loss: Callable[[float], float] | None = None) -> TrainState:
    """Train ``scorer`` (a :class:`cappy_core.scorer.Scorer`) per ``schedule``; returns the state.

    Data: ``pairs`` (columns ``instruction``, ``response``, ``label``, as
    :func:`cappy_core.pretrain_data.read_pair_columns` returns) cut into windows of
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
        raw = lambda: _one_window(windows())  # noqa: E731
    model = scorer.model if model is None else model
    state = TrainState() if state is None else state
    scorer.model.train()
    if optimizer is None:
        optimizer = make_optimizer(model, schedule.lr, schedule.weight_decay)
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
