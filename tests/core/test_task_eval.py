"""One sweep task (cappy_core.selection.task_eval): dev instructions held out of finetuning, the fused
selector fitted on them and applied to validation, the scorer's dtype after finetuning, and one
scorer finetuned for several tasks. Small synthetic tasks on disk; a tiny BERT or a fake scorer."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_bert_scorer

from cappy_core.labeling.candidates import CANDIDATE_SCHEMA, done_path, instruction_id, shard_path
from cappy_core.data.records import Example, split_path, write_examples
from cappy_core.selection.selectors import SELECTOR_FILE, read_selector
from cappy_core.selection.scored_tables import SIGNALS, add_fused, add_mbr, fit_fused, with_selector_columns
from cappy_core.selection.task_eval import TaskSettings, finetune, finetune_shared, split_dev, train_pairs
from cappy_core.scorer.training import ScorerSchedule

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
LABELS = (0.1, 0.9, 0.3, 0.5)  # per candidate, rotated per instruction
DECODINGS = (("beam4", 0), ("sample", 0), ("sample", 1), ("temp0.9", 0))


def candidate_text(task: str, split: str, i: int, k: int) -> str:
    """Distinct words per candidate, so no two candidates share a token (MBR is constant 0)."""
    rng = np.random.default_rng([len(task), {"train": 0, "validation": 1}[split], i, k])
    return f"{task}{split}{i}c{k} " + " ".join(f"{w}{i}{k}{split[0]}" for w in rng.choice(WORDS, 3, replace=False))


def make_task(root, task: str, n_train: int = 8, n_val: int = 4) -> tuple[str, str]:
    """``(data_dir, candidates_dir)`` with one synthetic generative task: ``n_train`` train and
    ``n_val`` validation instructions of four candidates each. ``logprob_mean`` is the negated
    label (the generator's own ranking is exactly wrong)."""
    data, cands = root / "data", root / "candidates"
    for split, n in (("train", n_train), ("validation", n_val)):
        examples = [Example(task, "", split, i, f"{task} {split} instruction {i}: say {WORDS[i % len(WORDS)]}",
                            [f"{task} reference {split} {i}"]) for i in range(n)]
        write_examples(examples, split_path(data, task, split))
        rows = []
        for e in examples:
            for k, (decoding, sample_idx) in enumerate(DECODINGS):
                label = LABELS[(k + e.example_idx) % len(LABELS)]
                rows.append({"instruction_id": instruction_id(task, "", split, e.example_idx), "task": task,
                             "subtask": "", "split": split, "example_idx": e.example_idx,
                             "instruction": e.instruction, "decoding": decoding, "sample_idx": sample_idx,
                             "text": candidate_text(task, split, e.example_idx, k), "num_tokens": 4,
                             "logprob_sum": -4 * label, "logprob_mean": -label, "label": label})
        path = shard_path(cands / split, task, split, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA), path)
        done_path(cands / split, task, split, 0).write_text("{}")
    return str(data), str(cands)


class LabelScorer:
    """Scores a candidate by its label (looked up by text): a perfectly informative scorer."""

    def __init__(self, cands_dir: str):
        from cappy_core.labeling.candidates import read_candidates

        self.by_text = {}
        for split in ("train", "validation"):
            t = read_candidates(f"{cands_dir}/{split}")
            self.by_text.update(zip(t["text"].to_pylist(), t["label"].to_pylist()))
        self.dtype = "float32"

    def score(self, instructions, responses):
        return [self.by_text[r] for r in responses]


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory) -> str:
    """A randomly initialised 1-layer BERT (hidden 32) with the MiniLM tokenizer, no dropout."""
    return tiny_bert_scorer(tmp_path_factory.mktemp("tiny_scorer"), num_layers=1)


