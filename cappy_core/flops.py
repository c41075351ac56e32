"""How close training runs to the machine's arithmetic limit: the FLOPs a training token costs
and the matmul rate the machine reaches at the current thread count (the bound it is measured
against). The scorer's per-pair forward FLOPs are :func:`cappy_core.scorer.model.flops_per_pair`.
Tested in ``tests/core/test_flops.py``.
"""

from __future__ import annotations

import time
from typing import Any


def matmul_flops(n: int = 1024, reps: int = 10, dtype: Any = None, device: str = "cpu",
                 threads: int | None = None) -> float:
    """Best-of-``reps`` FLOP/s of an ``n×n @ n×n`` ``torch.matmul`` (fp32 unless ``dtype``) on
    ``device``, at ``threads`` torch threads (default: the current count, left as it was)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _best_matmul(torch, n, reps, dtype, device)
    finally:
        torch.set_num_threads(before)


def _best_matmul(torch, n: int, reps: int, dtype: Any, device: str) -> float:
    a = torch.randn(n, n, dtype=dtype or torch.float32, device=device)
    b = torch.randn(n, n, dtype=dtype or torch.float32, device=device)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def linear_parameters(model: Any) -> int:
    """Weights of the model's ``nn.Linear`` layers: the matmuls a token goes through (the LM head
    included; embedding lookups, norms and biases are not matmuls)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def decoder_train_flops_per_token(model: Any, mean_tokens: float) -> float:
    """A decoder's training FLOPs per token: 6 × its linear parameters (forward 2, backward 4)
    plus attention's ``QKᵀ`` and ``AV`` at the mean sequence length, 12 × layers × length × width
    (causal masking not discounted)."""
    cfg = model.config
    return 6.0 * linear_parameters(model) + 12.0 * cfg.num_hidden_layers * mean_tokens * cfg.hidden_size
