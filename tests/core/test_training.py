"""The plain training loop (schedule, accumulation, bf16, clipping, seeding, resume state), the
scorer losses, the scorer batch collator (length- and instruction-grouped) and ``fit_scorer``.
The scorer metrics are tested in ``test_metrics.py``."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cappy_core.scorer.batches import (PairWindowCollator, iter_micro_batches, micro_batches_per_epoch,
                                       pack_instructions, table_windows)
from cappy_core.scorer.schedule import ScorerSchedule
from cappy_core.scorer.train_state import TrainState, load_train_state, save_train_state
from cappy_core.scorer.training import (SCORER_LOSSES, fit_scorer, listwise_loss, lr_at, make_optimizer, plan_pair_updates,
                                 plan_updates, scorer_loss, train, warmup_updates)

scorer_mse_loss = scorer_loss(ScorerSchedule())  # the paper's objective (the default schedule's)


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


def grouped_columns(n_instructions: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """A shuffled pair stream: instructions with 1-6 responses, one with 11 (more than a micro-batch)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, n_instructions)
    sizes[0] = 11
    instructions = [f"q{i}" for i, k in enumerate(sizes) for _ in range(k)]
    instructions = [instructions[i] for i in rng.permutation(len(instructions))]
    n = len(instructions)
    return {"instruction": np.array(instructions, dtype=object),
            "response": np.array([f"r{i}" for i in range(n)], dtype=object), "label": np.arange(n) / n}


