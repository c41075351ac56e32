"""How the transformers backend picks each next token: one rule per row, shared by ``generate``
(through :class:`SeededChooser`) and the backend's own decode loop.

End-of-sequence is masked until ``min_new_tokens``; temperature → top-k → top-p (transformers'
warpers; top-p as :class:`TopPFromSortedLogits`) warp the raw logits; the draw inverts the row's
cumulative distribution at a uniform that is a function of the row's seed and the step only
(:func:`row_uniforms`), so a sample does not depend on what else is in the batch; the raw
log-probability of the chosen token is recorded.

Tested in ``tests/core/test_generation.py``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper

from cappy_core.generation.decoding import DecodingSpec

__all__ = ["SeededChooser", "TopPFromSortedLogits", "choose_tokens", "row_uniforms", "spec_warpers"]


class TopPFromSortedLogits(LogitsProcessor):
    """transformers' :class:`~transformers.TopPLogitsWarper`, computed from the sorted logits'
    values alone: the least likely tokens go while their summed probability is at most
    ``1 - top_p`` (at least one token stays), i.e. every token whose logit is at or below the
    largest of those. Same sorted values, same softmax and cumulative sum as transformers; what
    differs is that ``torch.sort`` also returns indices, and sorting values alone with numpy's
    vectorised sort is ~10× faster on CPU (top-p's sort was a tenth of the decode loop's time). The
    kept tokens are the same except in an exact tie at the cut (transformers' unstable sort keeps an
    arbitrary part of the tied tokens; here they all go)."""

    def __init__(self, top_p: float):
        self.top_p = float(top_p)

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        if scores.device.type == "cpu":
            ascending = torch.from_numpy(np.sort(scores.numpy(), axis=-1))
        else:
            ascending = scores.sort(dim=-1).values
        dropped = (ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p).sum(dim=-1, keepdim=True)
        dropped.clamp_(max=scores.shape[-1] - 1)
        cut = ascending.gather(-1, (dropped - 1).clamp(min=0)).masked_fill_(dropped == 0, -float("inf"))
        return scores.masked_fill(scores <= cut, -float("inf"))


def spec_warpers(spec: DecodingSpec) -> list:
    """The warpers of a sampling decoding, in transformers' order: temperature, top-k, top-p."""
    warpers = []
    if spec.kind != "greedy":
        if spec.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(spec.temperature))
        if spec.top_k > 0:
            warpers.append(TopKLogitsWarper(top_k=spec.top_k))
        if spec.top_p < 1.0:
            warpers.append(TopPFromSortedLogits(spec.top_p))
    return warpers


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32") on int64 tensors holding values < 2**32.
    Products may wrap past 2**63; the low 32 bits kept by the mask are exact all the same."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in [0, 1) per row, a pure function of (row seed, step): counter-based, so a
    row's draws never depend on which rows share its batch, and all rows draw in one tensor
    operation (a seeded ``torch.Generator`` per row costs one Python-level call per row and step)."""
    s = seeds.to(torch.int64)
    x = _mix32((s & _MASK32) ^ _mix32((s >> 32) & _MASK32))
    x = _mix32(x ^ _mix32(torch.full_like(x, int(step) & _MASK32) + 0x9E3779B9))
    return x.double() / 2.0 ** 32


def choose_tokens(scores: torch.Tensor, greedy: bool, warpers: list, seeds: torch.Tensor | None, step: int,
                  mask_eos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its raw log-probability: the one per-row rule of both loops.

    ``scores`` are raw logits (rows × vocab); ``mask_eos`` the end-of-sequence ids to forbid (still
    before ``min_new_tokens``) or None. Sampling inverts each row's cumulative distribution at
    :func:`row_uniforms` of the row's seed and the step (inverse-CDF sampling, exact for the
    warped distribution; a token of probability 0 is never drawn).
    """
    scores = scores.float()
    raw = torch.log_softmax(scores, dim=-1)
    x = scores  # the warpers return new tensors; only masking writes in place
    if mask_eos is not None:
        x = scores.clone()
        x[:, mask_eos] = -float("inf")
    if greedy:
        tokens = x.argmax(dim=-1)
    else:
        for w in warpers:
            x = w(None, x)
        cdf = torch.softmax(x, dim=-1).cumsum(dim=-1, dtype=torch.float64)
        u = row_uniforms(seeds, step).to(cdf.device) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)
    return tokens, raw.gather(1, tokens[:, None])[:, 0]


class SeededChooser(LogitsProcessor):
    """Chooses the next token of every row (greedy or seeded sampling) inside ``generate``."""

    def __init__(self, spec: DecodingSpec, seeds: Sequence[int] | None, start_len: int, min_new_tokens: int,
                 eos_ids: Sequence[int]):
        self.greedy = spec.kind == "greedy"
        self.start_len = start_len
        self.min_new_tokens = min_new_tokens
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long)
        self.seeds = None if self.greedy else torch.tensor([int(s) for s in seeds], dtype=torch.int64)
        self.warpers = spec_warpers(spec)
        self.logprobs: list[torch.Tensor] = []  # per step: raw log-prob of each row's token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.start_len
        tokens, logprobs = choose_tokens(scores, self.greedy, self.warpers, self.seeds, step,
                                         self.eos.to(scores.device) if step < self.min_new_tokens else None)
        self.logprobs.append(logprobs)
        out = torch.full_like(scores, -float("inf"))
        out.scatter_(1, tokens[:, None], 0.0)
        return out
