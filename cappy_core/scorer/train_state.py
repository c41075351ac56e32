"""A training run's resumable state: :class:`TrainState` (update count, samples, loss curve,
eval history, resumes) and, beside a checkpoint, :func:`save_train_state` /
:func:`load_train_state`: that state and the optimizer's as JSON + safetensors (never pickles), so
a restarted worker continues the same schedule with the same Adam moments. Tested in
``tests/core/test_training.py``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch


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