def test_grouped_collator_keeps_each_instruction_in_one_micro_batch_and_covers_every_row():
    w = grouped_columns()
    n = len(w["label"])
    collate = PairWindowCollator(FakeTokenizer(), max_length=64, micro_batch_size=8, group_by_instruction=True,
                                 seed=3)
    plan = [ranks[0] for ranks in collate.plan(w["instruction"], w["response"])]
    assert sorted(i for rows in plan for i in rows.tolist()) == list(range(n))  # each row once
    batches_of: dict[str, set[int]] = {}
    for b, rows in enumerate(plan):
        for i in rows:
            batches_of.setdefault(w["instruction"][i], set()).add(b)
    assert len(batches_of) == 12 and all(len(b) == 1 for b in batches_of.values())  # never split
    sizes = sorted(len(rows) for rows in plan)
    assert sizes[-1] == 11 and sizes[-2] <= 8  # only the instruction larger than a micro-batch exceeds it
    again = [ranks[0] for ranks in collate.plan(w["instruction"], w["response"])]
    assert all(np.array_equal(a, b) for a, b in zip(plan, again))  # deterministic
    for mb, rows in zip(collate(w), plan):  # tokenised in plan order, with per-row instruction ids
        assert mb["labels"].tolist() == pytest.approx(w["label"][rows].tolist())
        same_id = mb["group"][:, None] == mb["group"][None, :]
        same_instruction = torch.tensor([[w["instruction"][a] == w["instruction"][b] for b in rows] for a in rows])
        assert torch.equal(same_id, same_instruction)

    ranks = [PairWindowCollator(FakeTokenizer(), max_length=64, micro_batch_size=8, world_size=2, rank=r,
                                group_by_instruction=True, seed=3) for r in range(2)]
    plans = [c.plan(w["instruction"], w["response"]) for c in ranks]
    assert len(plans[0]) == len(plan) // 2  # the same plan dealt out two micro-batches at a time
    assert all(np.array_equal(a, b) for p, q in zip(*plans) for a, b in zip(p, q))
    outs = [c(w) for c in ranks]
    assert [len(o) for o in outs] == [len(plan) // 2] * 2
    seen = [set(w["instruction"][i] for i in ranks_[r]) for ranks_ in plans[0] for r in range(2)]
    assert sum(map(len, seen)) == len(set().union(*seen))  # no instruction on two ranks


def test_train_state_round_trips_and_reads_old_dicts():
    s = TrainState(update=3, samples=12, losses=[1.0, 0.5, 0.25], evals=[{"update": 3}], resumes=[2])
    assert TrainState.from_state_dict(copy.deepcopy(s.state_dict())) == s
    assert TrainState.from_state_dict({"update": 1, "samples": 2}) == TrainState(update=1, samples=2)


# --- fit_scorer --------------------------------------------------------------------------------

def tiny_scorer(dropout: float = 0.1) -> SimpleNamespace:
    """What fit_scorer uses of a Scorer: the model, its tokenizer and the pair truncation length."""
    return SimpleNamespace(model=tiny_bert(dropout=dropout), tokenizer=FakeTokenizer(), max_length=24)


def pair_columns(n: int, seed: int = 0) -> dict[str, list]:
    return {k: list(v) for k, v in window(n, seed).items()}


def test_fit_scorer_default_equals_the_collator_and_train_path():
    """The reference is how the Ray worker and the sweep trained before fit_scorer existed (the
    paper's MSE on the first logit, length-grouped windows, one ``train`` call): the default
    schedule must keep computing exactly the same numbers."""
    cols = pair_columns(48)
    s = ScorerSchedule(lr=1e-2, batch_size=8, micro_batch_size=4, epochs=2, bucket_window=3, seed=5,
                       max_grad_norm=1.0, weight_decay=0.01)
    fitted = tiny_scorer()
    state = fit_scorer(fitted, cols, s)

    ref = tiny_scorer()
    ref.model.train()
    opt = make_optimizer(ref.model, s.lr, s.weight_decay)
    collate = PairWindowCollator(ref.tokenizer, max_length=24, micro_batch_size=4, sort_by_length=True, seed=5)
    windows = lambda: (collate(w) for w in table_windows(cols, 4 * 3))  # noqa: E731

    def mse(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        return torch.nn.functional.mse_loss(logits.float(), batch["labels"].float())

    expected = train(ref.model, iter_micro_batches(windows, epochs=2), loss_fn=mse, total_updates=12, lr=s.lr,
                     warmup_ratio=0.1, weight_decay=s.weight_decay, grad_accum_steps=2, max_grad_norm=1.0, seed=5,
                     optimizer=opt)
    assert state.update == 12 and state.losses == expected.losses and state.samples == expected.samples
    assert all(torch.equal(x, y) for x, y in zip(params(fitted.model), params(ref.model)))
    assert not fitted.model.training


def test_fit_scorer_resumes_from_a_saved_state(tmp_path):
    cols = pair_columns(32)
    s = ScorerSchedule(lr=1e-2, batch_size=8, micro_batch_size=4, bucket_window=2)
    straight = tiny_scorer(dropout=0.0)
    full = fit_scorer(straight, cols, s)
    assert full.update == 4

    class Stop(Exception):
        pass

    first = tiny_scorer(dropout=0.0)
    opt = make_optimizer(first.model, s.lr)

    def stop_after_two(info):
        if info.update == 2:
            save_train_state(tmp_path, state, opt)
            raise Stop

    state = TrainState()
    with pytest.raises(Stop):
        fit_scorer(first, cols, s, optimizer=opt, state=state, on_update=stop_after_two)
    second = tiny_scorer(dropout=0.0)
    second.model.load_state_dict(first.model.state_dict())
    opt2 = make_optimizer(second.model, s.lr)
    resumed, _ = load_train_state(tmp_path, opt2)
    fit_scorer(second, cols, s, optimizer=opt2, state=resumed)  # skips the 4 micro-batches used
    assert resumed.losses == full.losses
    assert all(torch.equal(x, y) for x, y in zip(params(second.model), params(straight.model)))


def test_fit_scorer_listwise_on_instruction_groups():
    cols = {k: list(v) for k, v in grouped_columns().items()}
    s = ScorerSchedule(lr=1e-2, batch_size=8, micro_batch_size=8, loss="listwise+mse", mse_weight=0.5,
                       group_by_instruction=True)
    sc = tiny_scorer(dropout=0.0)
    before = params(sc.model)
    seen = []
    state = fit_scorer(sc, cols, s, on_update=seen.append)
    assert state.update == len(seen) == plan_pair_updates(cols, s)[1] and all(map(math.isfinite, state.losses))
    assert state.samples == len(cols["label"])  # one epoch: every row once
    assert any(not torch.equal(x, y) for x, y in zip(before, params(sc.model)))
    with pytest.raises(ValueError, match="exactly one"):
        fit_scorer(sc, None, s)
    with pytest.raises(ValueError, match="total_updates"):
        fit_scorer(sc, None, s, windows=lambda: [])


# --- scorer losses ---------------------------------------------------------------------------

def test_listwise_loss_by_hand():
    # group 0: scores (1, 0), labels (1, 0); tau 0.5 → target softmax(2, 0) = (e²/(e²+1), 1/(e²+1)),
    # log_softmax(1, 0) = (1 - log(1+e), -log(1+e)) → loss log(1+e) - e²/(e²+1).
    # group 1: equal labels and scores → uniform target, log ½ each → loss log 2. Row 4 is alone.
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0, 9.0])
    labels = torch.tensor([1.0, 0.0, 0.2, 0.2, 0.7])
    groups = torch.tensor([0, 0, 1, 1, 2])
    g0 = math.log(1 + math.e) - math.exp(2) / (math.exp(2) + 1)
    assert float(listwise_loss(scores[:2], labels[:2], groups[:2], tau=0.5)) == pytest.approx(g0, rel=1e-6)
    assert float(listwise_loss(scores, labels, groups, tau=0.5)) == pytest.approx((g0 + math.log(2)) / 2, rel=1e-6)
    mixed = SCORER_LOSSES["listwise+mse"](scores, labels, groups, ScorerSchedule(listwise_tau=0.5, mse_weight=2.0))
    mse = float(((scores - labels) ** 2).mean())
    assert float(mixed) == pytest.approx((g0 + math.log(2)) / 2 + 2.0 * mse, rel=1e-6)
    assert float(SCORER_LOSSES["mse"](scores, labels, groups, ScorerSchedule())) == pytest.approx(mse)


