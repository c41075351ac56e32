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
* Resumable: :class:`TrainState` (update count, samples, loss curve, eval history) round-trips
  through ``state_dict``; :func:`save_train_state` / :func:`load_train_state` write it and the
  optimizer state beside a checkpoint as JSON + safetensors (no pickles), so a restarted worker
  continues the same schedule with the same Adam moments.
* Scorer batches: :class:`PairWindowCollator` turns a window of shuffled (instruction, response,
  label) rows into this rank's tokenised micro-batches, grouping rows of similar length
  (dynamic padding); :func:`iter_micro_batches` chains windows, epochs and the resume skip. The
  same code feeds a Ray Train worker and a plain process, so both see identical batches.
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

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"state": state.state_dict(), "extra": dict(extra or {})}
    if optimizer is not None:
        tensors, meta = optimizer_state_to_tensors(optimizer)
        info["optimizer"] = meta
        save_file(tensors, str(directory / OPTIMIZER_FILE))
    text = json.dumps(info, indent=1)
    tmp = directory / (TRAIN_STATE_FILE + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(directory / TRAIN_STATE_FILE)


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


# --- scorer batches: length-grouped, rank-sliced, resumable -----------------------------------

PAIR_COLUMNS = ("instruction", "response", "label")


class PairWindowCollator:
    """One window of pair rows → this rank's tokenised micro-batches (a list of batches).

    A window holds ``W·G`` consecutive rows of the (already shuffled) pair stream, where
    ``G = micro_batch_size · world_size`` is one *global* micro-batch. Every rank receives the
    same window and makes the same decisions from its content alone, so the ranks agree without
    talking:

    1. keep the first ``⌊rows/G⌋·G`` rows (a short last window drops its tail);
    2. with ``sort_by_length``: order them by character length (instruction + response, longest
       first, stable) and cut into global micro-batches of ``G`` rows, so each batch pads to a
       similar length; then shuffle the order of those batches with a generator seeded from
       ``seed`` and the window's first row, so long and short batches alternate at random but
       identically on every rank and every run. Without it: consecutive rows, in order;
    3. rank ``r`` takes rows ``r·B .. (r+1)·B`` of each global batch and tokenises them as
       ``tokenizer(instructions, responses, truncation="longest_first", max_length=...,
       padding="longest")`` with a float32 ``labels`` tensor.

    Callable from several threads (Ray Data's prefetch threads): the tokenizer runs under a lock.
    Input: a mapping with numpy arrays ``instruction``, ``response``, ``label``.
    """

    def __init__(self, tokenizer: Any, *, max_length: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, sort_by_length: bool = True, seed: int = 0):
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
        self._lock = threading.Lock()

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    def plan(self, instructions: Sequence[str], responses: Sequence[str]) -> list[np.ndarray]:
        """Row indices of each global micro-batch of this window (steps 1–2)."""
        g = self.global_batch
        k = len(instructions) // g
        if k == 0:
            return []
        keep = np.arange(k * g)
        if not self.sort_by_length or k == 1:
            return [keep[i * g:(i + 1) * g] for i in range(k)]
        lengths = np.array([len(instructions[i]) + len(responses[i]) for i in keep])
        order = keep[np.argsort(-lengths, kind="stable")]
        chunks = [order[i * g:(i + 1) * g] for i in range(k)]
        first = (str(instructions[0]) + "\x00" + str(responses[0])).encode("utf-8", "replace")
        rng = np.random.default_rng([self.seed, zlib.crc32(first)])
        return [chunks[i] for i in rng.permutation(k)]

    def tokenize(self, instructions: Sequence[str], responses: Sequence[str],
                 labels: Sequence[float]) -> dict[str, torch.Tensor]:
        with self._lock:
            enc = self.tokenizer([str(x) for x in instructions], [str(x) for x in responses],
                                 truncation="longest_first", max_length=self.max_length,
                                 padding="longest", return_tensors="pt")
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out["labels"] = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        return out

    def __call__(self, batch: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        instructions, responses = batch["instruction"], batch["response"]
        labels = np.asarray(batch["label"], dtype=np.float32)
        b, r = self.micro_batch_size, self.rank
        out = []
        for rows in self.plan(instructions, responses):
            mine = rows[r * b:(r + 1) * b]
            out.append(self.tokenize([instructions[i] for i in mine], [responses[i] for i in mine],
                                     labels[mine]))
        return out


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


def iter_micro_batches(windows: Callable[[], Iterable[Sequence[Batch]]], *, epochs: int = 1,
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
