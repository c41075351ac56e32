"""build_training_pairs: the reference Cappy labelling rules, and the pair table round trip."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rouge_score import rouge_scorer

from cappy_core.labeling.rouge import (
    PAIR_SCHEMA,
    LabeledPair,
    build_training_pairs,
    pairs_to_table,
    table_to_pairs,
)

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge(prediction, references):
    return SCORER.score_multi(references, prediction)["rougeL"].fmeasure


# Task "a": two examples; "b": one example (no negatives possible); "c": two examples that share
# their only answer (every negative would equal a known pair).
TASKS = ["a", "a", "b", "c", "c"]
INSTRUCTIONS = ["q0", "q1", "q2", "q3", "q4"]
REFERENCES = [["the cat sat"], ["a dog ran"], ["blue sky"], ["yes"], ["yes"]]
CANDIDATES = [
    # duplicate; equal to the reference; differs only in case; equal to q0's negative; new
    ["the cat", "the cat", "the cat sat", "The cat sat", "a dog ran", "dog"],
    ["ran away"],
    ["green sky", "blue sky"],
    ["no"],
    [],
]


def by_key(pairs):
    return {(p.instruction, p.response): p for p in pairs}


def test_counts_labels_and_dedup():
    pairs = build_training_pairs(TASKS, INSTRUCTIONS, REFERENCES, CANDIDATES, seed=0)
    assert Counter(p.source for p in pairs) == {"reference": 5, "negative": 2, "candidate": 6}
    assert len(by_key(pairs)) == len(pairs) == 13  # exact-pair dedup
    got = by_key(pairs)
    for i, refs in enumerate(REFERENCES):
        want = LabeledPair(INSTRUCTIONS[i], refs[0], 1.0, "reference", TASKS[i])
        assert got[(INSTRUCTIONS[i], refs[0])] == want
    # Task a has exactly one other example, so its negatives are fixed; b and c give none.
    assert got[("q0", "a dog ran")] == LabeledPair("q0", "a dog ran", 0.0, "negative", "a")
    assert got[("q1", "the cat sat")] == LabeledPair("q1", "the cat sat", 0.0, "negative", "a")
    candidates = {k: p.label for k, p in got.items() if p.source == "candidate"}
    assert candidates == {
        ("q0", "the cat"): rouge("the cat", ["the cat sat"]),
        ("q0", "The cat sat"): 1.0,
        ("q0", "dog"): 0.0,
        ("q1", "ran away"): rouge("ran away", ["a dog ran"]),
        ("q2", "green sky"): 0.5,
        ("q3", "no"): 0.0,
    }
    assert candidates[("q0", "the cat")] == pytest.approx(0.8)
    assert candidates[("q1", "ran away")] == pytest.approx(0.4)
    assert all(type(p.label) is float for p in pairs)


def test_precomputed_candidate_labels_are_used_verbatim():
    labels = [[0.11, 0.12, 0.13, 0.14, 0.15, 0.16], [0.2], [0.3, 0.31], [0.4], []]
    pairs = build_training_pairs(TASKS, INSTRUCTIONS, REFERENCES, CANDIDATES, labels, seed=0)
    candidates = {(p.instruction, p.response): p.label for p in pairs if p.source == "candidate"}
    assert candidates == {
        ("q0", "the cat"): 0.11,  # the first of the duplicates keeps its label
        ("q0", "The cat sat"): 0.14,
        ("q0", "dog"): 0.16,
        ("q1", "ran away"): 0.2,
        ("q2", "green sky"): 0.3,
        ("q3", "no"): 0.4,
    }


def test_negative_skipped_when_already_a_pair_and_not_redrawn():
    # q1's two positives both draw q0's only reference: the second is a known pair -> skipped.
    for seed in range(20):
        references = [["x one"], ["y two", "z three"]]
        pairs = build_training_pairs(["t", "t"], ["q0", "q1"], references, seed=seed)
        negatives = sorted((p.instruction, p.response) for p in pairs if p.source == "negative")
        assert len(negatives) == 2
        assert negatives[1] == ("q1", "x one")
        assert negatives[0] in {("q0", "y two"), ("q0", "z three")}


def test_negatives_come_from_another_example_of_the_same_task():
    tasks, instructions, references = [], [], []
    for t in "abc":
        for k in range(10):
            tasks.append(t)
            instructions.append(f"{t}-question-{k}")
            references.append([f"{t}-answer-{k}"])
    owner = {refs[0]: i for i, refs in enumerate(references)}
    drawn = set()
    for seed in range(5):
        pairs = build_training_pairs(tasks, instructions, references, seed=seed)
        negatives = [p for p in pairs if p.source == "negative"]
        # One reference per example and unique answers: no negative can collide, so one each.
        assert len(negatives) == sum(p.source == "reference" for p in pairs) == 30
        for p in negatives:
            j = owner[p.response]
            assert tasks[j] == p.task and instructions[j] != p.instruction and p.label == 0.0
            drawn.add((p.instruction, p.response))
    assert len(drawn) > 60  # they are random, not always the same neighbour


def test_no_negatives_when_disabled():
    pairs = build_training_pairs(TASKS, INSTRUCTIONS, REFERENCES, CANDIDATES, negatives=False)
    assert Counter(p.source for p in pairs) == {"reference": 5, "candidate": 7}
    assert by_key(pairs)[("q0", "a dog ran")].label == rouge("a dog ran", ["the cat sat"])


def test_same_instruction_in_two_examples_is_deduplicated():
    pairs = build_training_pairs(["t", "t"], ["q", "q"], [["yes"], ["yes", "sure"]], seed=0)
    got = sorted((p.response, p.source) for p in pairs)
    assert got == [("sure", "reference"), ("yes", "reference")]


def test_deterministic_for_a_seed_and_different_across_seeds():
    args = (TASKS, INSTRUCTIONS, REFERENCES, CANDIDATES)
    assert build_training_pairs(*args, seed=3) == build_training_pairs(*args, seed=3)
    orders = {tuple(build_training_pairs(*args, seed=s)) for s in range(5)}
    assert len(orders) == 5
    assert all(sorted(map(repr, o)) == sorted(map(repr, next(iter(orders)))) for o in orders)


def test_train_size_cuts_and_tiles_the_shuffled_list():
    args = (TASKS, INSTRUCTIONS, REFERENCES, CANDIDATES)
    full = build_training_pairs(*args, seed=1)
    assert len(full) == 13
    assert build_training_pairs(*args, seed=1, train_size=5) == full[:5]
    assert build_training_pairs(*args, seed=1, train_size=13) == full
    tiled = build_training_pairs(*args, seed=1, train_size=30)
    assert tiled == (full * 3)[:30]
    assert sorted(Counter(tiled).values()) == [2] * 9 + [3] * 4


def test_input_validation():
    t, i, r, c = TASKS, INSTRUCTIONS, REFERENCES, CANDIDATES
    cases = [
        ((t[:4], i, r), {}, "tasks has 4 items but instructions has 5"),
        ((t, i, r[:3]), {}, "references has 3 items but instructions has 5"),
        ((t, i, r, c[:2]), {}, "candidates has 2 items but instructions has 5"),
        ((t, i, r, c, [[0.1]]), {}, "candidate_labels has 1 items but instructions has 5"),
        ((t, i, r, None, [[]] * 5), {}, "candidate_labels given without candidates"),
        ((t, i, r, c, [[0.0] * 6, [0.1, 0.2], [0.0] * 2, [0.0], []]), {},
         r"candidate_labels\[1\] has 2 labels for 1 candidates"),
        ((t, i, r, c, [[0.0] * 6, [float("nan")], [0.0] * 2, [0.0], []]), {}, "non-finite"),
        ((t, i, [["a"], "a dog", ["b"], ["c"], ["d"]]), {}, r"references\[1\] is a str"),
        ((t, i, r, [["a"], "x", [], [], []]), {}, r"candidates\[1\] is a str"),
        ((["t"], ["q"], [[]], [["cand"]]), {}, "example 0 has candidates but no references"),
        ((t, i, r), {"train_size": 0}, "train_size must be a positive int"),
        ((t, i, r), {"train_size": True}, "train_size must be a positive int"),
        (([], [], []), {"train_size": 4}, "no pairs to tile"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            build_training_pairs(*args, **kwargs)
    assert build_training_pairs([], [], []) == []


def test_table_round_trip(tmp_path):
    pairs = build_training_pairs(TASKS, INSTRUCTIONS, REFERENCES, CANDIDATES, seed=0)
    table = pairs_to_table(pairs)
    assert table.schema == PAIR_SCHEMA
    assert table.column_names == ["task", "instruction", "response", "label", "source"]
    pq.write_table(table, tmp_path / "pairs.parquet")
    assert table_to_pairs(pq.read_table(tmp_path / "pairs.parquet")) == pairs
    assert table_to_pairs(pairs_to_table([])) == []
    with pytest.raises(ValueError, match=r"missing pair column\(s\) \['label'\]"):
        table_to_pairs(table.drop_columns(["label"]))
    extra = table.append_column("note", pa.array(["x"] * len(pairs)))
    assert table_to_pairs(extra) == pairs
