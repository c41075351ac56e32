"""The Cappy scorer: batched scoring equals plain per-pair transformers scoring, selection rules,
the one checkpoint format (safetensors + cappy.json, atomic), pickle refusal, and the embedded
MiniLM's deterministic head."""

from __future__ import annotations

import json
import logging
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cappy_core.scorer.model import (
    CAPPY_JSON,
    PickleCheckpointError,
    Scorer,
    flops_per_pair,
    length_buckets,
    select_best,
    select_best_grouped,
)

WORDS = ("the cat sat on a mat while seven quick foxes jumped over lazy dogs and one "
         "bright answer appeared near the river bank").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _pairs(n: int = 40, seed: int = 0) -> tuple[list[str], list[str]]:
    """Mixed lengths, a few shared instructions, one pair far beyond 512 tokens."""
    rng = random.Random(seed)
    ins, res = [], []
    for i in range(n):
        instruction = _text(rng, rng.choice([3, 10, 40, 120])) if i % 3 else "Q: what is 2+2?"
        ins.append(instruction)
        res.append(_text(rng, rng.choice([1, 4, 15, 60])))
    if n > 11:
        ins[7] = _text(rng, 900)  # truncated (longest_first) to 512 tokens
        res[7] = _text(rng, 30)
        res[11] = ""  # an empty response is a valid candidate
    return ins, res


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer.from_pretrained("minilm", device="cpu", seed=0)


def _same_weights(a: Scorer, b: Scorer) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _assert_same_scores(a: list[float], b: list[float]) -> None:
    # Same weights give the same scores up to MKL's alignment-dependent rounding (~1e-9).
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def _per_pair_reference(s: Scorer, ins: list[str], res: list[str]) -> np.ndarray:
    """Plain transformers: each pair encoded alone, no padding, first logit.

    Encoded as a one-pair batch: ``tokenizer(i, "")`` (non-batched) silently drops an empty
    second text and encodes a single sequence, unlike the batched call the scorer makes.
    """
    out = []
    with torch.inference_mode():
        for i, r in zip(ins, res):
            enc = s.tokenizer([i], [r], truncation="longest_first", max_length=512,
                              return_tensors="pt")
            out.append(float(s.model(**enc).logits[0, 0]))
    return np.array(out)


def test_batched_scores_equal_per_pair_transformers(scorer):
    ins, res = _pairs()
    lengths = [len(x) for x in scorer.encode(ins, res)["input_ids"]]
    assert max(lengths) == 512 and min(lengths) < 20  # truncation happened; lengths are mixed
    sep = scorer.tokenizer.sep_token_id
    assert scorer.encode(ins, res)["input_ids"][11][-2:] == [sep, sep]  # "" is still a pair
    ref = _per_pair_reference(scorer, ins, res)
    assert np.std(ref) > 1e-3  # the pairs get distinguishable scores, so order is checked below
    got = scorer.score(ins, res, batch_size=8)
    assert isinstance(got, list) and all(isinstance(x, float) for x in got)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # a token budget (bigger batches of short pairs) changes batching, not results
    np.testing.assert_allclose(scorer.score(ins, res, batch_size=64, max_tokens=1024), ref,
                               atol=1e-5, rtol=0)
    # input order is preserved: scoring a permutation permutes the scores
    perm = list(range(len(ins)))
    random.Random(1).shuffle(perm)
    got_perm = scorer.score([ins[p] for p in perm], [res[p] for p in perm], batch_size=8)
    np.testing.assert_allclose(got_perm, ref[perm], atol=1e-5, rtol=0)


def test_bf16_close_to_fp32(scorer):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN: bf16 matmuls unsupported on this CPU build")
    ins, res = _pairs(24, seed=3)
    ref = np.array(scorer.score(ins, res))
    bf = Scorer(scorer.model, scorer.tokenizer, dtype="bfloat16")
    got = np.array(bf.score(ins, res))
    assert np.abs(got - ref).max() < 3e-3
    assert np.corrcoef(got, ref)[0, 1] > 0.98
    assert next(scorer.model.parameters()).dtype == torch.float32  # autocast, weights untouched
    # the head runs in fp32: scores are not rounded to bf16's ~3 digits (which would make ties)
    assert any(float(torch.tensor(x).bfloat16()) != x for x in got)


def test_input_validation(scorer):
    assert scorer.score([], []) == []
    with pytest.raises(ValueError, match="2 instructions but 1 responses"):
        scorer.score(["a", "b"], ["x"])
    with pytest.raises(TypeError, match=r"responses\[1\] must be a str"):
        scorer.score(["a", "b"], ["x", 3])
    with pytest.raises(TypeError, match="list of strings"):
        scorer.score("abc", "xyz")
    with pytest.raises(ValueError, match="no candidates"):
        scorer.score_and_select("pick one", [])


