"""The OpenAI routes without Serve: which candidates a request gets (best_of, n, temperature,
top_p), the parameters refused with a 400 naming them, the choices (top n by the selector),
usage, logprobs, and the Server-Sent Events stream (keep-alive, chunks, errors, cancellation)."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from serve_app.args import IngressArgs
from serve_app.openai_api import ChatCompletionRequest, CompletionRequest
from serve_app.openai_format import OpenAIError, openai_completion
from serve_app.openai_plan import plan_openai
from serve_app.openai_stream import KEEPALIVE, openai_events, pieces


def _completion(**kw) -> CompletionRequest:
    return CompletionRequest(model="cappy", prompt=kw.pop("prompt", "Q: x\nA:"), **kw)


def _plan(**kw) -> list[tuple[str, int]]:
    return [(d.name, d.num_samples) for d in plan_openai(_completion(**kw), IngressArgs())]


def test_best_of_is_candidates_and_n_is_choices():
    assert _plan() == [("beam4", 1), ("sample", 4), ("temp0.9", 4), ("topk40", 4), ("topp0.95", 4)]  # the paper's 17
    assert sum(k for _, k in _plan(best_of=8, n=3)) == 8
    assert sum(k for _, k in _plan(n=20)) == 20  # best_of defaults to at least n
    with pytest.raises(OpenAIError) as info:
        _plan(best_of=2, n=3)
    assert info.value.status_code == 400 and info.value.param == "n" and "n <= best_of" in info.value.detail
    with pytest.raises(OpenAIError) as info:
        _plan(best_of=33)
    assert info.value.param == "best_of" and "limit is 32" in info.value.detail
    with pytest.raises(OpenAIError) as info:
        _plan(n=40)
    assert info.value.param == "n"
    with pytest.raises(OpenAIError) as info:
        _plan(max_tokens=10_000)
    assert info.value.param == "max_tokens"


def test_temperature_and_top_p_set_the_decodings():
    assert _plan(temperature=0) == [("greedy", 1), ("beam4", 1)]
    assert _plan(temperature=0, best_of=8) == [("greedy", 1), ("beam4", 1)] + [(f"beam{k}", 1) for k in (2, 3, 5, 6, 7, 8)]
    assert _plan(top_p=0, best_of=3) == [("greedy", 1), ("beam4", 1), ("beam2", 1)]
    with pytest.raises(OpenAIError) as info:
        _plan(temperature=0, best_of=9)
    assert info.value.param == "best_of" and "at most 8" in info.value.detail
    specs = plan_openai(_completion(temperature=0.7, top_p=0.9, best_of=5), IngressArgs())
    assert [(d.name, d.kind, d.num_samples) for d in specs] == [("beam4", "beam", 1), ("temp0.7-topp0.9", "sample", 4)]
    assert (specs[1].temperature, specs[1].top_p, specs[1].top_k) == (0.7, 0.9, 0)
    (one,) = plan_openai(_completion(temperature=1.3, best_of=1), IngressArgs())
    assert (one.name, one.kind, one.num_samples, one.temperature) == ("temp1.3", "sample", 1, 1.3)
    assert _plan(top_p=0.5, best_of=3) == [("beam4", 1), ("topp0.5", 2)]


@pytest.mark.parametrize("body, param, match", [
    ({"echo": True}, "echo", "only false"),
    ({"logprobs": 2}, "logprobs", "only 0"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "only 0"),
    ({"presence_penalty": -1}, "presence_penalty", "only 0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": ""}, "stop", "non-empty"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"prompt": [""]}, "prompt", "empty"),
    ({"prompt": ["x"] * 17}, "prompt", "1 to 16 prompts"),
    ({"suffix": "x"}, "suffix", "Extra inputs"),
    ({"logit_bias": {"1": 2}}, "logit_bias", "Extra inputs"),
])
def test_unsupported_values_are_refused_naming_the_parameter(body, param, match):
    with pytest.raises(ValidationError) as info:
        CompletionRequest(**{"model": "cappy", "prompt": "x", **body})
    (err,) = info.value.errors()
    assert err["loc"][0] == param and match in err["msg"]


def test_no_op_values_and_chat_logprobs_are_accepted():
    req = _completion(echo=False, logprobs=0, frequency_penalty=0, presence_penalty=0.0, stop="\n", user="u1")
    assert req.stops() == ("\n",) and req.wants_logprobs()
    assert _completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    chat = ChatCompletionRequest(model="cappy", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                 top_logprobs=0, max_completion_tokens=5, best_of=4, n=2)
    assert chat.wants_logprobs() and chat.new_tokens() == 5 and (chat.n, chat.best_of) == (2, 4)
    with pytest.raises(ValidationError, match="only 0"):
        ChatCompletionRequest(model="cappy", messages=[{"role": "user", "content": "hi"}], top_logprobs=3)


def _cand(text, *, tokens=3, generated=None, stopped=False, decoding="sample", idx=0):
    return {"text": text, "decoding": decoding, "sample_idx": idx, "num_tokens": tokens,
            "generated_tokens": tokens if generated is None else generated, "stopped": stopped,
            "logprob_sum": -1.0, "logprob_mean": -0.5, "token_ids": [1] * tokens}


def _out(texts_scores, *, fused=None, max_new_tokens=4, prompt_tokens=5, **cand_kw):
    from types import SimpleNamespace

    from cappy_core.scorer.pick import rank_best

    cands = [_cand(t, idx=i, **cand_kw) for i, (t, _) in enumerate(texts_scores)]
    scores = [s for _, s in texts_scores]
    return {"candidates": cands, "scores": scores, "fused": fused, "weights": None, "selector": "cappy",
            "ranked": rank_best(fused or scores), "meta": SimpleNamespace(scorer="default"),
            "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens, "timings_ms": {"generate": 1.0}}


def test_choices_are_the_top_n_by_the_selector_and_usage_counts_every_candidate():
    a = _out([("low", 0.1), ("best", 0.9), ("mid", 0.5), ("tie-later", 0.5)])
    b = _out([("x", 0.0), ("y", 1.0)], fused=[2.0, -1.0], generated=4)
    body = openai_completion("text_completion", "cappy", [a, b], 2, None)
    texts = [(c["index"], c["text"], c["cappy"]["candidate"]) for c in body["choices"]]
    assert texts == [(0, "best", 1), (1, "mid", 2), (2, "x", 0), (3, "y", 1)]  # ties: decoding order; fused decides
    assert body["choices"][2]["cappy"]["fused"] == 2.0 and body["choices"][0]["cappy"]["score"] == 0.9
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 4 * 3 + 2 * 4, "total_tokens": 30}
    assert [p["num_candidates"] for p in body["cappy"]["prompts"]] == [4, 2]
    chat = openai_completion("chat.completion", "cappy", [a], 1, None,
                             logprobs=[[[("b", -0.5), ("est", -0.25)]]])
    (choice,) = chat["choices"]
    assert choice["message"] == {"role": "assistant", "content": "best", "refusal": None}
    assert choice["logprobs"]["content"] == [{"token": "b", "logprob": -0.5, "bytes": [98], "top_logprobs": []},
                                             {"token": "est", "logprob": -0.25, "bytes": [101, 115, 116],
                                              "top_logprobs": []}]
    legacy = openai_completion("text_completion", "cappy", [a], 1, None, logprobs=[[[("b", -0.5), ("est", -0.25)]]])
    assert legacy["choices"][0]["logprobs"] == {"tokens": ["b", "est"], "token_logprobs": [-0.5, -0.25],
                                                "top_logprobs": None, "text_offset": [0, 1]}


def test_n_returns_distinct_answers_first():
    out = _out([("same", 0.9), ("same", 0.8), ("other", 0.1), ("same", 0.95)])
    body = openai_completion("text_completion", "cappy", [out], 3, None)
    assert [(c["text"], c["cappy"]["candidate"]) for c in body["choices"]] == [("same", 3), ("other", 2),
                                                                               ("same", 0)]


def test_finish_reason_is_stop_for_a_stop_string_and_length_at_the_limit():
    out = _out([("cut", 1.0), ("long", 0.5), ("short", 0.2)], max_new_tokens=4)
    out["candidates"][0].update(stopped=True, generated_tokens=4)
    out["candidates"][1].update(num_tokens=4, generated_tokens=4)
    body = openai_completion("text_completion", "cappy", [out], 3, None)
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length", "stop"]


def test_pieces_join_back_exactly():
    for text in ["", " a  b\n c ", "one", "\n\n", "a\tb  "]:
        assert "".join(pieces(text)) == text and all(pieces(text)) or text == ""


async def _collect(events, limit=10_000):
    out = []
    async for e in events:
        out.append(e)
        if len(out) >= limit:
            break
    return out


def _data(events):
    return [json.loads(e[len("data: "):]) for e in events if e.startswith("data: {")]


def test_stream_sends_role_keepalives_content_finish_usage_and_done():
    out = _out([("Paris is", 0.9), ("Lyon", 0.1)])

    async def work():
        await asyncio.sleep(0.25)
        return [out], None

    events = asyncio.run(_collect(openai_events("chat.completion", "cappy", work, 1, 1, True, 0.05)))
    assert events[-1] == "data: [DONE]\n\n" and all(e.endswith("\n\n") for e in events)
    first, *_ = _data(events)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                          "content": ""}
    assert events.count(KEEPALIVE) >= 2 and events.index(KEEPALIVE) == 1  # after the role chunk, while it works
    chunks = _data(events)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == "Paris is"
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["cappy"]["candidate"] == 0
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert len({c["id"] for c in chunks}) == 1


def test_stream_reports_a_late_error_as_an_event():
    from fastapi import HTTPException

    async def work():
        raise HTTPException(503, detail="generator did not answer within 1 s")

    events = asyncio.run(_collect(openai_events("text_completion", "cappy", work, 1, 1, False, 1.0)))
    (err,) = _data(events)
    assert err["error"]["type"] == "server_error" and "did not answer" in err["error"]["message"]
    assert "data: [DONE]\n\n" not in events


def test_a_client_that_leaves_cancels_the_work():
    cancelled = []

    async def work():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main():
        events = openai_events("chat.completion", "cappy", work, 1, 1, False, 0.05)
        assert (await events.__anext__()).startswith("data: ")  # the role chunk
        assert await events.__anext__() == KEEPALIVE
        await events.aclose()  # what Starlette does when the client disconnects

    asyncio.run(asyncio.wait_for(main(), 5))
    assert cancelled == [True]
