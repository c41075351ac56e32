"""Phase ``chat`` (4 of the docstring's list): ``--chat-concurrency`` clients, each sending a
/v1/select request, its /v1/chat/completions twin and (``--chat-stream``) the same chat request
with ``stream: true``, back to back (the instruction as one user message, ``best_of`` =
``num_candidates`` = ``--chat-candidates``, the same ``max_tokens`` and seed: the same candidates
when the generator's tokenizer has no chat template). Targets: every request 200, chat p50 ≤
``--chat-max-latency-ratio`` (1.10) × select p50, (no chat template) every twin picks the same
text, and every stream ends in ``[DONE]`` with the plain chat's text. Reported for streams: time
to the first content chunk and to ``[DONE]``, against the plain chat's latency."""

from __future__ import annotations

import asyncio
import json
import time

from jobs.bench.serve.client import latency_ms, post_once
from jobs.bench.serve.config import log


def has_chat_template(generator: str) -> bool:
    """Whether the generator's tokenizer has a chat template (then chat messages reach it templated,
    so /v1/chat/completions and /v1/select do not see the same prompt)."""
    from transformers import AutoTokenizer

    try:
        return bool(getattr(AutoTokenizer.from_pretrained(generator), "chat_template", None))
    except Exception as e:  # noqa: BLE001 - a hub id offline, say: unknown, reported as such
        log(f"chat: could not read the generator's tokenizer ({type(e).__name__}); assuming no chat template")
        return False


def chat_phase(cfg, url, instructions: list[str], chat_template: bool) -> dict:
    """The same instructions, candidates (``num_candidates`` = ``best_of``, same seed, same decoding plan)
    and scorer through /v1/select and /v1/chat/completions (one user message: the same prompt when
    the generator has no chat template). ``--chat-concurrency`` clients each send a /v1/select and
    its chat twin back to back (alternating which goes first), so both kinds see the same load.
    Reported: p50/p99 of each, chat p50 ÷ select p50, and how many twins picked the same text."""
    import aiohttp

    c, n, m, seed = cfg.chat_concurrency, cfg.chat_candidates, cfg.select_max_new_tokens, cfg.seed
    twins = [({"instruction": i, "num_candidates": n, "max_new_tokens": m, "seed": seed},
              {"model": "cappy", "messages": [{"role": "user", "content": i}], "best_of": n, "max_tokens": m,
               "seed": seed}) for i in instructions]
    records: list[tuple] = []  # (kind, (client, round), start, end, status, body)
    firsts: list[float] = []  # streams: seconds to the first content chunk
    opened: list[float] = []  # streams: seconds to the first event (the role chunk)

    async def scenario():
        stop_at = time.monotonic() + cfg.chat_duration_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180),
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            async def client(k: int):
                j = k
                while time.monotonic() < stop_at:
                    select, chat = twins[j % len(twins)]
                    order = [("select", "/v1/select", select), ("chat", "/v1/chat/completions", chat)]
                    if cfg.chat_stream:
                        order.append(("stream", "/v1/chat/completions", dict(chat, stream=True)))
                    for kind, path, body in order[j % len(order):] + order[:j % len(order)]:
                        t0 = time.monotonic()
                        if kind == "stream":
                            status, payload, (event, first) = await stream_once(session, url + path, body)
                            if first is not None:
                                firsts.append(first - t0)
                            if event is not None:
                                opened.append(event - t0)
                        else:
                            status, payload, _ = await post_once(session, url + path, body)
                        records.append((kind, (k, j), t0, time.monotonic(), status, payload))
                    j += c
            await asyncio.gather(*(client(k) for k in range(c)))

    asyncio.run(scenario())
    out = chat_summary(records, c, chat_template, firsts, opened)
    log(f"chat c={c}: p50 chat {out['chat']['p50_ms']} ms vs select {out['select']['p50_ms']} ms (ratio "
        f"{out['p50_ratio_chat_vs_select']}); same pick {out['twins_same_pick']}/{out['twins_answered']}")
    if cfg.chat_stream:
        log(f"chat c={c} streamed: first event p50 {out['stream']['first_event_p50_ms']} ms, "
            f"first content chunk p50 {out['stream']['first_content_p50_ms']} ms, [DONE] p50 "
            f"{out['stream']['p50_ms']} ms, vs plain chat p50 {out['chat']['p50_ms']} ms; same text as plain "
            f"{out['stream_same_text']}/{out['stream_twins']}")
    return out


async def stream_once(session, url: str, body: dict) -> tuple[int, object, tuple[float | None, float | None]]:
    """``(status, the streamed text (or the error), (monotonic time of the first event, of the
    first content chunk))`` of one streamed chat request; the text is None when the stream did
    not end in ``[DONE]``."""
    event, first, parts, done = None, None, [], False
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                return r.status, await r.text(), (None, None)
            async for raw in r.content:
                line = raw.decode().strip()
                event = event or (time.monotonic() if line.startswith("data: ") else None)
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        return 500, chunk["error"], (event, first)
                    for choice in chunk.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            first = first or time.monotonic()
                            parts.append(piece)
        return 200, "".join(parts) if done else None, (event, first)
    except Exception as e:  # noqa: BLE001 - what the client saw
        return 0, f"{type(e).__name__}: {e}", (event, first)


def chat_summary(records: list[tuple], concurrency: int, chat_template: bool, firsts: list[float] = (),
                 opened: list[float] = ()) -> dict:
    """Figures of :func:`chat_phase` from its records ``(kind, twin key, start, end, status, body)``
    and the streams' seconds to their first content chunk and to their first event."""
    picks: dict[tuple, dict] = {}
    for kind, key, _, _, status, body in records:
        if status == 200 and kind == "stream":
            picks.setdefault(key, {})[kind] = body
        elif status == 200 and isinstance(body, dict):
            text = body["response"] if kind == "select" else body["choices"][0]["message"]["content"]
            picks.setdefault(key, {})[kind] = text
    both = [p for p in picks.values() if "select" in p and "chat" in p]
    streamed = [p for p in picks.values() if "stream" in p and "chat" in p]
    out: dict = {"concurrency": concurrency, "chat_template": chat_template}
    for kind in ("select", "chat", "stream"):
        rs = [r for r in records if r[0] == kind]
        ok = [(r[2], r[3]) for r in rs if r[4] == 200 and r[5] is not None]
        out[kind] = {"requests": len(rs), "ok": len(ok), "p50_ms": latency_ms(ok, 0.5), "p99_ms": latency_ms(ok, 0.99)}
    out["stream"]["first_content_p50_ms"] = latency_ms([(0.0, x) for x in firsts], 0.5)
    out["stream"]["first_content_p99_ms"] = latency_ms([(0.0, x) for x in firsts], 0.99)
    out["stream"]["first_event_p50_ms"] = latency_ms([(0.0, x) for x in opened], 0.5)
    chat_p50, first = out["chat"]["p50_ms"], out["stream"]["first_content_p50_ms"]
    out["stream"]["first_content_vs_chat_p50"] = round(first / chat_p50, 3) if first and chat_p50 else None
    out["stream_twins"] = len(streamed)
    out["stream_same_text"] = sum(1 for p in streamed if p["stream"] == p["chat"])
    sel, chat = out["select"]["p50_ms"], out["chat"]["p50_ms"]
    out["p50_ratio_chat_vs_select"] = round(chat / sel, 3) if sel and chat else None
    out["twins_answered"] = len(both)
    out["twins_same_pick"] = sum(1 for p in both if p["select"] == p["chat"])
    return out