def test_score_and_select(scorer):
    cands = ["blue", "green", "red", "blue"]
    idx, scores = scorer.score_and_select("What colour is the sky?", cands)
    assert len(scores) == 4 and idx == select_best(scores)
    assert scores[0] == scores[3]  # duplicates are scored once: exactly the same score


def test_a_repeated_pair_is_scored_once_and_every_copy_gets_its_score(scorer, monkeypatch):
    ins, res = _pairs(12, seed=7)
    ref = scorer.score(ins, res)
    seen = []
    real = Scorer._score
    monkeypatch.setattr(Scorer, "_score", lambda self, i, r, *a: seen.append(len(i)) or real(self, i, r, *a))
    order = [3, 0, 3, 5, 0, 0, 11, 3]  # repeats, out of order; "b" vs "a" below: same response, other instruction
    got = scorer.score([ins[k] for k in order], [res[k] for k in order])
    assert seen == [4]  # the four distinct pairs, once each
    _assert_same_scores(got, [ref[k] for k in order])
    assert got[0] == got[2] == got[7] and got[1] == got[4] == got[5]
    seen.clear()
    two = scorer.score(["a", "b", "a"], ["same", "same", "same"])
    assert seen == [2] and two[0] == two[2] and two[0] != two[1]  # a pair is (instruction, response)


def test_select_best_rules():
    assert select_best([0.1, 0.5, 0.5, 0.2]) == 1  # ties go to the first
    assert select_best([3.0]) == 0
    assert select_best([float("nan"), -1.0, -2.0]) == 1  # NaN never wins over a number
    assert select_best([-1.0, float("nan"), 5.0, float("nan")]) == 2
    assert select_best([float("-inf"), float("nan")]) == 0  # -inf is a number
    with pytest.raises(ValueError, match="every one of the 2 scores is NaN"):
        select_best([float("nan")] * 2)  # nothing to compare: an error, not a silent pick
    assert select_best(np.array([1.0, 2.0, 2.0], dtype=np.float32)) == 1
    with pytest.raises(ValueError, match="no candidates"):
        select_best([])
    assert select_best_grouped([1, 2, 2, 5, 0, 5, 7], [3, 3, 1]) == [1, 0, 0]
    with pytest.raises(ValueError, match="sum to 5"):
        select_best_grouped([1, 2, 3, 4], [2, 3])
    with pytest.raises(ValueError, match="≥1 candidate"):
        select_best_grouped([1, 2], [2, 0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 600), max_size=60), st.integers(1, 16),
       st.one_of(st.none(), st.integers(1, 4000)))
