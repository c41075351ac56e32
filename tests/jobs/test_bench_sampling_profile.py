"""``python -m jobs.bench.sampling --profile``: operator shares of a torch profile."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from jobs.bench.sampling import operator_shares


def test_operator_shares_rank_the_heaviest_operator_first_and_are_fractions_of_the_total():
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            a @ b  # far heavier than the one small add
        a[:2] + 1
    shares = operator_shares(prof, top=3)
    assert len(shares) <= 3 and next(iter(shares)) in ("aten::mm", "aten::matmul")
    values = list(shares.values())
    assert values == sorted(values, reverse=True) and 0 < sum(values) <= 1.0 + 1e-9
    assert values[0] > 0.5
