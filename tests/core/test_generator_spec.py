"""GeneratorSpec: which settings each backend gets, and its checks (no model is loaded)."""

from __future__ import annotations

import dataclasses

import pytest

from cappy_core.generation import GeneratorSpec

COMMON = {"max_prompt_tokens": 256, "dtype": "float32", "allow_pickle": False, "trust_remote_code": True}


def cli_spec(backend: str, **kw) -> GeneratorSpec:
    """A spec as the sampler builds it from its flags: every setting given, whatever the backend."""
    return GeneratorSpec("gen", backend, max_prompt_tokens=256, dtype="float32", trust_remote_code=True,
                         batch_rows=64, decode_loop="shared", max_model_len=320, **kw)


def test_each_backend_gets_its_own_settings_and_ignores_the_others():
    assert cli_spec("hf", gpu_memory_utilization=0.5).backend_kwargs() == \
        {**COMMON, "batch_rows": 64, "decode_loop": "shared"}
    assert cli_spec("vllm", kv_cache_memory_bytes=1 << 28).backend_kwargs() == \
        {**COMMON, "max_model_len": 320, "kv_cache_memory_bytes": 1 << 28, "async_engine": False}
    # unset (None) settings keep the backend's default: they are not passed at all
    assert GeneratorSpec("gen", "vllm").backend_kwargs() == {
        "max_prompt_tokens": 512, "dtype": "auto", "allow_pickle": False, "trust_remote_code": False,
        "async_engine": False}


def test_from_kwargs_keeps_unknown_options_for_the_vllm_engine():
    spec = GeneratorSpec.from_kwargs("gen", "vllm", dtype="bfloat16", gpu_memory_utilization=0.85,
                                     tensor_parallel_size=2, async_engine=True)
    assert spec.engine_args == {"tensor_parallel_size": 2}
    assert spec.backend_kwargs() == {"max_prompt_tokens": 512, "dtype": "bfloat16", "allow_pickle": False,
                                     "trust_remote_code": False, "gpu_memory_utilization": 0.85,
                                     "async_engine": True, "tensor_parallel_size": 2}
    # serve's auto falls back to transformers with the same spec, without vLLM's options
    hf = dataclasses.replace(spec, backend="hf", engine_args={})
    assert hf.backend_kwargs() == {"max_prompt_tokens": 512, "dtype": "bfloat16", "allow_pickle": False,
                                   "trust_remote_code": False}


@pytest.mark.parametrize("kw, match", [
    (dict(backend="tgi"), "unknown generation backend 'tgi': choose one of vllm, hf"),
    (dict(backend="hf", max_prompt_tokens=1), "max_prompt_tokens must be >= 2, got 1"),
    (dict(backend="vllm", decode_loop="paged"), "decode_loop must be one of shared, cached, generate, got 'paged'"),
    (dict(backend="vllm", gpu_memory_utilization=1.5), "gpu_memory_utilization must be > 0 and <= 1, got 1.5"),
    (dict(backend="hf", engine_args={"tensor_parallel_size": 2}), "tensor_parallel_size: not a setting of the hf"),
])
def test_errors_name_the_setting(kw, match):
    with pytest.raises(ValueError, match=match):
        GeneratorSpec("gen", **kw)


def test_a_vllm_setting_is_not_checked_for_the_hf_backend():
    """The sampler passes its vLLM flags whatever the backend; transformers never reads them."""
    assert "gpu_memory_utilization" not in cli_spec("hf", gpu_memory_utilization=1.5).backend_kwargs()


def test_load_is_load_generator_with_the_backend_kwargs(monkeypatch):
    from cappy_core.generation import generator_spec

    calls = []
    monkeypatch.setattr(generator_spec, "load_generator", lambda *a, **kw: calls.append((a, kw)) or "gen")
    spec = cli_spec("hf")
    assert spec.load() == "gen" and calls == [(("hf", "gen"), spec.backend_kwargs())]
