"""Pair mixtures: exact multiple-choice labels, generative pairs + sampled candidates, the per-task
cap, the held-out slice by instruction, pair/sample files and their label checks."""

from __future__ import annotations

import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cappy_core.data.records import Example
from cappy_core.labeling.rouge import LabeledPair, pairs_to_table
from cappy_core.labeling.pair_mixture import (CandidateIndex, LabelError, build_pair_mixture, cap_per_task, check_pair_file,
                                      example_pairs, read_pairs, read_samples, split_by_instruction, tile,
                                      write_pairs)


def mc(task, i, choices, scores, split="train"):
    return Example(task=task, subtask="", split=split, example_idx=i, instruction=f"{task} q{i}",
                   references=[c for c, s in zip(choices, scores) if s == max(scores)],
                   choices=choices, choice_scores=scores)


def gen(task, i, refs, split="train", subtask=""):
    return Example(task=task, subtask=subtask, split=split, example_idx=i, instruction=f"{task} q{i}",
                   references=refs)


def test_multiple_choice_gives_exact_labels():
    pairs = example_pairs([mc("t", 0, ["a", "b", "c", "d"], [0.0, 1.0, 0.5, 1.0]),
                           mc("t", 1, ["x", "y"], [0.0, 0.0])])  # uninformative: skipped
    assert {(p.response, p.label) for p in pairs} == {("a", 0.0), ("b", 1.0), ("c", 0.0), ("d", 1.0)}
    assert {p.source for p in pairs} == {"choice"} and {p.instruction for p in pairs} == {"t q0"}


def test_max_wrong_choices_keeps_every_correct_choice():
    ex = mc("t", 0, [f"c{i}" for i in range(50)], [1.0 if i in (3, 7) else 0.0 for i in range(50)])
    pairs = example_pairs([ex], max_wrong_choices=4, seed=1)
    assert sorted(p.response for p in pairs if p.label == 1.0) == ["c3", "c7"]
    assert sum(p.label == 0.0 for p in pairs) == 4
    assert pairs == example_pairs([ex], max_wrong_choices=4, seed=1)


def test_generative_examples_use_the_reference_rules_and_candidates():
    exs = [gen("g", 0, ["alpha"]), gen("g", 1, ["beta"]), gen("g", 2, ["gamma"])]
    cands = CandidateIndex()
    cands.add("g", "g q0", "alpha", 0.3, key=("", "train", 0))  # equals the reference: keeps 1.0
    cands.add("g", "g q0", "alp", 0.6, key=("", "train", 0))
    cands.add("g", "g q2", "gam", 0.5)  # matched by instruction
    pairs = example_pairs(exs, cands)
    by = {(p.instruction, p.response): (p.label, p.source) for p in pairs}
    assert by[("g q0", "alpha")] == (1.0, "reference")
    assert by[("g q0", "alp")] == (0.6, "candidate")
    assert by[("g q2", "gam")] == (0.5, "candidate")
    negatives = [p for p in pairs if p.source == "negative"]
    assert len(negatives) == 3 and all(p.label == 0.0 for p in negatives)
    assert all(p.response in {"alpha", "beta", "gamma"} and p.response != by_ref
               for p, by_ref in ((n, {"g q0": "alpha", "g q1": "beta", "g q2": "gamma"}[n.instruction])
                                 for n in negatives))


def test_cap_per_task_takes_whole_instructions():
    big = [LabeledPair(f"b{i}", r, 1.0, "choice", "big") for i in range(100) for r in "xyz"]
    small = [LabeledPair(f"s{i}", "r", 1.0, "choice", "small") for i in range(5)]
    out = cap_per_task(big + small, 30, random.Random(0))
    counts = Counter(p.task for p in out)
    assert counts == {"big": 30, "small": 5}
    per_instruction = Counter(p.instruction for p in out if p.task == "big")
    assert set(per_instruction.values()) == {3}  # never a partial instruction
    assert cap_per_task(big, None, random.Random(0)) == big
    one_huge = [LabeledPair("h", str(i), 0.0, "choice", "h") for i in range(50)]
    assert len(cap_per_task(one_huge, 10, random.Random(0))) == 50  # the first is always taken


def test_split_by_instruction_is_disjoint():
    pairs = [LabeledPair(f"i{i}", f"r{k}", k / 3, "candidate", "t") for i in range(20) for k in range(3)]
    train, held = split_by_instruction(pairs, 10, random.Random(0))
    assert len(held) >= 10 and len(held) % 3 == 0
    assert not {p.instruction for p in train} & {p.instruction for p in held}
    assert len(train) + len(held) == len(pairs)
    with pytest.raises(ValueError, match="distinct instruction"):
        split_by_instruction(pairs[:3], 1, random.Random(0))
    train, held = split_by_instruction(pairs[:6], 100, random.Random(0))
    assert train and held  # one instruction always stays in train


