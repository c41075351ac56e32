"""MBR consensus and the fused selector."""

from __future__ import annotations

import numpy as np
import pytest

from cappy_core.labeling.rouge import rouge_l
from cappy_core.selection.selectors import fit_weights, fused_scores, mbr_scores, standardize, weight_grid


def test_mbr_is_the_mean_rouge_against_the_others():
    texts = ["the cat sat on the mat", "the cat sat", "a dog ran away", "the cat sat on a mat"]
    got = mbr_scores(texts)
    for i, t in enumerate(texts):
        others = [rouge_l(t, [u]) for j, u in enumerate(texts) if j != i]
        assert got[i] == pytest.approx(sum(others) / len(others))
    assert int(np.argmax(got)) in (0, 3) and int(np.argmin(got)) == 2  # the outlier is last
    assert mbr_scores(["alone"]) == [0.0] and mbr_scores([]) == []


def test_standardize_constant_nan_and_scale():
    assert list(standardize([3.0, 3.0, 3.0])) == [0.0, 0.0, 0.0]
    z = standardize([1.0, 2.0, 3.0])
    assert z.mean() == pytest.approx(0.0) and z.std() == pytest.approx(1.0)
    z = standardize([float("nan"), 1.0, 3.0])
    assert z[0] == z[1] < z[2]  # NaN counts as the lowest value


def test_fused_scores_and_unknown_signal():
    s = {"cappy": [0.0, 1.0, 2.0], "logprob_mean": [-1.0, -3.0, -2.0]}
    assert list(fused_scores(s, {"cappy": 1.0, "logprob_mean": 0.0})) == list(standardize(s["cappy"]))
    with pytest.raises(ValueError, match="'mbr'"):
        fused_scores(s, {"mbr": 1.0})


def test_weight_grid_starts_with_equal_weights_and_has_no_all_zero():
    g = weight_grid(["a", "b"])
    assert g[0] == {"a": 1.0, "b": 1.0}
    assert {"a": 0.0, "b": 0.0} not in g and len(g) == 4 ** 2 - 1


def test_fit_weights_finds_the_informative_signal():
    rng = np.random.default_rng(0)
    instructions, rouges = [], []
    for _ in range(30):
        r = rng.uniform(0, 1, 6)
        instructions.append({"good": 2 * r + 1, "noise": rng.normal(0, 1, 6)})
        rouges.append(list(r))
    w, value = fit_weights(instructions, rouges, ["good", "noise"])
    assert w["good"] > 0 and w["noise"] == 0.0
    assert value == pytest.approx(np.mean([max(r) for r in rouges]))


def test_fused_for_candidates_matches_the_fused_signals():
    from cappy_core.selection.selectors import fused_for_candidates, fused_scores, mbr_scores, standardize

    texts = ["a b c", "a b d", "x y z", "a b c"]
    cappy, lm = [0.1, 0.9, 0.3, 0.2], [-1.0, -2.0, -0.5, -1.5]
    w = {"cappy": 1.0, "logprob_mean": 0.5, "mbr": 2.0}
    got = fused_for_candidates(cappy, lm, texts, w)
    assert list(got) == pytest.approx(list(standardize(cappy) + 0.5 * standardize(lm) + 2 * standardize(mbr_scores(texts))))
    # mbr without weight is not computed (nor needed)
    no_mbr = fused_for_candidates(cappy, lm, texts, {"cappy": 1.0, "logprob_mean": 1.0, "mbr": 0.0})
    assert list(no_mbr) == pytest.approx(list(fused_scores({"cappy": cappy, "logprob_mean": lm},
                                                           {"cappy": 1.0, "logprob_mean": 1.0})))


def test_length_is_a_signed_lever_fitted_on_dev_and_computed_from_the_texts():
    """``length`` (words): its weights are signed with 0 first, so a tie leaves it unused; where the
    shorter candidate is the better one the fit finds a negative weight, and serve's fused value
    computes the same signal from the texts."""
    import pyarrow as pa

    from cappy_core.selection.scored_tables import add_fused, add_mbr, fit_fused
    from cappy_core.selection.selectors import fused_for_candidates, length_signal

    g = weight_grid(["cappy", "length"])
    assert g[0] == {"cappy": 1.0, "length": 0.0} and len(g) == 4 * 5 - 1
    assert {w["length"] for w in g} == {0.0, 0.5, -0.5, 1.0, -1.0}
    assert length_signal(["a b  c", "", "one"]) == [3.0, 0.0, 1.0]
    rng = np.random.default_rng(1)
    rows = []
    for i in range(20):  # the label falls with length; cappy and the LM are noise
        for j, n in enumerate(rng.permutation([1, 2, 4, 7])):
            rows.append({"instruction_id": f"i{i}", "text": " ".join(["w"] * int(n)), "label": 1.0 / n,
                         "score": float(rng.normal()), "logprob_mean": float(rng.normal())})
    table = add_mbr(pa.Table.from_pylist(rows))
    weights, value, n = fit_fused(table, ["cappy", "logprob_mean", "length"])
    assert n == 20 and weights["length"] < 0 and value == pytest.approx(1.0)
    base, base_value, _ = fit_fused(table, ["cappy", "logprob_mean", "mbr"])  # without length
    assert "length" not in base and base_value < value
    fused = add_fused(table, weights)["fused"].to_pylist()
    first = [r for r in rows if r["instruction_id"] == "i0"]
    served = fused_for_candidates([r["score"] for r in first], [r["logprob_mean"] for r in first],
                                  [r["text"] for r in first], weights)
    assert list(served) == pytest.approx(fused[:4])
