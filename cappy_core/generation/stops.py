"""Stop strings, as OpenAI's ``stop`` means them: a candidate ends where the first of them begins,
the stop string itself left out. Applied to every candidate *before* selection, so the scorer and
the fused selector's log-likelihood read the text a client would get.

A cut candidate keeps the count of tokens it cost (``generated_tokens``) and gets its
log-likelihood again from the generator (:meth:`Generator.token_logprobs` of the kept text, no
end-of-sequence token: the stop string ended it; an empty text counts the end-of-sequence token
alone, the model's probability of stopping at once).

Tested in ``tests/core/test_generation.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from cappy_core.generation.base import Candidate

MAX_STOPS = 4  # OpenAI's bound
MAX_STOP_CHARS = 64


def check_stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (a single string is one stop); at most
    :data:`MAX_STOPS`, each at most :data:`MAX_STOP_CHARS` characters."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > MAX_STOPS:
        raise ValueError(f"stop: at most {MAX_STOPS} stop sequences, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError("stop: every stop sequence must be a non-empty string")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop: a stop sequence has at most {MAX_STOP_CHARS} characters")
    return stops


def stop_at(text: str, stops: Sequence[str]) -> int | None:
    """Where ``text`` ends under ``stops``: the index of the earliest stop string, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


@dataclasses.dataclass(frozen=True)
class StopCut:
    """A candidate that a stop string cut: its position, and the text kept."""

    index: int
    text: str


def stop_cuts(candidates: Sequence[Candidate], stops: Sequence[str]) -> list[StopCut]:
    """The candidates ``stops`` cut, in order."""
    cuts = []
    for i, c in enumerate(candidates):
        at = stop_at(c.text, stops)
        if at is not None:
            cuts.append(StopCut(i, c.text[:at]))
    return cuts


def rescore_request(cuts: Sequence[StopCut]) -> tuple[list[str], list[bool]]:
    """What to hand :meth:`Generator.token_logprobs` for ``cuts``: texts and their ``add_eos``
    (an empty text is scored as stopping at once, by its end-of-sequence token)."""
    return [c.text for c in cuts], [not c.text for c in cuts]


def apply_cuts(candidates: Sequence[Candidate], cuts: Sequence[StopCut],
               token_logprobs: Sequence[Sequence[tuple[int, float]]]) -> list[dict]:
    """Every candidate as a dict (:class:`Candidate`'s fields, plus ``generated_tokens``, the
    tokens it cost, and ``stopped``: a stop string ended it), the cut ones with their kept text,
    its tokens and its log-likelihood (``token_logprobs``: one list per cut, from the generator)."""
    out = [dict(dataclasses.asdict(c), generated_tokens=c.num_tokens, stopped=False) for c in candidates]
    for cut, lps in zip(cuts, token_logprobs):
        n = len(lps)
        total = float(sum(lp for _, lp in lps))
        out[cut.index].update(text=cut.text, num_tokens=n, logprob_sum=total, token_ids=[t for t, _ in lps],
                              logprob_mean=total / n if n else 0.0, stopped=True)
    return out