def test_length_buckets_cover_every_pair_once_within_budget(lengths, batch_size, max_tokens):
    batches = length_buckets(lengths, batch_size, max_tokens)
    flat = sorted(int(i) for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= batch_size
        padded = len(b) * max(lengths[i] for i in b)
        assert max_tokens is None or len(b) == 1 or padded <= max_tokens


def test_save_load_round_trip(scorer, tmp_path):
    ins, res = _pairs(12, seed=5)
    before = scorer.score(ins, res)
    ckpt = tmp_path / "ckpt"
    scorer.save_pretrained(ckpt, metadata={"step": 7, "metrics": {"rougeL": 12.5}})
    names = {p.name for p in ckpt.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    info = json.loads((ckpt / CAPPY_JSON).read_text())
    assert info["format_version"] == 1 and info["max_length"] == 512
    assert info["metadata"] == {"step": 7, "metrics": {"rougeL": 12.5}}
    assert "all-MiniLM-L6-v2" in info["base_model"]
    # the head comes from the checkpoint, not from the seed
    loaded = Scorer.from_pretrained(ckpt, device="cpu", seed=123)
    assert _same_weights(loaded, scorer)
    _assert_same_scores(loaded.score(ins, res), before)
    assert loaded.metadata["metadata"]["step"] == 7 and loaded.base_model == info["base_model"]
    # overwriting an existing checkpoint is atomic and leaves no temporary folders behind
    scorer.save_pretrained(ckpt, metadata={"step": 8})
    assert json.loads((ckpt / CAPPY_JSON).read_text())["metadata"] == {"step": 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_fingerprint_is_the_weights_length_and_dtype_not_where_they_came_from(scorer, tmp_path):
    import torch

    scorer.save_pretrained(tmp_path / "a")
    loaded = Scorer.from_pretrained(tmp_path / "a", device="cpu", seed=123)
    assert loaded.fingerprint() == scorer.fingerprint()  # a saved copy is the same scorer
    assert Scorer.from_pretrained(tmp_path / "a", device="cpu", max_length=64).fingerprint() != scorer.fingerprint()
    assert Scorer.from_pretrained(tmp_path / "a", device="cpu", dtype="bfloat16").fingerprint() != scorer.fingerprint()
    with torch.no_grad():  # one weight of one layer nudged by a float's last bit
        w = next(p for n, p in loaded.model.named_parameters() if n.endswith("classifier.weight"))
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1e9))
    nudged = loaded.fingerprint()
    assert nudged != scorer.fingerprint()
    from cappy_core.scorer.training import make_optimizer

    opt = make_optimizer(loaded.model, lr=1e-3)  # the fused step, which leaves version counters alone
    loaded.model(**loaded._collate(loaded.encode(["q"], ["a"]), [0])).logits.sum().backward()
    opt.step()
    assert loaded.fingerprint() != nudged


def test_saved_scorer_has_a_model_card_and_loads_in_plain_transformers(scorer, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ckpt = tmp_path / "tense-scorer"
    run = {"job": "finetune", "name": "finetune-tense", "task": "tense", "train_pairs": 1024, "eval_pairs": 64,
           "loss": "mse"}
    scorer.save_pretrained(ckpt, metadata={"update": 8, "total_updates": 8, "metrics": {"spearman": 0.4321}, "run": run})
    card = (ckpt / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: transformers\n")
    assert "\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n" in card and "\n- google/bigbench\n" in card
    for row in ("| training data | BIG-Bench: tense |", "| training pairs | 1,024 (64 held out) |", "| loss | mse |",
                "| updates | 8 of 8 |", "| metric: spearman | 0.4321 |", "| max length | 512 tokens"):
        assert row in card, row
    # the card's recipe: the tokenizer's plain pair encoding, one padded batch, first logit
    ins, res = _pairs(12, seed=9)
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    enc = tok(ins, res, truncation="longest_first", max_length=512, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = model(**enc).logits[:, 0].numpy()
    ours = np.array(scorer.score(ins, res))
    np.testing.assert_allclose(plain, ours, atol=1e-5, rtol=0)
    assert np.ptp(ours) > 1e-2  # the pairs score differently, so equal scores mean equal inputs
    swapped = np.array(scorer.score(res, ins))  # e.g. (response, instruction) would not pass
    assert np.abs(swapped - ours).max() > 1e-3


def test_saved_scorer_loads_as_a_sentence_transformers_cross_encoder(scorer, tmp_path, monkeypatch):
    st_ = pytest.importorskip("sentence_transformers",
                              reason="sentence-transformers is in the dev extra: pip install -e '.[dev]'")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the saved folder only, never the hub
    ckpt = scorer.save_pretrained(tmp_path / "scorer")
    ins, res = _pairs(12, seed=11)
    model = st_.CrossEncoder(str(ckpt), max_length=512, activation_fn=torch.nn.Identity(), device="cpu",
                             local_files_only=True)
    assert model.config.name_or_path == str(ckpt)  # built from the local folder
    ours = np.array(scorer.score(ins, res))
    assert np.ptp(ours) > 1e-2  # the pairs score differently, so agreement is not that of a constant
    np.testing.assert_allclose(model.predict(list(zip(ins, res))), ours, atol=1e-5, rtol=0)


def test_pickle_only_folder_refused_unless_allowed(scorer, tmp_path):
    ckpt = tmp_path / "pickled"
    scorer.save_pretrained(ckpt)
    state = {k: v.contiguous() for k, v in scorer.model.state_dict().items()}
    torch.save(state, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(PickleCheckpointError, match="allow_pickle"):
        Scorer.from_pretrained(ckpt)
    loaded = Scorer.from_pretrained(ckpt, allow_pickle=True, device="cpu")
    ins, res = _pairs(6, seed=9)
    assert _same_weights(loaded, scorer)
    _assert_same_scores(loaded.score(ins, res), scorer.score(ins, res))


def test_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "such" / "ckpt"
    with pytest.raises(FileNotFoundError, match="no/such/ckpt"):
        Scorer.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="not found"):
        Scorer.from_pretrained("./nope-not-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Scorer.from_pretrained(tmp_path / "empty")


def test_embedded_head_is_deterministic_in_seed(scorer):
    ins, res = _pairs(8, seed=11)
    again = Scorer.from_pretrained("minilm", device="cpu", seed=0)
    other = Scorer.from_pretrained("minilm", device="cpu", seed=1)
    torch.manual_seed(999)  # global RNG state does not matter
    assert _same_weights(again, scorer) and not _same_weights(other, scorer)
    _assert_same_scores(again.score(ins, res), scorer.score(ins, res))
    assert not np.allclose(other.score(ins, res), scorer.score(ins, res), atol=1e-4)


def test_a_fresh_head_warns_unless_it_is_about_to_be_trained(caplog, monkeypatch):
    from cappy_core.scorer import model as scorer_mod

    monkeypatch.setattr(scorer_mod, "_warned_fresh_head", set())

    def ours():  # other libraries may log while loading (what earlier tests set up decides)
        return [r for r in caplog.records if r.name == "cappy_core.scorer.model"]

    with caplog.at_level(logging.INFO, logger="cappy_core.scorer.model"):
        Scorer.from_pretrained("minilm", device="cpu", for_training=True)
        Scorer.from_pretrained("minilm", device="cpu", for_training=True)
        assert [r.levelname for r in ours()] == ["INFO", "INFO"]
        assert "to be trained" in ours()[0].getMessage()
        caplog.clear()
        Scorer.from_pretrained("minilm", device="cpu")  # scoring with it: the user must know
        assert [r.levelname for r in ours()] == ["WARNING"]
        assert "meaningless until it is trained" in ours()[0].getMessage()


def test_flops_per_pair_formula(scorer):
    cfg = scorer.model.config  # MiniLM-L6: d=384, 6 layers, d_ff=1536
    d, n_layers, d_ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    t = 100
    expected = 2 * n_layers * (4 * d * d + 2 * d * d_ff) * t + 4 * n_layers * t * t * d
    assert math.isclose(flops_per_pair(cfg, t), expected, rel_tol=1e-3)
    assert flops_per_pair(cfg, 2 * t) > 2 * flops_per_pair(cfg, t)  # attention is quadratic


def _front_matter(card: str) -> dict:
    import yaml

    head, sep, _ = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep, card[:200]
    return yaml.safe_load(head)


def test_model_card_front_matter_carries_license_base_datasets_and_the_sweeps_rouge(tmp_path):
    """Fast (no model): the card's YAML, as the hub reads it, for a sweep's kept scorer and others."""
    from cappy_core.scorer.checkpoint import CAPPY_JSON, EMBEDDED_SOURCE, model_card, record_evaluation

    info = {"base_model": EMBEDDED_SOURCE, "model_type": "bert", "max_length": 512,
            "metadata": {"run": {"job": "sweep", "name": "tense", "task": "tense", "loss": "mse"}}}
    folder = tmp_path / "scorer"
    folder.mkdir()
    (folder / CAPPY_JSON).write_text(json.dumps(info))
    card = _front_matter(model_card(info, "scorer"))
    assert card["license"] == "apache-2.0" and card["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert card["datasets"] == ["google/bigbench"] and "model-index" not in card
    assert card["library_name"] == "transformers" and card["pipeline_tag"] == "text-classification"
    record_evaluation(folder, [{"task": "tense", "split": "validation", "method": "cappy", "rouge_l": 61.25}],
                      name="cappy-tense")
    text = (folder / "README.md").read_text()
    card = _front_matter(text)
    index, = card["model-index"]
    result, = index["results"]
    assert index["name"] == "cappy-tense" and result["dataset"] == {
        "type": "google/bigbench", "name": "BIG-Bench tense", "config": "tense", "split": "validation"}
    assert result["metrics"] == [{"type": "rouge", "name": "Rouge-L (x100) of the selected response", "value": 61.25}]
    assert "| Rouge-L, BIG-Bench tense validation | 61.25 (the `cappy` pick, x100) |" in text
    assert json.loads((folder / CAPPY_JSON).read_text())["metadata"]["evaluation"][0]["rouge_l"] == 61.25
    # other bases: roberta's MIT licence; a pinned hub id loses its revision; an unknown base says so
    for base, license_, hub in (("roberta-large", "mit", "roberta-large"),
                                ("sentence-transformers/all-MiniLM-L6-v2@1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
                                 "apache-2.0", "sentence-transformers/all-MiniLM-L6-v2"),
                                ("someone/scorer", "unknown", "someone/scorer"), (str(tmp_path), "unknown", None)):
        card = _front_matter(model_card({"base_model": base, "max_length": 64, "metadata": {}}, "x"))
        assert card["license"] == license_ and card.get("base_model") == hub and "datasets" not in card
