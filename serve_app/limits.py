"""The ingress's configurable bounds on a request (``IngressArgs``: longest instruction, most
responses, most candidates, ...), checked cheapest first and before any work, each a 422 naming the
field. The fixed bounds are api.py's, checked while the body is parsed; these come from the app's
args, so they are checked once the deployment knows them."""

from __future__ import annotations

from cappy_core.generation import candidates_per_instruction, decoding_plan
from serve_app.api import SelectRequest
from serve_app.args import IngressArgs
from serve_app.errors import field_error


def check_instruction(instruction: str, lim: IngressArgs) -> None:
    most = lim.max_instruction_chars
    if len(instruction) > most:
        raise field_error("instruction", f"instruction has {len(instruction)} characters; the limit is {most}",
                          "string_too_long")


def check_texts(instruction: str, field: str, texts: list[str], most: int, lim: IngressArgs) -> None:
    """The instruction, and at most ``most`` texts (responses or choices), none too long."""
    check_instruction(instruction, lim)
    if len(texts) > most:
        raise field_error(field, f"{len(texts)} {field} given; the limit is {most}", "too_long")
    longest = lim.max_response_chars
    for i, t in enumerate(texts):
        if len(t) > longest:
            raise field_error(field, f"{field}[{i}] has {len(t)} characters; the limit is {longest}",
                              "string_too_long")


def plan_select(req: SelectRequest, lim: IngressArgs) -> tuple:
    """The decoding specs of a /v1/select request, after every bound is checked, cheapest first
    and before any work. Raises a 422 naming the field."""
    check_instruction(req.instruction, lim)
    if req.decodings is not None and len(req.decodings) > lim.max_decodings:
        raise field_error("decodings", f"{len(req.decodings)} decodings given; the limit is {lim.max_decodings}",
                          "too_long")
    for field in ("num_candidates", "num_samples"):
        value = getattr(req, field)
        if value is not None and value > lim.max_candidates:
            raise field_error(field, f"{field}={value}; the limit is {lim.max_candidates} candidates",
                              "less_than_equal")
    if req.max_new_tokens is not None and req.max_new_tokens > lim.max_new_tokens:
        raise field_error("max_new_tokens", f"max_new_tokens={req.max_new_tokens}; the limit is "
                          f"{lim.max_new_tokens}", "less_than_equal")
    try:
        specs = decoding_plan(req.decodings, req.num_samples, req.num_candidates,
                              lim.default_decodings, lim.default_num_samples)
    except ValueError as e:
        raise field_error("num_candidates" if req.num_candidates else "decodings", str(e)) from None
    n = candidates_per_instruction(specs)
    if n > lim.max_candidates:
        field = "num_candidates" if req.num_candidates else ("num_samples" if req.num_samples else "decodings")
        raise field_error(field, f"this request asks for {n} candidates; the limit is {lim.max_candidates}",
                          "too_long")
    return specs
