"""Selection at lower cost (cappy_core.selection.cost_curve): candidates in generation order, the
curve's last point is the sweep's own table, its first is beam4 for every method, and the
adaptive rule spans "stop at 2" to "use all 17", with tau fitted on dev within the tolerance."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from cappy_core.generation.decoding import PAPER_DECODING_NAMES
from cappy_core.selection.adaptive import adaptive_rounds
from cappy_core.selection.cost_curve import COUNTS, adaptive_picks, curve, fit_tau, generation_order, margin
from cappy_core.selection.scored_tables import with_selector_columns
from cappy_core.selection.task_eval import evaluate_scored

WORDS = "the cat sat on a mat red blue green dog ran far away home".split()


def table(n: int = 12, seed: int = 0) -> pa.Table:
    """``n`` instructions x 17 candidates (beam4 + 4 x 4 samples), file order by decoding: random
    word texts (so MBR varies), labels, scores and likelihoods."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for d in PAPER_DECODING_NAMES:
            for s in range(1 if d == "beam4" else 4):
                rows.append({"instruction_id": f"t/{i}", "decoding": d, "sample_idx": s,
                             "text": " ".join(rng.choice(WORDS, 4)), "label": float(rng.random()),
                             "score": float(rng.normal()), "logprob_sum": float(-rng.random() * 4),
                             "logprob_mean": float(-rng.random())})
    return pa.Table.from_pylist(rows)


def test_generation_order_is_beam_then_one_sample_of_each_decoding_in_turn():
    t = table(1)
    order = generation_order(t["decoding"].to_pylist(), t["sample_idx"].to_pylist())
    got = [(t["decoding"][i].as_py(), t["sample_idx"][i].as_py()) for i in order]
    assert got[:6] == [("beam4", 0), ("sample", 0), ("temp0.9", 0), ("topk40", 0), ("topp0.95", 0), ("sample", 1)]
    assert sorted(order) == list(range(17))


def test_the_curve_ends_at_the_sweeps_table_and_starts_at_beam():
    weights = {"cappy": 1.0, "logprob_mean": 0.5, "mbr": 2.0}
    t = table()
    _, _, result = evaluate_scored(with_selector_columns(t, weights), "t")
    got = curve(t, weights)
    for m in ("beam4", "mbr", "cappy", "cappy+lm+mbr"):
        assert np.mean(got[m][17]) == pytest.approx(result["metrics"][m])  # every candidate: the sweep's picks
        assert got[m][1] == got["beam4"][17]  # one candidate: beam4's
    assert got["cappy"][4] != got["cappy"][17]  # fewer candidates, other picks


def test_adaptive_rule_spans_stopping_at_two_to_using_every_candidate():
    weights = {"cappy": 1.0, "logprob_mean": 1.0, "mbr": 1.0}
    t = table()
    full = curve(t, weights)["cappy+lm+mbr"]
    values, used = adaptive_picks(t, weights, math.inf)
    assert used == [17] * 12 and values == full[17]
    values, used = adaptive_picks(t, weights, 0.0)
    assert used == [2] * 12 and values == full[2]
    assert margin([3.0, 1.0, 0.5], {"cappy": 1.0, "mbr": 3.0}) == pytest.approx(0.5)  # per unit of weight
    assert margin([1.0, 1.0], weights) == 0.0 and margin([2.0], weights) == 0.0
    fit = fit_tau([(t, weights)], tolerance=0.5)
    assert fit["dev_rouge"] >= fit["dev_full"] - 0.5 and fit["dev_candidates"] <= 17
    strict = fit_tau([(t, weights)], tolerance=0.0)
    assert strict["dev_rouge"] >= strict["dev_full"] and strict["dev_candidates"] >= fit["dev_candidates"]
    with pytest.raises(ValueError, match="tolerance"):
        fit_tau([(t, weights)], tolerance=-1)
    assert COUNTS[0] == 1 and COUNTS[-1] == 17


def test_adaptive_rounds_generate_the_curves_first_k_and_each_candidate_once():
    """Serve's rounds: after each, the candidates generated are the curve's first k (1, 2, 4, 8,
    17) in generation order; a request's own decodings are cut the same way."""
    from cappy_core.generation.decoding import PAPER_DECODINGS, decodings_from_names

    names = [d.name for d in PAPER_DECODINGS for _ in range(d.num_samples)]
    idx = [j for d in PAPER_DECODINGS for j in range(d.num_samples)]
    order = [(names[i], idx[i]) for i in generation_order(names, idx)]
    rounds = adaptive_rounds(PAPER_DECODINGS)
    assert [sum(d.num_samples for d in r) for r in rounds] == [1, 1, 2, 4, 9]
    seen: list[tuple[str, int]] = []
    for r, k in zip(rounds, COUNTS):
        seen += [(d.name, d.first_sample + j) for d in r for j in range(d.num_samples)]
        assert sorted(seen) == sorted(order[:k])
    assert len(set(seen)) == 17
    small = adaptive_rounds(decodings_from_names(["greedy", "sample"], num_samples=2))
    assert [[(d.name, d.first_sample, d.num_samples) for d in r] for r in small] == \
        [[("greedy", 0, 1)], [("sample", 0, 1)], [("sample", 1, 1)]]
