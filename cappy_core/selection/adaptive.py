"""The adaptive rule's two halves that serve shares with the cost curve (no torch here: the
ingress imports it): which candidates each round generates (:func:`adaptive_rounds`) and the
fused margin that stops it (:func:`margin`). The rule itself, fitted and graded on a sweep's
tables: :mod:`cappy_core.selection.cost_curve`. Tested in ``tests/core/test_cost_curve.py`` and,
served, in ``tests/serve/test_serve_app.py``."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from cappy_core.generation.decoding import DecodingSpec

#: The rounds' (and the cost curve's) candidate counts (the paper's 17 last).
COUNTS = (1, 2, 4, 8, 17)


def adaptive_rounds(specs: Sequence[DecodingSpec], counts: Sequence[int] = COUNTS) -> list[list[DecodingSpec]]:
    """What the adaptive rule generates in each round, for a request's decodings: their candidates
    in generation order (by sample index, then the request's decoding order: for the paper's 17,
    beam4 then one sample of each sampling decoding in turn, as :func:`generation_order`), cut at
    ``counts`` (capped at the total), each round's part as specs of its own
    (``DecodingSpec.first_sample``: a sample is the same candidate whichever round draws it)."""
    order = sorted(((j, s) for s, d in enumerate(specs) for j in range(d.first_sample, d.first_sample + d.num_samples)))
    cuts = sorted({min(k, len(order)) for k in counts} | {len(order)})
    out, start = [], 0
    for end in cuts:
        part: dict[int, list[int]] = {}
        for j, s in order[start:end]:
            part.setdefault(s, []).append(j)
        out.append([dataclasses.replace(specs[s], num_samples=len(js), first_sample=js[0])
                    for s, js in sorted(part.items())])
        start = end
    return [r for r in out if r]


def margin(fused: Sequence[float], weights: Mapping[str, float]) -> float:
    """The fused value's best minus second-best, per unit of weight (``fused / Σ weights``: a
    weighted mean of the signals' within-instruction z-scores). Not divided by the fused value's
    own spread: with two candidates that would always be 2; this way it is 2 only when every
    signal prefers the same one, and less as they disagree."""
    v = np.sort(np.asarray(fused, dtype=np.float64))[::-1]
    total = sum(abs(w) for w in weights.values())
    return 0.0 if len(v) < 2 or total == 0 else float((v[0] - v[1]) / total)
