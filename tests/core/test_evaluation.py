"""Evaluation numbers on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from cappy_core.evaluation import (
    CAPPY, ORACLE, RANDOM, SELF_MEAN, SELF_SUM, ScoredCandidate as C, best_baseline, classification_accuracy,
    evaluate_task, mean_over_tasks, method_order, pick, scored_groups,
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
    """Evaluation picks with serve's rule (cappy_core.scorer.select_best): ties to the first, NaN
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
    assert order == [CAPPY, *PAPER_DECODING_NAMES, SELF_SUM, SELF_MEAN, ORACLE, RANDOM]
    g = group([0.2, 0.5, 0.9, 0.1], [1.0, 3.0, 2.0, 3.0], [-5, -2, -9, -1], [-1.0, -0.5, -0.2, -0.9], DEC)
    assert list(evaluate_task([g])) == method_order(["beam4", "sample", "top_k_40"])


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


def test_classification_accuracy():
    gold = [[0.0, 1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    pred = [[0.1, 0.5, 0.2], [-1.0, 3.0], [2.0, 2.0]]  # right, right (either correct), tie → first: wrong
    assert classification_accuracy(gold, pred) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="example 0: 2 choices but 3 scores"):
        classification_accuracy([[0.0, 1.0]], [[1.0, 2.0, 3.0]])
