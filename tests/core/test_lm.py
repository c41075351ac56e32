"""The embedded generator's building blocks: tokenizer, training sequences, batches, a tiny
training run, the saved folder and the quality check."""

from __future__ import annotations

import time

import pytest
import torch

from cappy_core.data.records import Example
from cappy_core.generation.embedded_data import (LengthBucketedBatches, LMSequence, collate, encode_examples, mix_tasks,
                                       tokenizer_texts)
from cappy_core.generation.embedded_model import (default_generator_path, evaluate_generator, generate_texts, is_generator_dir, new_llama,
                           prompt_text, save_generator, tiny_generator, train_tokenizer)
from cappy_core.scorer.training import causal_lm_loss, train

TEXTS = [
    "Q: What is the capital of France?\nA:\nParis", "Change tense to PAST: I walk.\nA:\nI walked.",
    "Sort the words: pear apple fig\nSorted:\napple fig pear", "Wie das RKI meldete, haben Ärzt*innen",
] * 30


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400, min_frequency=1)


def ex(task, instruction, refs, i=0):
    return Example(task=task, subtask="", split="train", example_idx=i, instruction=instruction, references=refs)


@pytest.mark.parametrize("text", [
    "plain ascii", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "Ärzt*innen, Straße, naïve café",
    "中文字符 和 日本語のテキスト", "emoji 🙂👩‍👩‍👧 flags 🇫🇷", "combining e\u0301 and zero\u200bwidth",
    "control \x00\x07\x1b chars", "", "🙂" * 50, "don't  ,  . ?!", "<s> literal special-looking </s>",
])
def test_tokenizer_round_trips_any_unicode(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id is None  # byte-level: nothing is unknown
    decoded = tokenizer.decode(ids[1:], skip_special_tokens=False)
    if "<s>" not in text:
        assert decoded == text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_prompts_are_cut_from_the_left_keeping_bos(tokenizer):
    instruction = "filler words " * 200 + "Q: final question?\nA:"
    ids = tokenizer(prompt_text(instruction), truncation=True, max_length=24)["input_ids"]
    assert len(ids) == 24 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[1:]).endswith("Q: final question?\nA:\n")


def test_encode_examples_splits_prompt_and_response(tokenizer):
    exs = [ex("t", "Q: capital of France?\nA:", ["Paris"]), ex("t", "no refs", []),
           ex("t", "x " * 500 + "A:", ["word " * 100], 1)]
    seqs = encode_examples(exs, tokenizer, max_prompt_tokens=32, max_response_tokens=8)
    assert len(seqs) == 2  # the example without references is skipped
    first, long = seqs
    assert list(first.prompt) == tokenizer(prompt_text(exs[0].instruction))["input_ids"]
    assert first.response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(first.response[:-1]) == "Paris"
    assert len(long.prompt) == 32 and long.prompt[0] == tokenizer.bos_token_id
    assert len(long.response) == 8 and tokenizer.eos_token_id not in long.response  # cut: no EOS
    with pytest.raises(ValueError):
        encode_examples(exs, tokenizer, max_prompt_tokens=1, max_response_tokens=8)


def test_references_are_drawn_per_example_and_seeded(tokenizer):
    exs = [ex("t", f"Q{i}\nA:", ["alpha", "beta", "gamma"], i) for i in range(30)]
    a = encode_examples(exs, tokenizer, max_prompt_tokens=16, max_response_tokens=8, seed=1)
    b = encode_examples(exs, tokenizer, max_prompt_tokens=16, max_response_tokens=8, seed=1)
    assert a == b and len({s.response for s in a}) == 3


