"""The scorer's training recipe, :class:`ScorerSchedule`: one dataclass, torch-free, so every
job's config embeds it (``--schedule.lr``, a ``schedule:`` YAML section) without loading torch,
and :func:`cappy_core.scorer.training.fit_scorer` reads it. Its validation is its own. Tested in ``tests/core/test_training.py`` and ``tests/jobs/test_sweep.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from cappy_core.config import SettingError

#: The scorer objectives :data:`cappy_core.scorer.training.SCORER_LOSSES` implements; ``mse`` is the paper's.
SCORER_LOSS_NAMES = ("mse", "listwise", "listwise+mse")


def _setting(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class ScorerSchedule:
    """The scorer's training recipe: optimizer, schedule, batches, precision, seed and loss.

    Embedded whole (a config *section*, ``--schedule.<field>``) in ``cappy pretrain``,
    ``cappy finetune`` and ``cappy sweep``, whose run keys and result keys are its fields: a new
    hyperparameter is one field here (and its use in :func:`fit_scorer`)."""

    lr: float = _setting(2e-5, "peak learning rate (AdamW)")
    warmup_ratio: float = _setting(0.1, "fraction of updates of linear warmup")
    weight_decay: float = _setting(0.0, "AdamW weight decay (matrices only)")
    adam_beta2: float = _setting(0.999, "AdamW's second-moment decay (lower, e.g. 0.98 or 0.95, for short or "
                                        "large-batch runs)")
    epochs: int = _setting(1, "passes over the training pairs")
    batch_size: int = _setting(128, "effective batch: pairs per optimizer update, over all workers")
    micro_batch_size: int = _setting(32, "pairs per forward pass per worker; accumulation = batch / (micro x workers)")
    max_grad_norm: Optional[float] = _setting(None, "clip gradients to this norm")
    bf16: bool = _setting(False, "bf16 autocast for training")
    seed: int = _setting(0, "seeds the pairs, the batch order and dropout (the head init: the scorer loader's)")
    bucket_window: int = _setting(8, "global micro-batches per length-grouping window (1: no grouping)")
    loss: str = _setting("mse", "objective on the raw first logit: the paper's mse, listwise (softmax CE against "
                         "softmax(label / tau) over one instruction's candidates; needs group_by_instruction) "
                         "or listwise+mse", choices=list(SCORER_LOSS_NAMES))
    listwise_tau: float = _setting(0.3, "temperature tau of the listwise target softmax(label / tau)")
    mse_weight: float = _setting(0.0, "listwise+mse: loss = listwise + mse_weight * mse")
    group_by_instruction: bool = _setting(False, "micro-batches keep one instruction's pairs together")

    def __post_init__(self) -> None:
        if self.loss not in SCORER_LOSS_NAMES:
            raise SettingError("loss", f"{self.loss!r}: unknown scorer loss; choose from {list(SCORER_LOSS_NAMES)}")
        if not self.lr > 0:
            raise SettingError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise SettingError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.adam_beta2 < 1:
            raise SettingError("adam_beta2", f"must be in (0, 1), got {self.adam_beta2}")
        if not self.listwise_tau > 0:
            raise SettingError("listwise_tau", f"must be > 0, got {self.listwise_tau}")
        if self.mse_weight < 0:
            raise SettingError("mse_weight", f"must be >= 0, got {self.mse_weight}")
        for name in ("epochs", "batch_size", "micro_batch_size", "bucket_window"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise SettingError("batch_size", f"{self.batch_size} must be a multiple of micro_batch_size "
                               f"{self.micro_batch_size}", related=["micro_batch_size"])
        if self.loss.startswith("listwise") and not self.group_by_instruction:
            raise SettingError("loss", f"{self.loss} ranks one instruction's candidates against each other: it "
                               "needs group_by_instruction (micro-batches that keep an instruction's candidates "
                               "together)", related=["group_by_instruction"])