def test_split_dev_holds_out_the_last_instructions_and_their_duplicates():
    ex = [Example("t", "", "train", i, f"q{i % 5}") for i in range(8)]
    train, dev = split_dev(ex, 2)
    assert [e.example_idx for e in dev] == [6, 7]
    assert [e.example_idx for e in train] == [0, 3, 4, 5]  # 1 and 2 repeat dev's instructions q1, q2
    assert split_dev(ex, 0) == (ex, [])
    with pytest.raises(ValueError, match="none of the 8"):
        split_dev(ex, 8)


def test_dev_instructions_never_appear_in_the_finetuning_pairs(tmp_path):
    data, cands = make_task(tmp_path, "t")
    dev_texts = {f"t train instruction {i}: say {WORDS[i]}" for i in (6, 7)}
    dev_responses = {candidate_text("t", "train", i, k) for i in (6, 7) for k in range(4)} | {
        "t reference train 6", "t reference train 7"}
    pairs, sizes = train_pairs("t", data_dir=data, candidates_dir=cands, max_train_examples=None, train_size=64,
                               seed=0, dev_examples=2)
    assert sizes["dev_instructions"] == 2 and sizes["train_examples"] == 6 and sizes["train_candidates"] == 24
    assert not {p.instruction for p in pairs} & dev_texts
    assert not {p.response for p in pairs} & dev_responses  # not even as another instruction's negative
    all_pairs, _ = train_pairs("t", data_dir=data, candidates_dir=cands, max_train_examples=None, train_size=None,
                               seed=0)
    assert {p.instruction for p in all_pairs} & dev_texts  # without dev they are used
    capped, sizes = train_pairs("t", data_dir=data, candidates_dir=cands, max_train_examples=5, train_size=None,
                                seed=0, dev_examples=1)  # dev = the last of the *sampled* instructions
    assert sizes["train_examples"] == 4 and "t train instruction 4: say echo" not in {p.instruction for p in capped}


def test_selector_columns_read_no_label_and_fused_weights_come_from_dev(tmp_path):
    from cappy_core.labeling.candidates import read_candidates
    from cappy_core.selection.scored_tables import score_table

    _, cands = make_task(tmp_path, "t")
    scorer = LabelScorer(cands)
    dev = add_mbr(score_table(scorer, read_candidates(f"{cands}/train")))
    assert set(dev["mbr"].to_pylist()) == {0.0}  # no shared tokens: MBR says nothing here
    weights, value, n = fit_fused(dev)
    assert n == 8 and value == pytest.approx(max(LABELS))
    assert set(weights) == set(SIGNALS) and weights["cappy"] > weights["logprob_mean"]  # the informative signal
    val = score_table(scorer, read_candidates(f"{cands}/validation"))
    masked = val.drop_columns(["label"])  # validation labels are not needed to compute any pick value
    fused = with_selector_columns(masked, weights)
    assert fused["fused"].to_pylist() == add_fused(add_mbr(val), weights)["fused"].to_pylist()
    # an instruction with no labels does not count; none at all: equal weights
    unlabeled = dev.set_column(dev.schema.get_field_index("label"), "label", pa.nulls(dev.num_rows, pa.float64()))
    assert fit_fused(unlabeled) == ({s: 0.0 if s == "length" else 1.0 for s in SIGNALS}, None, 0)
    nan = dev.set_column(dev.schema.get_field_index("label"), "label", pa.array([float("nan")] * dev.num_rows))
    assert fit_fused(nan) == fit_fused(unlabeled)  # NaN (no references) is unlabelled too, not a worst pick


