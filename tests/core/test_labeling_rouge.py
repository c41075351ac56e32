"""cappy_core.labeling.rouge's Rouge-L equals rouge-score's ``score_multi`` exactly (==, not approx)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from cappy_core.labeling.rouge import RougeL, rouge_l, rouge_l_batch
from jobs.bench.labeling import load_reference_pool, make_rouge_pairs

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def expected(prediction: str, references: list[str]) -> float:
    return SCORER.score_multi(references, prediction)["rougeL"].fmeasure


def _assert_all_equal(pairs, got):
    want = [expected(p, refs) for p, refs in pairs]
    bad = [(p, refs, g, w) for (p, refs), g, w in zip(pairs, got, want) if g != w]
    assert not bad, f"{len(bad)} of {len(pairs)} differ, e.g. {bad[:3]}"
    return want


@pytest.mark.bigbench
@pytest.mark.slow
def test_exact_on_100k_bigbench_pairs(bigbench):
    pool = load_reference_pool(bigbench, max_words=40)
    # Half with one prediction per reference set (most varied), half with 8 per set (the
    # labelling workload: many candidates against the same references, the caches warm).
    pairs = make_rouge_pairs(pool, 50_000, seed=1234)
    pairs += make_rouge_pairs(pool, 50_000, seed=99, per_set=8)
    assert len(pairs) >= 100_000
    assert sum(len(refs) > 1 for _, refs in pairs) > 20_000  # multi-reference sets are common
    got = rouge_l_batch([p for p, _ in pairs], [refs for _, refs in pairs])
    assert all(type(x) is float for x in got)
    want = _assert_all_equal(pairs, got)
    # The pairs exercise the whole range, not just 0 and 1.
    assert sum(0.0 < w < 1.0 for w in want) > 30_000
    assert sum(w == 0.0 for w in want) > 2_000
    assert sum(w == 1.0 for w in want) > 10_000


@pytest.mark.bigbench
def test_exact_per_reference_and_with_tiny_caches(bigbench):
    pool = load_reference_pool(bigbench, max_words=40)
    pairs = make_rouge_pairs(pool, 3_000, seed=7, per_set=3)
    # Caches small enough to be reset many times mid-batch (and mid-call).
    tiny = RougeL(max_cached_texts=8, max_cached_tokens=40)
    _assert_all_equal(pairs, tiny.score_batch([p for p, _ in pairs], [r for _, r in pairs]))
    scorer = RougeL()
    for pred, refs in pairs[:1_000]:
        want = [SCORER.score(r, pred)["rougeL"].fmeasure for r in refs]
        assert [scorer.score(pred, [r]) for r in refs] == want


WORDS = [
    "the", "a", "cat", "cats", "running", "runs", "ran", "generalization", "generalize",
    "happily", "happiness", "relational", "conditional", "dying", "lying", "sky", "skies",
    "Einwohner*innen", "naïve", "café", "don't", "it's", "U.S.A.", "e-mail", "x2", "1,000",
    "3.14", "2023", "ABC", "İstanbul", "\u212aelvin", "ﬁsh", "straße", "日本", "ʃə", "😀",
]
SEPARATORS = [" ", "  ", "\t", "\n", "", ",", ". ", "!", "-", "'", "\xa0", "\u200b"]
TEXT = st.one_of(
    st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=12).map(
        lambda parts: "".join(w + s for w, s in parts)
    ),
    st.text(max_size=40),
    st.text(alphabet="abcABC xyz012.,!é İ\u212a", max_size=30),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prediction=TEXT, references=st.lists(TEXT, min_size=1, max_size=5), data=st.data())
def test_property_equal_to_rouge_score(prediction, references, data):
    if data.draw(st.booleans()):  # often predict a variant of a reference
        base = data.draw(st.sampled_from(references))
        variants = [base, base.upper(), base + " " + prediction, base[::-1]]
        prediction = data.draw(st.sampled_from(variants))
    assert rouge_l(prediction, references) == expected(prediction, references)
    want_each = [SCORER.score(r, prediction)["rougeL"].fmeasure for r in references]
    scorer = RougeL()
    assert [scorer.score(prediction, [r]) for r in references] == want_each


def test_known_values_and_empty_texts():
    assert rouge_l("The quick brown fox", ["the quick brown fox"]) == 1.0
    assert rouge_l("cats running", ["cat runs"]) == 1.0  # stemmed: cat run
    assert rouge_l("the cat", ["the cat sat"]) == expected("the cat", ["the cat sat"])
    # rouge-score returns the int 0 when a side has no tokens; we return the float 0.0.
    for pred, refs in [("", ["a"]), ("a", [""]), ("...", ["!!"]), ("", [""])]:
        got = rouge_l(pred, refs)
        assert type(got) is float and got == 0.0 == expected(pred, refs)
    # First maximum wins in score_multi; the value is the maximum F over references.
    assert rouge_l("a b c", ["x", "a b", "a b c", "a"]) == 1.0


def test_input_errors():
    with pytest.raises(ValueError, match="references is empty"):
        rouge_l("a", [])
    with pytest.raises(ValueError):  # rouge-score itself crashes on an empty list
        SCORER.score_multi([], "a")
    with pytest.raises(TypeError, match="not a single str"):
        rouge_l("a", "a")
    with pytest.raises(ValueError, match="predictions has 2 items but references has 1"):
        rouge_l_batch(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        RougeL(max_cached_tokens=0)