def test_mixture_tiles_train_and_is_seeded():
    exs = [mc(t, i, ["a", "b", "c"], [1.0, 0.0, 0.0]) for t in ("t1", "t2") for i in range(20)]
    train, held = build_pair_mixture(exs, train_size=500, eval_size=12, seed=3)
    assert len(train) == 500 and 12 <= len(held) < 20
    assert not {p.instruction for p in train} & {p.instruction for p in held}
    again = build_pair_mixture(exs, train_size=500, eval_size=12, seed=3)
    assert (train, held) == again
    assert build_pair_mixture(exs, train_size=500, eval_size=12, seed=4)[0] != train
    assert tile(train[:3], 7) == train[:3] * 2 + train[:1]
    with pytest.raises(ValueError, match="no labelled pairs"):
        build_pair_mixture([mc("t", 0, ["a"], [1.0])], train_size=10)


def test_pair_files_round_trip_and_bad_labels_name_file_and_row(tmp_path):
    pairs = [LabeledPair("i", f"r{k}", k / 4, "candidate", "t") for k in range(5)]
    path = write_pairs(pairs, tmp_path / "p" / "train.parquet")
    assert read_pairs(path) == pairs and check_pair_file(tmp_path / "p") == 5
    for bad, shown in ((1.5, "1.5"), (float("nan"), "nan"), (-0.1, "-0.1")):
        table = pairs_to_table(pairs).set_column(3, "label", pa.array([0.0, 0.2, bad, 0.4, 0.9]))
        pq.write_table(table, tmp_path / "bad.parquet")
        with pytest.raises(LabelError, match=rf"bad\.parquet: row 2 \(0-based\): label {shown}"):
            check_pair_file(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"instruction": ["i"], "label": [0.5]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match="missing pair column"):
        check_pair_file(tmp_path / "cols.parquet")
    with pytest.raises(FileNotFoundError):
        check_pair_file(tmp_path / "nope.parquet")


def sample_table(rows):
    cols = ["task", "subtask", "split", "example_idx", "instruction", "text", "label", "decoding", "sample_idx"]
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)})


def test_read_samples_keys_filters_and_checks_labels(tmp_path):
    rows = [("g", "", "train", 0, "g q0", "cand a", 0.25, "beam4", 0),
            ("g", "", "validation", 0, "g q0 val", "cand b", 0.5, "sample", 1),
            ("other", "", "train", 0, "o q0", "cand c", 1.0, "sample", 0)]
    (tmp_path / "s").mkdir()
    pq.write_table(sample_table(rows), tmp_path / "s" / "part-0.parquet")
    index = read_samples(tmp_path / "s", tasks=["g"], splits=["train"])
    assert len(index) == 1
    assert index.for_example(gen("g", 0, ["ref"])) == [("cand a", 0.25)]
    assert index.for_example(gen("g", 0, ["ref"], split="validation")) == []
    bad = rows[:1] + [("g", "", "train", 1, "g q1", "x", float("nan"), "sample", 0)]
    pq.write_table(sample_table(bad), tmp_path / "s" / "part-1.parquet")
    with pytest.raises(LabelError, match=r"part-1\.parquet: row 1 \(0-based\): label nan"):
        read_samples(tmp_path / "s")


def test_read_samples_from_a_sample_output_reads_completed_shards_and_skips_null_labels(tmp_path):
    from cappy_core.labeling.candidates import done_path, shard_path

    rows = [("g", "", "train", 0, "g q0", "done a", 0.25, "beam4", 0),
            ("g", "", "train", 1, "g q1", "no refs", None, "beam4", 0)]
    shard_path(tmp_path, "g", "train", 0).parent.mkdir(parents=True)
    pq.write_table(sample_table(rows), shard_path(tmp_path, "g", "train", 0))
    done_path(tmp_path, "g", "train", 0).write_text("{}")
    pq.write_table(sample_table([("g", "", "train", 2, "g q2", "half-written", 0.5, "beam4", 0)]),
                   shard_path(tmp_path, "g", "train", 1))  # no completion record yet: not read
    index = read_samples(tmp_path)
    assert len(index) == 1 and index.for_example(gen("g", 0, ["x"])) == [("done a", 0.25)]


@pytest.mark.bigbench
def test_real_bigbench_mixture(bigbench):
    examples = []
    for task in ("general_knowledge", "periodic_elements", "riddle_sense"):
        parts = bigbench.load(task)
        examples += parts["train"] + parts["validation"]
    train, held = build_pair_mixture(examples, train_size=600, eval_size=100, max_pairs_per_task=200,
                                     max_wrong_choices=4, seed=0)
    assert len(train) == 600 and len(held) >= 100
    assert all(0.0 <= p.label <= 1.0 for p in train + held)
    assert not {p.instruction for p in train} & {p.instruction for p in held}
    sources = Counter(p.source for p in train)
    assert sources["choice"] and sources["reference"] and sources["negative"]  # periodic_elements is mixed
    per_task = Counter(p.task for p in set(train) | set(held))
    assert max(per_task.values()) <= 200