def test_run_task_fits_on_dev_and_records_it(tmp_path, monkeypatch):
    """A fake scorer that knows the labels: the weights fitted on dev favour it, and the fused
    pick on validation is then the oracle's."""
    from cappy_core.scorer.model import Scorer
    from cappy_core.selection.task_eval import run_task

    data, cands = make_task(tmp_path, "t")
    monkeypatch.setattr(Scorer, "from_pretrained", classmethod(lambda cls, *a, **k: LabelScorer(cands)))
    settings = TaskSettings(data_dir=data, candidates_dir=cands, tasks_dir=str(tmp_path / "tasks"), init="fake",
                            max_length=32, dev_examples=3)
    rec = run_task("t", settings)
    assert rec["fused_weights"]["cappy"] > rec["fused_weights"]["logprob_mean"]
    assert rec["fused_fit"] == {"dev_rouge": pytest.approx(90.0), "dev_instructions": 3} and rec["sizes"]["dev_instructions"] == 3
    m = rec["metrics"]
    assert m["cappy"] == m["oracle"] == pytest.approx(90.0) and m["cappy+lm+mbr"] == pytest.approx(90.0)
    assert m["self_score_mean"] == pytest.approx(10.0) and "mbr" in m
    assert set(rec["dev_metrics"]) == set(m)
    # dev picks per instruction, named, as `cappy dev-report` reads them; their means are the dev table's
    assert rec["dev_instruction_ids"] == [f"t/train/{i}" for i in (5, 6, 7)]
    for method, values in rec["dev_per_instruction"].items():
        assert len(values) == 3 and sum(values) / 3 == pytest.approx(rec["dev_metrics"][method])
    assert len(rec["per_instruction"]["cappy+lm+mbr"]) == 4 and "cappy" in rec["spearman"]
    json.dumps(rec)  # the record is JSON as it is
    val = pq.read_table(tmp_path / "tasks" / "t" / "validation_scored.parquet")
    dev = pq.read_table(tmp_path / "tasks" / "t" / "dev_scored.parquet")
    assert {"score", "mbr", "fused"} <= set(val.column_names) and dev.num_rows == 3 * 4
    assert set(dev["example_idx"].to_pylist()) == {5, 6, 7}


def test_run_task_finetunes_without_dev_pairs_and_keeps_the_selector(tmp_path, tiny_scorer):
    from cappy_core.selection.task_eval import run_task

    data, cands = make_task(tmp_path, "t")
    schedule = ScorerSchedule(lr=1e-3, batch_size=8, micro_batch_size=4, seed=0, loss="listwise",
                              group_by_instruction=True)
    settings = TaskSettings(data_dir=data, candidates_dir=cands, tasks_dir=str(tmp_path / "tasks"),
                            init=tiny_scorer, max_length=32, schedule=schedule, train_size=16, dev_examples=2,
                            keep_scorer=True)
    rec = run_task("t", settings)
    assert rec["training"]["updates"] >= 1 and rec["sizes"]["train_pairs"] == 16
    pairs = pq.read_table(tmp_path / "tasks" / "t" / "train_pairs.parquet")
    assert not set(pairs["instruction"].to_pylist()) & {f"t train instruction {i}: say {WORDS[i]}" for i in (6, 7)}
    kept = tmp_path / "tasks" / "t" / "scorer"
    assert read_selector(kept) == rec["fused_weights"]
    assert json.loads((kept / SELECTOR_FILE).read_text())["task"] == "t"


