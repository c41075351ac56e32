"""The plain training loop (schedule, accumulation, bf16, clipping, seeding, resume state), the
scorer batch collator, and the scorer metrics (hand-computed cases)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cappy_core import metrics
from cappy_core.training import (PairWindowCollator, TrainState, iter_micro_batches, load_train_state, lr_at,
                                 make_optimizer, micro_batches_per_epoch, save_train_state, scorer_mse_loss,
                                 table_windows, train, warmup_updates)


def tiny_bert(dropout: float = 0.0, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=1,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg)


def batches(n_batches: int, size: int, seq: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 64, (size, seq), generator=g),
             "attention_mask": torch.ones(size, seq, dtype=torch.long),
             "labels": torch.rand(size, generator=g)} for _ in range(n_batches)]


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --- schedule --------------------------------------------------------------------------------

def test_lr_schedule_warms_up_to_peak_at_end_of_warmup_then_decays_to_zero():
    total, peak = 20, 1e-3
    warm = warmup_updates(total, 0.1)
    assert warm == 2
    lrs = [lr_at(u, total, warm, peak) for u in range(total + 1)]
    assert lrs[:3] == [0.0, peak / 2, peak]  # the peak exactly at the end of warmup
    assert max(lrs) == peak and lrs.index(peak) == warm
    assert lrs[total - 1] == pytest.approx(peak / (total - warm))  # last update: one step above 0
    assert lrs[total] == 0.0
    decay = lrs[warm:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing, linearly
    assert np.allclose(np.diff(decay), -peak / (total - warm))


def test_lr_changes_once_per_update_not_per_micro_step():
    model = tiny_bert()
    opt = make_optimizer(model, 1e-3)
    seen = []

    def loss(m, b):
        seen.append(opt.param_groups[0]["lr"])
        return scorer_mse_loss(m, b)

    infos = []
    train(model, batches(12, 2), loss_fn=loss, total_updates=3, lr=1e-3, warmup_ratio=0.5,
          grad_accum_steps=4, optimizer=opt, on_update=infos.append)
    assert len(seen) == 12
    per_update = [seen[i:i + 4] for i in range(0, 12, 4)]
    assert all(len(set(g)) == 1 for g in per_update)  # constant within an update
    expected = [lr_at(u, 3, warmup_updates(3, 0.5), 1e-3) for u in range(3)]
    assert [g[0] for g in per_update] == expected == [i.lr for i in infos]
    assert expected[warmup_updates(3, 0.5)] == 1e-3  # peak reached after warmup (update 2)


# --- accumulation, bf16, clipping, seeding, errors -------------------------------------------

def test_grad_accumulation_equals_one_big_batch_fp32():
    data = batches(4, 3, seed=1)
    big = [{k: torch.cat([b[k] for b in data]) for k in data[0]}]
    a, b = tiny_bert(), tiny_bert()
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))
    kw = dict(loss_fn=scorer_mse_loss, total_updates=1, lr=1e-2, warmup_ratio=0.0)
    sa = train(a, data, grad_accum_steps=4, **kw)
    sb = train(b, big, grad_accum_steps=1, **kw)
    assert sa.samples == sb.samples == 12
    assert sa.losses[0] == pytest.approx(sb.losses[0], rel=1e-5)
    for x, y in zip(params(a), params(b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(x, y) for x, y in zip(params(a), params(tiny_bert())))  # it trained


def test_bf16_autocast_trains_and_keeps_fp32_weights():
    model = tiny_bert()
    before = params(model)
    state = train(model, batches(4, 4), loss_fn=scorer_mse_loss, total_updates=4, lr=1e-2,
                  warmup_ratio=0.0, bf16=True)
    assert state.update == 4 and all(math.isfinite(x) for x in state.losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(x, y) for x, y in zip(before, params(model)))


def test_clipping_bounds_the_step_and_reports_the_unclipped_norm():
    model = tiny_bert()
    before = params(model)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    infos = []
    train(model, batches(1, 4), loss_fn=scorer_mse_loss, total_updates=1, lr=1.0, warmup_ratio=0.0,
          max_grad_norm=1e-3, optimizer=sgd, on_update=infos.append)
    step = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(params(model), before)))
    assert infos[0].grad_norm > 1e-3  # the norm before clipping
    assert float(step) == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1: the step is the clipped gradient


def test_seeded_runs_repeat_and_seeds_differ():
    def run(seed):
        model = tiny_bert(dropout=0.3)
        return train(model, batches(3, 4), loss_fn=scorer_mse_loss, total_updates=3, lr=1e-2, seed=seed).losses

    assert run(7) == run(7)
    assert run(7) != run(8)  # dropout masks follow the seed


def test_non_finite_loss_is_an_error():
    model = tiny_bert()
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(model, batches(2, 2), loss_fn=lambda m, b: scorer_mse_loss(m, b) * float("nan"),
              total_updates=2, lr=1e-3)


def test_reduce_loss_maps_the_recorded_loss():
    state = train(tiny_bert(), batches(2, 2), loss_fn=scorer_mse_loss, total_updates=2, lr=1e-3,
                  reduce_loss=lambda x: 42.0)
    assert state.losses == [42.0, 42.0]


def test_stops_when_data_runs_out_without_a_partial_update():
    state = train(tiny_bert(), batches(5, 2), loss_fn=scorer_mse_loss, total_updates=10, lr=1e-3,
                  grad_accum_steps=2)
    assert state.update == 2 and state.samples == 10  # the fifth micro-batch made no update


# --- resume state ----------------------------------------------------------------------------

def test_saved_state_and_optimizer_resume_exactly(tmp_path):
    data = batches(6, 3, seed=3)
    kw = dict(loss_fn=scorer_mse_loss, total_updates=6, lr=1e-2, warmup_ratio=0.3, seed=0)
    straight = tiny_bert()
    full = train(straight, data, **kw)

    first = tiny_bert()
    opt = make_optimizer(first, 1e-2)
    state = TrainState()
    train(first, data[:3], optimizer=opt, state=state, **kw)  # data ends after 3 updates
    assert state.update == 3
    state.evals.append({"update": 3, "mse": 0.5})
    save_train_state(tmp_path, state, opt, extra={"note": "x"})
    assert not list(tmp_path.glob("*.pt")) and (tmp_path / "optimizer.safetensors").is_file()

    second = tiny_bert()
    second.load_state_dict(first.state_dict())
    opt2 = make_optimizer(second, 1e-2)
    state2, extra = load_train_state(tmp_path, opt2)
    assert extra == {"note": "x"} and state2.update == 3 and state2.evals == [{"update": 3, "mse": 0.5}]
    train(second, data[3:], optimizer=opt2, state=state2, **kw)
    assert state2.losses == full.losses
    for x, y in zip(params(second), params(straight)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_load_train_state_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        load_train_state(tmp_path)


# --- scorer batches --------------------------------------------------------------------------

class FakeTokenizer:
    def __call__(self, a, b, truncation, max_length, padding, return_tensors):
        lens = [min(len(x) + len(y), max_length) for x, y in zip(a, b)]
        width = max(lens)
        ids = torch.zeros(len(a), width, dtype=torch.long)
        mask = torch.zeros(len(a), width, dtype=torch.long)
        for i, n in enumerate(lens):
            ids[i, :n] = i + 1
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}


def window(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 40, n)
    return {"instruction": np.array(["x" * int(k) for k in lens], dtype=object),
            "response": np.array([f"r{i}" for i in range(n)], dtype=object),
            "label": np.arange(n, dtype=np.float64) / n}


def test_collator_splits_each_global_batch_between_ranks_and_drops_the_tail():
    w = window(40)  # G = 4 * 2 = 8 → 5 global micro-batches
    outs = [PairWindowCollator(FakeTokenizer(), max_length=64, micro_batch_size=4, world_size=2, rank=r)(w)
            for r in range(2)]
    assert [len(o) for o in outs] == [5, 5]
    labels = [sorted(torch.cat([o[i]["labels"] for o in outs]).tolist()) for i in range(5)]
    flat = sorted(x for b in labels for x in b)
    assert flat == pytest.approx(sorted((np.arange(40) / 40).tolist()))  # each row once per window
    short = PairWindowCollator(FakeTokenizer(), max_length=64, micro_batch_size=4, world_size=2, rank=0)(window(13))
    assert len(short) == 1  # 13 rows → one global batch of 8, the other 5 dropped


def test_collator_groups_lengths_deterministically():
    w = window(64, seed=5)
    sorted_c = PairWindowCollator(FakeTokenizer(), max_length=256, micro_batch_size=8)
    plain = PairWindowCollator(FakeTokenizer(), max_length=256, micro_batch_size=8, sort_by_length=False)
    padded = lambda out: sum(int(b["input_ids"].numel()) for b in out)
    assert padded(sorted_c(w)) < padded(plain(w))  # grouping by length pads less
    again = sorted_c(w)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(sorted_c(w), again))
    assert [b["labels"].tolist() for b in plain(w)][0] == pytest.approx((np.arange(8) / 64).tolist())


def test_iter_micro_batches_skips_and_repeats_epochs():
    cols = {"instruction": ["a"] * 10, "response": ["b"] * 10, "label": list(np.arange(10) / 10)}
    collate = PairWindowCollator(FakeTokenizer(), max_length=8, micro_batch_size=2, sort_by_length=False)
    windows = lambda: (collate(w) for w in table_windows(cols, 4))
    all_mb = list(iter_micro_batches(windows, epochs=2))
    assert len(all_mb) == 2 * micro_batches_per_epoch(10, 2) == 10  # windows of 4, 4, 2 rows
    skipped = list(iter_micro_batches(windows, epochs=2, skip=3))
    assert [b["labels"].tolist() for b in skipped] == [b["labels"].tolist() for b in all_mb[3:]]


def test_train_state_round_trips_and_reads_old_dicts():
    s = TrainState(update=3, samples=12, losses=[1.0, 0.5, 0.25], evals=[{"update": 3}], resumes=[2])
    assert TrainState.from_state_dict(copy.deepcopy(s.state_dict())) == s
    assert TrainState.from_state_dict({"update": 1, "samples": 2}) == TrainState(update=1, samples=2)


# --- metrics (hand-computed) -----------------------------------------------------------------

def test_mse_and_pearson_by_hand():
    assert metrics.mse([1, 2, 3], [1, 1, 1]) == pytest.approx(5 / 3)
    # dx = (-1, 0, 1), dy = (-4/3, -1/3, 5/3): Σdxdy = 3, Σdx² = 2, Σdy² = 14/3
    assert metrics.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 14 / 3))
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(metrics.mse([], []))


def test_ranks_and_spearman_with_ties_by_hand():
    assert metrics.rankdata([5, 1, 5]).tolist() == [2.5, 1.0, 2.5]
    assert metrics.rankdata([3, 1, 4, 1, 5]).tolist() == [3.0, 1.5, 4.0, 1.5, 5.0]
    # ranks (1, 2, 3, 4) vs (1, 2.5, 2.5, 4): Σdxdy = 4.5, Σdx² = 5, Σdy² = 4.5
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 20, 30]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    assert metrics.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=30, unique=True))
def test_spearman_without_ties_matches_the_textbook_formula(xs):
    ys = [x ** 3 - 5 * x for x in xs]
    if len(set(ys)) < len(ys):
        return
    rx, ry = metrics.rankdata(xs), metrics.rankdata(ys)
    n = len(xs)
    textbook = 1 - 6 * float(((rx - ry) ** 2).sum()) / (n * (n * n - 1))
    assert metrics.spearman(xs, ys) == pytest.approx(textbook, abs=1e-9)


def test_pairwise_accuracy_and_selected_label_by_hand():
    groups = ["A", "A", "A", "B", "B", "C", "C", "D"]
    labels = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0, 0.3]
    scores = [0.9, 0.1, 0.9, 0.3, 0.2, 0.4, 0.4, 9.0]
    # A: (1>0) right, (1 vs 0.5) tied score → ½, (0.5>0) right; B: wrong; C: equal labels; D: alone
    assert metrics.pairwise_counts(scores, labels, groups) == (2.5, 4)
    assert metrics.pairwise_accuracy(scores, labels, groups) == pytest.approx(2.5 / 4)
    # picks: A → first 0.9 (label 1), B → 0.3 (label 0), C → first (label 1); D has one response
    assert metrics.selected_label(scores, labels, groups) == pytest.approx(2 / 3)
    m = metrics.scorer_metrics(scores, labels, groups)
    assert m["pairs"] == 4 and m["n"] == 8 and m["pairwise_acc"] == pytest.approx(0.625)
    assert math.isnan(metrics.pairwise_accuracy([1, 2], [0.5, 0.5], ["a", "a"]))
    with pytest.raises(ValueError):
        metrics.pairwise_accuracy([1, 2], [0, 1], ["a"])
