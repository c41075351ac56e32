"""The request pairs every phase sends: BIG-Bench validation instructions with references of the
same task as responses when the tasks are on this machine, else synthetic text of similar length."""

from __future__ import annotations

import random

from jobs.bench.serve.config import log


def bench_requests(n: int, k: int, seed: int) -> tuple[list[tuple[str, list[str]]], str]:
    """``n`` (instruction, k responses) pairs and where they came from."""
    rng = random.Random(seed)
    try:
        from cappy_core.data.catalog import TaskCatalog

        catalog = TaskCatalog.open()
        out = []
        for task in ("tense", "rephrase", "simple_text_editing", "word_sorting"):
            val = [e for e in catalog.load(task)["validation"] if e.references]
            refs = [r for e in val for r in e.references]
            for e in val[: n // 4 + 1]:
                others = rng.sample(refs, min(k - 1, len(refs)))
                out.append((e.instruction, ([e.references[0]] + others + others * k)[:k]))
        rng.shuffle(out)
        return out[:n], "bigbench validation (tense, rephrase, simple_text_editing, word_sorting)"
    except Exception as e:  # noqa: BLE001 - no cache: synthetic text of similar length
        log(f"BIG-Bench not usable ({type(e).__name__}); synthetic pairs")
    words = "the a of to and in is that for it as with was on be by this are from at or an".split()
    text = lambda m: " ".join(rng.choice(words) for _ in range(m))  # noqa: E731
    return [(f"Q: {text(40)}?\nA:", [text(rng.randint(3, 20)) for _ in range(k)]) for _ in range(n)], "synthetic"
