"""``stream: true`` on the OpenAI routes: Server-Sent Events in OpenAI's chunk format.

Candidates are scored once all are generated, so the text cannot stream token by token as it is
generated; what streams is the wait and then the answer:

1. chat only: a role chunk per choice (``delta: {"role": "assistant", "content": ""}``), at once;
2. while candidates generate and are scored, an SSE comment line (``: keep-alive``) every
   ``stream_keepalive_s``, so proxies and clients keep the connection open;
3. each choice's text as content chunks (a word at a time; one chunk carrying every token's
   log-probability when ``logprobs`` is asked for), then its finish chunk with ``finish_reason``
   and the choice's ``cappy`` extension;
4. with ``stream_options.include_usage``, a last chunk with no choices and the ``usage``;
5. ``data: [DONE]``.

An error after the first byte (a generator that fails or times out) is one event
``data: {"error": {...}}`` in OpenAI's shape, as OpenAI's own streams report it, and the stream
ends. A client that disconnects cancels the work: Serve cancels the request, and the cancellation
reaches the Generator's call (an async engine aborts its requests).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import AsyncIterator, Awaitable, Callable

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from serve_app.openai_format import (OpenAIError, chosen, finish_reason, openai_choices, openai_logprobs,
                                     openai_select_error, openai_usage, response_id)

KEEPALIVE = ": keep-alive\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def pieces(text: str) -> list[str]:
    """``text`` in word-sized pieces that join back to it exactly."""
    parts = re.findall(r"\s*\S+", text)
    rest = text[len("".join(parts)):]
    if rest or not parts:
        parts.append(rest)
    return parts


def _chunk(kind: str, cid: str, created: int, model: str, choices: list[dict], **extra) -> dict:
    return {"id": cid, "object": kind + (".chunk" if kind.startswith("chat") else ""), "created": created,
            "model": model, "system_fingerprint": None, "choices": choices, **extra}


def _choice(kind: str, index: int, text: str | None, *, role: bool = False, logprobs=None, finish=None) -> dict:
    if kind.startswith("chat"):
        delta = {} if text is None else {"content": text}
        if role:
            delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}


def answer_chunks(kind: str, cid: str, created: int, model: str, outs: list[dict], n: int,
                  logprobs: list[list] | None) -> list[dict]:
    """Steps 3 and 4's chunks (but usage) for generate-then-select results, choice by choice."""
    chunks = []
    finished = openai_choices(kind, outs, n, logprobs)
    at = 0
    for p, out in enumerate(outs):
        for k, best in enumerate(chosen(out, n)):
            cand, done = out["candidates"][best], finished[at]
            at += 1
            index = p * n + k
            if logprobs:
                texts = [(cand["text"], openai_logprobs(kind, logprobs[p][k]))]
            else:
                texts = [(piece, None) for piece in pieces(cand["text"])]
            chunks += [_chunk(kind, cid, created, model, [_choice(kind, index, t, logprobs=lp)]) for t, lp in texts]
            last = _choice(kind, index, None if kind.startswith("chat") else "",
                           finish=finish_reason(cand, out["max_new_tokens"]))
            last["cappy"] = done["cappy"]
            chunks.append(_chunk(kind, cid, created, model, [last]))
    return chunks


def stream_error(e: BaseException, model: str) -> dict:
    """An error raised after streaming began, as OpenAI's ``{"error": {...}}``."""
    if isinstance(e, RequestValidationError):
        e = openai_select_error(e, model)
    if isinstance(e, OpenAIError):
        return {"error": {"message": e.detail, "type": e.type, "param": e.param, "code": e.code}}
    if isinstance(e, HTTPException):
        kind = "server_error" if e.status_code >= 500 else "invalid_request_error"
        return {"error": {"message": str(e.detail), "type": kind, "param": None, "code": str(e.status_code)}}
    return {"error": {"message": f"{type(e).__name__}", "type": "server_error", "param": None, "code": None}}


async def openai_events(kind: str, model: str, work: Callable[[], Awaitable[tuple[list[dict], list | None]]],
                        n: int, num_prompts: int, include_usage: bool, keepalive_s: float) -> AsyncIterator[str]:
    """The event stream of one request; ``work()`` runs generate-then-select and returns
    ``(outs, logprobs)``. Leaving early (the client went away) cancels it."""
    cid, created = response_id(kind), int(time.time())
    task = asyncio.ensure_future(work())
    try:
        if kind.startswith("chat"):
            for index in range(n * num_prompts):
                yield sse(_chunk(kind, cid, created, model, [_choice(kind, index, None, role=True)]))
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=keepalive_s)
            if not done:
                yield KEEPALIVE
        try:
            outs, logprobs = task.result()
        except Exception as e:  # noqa: BLE001 - the status line is gone: the error is an event
            yield sse(stream_error(e, model))
            return
        for chunk in answer_chunks(kind, cid, created, model, outs, n, logprobs):
            yield sse(chunk)
        if include_usage:
            yield sse(_chunk(kind, cid, created, model, [], usage=openai_usage(outs)))
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