def test_a_selector_scorer_of_its_own_drives_the_fused_row_only(tmp_path, monkeypatch):
    """``selector_schedule``: a second scorer, finetuned with that loss on the same pairs, is the
    fused selector's Cappy signal; the ``cappy`` row stays the first scorer's pick, and the kept
    weights sit with the scorer they were fitted on."""
    import cappy_core.selection.task_eval as te

    data, cands = make_task(tmp_path, "t")

    class Saved:
        def save_pretrained(self, folder, metadata=None):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "cappy.json").write_text(json.dumps({"max_length": 32, "metadata": metadata or {}}))

    class Wrong(Saved):  # the generator's own (exactly wrong) ranking: picks the worst candidate
        dtype = "float32"

        def __init__(self):
            self.by_text = LabelScorer(cands).by_text

        def score(self, instructions, responses):
            return [-self.by_text[r] for r in responses]

    class Right(LabelScorer, Saved):
        pass

    seen = []

    def fake_finetune(init, pairs_file, schedule, **kw):
        seen.append((schedule.loss, schedule.group_by_instruction, str(pairs_file)))
        return (Right(cands) if schedule.loss == "listwise" else Wrong()), {"updates": 1}

    monkeypatch.setattr(te, "finetune", fake_finetune)
    mse = ScorerSchedule(seed=0)
    settings = TaskSettings(data_dir=data, candidates_dir=cands, tasks_dir=str(tmp_path / "tasks"), init="x",
                            max_length=32, schedule=mse, train_size=16, dev_examples=3, keep_scorer=True,
                            selector_schedule=ScorerSchedule(seed=0, loss="listwise", group_by_instruction=True))
    rec = te.run_task("t", settings)
    assert [s[:2] for s in seen] == [("mse", False), ("listwise", True)] and seen[0][2] == seen[1][2]
    m = rec["metrics"]
    assert m["cappy"] == pytest.approx(10.0) and m["cappy+lm+mbr"] == m["oracle"] == pytest.approx(90.0)
    assert rec["training"]["selector"]["loss"] == "listwise" and "selector_finetune_s" in rec["timings"]
    val = pq.read_table(tmp_path / "tasks" / "t" / "validation_scored.parquet")
    assert "selector_score" in val.column_names
    task_dir = tmp_path / "tasks" / "t"
    assert read_selector(task_dir / "selector_scorer") == rec["fused_weights"]
    assert (task_dir / "scorer").is_dir() and read_selector(task_dir / "scorer") is None
    # the kept scorer records its validation Rouge-L (the cappy row) in cappy.json and its model card
    kept = json.loads((task_dir / "scorer" / "cappy.json").read_text())["metadata"]
    assert kept["run"] == {"job": "sweep", "name": "t", "task": "t", "loss": "mse"} and kept["update"] == 1
    assert kept["evaluation"] == [{"task": "t", "split": "validation", "method": "cappy", "rouge_l": m["cappy"]}]
    card = yaml.safe_load((task_dir / "scorer" / "README.md").read_text().split("---\n")[1])
    result, = card["model-index"][0]["results"]
    # "t" is no BIG-Bench task: the card names no hub dataset for it
    assert card["model-index"][0]["name"] == "cappy-t" and "datasets" not in card
    assert result["dataset"] == {"type": "t", "name": "t (a --task-dir task)", "config": "t", "split": "validation"}
    assert result["metrics"][0]["value"] == pytest.approx(10.0)


def test_a_bf16_finetuned_scorer_scores_in_the_score_dtype(tmp_path, tiny_scorer):
    from cappy_core.labeling.rouge import LabeledPair
    from cappy_core.labeling.pair_mixture import write_pairs

    pairs = write_pairs([LabeledPair(f"q{i}", f"a{i}", i / 8, "candidate", "t") for i in range(8)],
                        tmp_path / "pairs.parquet")
    schedule = ScorerSchedule(batch_size=8, micro_batch_size=8, bf16=True)
    scorer, info = finetune(tiny_scorer, pairs, schedule, max_length=16, device="cpu")
    assert info["updates"] == 1 and scorer.dtype == "float32"
    scorer, _ = finetune(tiny_scorer, pairs, schedule, max_length=16, device="cpu", score_dtype="bfloat16")
    assert scorer.dtype == "bfloat16"


