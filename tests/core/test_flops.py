"""cappy_core/flops.py: the FLOPs a training token costs, and the matmul rate it is measured against."""

from __future__ import annotations

import pytest


def test_a_decoder_token_costs_six_times_its_matmul_weights_plus_attention():
    import torch

    from cappy_core.flops import decoder_train_flops_per_token, linear_parameters
    from cappy_core.generation.embedded_model import new_llama, train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300, min_frequency=1)
    model = new_llama(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    d, layers, ff, vocab = 32, 2, model.config.intermediate_size, model.config.vocab_size
    # per layer q, k, v, o (d x d each, no grouped heads here) and the gated MLP (3 x d x ff); the LM head
    assert linear_parameters(model) == layers * (4 * d * d + 3 * d * ff) + vocab * d
    assert linear_parameters(model) < sum(p.numel() for p in model.parameters())  # embeddings, norms: not matmuls
    assert decoder_train_flops_per_token(model, 10) == pytest.approx(6 * linear_parameters(model) + 12 * layers * 10 * d)
    assert torch.get_num_threads() >= 1


def test_the_matmul_rate_is_measured_at_the_threads_asked_and_leaves_them_as_they_were():
    import torch

    from cappy_core.flops import matmul_flops

    before = torch.get_num_threads()
    rate = matmul_flops(128, reps=3, threads=1)
    assert rate > 1e7 and torch.get_num_threads() == before
