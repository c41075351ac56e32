"""Phase ``chat`` (4 of the docstring's list): ``--chat-concurrency`` clients, each sending a
/v1/select request and its /v1/chat/completions twin back to back (the instruction as one user
message, ``n`` = ``num_candidates`` = ``--chat-candidates``, the same ``max_tokens`` and seed: the
same candidates when the generator's tokenizer has no chat template). Targets: every request 200,
chat p50 ≤ ``--chat-max-latency-ratio`` (1.10) × select p50, and (no chat template) every twin
picks the same text."""

from __future__ import annotations

import asyncio
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
    """The same instructions, candidates (``num_candidates`` = ``n``, same seed, same decoding plan)
    and scorer through /v1/select and /v1/chat/completions (one user message: the same prompt when
    the generator has no chat template). ``--chat-concurrency`` clients each send a /v1/select and
    its chat twin back to back (alternating which goes first), so both kinds see the same load.
    Reported: p50/p99 of each, chat p50 ÷ select p50, and how many twins picked the same text."""
    import aiohttp

    c, n, m, seed = cfg.chat_concurrency, cfg.chat_candidates, cfg.select_max_new_tokens, cfg.seed
    twins = [({"instruction": i, "num_candidates": n, "max_new_tokens": m, "seed": seed},
              {"model": "cappy", "messages": [{"role": "user", "content": i}], "n": n, "max_tokens": m,
               "seed": seed}) for i in instructions]
    records: list[tuple] = []  # (kind, (client, round), start, end, status, body)

    async def scenario():
        stop_at = time.monotonic() + cfg.chat_duration_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180),
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            async def client(k: int):
                j = k
                while time.monotonic() < stop_at:
                    select, chat = twins[j % len(twins)]
                    order = [("select", "/v1/select", select), ("chat", "/v1/chat/completions", chat)]
                    for kind, path, body in (order if j % 2 == 0 else order[::-1]):
                        t0 = time.monotonic()
                        status, payload, _ = await post_once(session, url + path, body)
                        records.append((kind, (k, j), t0, time.monotonic(), status, payload))
                    j += c
            await asyncio.gather(*(client(k) for k in range(c)))

    asyncio.run(scenario())
    out = chat_summary(records, c, chat_template)
    log(f"chat c={c}: p50 chat {out['chat']['p50_ms']} ms vs select {out['select']['p50_ms']} ms (ratio "
        f"{out['p50_ratio_chat_vs_select']}); same pick {out['twins_same_pick']}/{out['twins_answered']}")
    return out


def chat_summary(records: list[tuple], concurrency: int, chat_template: bool) -> dict:
    """Figures of :func:`chat_phase` from its records ``(kind, twin key, start, end, status, body)``."""
    picks: dict[tuple, dict] = {}
    for kind, key, _, _, status, body in records:
        if status == 200 and isinstance(body, dict):
            text = body["response"] if kind == "select" else body["choices"][0]["message"]["content"]
            picks.setdefault(key, {})[kind] = text
    both = [p for p in picks.values() if len(p) == 2]
    out: dict = {"concurrency": concurrency, "chat_template": chat_template}
    for kind in ("select", "chat"):
        rs = [r for r in records if r[0] == kind]
        ok = [(r[2], r[3]) for r in rs if r[4] == 200]
        out[kind] = {"requests": len(rs), "ok": len(ok), "p50_ms": latency_ms(ok, 0.5), "p99_ms": latency_ms(ok, 0.99)}
    sel, chat = out["select"]["p50_ms"], out["chat"]["p50_ms"]
    out["p50_ratio_chat_vs_select"] = round(chat / sel, 3) if sel and chat else None
    out["twins_answered"] = len(both)
    out["twins_same_pick"] = sum(1 for p in both if p["select"] == p["chat"])
    return out