def test_finetune_shared_trains_once_on_every_task_without_dev(tmp_path, tiny_scorer):
    root = tmp_path
    for task in ("a", "b"):
        data, cands = make_task(root, task, n_train=6)
    schedule = ScorerSchedule(lr=1e-3, batch_size=8, micro_batch_size=8, seed=0)
    settings = TaskSettings(data_dir=data, candidates_dir=cands, tasks_dir=str(root / "tasks"), init=tiny_scorer,
                            max_length=32, schedule=schedule, train_size=16, dev_examples=1)
    shared = finetune_shared(["a", "b"], settings, "digest-1")
    assert shared.schedule is None and shared.init == str(root / "tasks" / "_shared" / "scorer")
    rec = shared.shared_training
    assert rec["scope"] == "all" and rec["tasks"] == ["a", "b"] and rec["train_pairs"] == 32 and rec["updates"] == 4
    pairs = pq.read_table(root / "tasks" / "_shared" / "train_pairs.parquet")
    instructions = set(pairs["instruction"].to_pylist())
    assert {i.split()[0] for i in instructions} == {"a", "b"}
    assert not instructions & {"a train instruction 5: say foxtrot", "b train instruction 5: say foxtrot"}
    record = root / "tasks" / "_shared" / "training.json"
    stamp = record.stat().st_mtime_ns
    again = finetune_shared(["a", "b"], settings, "digest-1")  # same digest: kept
    assert again.shared_training == shared.shared_training and record.stat().st_mtime_ns == stamp


def test_one_selector_scorer_for_every_task_drives_each_tasks_fused_row(tmp_path, monkeypatch):
    """``selector_scope: all``: the selector scorer is finetuned once, before the tasks, on each
    task's train_size pairs together (dev held out); every task then scores with it and finetunes
    only its own cappy scorer; a kept task carries a copy with its own weights (serve's folder)."""
    import cappy_core.selection.task_eval as te
    from cappy_core.selection.task_eval import finetune_shared_selector

    for task in ("a", "b"):
        data, cands = make_task(tmp_path, task)

    class Right(LabelScorer):  # knows both tasks' labels
        dtype = "float32"

        def __init__(self):
            self.by_text = {**LabelScorer(cands).by_text}

        def save_pretrained(self, folder, metadata=None):
            folder = __import__("pathlib").Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{}")
            (folder / "cappy.json").write_text(json.dumps({"max_length": 32, "metadata": metadata or {}}))

    class Wrong(Right):
        def score(self, instructions, responses):
            return [-s for s in super().score(instructions, responses)]

    seen = []

    def fake_finetune(init, pairs_file, schedule, **kw):
        seen.append((schedule.loss, pq.read_table(pairs_file)["instruction"].to_pylist()))
        return (Right() if schedule.loss == "listwise" else Wrong()), {"updates": 1}

    monkeypatch.setattr(te, "finetune", fake_finetune)
    monkeypatch.setattr("cappy_core.scorer.model.Scorer.from_pretrained", lambda folder, **kw: Right())
    settings = TaskSettings(data_dir=data, candidates_dir=cands, tasks_dir=str(tmp_path / "tasks"), init="x",
                            max_length=32, schedule=ScorerSchedule(seed=0), train_size=16, dev_examples=3,
                            keep_scorer=True,
                            selector_schedule=ScorerSchedule(seed=0, loss="listwise", group_by_instruction=True))
    shared = finetune_shared_selector(["b", "a"], settings, "digest-1")
    assert shared.selector_schedule is None and shared.schedule == settings.schedule
    assert shared.selector_init == str(tmp_path / "tasks" / "_shared" / "selector_scorer")
    rec = shared.shared_selector_training
    assert rec["scope"] == "all" and rec["tasks"] == ["a", "b"] and rec["loss"] == "listwise"
    (loss, union), = seen
    assert loss == "listwise" and len(union) == rec["train_pairs"] == 2 * 16  # each task's 16 pairs
    assert {i.split()[0] for i in union} == {"a", "b"} and "a train instruction 5: say foxtrot" not in union
    assert "a train instruction 4: say echo" in union
    for task in ("a", "b"):
        r = te.run_task(task, shared)
        assert [s for s, _ in seen[1:]] == ["mse"] and seen[1][1] == pq.read_table(
            tmp_path / "tasks" / task / "train_pairs.parquet")["instruction"].to_pylist()
        seen[1:] = []
        m = r["metrics"]  # the cappy row is the task's own (wrong) scorer, the fused row the shared one's
        assert m["cappy"] < m["cappy+lm+mbr"] == m["oracle"]
        assert r["training"]["selector"] == rec and "selector_finetune_s" not in r["timings"]
        kept = tmp_path / "tasks" / task / "selector_scorer"
        assert read_selector(kept) == r["fused_weights"] and read_selector(kept.parent / "scorer") is None
    again = finetune_shared_selector(["a", "b"], settings, "digest-1")  # same digest: kept, not retrained
    assert again.shared_selector_training == json.loads(json.dumps(rec)) and len(seen) == 1


