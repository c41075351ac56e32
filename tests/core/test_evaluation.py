"""Evaluation numbers on hand-computed cases; picks that never read the labels."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from cappy_core.selection.evaluation import (
    CAPPY, FUSED, MBR, ORACLE, RANDOM, SELF_MEAN, SELF_SUM, ScoredCandidate as C, best_baseline,
    classification_accuracy, evaluate_task, mean_over_tasks, method_order, per_instruction_values, pick, picks,
    ranker_spearman, scored_groups,
)
from cappy_core.generation import PAPER_DECODING_NAMES


def group(rouges, scores, lp_sum, lp_mean, decodings):
    return [C(decoding=d, sample_idx=s, rouge=r, logprob_sum=ls, logprob_mean=lm, score=sc)
            for (d, s), r, sc, ls, lm in zip(decodings, rouges, scores, lp_sum, lp_mean)]


DEC = [("beam4", 0), ("sample", 0), ("sample", 1), ("top_k_40", 0)]


def test_each_method_picks_what_it_should():
    g = group([0.2, 0.5, 0.9, 0.1], [1.0, 3.0, 2.0, 3.0], [-5, -2, -9, -1], [-1.0, -0.5, -0.2, -0.9], DEC)
    assert pick(CAPPY, g) == 1  # 3.0 twice: ties go to the first in decoding order
    assert pick("beam4", g) == 0 and pick("sample", g) == 1 and pick("top_k_40", g) == 3
    assert pick(SELF_SUM, g) == 3 and pick(SELF_MEAN, g) == 2 and pick(ORACLE, g) == 2
    assert pick("top_p_0.95", g) is None


def test_task_and_summary_numbers():
    g1 = group([0.2, 0.5, 0.9, 0.1], [1.0, 3.0, 2.0, 3.0], [-5, -2, -9, -1], [-1.0, -0.5, -0.2, -0.9], DEC)
    g2 = group([1.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0], [-1, -2, -3, -4], [-1.0, -2.0, -3.0, -4.0], DEC)
    res = evaluate_task([g1, g2])
    assert res[CAPPY] == pytest.approx(100 * (0.5 + 0.5) / 2)
    assert res["beam4"] == pytest.approx(100 * (0.2 + 1.0) / 2)
    assert res["sample"] == pytest.approx(100 * (0.5 + 0.0) / 2)
    assert res[SELF_SUM] == pytest.approx(100 * (0.1 + 1.0) / 2)
    assert res[SELF_MEAN] == pytest.approx(100 * (0.9 + 1.0) / 2)
    assert res[ORACLE] == pytest.approx(100 * (0.9 + 1.0) / 2)
    assert res[RANDOM] == pytest.approx(100 * ((1.7 / 4) + (1.5 / 4)) / 2)
    summary = mean_over_tasks({"a": res, "b": {**res, CAPPY: 0.0}})
    assert summary[CAPPY] == pytest.approx(25.0) and summary["beam4"] == pytest.approx(60.0)
    assert best_baseline(summary) == (SELF_MEAN, pytest.approx(95.0))


def test_unscored_candidates_leave_cappy_out_and_errors_are_clear():
    g = group([0.3], [None], [-1], [-1], [("beam4", 0)])
    assert CAPPY not in evaluate_task([g])
    with pytest.raises(ValueError, match="no candidates"):
        pick(CAPPY, [])


def test_picks_follow_the_one_argmax_rule_of_serve():
    """Evaluation picks with serve's rule (cappy_core.scorer.model.select_best): ties to the first, NaN
    never wins over a number, all NaN is an error naming it."""
    nan = math.nan
    g = group([0.1, 0.2, 0.3, 0.4], [nan, 2.0, 2.0, nan], [nan, -3, -1, -1], [-1.0, -1.0, -1.0, -1.0], DEC)
    assert pick(CAPPY, g) == 1 and pick(SELF_SUM, g) == 2 and pick(SELF_MEAN, g) == 0
    g = group([0.1, 0.2, 0.3, 0.4], [nan] * 4, [-1] * 4, [-1.0] * 4, DEC)
    with pytest.raises(ValueError, match="NaN"):
        pick(CAPPY, g)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_task([g])


def test_method_order_is_what_evaluation_reports():
    order = method_order()
    assert order == [CAPPY, FUSED, *PAPER_DECODING_NAMES, SELF_SUM, SELF_MEAN, MBR, ORACLE, RANDOM]
    g = group([0.2, 0.5, 0.9, 0.1], [1.0, 3.0, 2.0, 3.0], [-5, -2, -9, -1], [-1.0, -0.5, -0.2, -0.9], DEC)
    # MBR and the fused selector only where every candidate has their value
    assert list(evaluate_task([g])) == [m for m in method_order(["beam4", "sample", "top_k_40"])
                                        if m not in (FUSED, MBR)]
    g = with_signals(g, mbr=[0.1, 0.2, 0.3, 0.4], fused=[0.0, 0.0, 1.0, 0.0])
    assert list(evaluate_task([g])) == method_order(["beam4", "sample", "top_k_40"])


def with_signals(g, mbr=None, fused=None):
    return [dataclasses.replace(c, mbr=None if mbr is None else mbr[i], fused=None if fused is None else fused[i])
            for i, c in enumerate(g)]


def test_mbr_is_a_baseline_and_fused_a_selector():
    g1 = with_signals(group([0.2, 0.5, 0.9, 0.1], [1.0, 3.0, 2.0, 3.0], [-5, -2, -9, -1],
                            [-1.0, -0.2, -0.5, -0.9], DEC), mbr=[0.3, 0.1, 0.6, 0.6], fused=[2.0, 0.0, 1.0, -1.0])
    assert pick(MBR, g1) == 2 and pick(FUSED, g1) == 0  # MBR tie 0.6/0.6 → the first
    res = evaluate_task([g1])
    assert res[MBR] == pytest.approx(90.0) and res[FUSED] == pytest.approx(20.0)
    # the best baseline may be MBR; Cappy, the fused selector and the bounds never are
    assert best_baseline(res) == (MBR, pytest.approx(90.0))
    assert best_baseline({CAPPY: 99.0, FUSED: 98.0, ORACLE: 100.0, RANDOM: 97.0, MBR: 10.0, "beam4": 11.0}) == (
        "beam4", 11.0)
    # fused on some candidates only: no fused row (and an explicit fused pick is an error)
    partial = [dataclasses.replace(c, fused=None) if i else c for i, c in enumerate(g1)]
    assert FUSED not in evaluate_task([partial]) and MBR in evaluate_task([partial])
    with pytest.raises(ValueError, match="fused"):
        pick(FUSED, partial)


def test_per_instruction_values_aggregate_to_the_task_means():
    g1 = with_signals(group([0.2, 0.5, 0.9, 0.1], [1.0, 3.0, 2.0, 3.0], [-5, -2, -9, -1],
                            [-1.0, -0.5, -0.2, -0.9], DEC), mbr=[0.3, 0.1, 0.6, 0.6], fused=[2.0, 0.0, 1.0, -1.0])
    g2 = with_signals(group([1.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0], [-1, -2, -3, -4],
                            [-1.0, -2.0, -3.0, -4.0], DEC), mbr=[0.0, 0.0, 0.0, 0.1], fused=[0.0, 1.0, 0.0, 0.0])
    means, per = evaluate_task([g1, g2]), per_instruction_values([g1, g2])
    assert list(per) == list(means)
    assert per[CAPPY] == pytest.approx([50.0, 50.0]) and per[MBR] == pytest.approx([90.0, 50.0])
    assert per[RANDOM] == pytest.approx([100 * 1.7 / 4, 100 * 1.5 / 4])
    for m, vals in per.items():
        assert len(vals) == 2 and sum(vals) / 2 == pytest.approx(means[m])
    assert list(per_instruction_values([g1, g2], ["beam4", "top_p_0.95"])) == ["beam4"]  # cannot pick: left out


def test_ranker_spearman_by_hand():
    # instruction 1: cappy agrees perfectly (+1), self_score_sum is reversed (−1), mbr is constant (skipped)
    g1 = with_signals(group([0.1, 0.5, 0.9], [1.0, 2.0, 3.0], [-1, -2, -3], [-1.0, -1.0, -1.0], DEC[:3]),
                      mbr=[0.4, 0.4, 0.4])
    # instruction 2: cappy ranks the middle one first: ranks (1, 3, 2) against (1, 2, 3) → ρ = 0.5;
    # a NaN signal ranks lowest, as in a pick: self_score_sum (NaN, −1, −2) → ranks (1, 3, 2) → 0.5
    g2 = with_signals(group([0.0, 0.3, 0.6], [0.0, 5.0, 4.0], [math.nan, -1, -2], [-1.0, -2.0, -3.0], DEC[:3]),
                      mbr=[0.1, 0.2, 0.3])
    # instruction 3: every Rouge-L equal: no correlation for anyone
    g3 = with_signals(group([0.2, 0.2, 0.2], [1.0, 2.0, 3.0], [-1, -2, -3], [-3.0, -2.0, -1.0], DEC[:3]),
                      mbr=[0.1, 0.2, 0.3])
    rho = ranker_spearman([g1, g2, g3])
    assert list(rho) == [CAPPY, SELF_SUM, SELF_MEAN, MBR]  # no fused values: no fused ranker
    assert rho[CAPPY] == {"mean": pytest.approx(0.75), "instructions": 2}
    assert rho[SELF_SUM] == {"mean": pytest.approx(-0.25), "instructions": 2}
    assert rho[SELF_MEAN] == {"mean": pytest.approx(-1.0), "instructions": 1}  # constant in instruction 1
    assert rho[MBR] == {"mean": pytest.approx(1.0), "instructions": 1}
    assert ranker_spearman([g3])[CAPPY] == {"mean": None, "instructions": 0}


class LabelsHidden:
    """A candidate whose label cannot be read: any read of ``rouge`` fails the test."""

    def __init__(self, c):
        self._c = c

    def __getattr__(self, name):
        if name == "rouge":
            raise AssertionError("a pick read the label (rouge)")
        return getattr(self._c, name)


def test_masking_validation_labels_leaves_every_pick_unchanged():
    """The issue's test: every pick but the oracle's is made without the labels, so masking
    validation labels until the final evaluation changes no pick."""
    rng = random.Random(0)
    decs = [("beam4", 0)] + [(d, s) for d in ("sample", "temp0.9", "topk40", "topp0.95") for s in range(4)]
    groups = []
    for _ in range(30):
        groups.append([C(decoding=d, sample_idx=s, rouge=rng.random(), logprob_sum=rng.uniform(-30, 0),
                         logprob_mean=rng.choice([-1.0, -0.5, rng.uniform(-3, 0)]),  # ties too
                         score=rng.choice([0.5, rng.random()]), mbr=rng.random(), fused=rng.gauss(0, 1))
                       for d, s in decs])
    methods = [m for m in method_order([d for d, _ in decs]) if m not in (ORACLE, RANDOM)]
    before = picks(groups, methods)
    assert list(before) == methods
    for masked in (math.nan, None):
        relabeled = [[dataclasses.replace(c, rouge=masked) for c in g] for g in groups]
        assert picks(relabeled, methods) == before
    shuffled = [[dataclasses.replace(c, rouge=rng.random()) for c in g] for g in groups]
    assert picks(shuffled, methods) == before
    assert picks([[LabelsHidden(c) for c in g] for g in groups], methods) == before
    with pytest.raises(AssertionError, match="read the label"):  # the guard works: the oracle needs labels
        picks([[LabelsHidden(c) for c in g] for g in groups], [ORACLE])


def test_scored_groups_keep_file_order_and_count_unlabeled():
    import pyarrow as pa

    table = pa.table({"instruction_id": ["a", "a", "b", "c", "c"], "decoding": ["beam4", "sample"] * 2 + ["beam4"],
                      "sample_idx": [0, 0, 0, 0, 0], "label": [0.5, 0.25, None, 1.0, 0.0],
                      "logprob_sum": [-1.0] * 5, "logprob_mean": [-0.5] * 5, "score": [0.1, 0.2, 0.3, 0.4, 0.5],
                      "text": ["x"] * 5})
    groups, ids, unlabeled = scored_groups(table)
    assert ids == ["a", "c"] and unlabeled == 1
    assert [[(c.decoding, c.rouge, c.score) for c in g] for g in groups] == [
        [("beam4", 0.5, 0.1), ("sample", 0.25, 0.2)], [("sample", 1.0, 0.4), ("beam4", 0.0, 0.5)]]
    assert all(c.mbr is None and c.fused is None for g in groups for c in g)
    # the selector columns, where the table has them
    groups, _, _ = scored_groups(table.append_column("mbr", pa.array([0.1, 0.2, 0.3, 0.4, 0.5]))
                                 .append_column("fused", pa.array([1.0, 2.0, 3.0, 4.0, 5.0])))
    assert [[(c.mbr, c.fused) for c in g] for g in groups] == [[(0.1, 1.0), (0.2, 2.0)], [(0.4, 4.0), (0.5, 5.0)]]


def test_classification_accuracy():
    gold = [[0.0, 1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    pred = [[0.1, 0.5, 0.2], [-1.0, 3.0], [2.0, 2.0]]  # right, right (either correct), tie → first: wrong
    assert classification_accuracy(gold, pred) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="example 0: 2 choices but 3 scores"):
        classification_accuracy([[0.0, 1.0]], [[1.0, 2.0, 3.0]])