def test_listwise_loss_of_lone_rows_is_zero_with_a_gradient_and_needs_groups():
    lone = torch.tensor([1.0, 2.0], requires_grad=True)
    out = listwise_loss(lone, torch.tensor([0.1, 0.9]), torch.tensor([0, 1]), tau=0.3)
    out.backward()
    assert out.item() == 0.0 and lone.grad.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="group"):
        listwise_loss(lone, torch.tensor([0.1, 0.9]), None, tau=0.3)
    with pytest.raises(ValueError, match="unknown scorer loss"):
        ScorerSchedule(loss="hinge")
    with pytest.raises(ValueError, match="listwise_tau"):
        ScorerSchedule(listwise_tau=0.0)


def test_plan_updates():
    s = ScorerSchedule(batch_size=16, micro_batch_size=8, epochs=2)
    assert plan_updates(100, s) == (2, 12)  # 12 micro-batches an epoch, 2 per update, 2 epochs
    assert plan_updates(100, s, world_size=2) == (1, 12)  # 6 global micro-batches of 2 x 8
    with pytest.raises(ValueError, match="batch_size 12 must be a multiple of micro_batch_size 8"):
        replace(s, batch_size=12)  # refused by the schedule itself
    with pytest.raises(ValueError, match="not a multiple"):
        plan_updates(100, s, world_size=3)  # 16 pairs an update over 3 ranks of 8
    with pytest.raises(ValueError, match="no full update"):
        plan_updates(7, s)
    cols = grouped_columns()
    assert plan_pair_updates(cols, s) == plan_updates(len(cols["label"]), s)
    grouped = replace(s, group_by_instruction=True)
    per_epoch = len(pack_instructions(cols["instruction"], cols["response"], 8))
    assert plan_pair_updates(cols, grouped) == (2, per_epoch * 2 // 2)


def test_a_schedule_setting_reaches_the_optimizer_the_command_line_and_every_key():
    """adam_beta2, added as one ScorerSchedule field: the optimizer uses it, every training
    command takes it as --schedule.adam-beta2, and it is in the finetune run's and the sweep's keys."""
    from cappy_core.config import build_parser, config_from_args, key_values
    from cappy_core.scorer.runs import resume_key
    from cappy_core.scorer.training import scorer_optimizer
    from jobs.finetune import FinetuneConfig
    from jobs.sweep_config import SweepConfig
    from jobs.sweep_layout import result_key

    model = torch.nn.Linear(4, 1)
    assert scorer_optimizer(model, ScorerSchedule()).param_groups[0]["betas"] == (0.9, 0.999)  # AdamW's default
    assert scorer_optimizer(model, ScorerSchedule(adam_beta2=0.95)).param_groups[0]["betas"] == (0.9, 0.95)
    for cls in (FinetuneConfig, SweepConfig):
        args = build_parser(cls, prog="x", description="").parse_args(["--schedule.adam-beta2", "0.98"])
        assert config_from_args(cls, args).schedule.adam_beta2 == 0.98
    assert resume_key(FinetuneConfig(schedule=ScorerSchedule(adam_beta2=0.98)), {})["adam_beta2"] == 0.98
    assert result_key(SweepConfig(), "gen", "init", ["t"])["schedule.adam_beta2"] == 0.999
    assert "schedule.adam_beta2" in key_values(SweepConfig())
    with pytest.raises(ValueError, match="adam_beta2 must be in"):
        ScorerSchedule(adam_beta2=1.0)