def test_collate_masks_prompt_and_padding():
    seqs = [LMSequence("t", (1, 10, 11), (20, 2)), LMSequence("t", (1, 12), (21, 22, 23, 2))]
    b = collate(seqs, pad_id=0, loss_on="response")
    assert b["input_ids"].tolist() == [[1, 10, 11, 20, 2, 0], [1, 12, 21, 22, 23, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    assert b["labels"].tolist() == [[-100, -100, -100, 20, 2, -100], [-100, -100, 21, 22, 23, 2]]
    b = collate(seqs, pad_id=0, loss_on="all")
    assert b["labels"].tolist() == [[-100, 10, 11, 20, 2, -100], [-100, 12, 21, 22, 23, 2]]
    with pytest.raises(ValueError):
        collate(seqs, pad_id=0, loss_on="prompt")


def test_mix_caps_tasks_and_tokenizer_text_covers_each_task():
    by_task = {"big": [ex("big", f"q{i}", [f"a{i}"], i) for i in range(100)],
               "small": [ex("small", "q", ["a"]), ex("small", "q2", [])]}
    mixed = mix_tasks(by_task, max_per_task=10, seed=0)
    assert sum(e.task == "big" for e in mixed) == 10 and sum(e.task == "small" for e in mixed) == 1
    texts = tokenizer_texts(by_task, max_chars_per_task=20)
    assert any(t.startswith("q") and t.endswith("\n") for t in texts) and "a" in texts
    assert sum(len(t) for t in texts) < 2 * (20 + 5)


def test_length_bucketed_batches_cover_an_epoch_and_stop(tokenizer):
    seqs = [LMSequence("t", (1,) + (5,) * n, (6, 2)) for n in range(1, 41)]
    stream = LengthBucketedBatches(seqs, batch_size=4, pad_id=0, bucket_batches=10, seed=3)
    epoch = [next(stream) for _ in range(10)]
    lengths = sorted(int(m.sum()) for b in epoch for m in b["attention_mask"])
    assert lengths == sorted(len(s) for s in seqs)  # each sequence exactly once per epoch
    spans = [int(b["attention_mask"].sum(1).max() - b["attention_mask"].sum(1).min()) for b in epoch]
    assert spans == [3] * 10  # one window: batches of neighbouring lengths, little padding
    assert stream.tokens == sum(lengths) and stream.epoch == 0
    next(stream)
    assert stream.epoch == 1
    stream.max_batches = 12
    next(stream)
    with pytest.raises(StopIteration):
        next(stream)
    stream.max_batches, stream.deadline = None, time.monotonic() - 1
    with pytest.raises(StopIteration):
        next(stream)
    assert stream.mean_padded_tokens_per_batch() >= 4 * 2
    with pytest.raises(ValueError):
        LengthBucketedBatches([], batch_size=4, pad_id=0)


def test_a_tiny_training_run_lowers_the_loss(tokenizer):
    model = new_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    exs = [ex("t", t.rsplit("\n", 1)[0], [t.rsplit("\n", 1)[1]], i) for i, t in enumerate(TEXTS[:3])]
    batch = collate(encode_examples(exs, tokenizer, max_prompt_tokens=32, max_response_tokens=8),
                    pad_id=tokenizer.pad_token_id)
    state = train(model, [batch] * 30, loss_fn=causal_lm_loss, total_updates=30, lr=3e-3, warmup_ratio=0.1,
                  bf16=True, max_grad_norm=1.0)
    assert state.update == 30
    assert state.losses[-1] < 0.6 * state.losses[0], state.losses


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_saved_folder_loads_in_transformers_and_generates(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = new_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    tokenizer.model_max_length = 48
    path = save_generator(model, tokenizer, tmp_path / "gen", metadata={"kind": "test"})
    assert is_generator_dir(path) and [p.name for p in tmp_path.iterdir()] == ["gen"]  # no temp folder left
    save_generator(model, tokenizer, path, metadata={"kind": "again"})  # replaces the folder
    assert [p.name for p in tmp_path.iterdir()] == ["gen"] and "again" in (path / "cappy_generator.json").read_text()
    assert not list(path.glob("*.bin")) and (path / "model.safetensors").is_file()
    m2 = AutoModelForCausalLM.from_pretrained(path)
    t2 = AutoTokenizer.from_pretrained(path)
    assert t2.truncation_side == "left" and t2.padding_side == "left" and t2.model_max_length == 48
    text = "Straße 🙂 ok"
    assert t2.decode(t2(text)["input_ids"], skip_special_tokens=True) == text
    ids = t2([prompt_text("Q: hi\nA:")], return_tensors="pt")
    out = m2.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=t2.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    torch.testing.assert_close(m2.model.embed_tokens.weight, model.model.embed_tokens.weight)

    model, tok = load(path)
    texts = generate_texts(model, tok, ["Q: a\nA:", "Q: a much longer question here\nA:", "x"],
                           max_new_tokens=4, num_samples=3, do_sample=True, seed=1, batch_size=2)
    assert [len(t) for t in texts] == [3, 3, 3] and all(isinstance(s, str) for t in texts for s in t)
    greedy1 = generate_texts(model, tok, ["Q: a\nA:"], max_new_tokens=6)
    greedy2 = generate_texts(model, tok, ["Q: zzz\nA:", "Q: a\nA:"], max_new_tokens=6, batch_size=2)
    assert greedy1[0] == greedy2[1]  # left padding does not change a greedy answer


def test_evaluate_generator_reports_greedy_and_spread(tmp_path):
    path = tiny_generator(tmp_path / "tiny")
    model, tok = load(path)
    by_task = {"a": [ex("a", "Q: capital of France?\nA:", ["Paris"]), ex("a", "Q: b\nA:", ["x y"], 1)],
               "b": [ex("b", "Sort: pear fig\nSorted:", ["fig pear"])], "c": [ex("c", "no refs", [])]}
    m = evaluate_generator(model, tok, by_task, max_new_tokens=4, num_samples=3)
    assert set(m["tasks"]) == {"a", "b"} and m["num_examples"] == 3
    for k in ("greedy_rouge_l", "sample_rouge_l", "sample_spread", "oracle_rouge_l"):
        assert 0.0 <= m[k] <= 100.0
    assert m["oracle_rouge_l"] >= m["greedy_rouge_l"] and m["skipped_tasks"] == []
    late = evaluate_generator(model, tok, by_task, max_new_tokens=4, deadline=time.monotonic() - 1)
    assert late["skipped_tasks"] == ["a", "b", "c"] and late["tasks"] == {}


def test_default_generator_path_follows_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPPY_CACHE_DIR", str(tmp_path))
    assert default_generator_path() == tmp_path / "generator" / "bigbench-llama"
    assert default_generator_path("x", cache_dir=tmp_path / "c") == tmp_path / "c" / "generator" / "x"
