"""Transformers' beam search, one step at a time and backend-free, so that the transformers loop
and the vLLM backend's one-token requests pick the same beams. Tested in ``tests/core/test_generation.py``."""

from __future__ import annotations


def beam_width(num_beams: int, num_eos: int) -> int:
    """Candidates kept per step: transformers' ``max(2, 1 + number of EOS ids) * num_beams``."""
    return max(2, 1 + num_eos) * num_beams


def beam_search_step(step: int, cands: dict[int, list[tuple]], running: list[list[tuple]],
                     finished: list[list[tuple]], num_beams: int, eos: set[int], length_penalty: float,
                     last: bool) -> list[int]:
    """One step of transformers' beam search (``early_stopping=False``), backend-free.

    ``cands[i]``: the extensions of prompt ``i``'s running beams, ``(logprob sum, ids, *extra)``
    (``extra`` is the backend's, e.g. the batch row a beam came from). Keeps the best
    ``beam_width`` of them: those that end (an EOS id, or ``last``) join ``finished[i]`` as
    ``(sum / length ** length_penalty, ids, sum)`` (best ``num_beams`` kept), the best
    ``num_beams`` others become ``running[i]`` as ``(ids, sum, *extra)``. Returns the prompts
    still searching: transformers stops a prompt once its best running beam, scored at the
    current length, cannot beat its worst kept hypothesis.
    """
    still = []
    for i, options in cands.items():
        top = sorted(options, key=lambda c: -c[0])[:beam_width(num_beams, len(eos))]
        for s, ids, *_ in top[:num_beams]:
            if last or ids[-1] in eos:
                finished[i].append((s / (step + 1) ** length_penalty, ids, s))
        finished[i] = sorted(finished[i], key=lambda f: -f[0])[:num_beams]
        running[i] = [(ids, s, *extra) for s, ids, *extra in top if ids[-1] not in eos][:num_beams]
        full = len(finished[i]) == num_beams
        if not last and running[i] and not (full and running[i][0][1] / (step + 1) ** length_penalty
                                            <= finished[i][-1][0]):
            still.append(i)
    return still
