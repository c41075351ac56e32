"""Which candidates an OpenAI request gets: ``best_of``, ``n``, ``temperature`` and ``top_p`` as a
tuple of :class:`~cappy_core.generation.DecodingSpec`, every bound checked before any work.

* Neither ``temperature`` nor ``top_p``: the app's decoding plan with ``best_of`` candidates spread
  over it, as ``/v1/select``'s ``num_candidates`` (17 = the paper's beam4 + 4 × 4 samples).
* ``temperature: 0`` (or ``top_p: 0``): deterministic decodings only: greedy, then the plan's beam
  search, then beam search with the other widths (2..8), so at most 8 distinct candidates.
* Otherwise: the plan's beam search once, and ``best_of - 1`` samples at that temperature and
  nucleus (one sample alone when ``best_of`` is 1).

``best_of`` defaults to the plan's own count (2 at temperature 0), and to ``n`` when ``n`` is
larger.
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError

from cappy_core.generation import (MAX_BEAMS, DecodingSpec, candidates_per_instruction, decoding_plan,
                                   decodings_from_names)
from serve_app.args import IngressArgs
from serve_app.limits import check_instruction
from serve_app.openai_format import OpenAIError


def _bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code="invalid_value")


def deterministic_names(default_names: list[str]) -> list[str]:
    """Greedy, the plan's beam searches, then every other beam width up to :data:`MAX_BEAMS`."""
    specs = decodings_from_names(default_names, 1)
    beams = [d.num_beams for d in specs if d.kind == "beam"]
    beams += [k for k in range(2, MAX_BEAMS + 1) if k not in beams]
    return ["greedy"] + [f"beam{k}" for k in beams]


def plan_openai(req, lim: IngressArgs) -> tuple[DecodingSpec, ...]:
    """The decodings of an OpenAI request (``n``, ``best_of``, ``temperature``, ``top_p``,
    ``max_tokens``/``max_completion_tokens``), or a 400 naming the parameter at fault."""
    new = req.new_tokens()
    if new is not None and new > lim.max_new_tokens:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise _bad(param, f"{new} is over this endpoint's limit of {lim.max_new_tokens}")
    greedy_only = req.temperature == 0 or req.top_p == 0
    if greedy_only:
        names = deterministic_names(lim.default_decodings)
        default = 2
    else:
        default = candidates_per_instruction(decoding_plan(None, None, None, lim.default_decodings,
                                                           lim.default_num_samples))
    best_of = req.best_of if req.best_of is not None else max(default, req.n)
    if req.n > best_of:
        raise _bad("n", f"n={req.n} choices cannot come from best_of={best_of} candidates: need n <= best_of")
    if best_of > lim.max_candidates:
        param = "best_of" if req.best_of is not None else "n"
        raise _bad(param, f"{best_of} candidates asked for; the limit is {lim.max_candidates}")
    if greedy_only:
        if best_of > len(names):
            raise _bad("best_of", f"best_of={best_of} at temperature 0: greedy and beam search give at most "
                       f"{len(names)} distinct candidates ({', '.join(names)})")
        return decodings_from_names(names[:best_of], 1)
    if req.temperature is None and req.top_p is None:
        return decoding_plan(None, None, best_of, lim.default_decodings, lim.default_num_samples)
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    name = "-".join([f"temp{temperature:g}"] * (req.temperature is not None) + [f"topp{top_p:g}"] * (req.top_p is not None))
    fixed = [d for d in decodings_from_names(lim.default_decodings, 1) if d.kind != "sample"][:1 if best_of > 1 else 0]
    sampled = DecodingSpec(name, "sample", best_of - len(fixed), temperature=temperature, top_p=top_p)
    return (*fixed, sampled)


def check_prompts(instructions: list[str], lim: IngressArgs, param: str) -> None:
    """Every prompt within ``max_instruction_chars`` (a 400 naming ``param``)."""
    for text in instructions:
        try:
            check_instruction(text, lim)
        except RequestValidationError as e:
            raise _bad(param, e.errors()[0]["msg"]) from None