class TextScorer:
    """Scores a pair from its text alone (no label anywhere), deterministically."""

    dtype = "float32"

    def score(self, instructions, responses):
        return [sum(map(ord, i + "|" + r)) % 101 / 101 for i, r in zip(instructions, responses)]


@pytest.mark.parametrize("perturb", ["shuffled", "nan"])
def test_validation_labels_change_no_pick_and_no_fused_weight(tmp_path, monkeypatch, perturb):
    """The validation labels on disk are read only to grade the picks: shuffled, or NaN for half the
    instructions (then ungraded, counted as unlabeled), every selector picks the same candidates and
    the fused weights fitted on dev are the same. The scorer reads text only."""
    from cappy_core.labeling.candidates import read_candidates
    from cappy_core.scorer.model import Scorer
    from cappy_core.selection.task_eval import run_task

    data, cands = make_task(tmp_path, "t", n_train=10, n_val=6)
    monkeypatch.setattr(Scorer, "from_pretrained", classmethod(lambda cls, *a, **k: TextScorer()))

    def run(name: str) -> tuple[dict, pa.Table]:
        settings = TaskSettings(data_dir=data, candidates_dir=cands, tasks_dir=str(tmp_path / name), init="fake",
                                max_length=32, dev_examples=4)
        rec = run_task("t", settings)
        return rec, pq.read_table(tmp_path / name / "t" / "validation_scored.parquet")

    before, scored = run("before")
    shard = shard_path(f"{cands}/validation", "t", "validation", 0)
    table = pq.read_table(shard)
    labels = table["label"].to_numpy()
    if perturb == "shuffled":
        new = np.random.default_rng(0).permutation(labels)
    else:
        new = np.where(np.asarray(table["example_idx"]) % 2 == 1, np.nan, labels)
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(new)), shard)
    assert read_candidates(f"{cands}/validation")["label"].to_pylist() != labels.tolist()
    after, rescored = run("after")

    assert after["fused_weights"] == before["fused_weights"] and after["fused_fit"] == before["fused_fit"]
    for column in ("instruction_id", "text", "score", "mbr", "fused"):
        assert rescored[column].to_pylist() == scored[column].to_pylist(), column
    assert _picks(rescored) == _picks(scored) and set(_picks(scored)) >= {"cappy", "cappy+lm+mbr", "mbr", "beam4"}
    if perturb == "shuffled":
        assert after["metrics"] != before["metrics"]  # the grades did read the new labels
    else:
        assert after["sizes"]["validation_unlabeled_instructions"] == 3 and len(after["per_instruction"]["cappy"]) == 3


def _picks(scored: pa.Table) -> dict[str, list[int]]:
    """Every selector's and baseline's pick per instruction from a scored table, its labels blanked."""
    from cappy_core.selection.evaluation import BOUNDS, picks, scored_groups, task_methods

    blank = scored.set_column(scored.schema.get_field_index("label"), "label", pa.array([0.0] * scored.num_rows))
    groups, _, _ = scored_groups(blank)
    return picks(groups, [m for m in task_methods(groups) if m not in BOUNDS])
