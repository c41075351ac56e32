"""What the OpenAI routes do with a checked request: the same generate-then-select as
``/v1/select`` for each prompt (sent together, so the Generator batches them), the top ``n``
candidates as choices, the chosen texts' token log-probabilities when asked for, and the answer
as one JSON object or as Server-Sent Events (:mod:`serve_app.openai_stream`).

Parameters: :mod:`serve_app.openai_api`; candidates per request: :mod:`serve_app.openai_plan`;
the objects returned: :mod:`serve_app.openai_format`.
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from cappy_core.generation import gather_or_cancel
from cappy_core.generation.prompts import plain_chat
from serve_app.openai_api import ChatCompletionRequest, CompletionRequest
from serve_app.openai_format import OpenAIError, chosen, openai_completion, openai_model_task, openai_select_error
from serve_app.openai_plan import check_prompts, plan_openai
from serve_app.openai_stream import openai_events

CHAT, COMPLETION = "chat.completion", "text_completion"
ROUTES = {CHAT: "/v1/chat/completions", COMPLETION: "/v1/completions"}


async def openai_answer(ingress, req: ChatCompletionRequest | CompletionRequest, kind: str):
    """The response to a validated OpenAI request (``ingress``: the Ingress deployment, whose
    ``generate_select``, ``token_logprobs`` and ``limits`` it uses)."""
    task = openai_model_task(req.model)
    if kind == CHAT:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        instructions, prompts, param = [plain_chat(messages)], [messages], "messages"
    else:
        instructions = req.prompts()
        prompts, param = [None] * len(instructions), "prompt"
    check_prompts(instructions, ingress.limits, param)
    specs = plan_openai(req, ingress.limits)
    if req.stream and req.return_candidates:
        raise OpenAIError(400, "return_candidates: not available with stream=true", param="return_candidates",
                          code="unsupported_value")

    async def work():
        try:
            outs = await gather_or_cancel([
                ingress.generate_select(text, specs, req.new_tokens(), req.seed, task, prompt=prompt,
                                        stop=req.stops(), route=ROUTES[kind], adaptive=req.adaptive)
                for text, prompt in zip(instructions, prompts)])
        except RequestValidationError as e:
            raise openai_select_error(e, req.model) from None
        logprobs = None
        if req.wants_logprobs():
            logprobs = await gather_or_cancel([
                gather_or_cancel([ingress.token_logprobs(prompt or text, out["candidates"][best]["token_ids"])
                                  for best in chosen(out, req.n)])
                for text, prompt, out in zip(instructions, prompts, outs)])
        return outs, logprobs

    if req.stream:
        events = openai_events(kind, req.model, work, req.n, len(instructions), req.include_usage(),
                               ingress.limits.stream_keepalive_s)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    outs, logprobs = await work()
    candidates = ([[c.model_dump(exclude_none=True) for c in ingress.candidates(out)] for out in outs]
                  if req.return_candidates else None)
    return openai_completion(kind, req.model, outs, req.n, candidates, logprobs)
