"""``Ingress`` deployment: the FastAPI front of generate-then-select.

Routes (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

- ``POST /v1/select``: generate candidates (``Generator``), score them (``Scorer``), return the
  one the scorer ranks highest (ties: the first in decoding order), optionally all of them.
- ``POST /v1/score``: raw scores of given responses.
- ``POST /v1/classify``: the highest-scoring answer choice.
- ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``: OpenAI-compatible,
  the same generate-then-select (``n`` = candidates generated, the one choice = the pick,
  ``model`` = ``cappy`` or ``cappy:<task>``, Cappy's score in the extra ``cappy`` field); errors in
  OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (400 invalid input or
  ``stream=true``, 404 unknown model, 503 unavailable).
- ``GET /healthz``: 200 while the ingress runs; ``?deep=true`` also asks both deployments.

Errors: a body over ``max_body_bytes`` → 413; invalid or over-limit fields → 422 whose
``detail[].loc`` and ``message`` name the field; a generator or scorer that fails, times out or
is unavailable → 503 with the reason (and ``Retry-After``); a generate-then-select request over
``max_generating`` in this replica → 503 at once (:class:`GenerateAdmission`). Every call to another deployment has
a deadline (``generate_timeout_s`` / ``score_timeout_s``), so no request hangs. A call whose
replica died while serving it is not sent again (it may be what killed it): a 503. A call routed
to a replica that was already dead never ran there: Serve's router itself re-routes it to a live
replica or the replacement (see :data:`RETRYABLE`), so the client sees nothing.
Route handlers only validate and delegate: scoring is ``cappy_core.scorer``, generation is
``cappy_core.generation``, the pick is :func:`cappy_core.scorer.select_best`.
"""

# No `from __future__ import annotations` here: FastAPI must see the route parameters' real
# classes, and Serve's ingress re-binds the methods outside this module's globals.
import asyncio
import logging
import re
import time
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app.api import (CandidateOut, ChatCompletionRequest, ClassifyRequest, ClassifyResponse,
                           CompletionRequest, Health, RequestError, ScoreMeta, ScoreRequest, ScoreResponse,
                           SelectRequest, SelectResponse, plain_chat)
from serve_app.scorer import UnknownTaskError

logger = logging.getLogger("ray.serve")
DEFAULT_MAX_BODY_BYTES = 1_000_000

app = FastAPI(
    title="Cappy on Ray",
    version="0.1.0",
    description="Generate candidates with an LLM and pick the best with a Cappy scorer "
                "(a small (instruction, response) → correctness regressor).",
)
app.state.max_body_bytes = DEFAULT_MAX_BODY_BYTES


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, detail=f"request body is larger than {limit} bytes")


class BodySizeLimit:
    """ASGI middleware: 413 for a body over ``app.state.max_body_bytes``, by ``Content-Length``
    before anything is read, or by counting the bytes of a chunked body as it arrives."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(getattr(scope.get("app"), "state", None), "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            resp = JSONResponse({"detail": f"request body is larger than {limit} bytes"}, status_code=413)
            return await resp(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        return await self.app(scope, counted, send)


app.add_middleware(BodySizeLimit)

#: Routes that run the Generator (generate-then-select), admitted by :class:`GenerateAdmission`.
GENERATE_PATHS = ("/v1/select", "/v1/chat/completions", "/v1/completions")
app.state.generating = 0  # requests on GENERATE_PATHS in this replica now
app.state.max_generating = -1  # IngressArgs.max_generating, set by the deployment


class GenerateAdmission:
    """ASGI middleware: at most ``app.state.max_generating`` requests on ``GENERATE_PATHS`` in this
    replica at once (-1: no limit); one more is answered 503 with ``Retry-After`` before its body
    is read or anything is awaited. Under overload a refusal then costs no parsing, no validation
    and no trip through Serve's router to the Generator's full queue, which on a busy replica took
    seconds (the router thread shares the GIL with every admitted request)."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        state = getattr(scope.get("app"), "state", None)
        most = getattr(state, "max_generating", -1)
        if (scope["type"] != "http" or most < 0 or scope.get("method") != "POST"
                or not scope.get("path", "").rstrip("/").endswith(GENERATE_PATHS)):
            return await self.app(scope, receive, send)
        if state.generating >= most:
            from serve_app.args import RETRY_AFTER_S

            message = f"generator is overloaded ({most} requests are being served or queued); retry later"
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            if scope["path"].rstrip("/").endswith(OPENAI_PATHS):
                resp = openai_error(503, message, "server_error", None, "service_unavailable", headers)
            else:
                resp = JSONResponse({"detail": message}, status_code=503, headers=headers)
            return await resp(scope, receive, send)
        state.generating += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            state.generating -= 1


app.add_middleware(GenerateAdmission)  # added last: runs first, before the body is read


OPENAI_PATHS = ("/chat/completions", "/completions", "/models")
#: the /v1/select field a bound names → the OpenAI request field the client sent
_OPENAI_PARAM = {"num_candidates": "n", "max_new_tokens": "max_tokens"}


def _is_openai(request: Request) -> bool:
    return request.url.path.rstrip("/").endswith(OPENAI_PATHS)


class OpenAIError(HTTPException):
    """An error of the OpenAI routes, answered in OpenAI's shape:
    ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(status, detail=message, headers=headers)
        self.type, self.param, self.code = type, param, code


def openai_error(status: int, message: str, type: str, param: str | None, code: str | None,
                 headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = jsonable_encoder(exc.errors(), exclude={"input", "ctx", "url"})
    if _is_openai(request):  # OpenAI answers invalid input with 400 naming the parameter
        loc = [str(p) for p in (errors[0].get("loc") or ()) if p != "body"] if errors else []
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
                            f"{e.get('msg')}" for e in errors)
        return openai_error(400, message, "invalid_request_error", loc[0] if loc else None, "invalid_value")
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
    return JSONResponse({"detail": errors, "message": message}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    if isinstance(exc, OpenAIError):
        return openai_error(exc.status_code, exc.detail, exc.type, exc.param, exc.code, exc.headers)
    if _is_openai(request):
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        code = {503: "service_unavailable", 413: "request_too_large", 404: "not_found"}.get(exc.status_code)
        return openai_error(exc.status_code, str(exc.detail), kind, None, code, exc.headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def field_error(field: str, msg: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 for a body field, in FastAPI's own format."""
    return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": kind}])


class Unavailable(Exception):
    """A deployment did not answer: failed, timed out, overloaded or has no replica. → 503."""


#: Re-sent to another replica: only a call that never reached one. A replica that died while
#: serving a call (``RayActorError``) is not retried: the call may be what killed it.
#: Ray Serve 2.60 keeps the two apart itself: with strict ``max_ongoing_requests`` (the default
#: outside Ray Client) a replica first accepts or rejects a call before running it, and the router
#: (``AsyncioRouter._route_and_send_request_once``) catches ``ActorDiedError`` /
#: ``ActorUnavailableError`` at that step, drops the replica and routes the call again, inside
#: ``.remote()``; a replica that dies after accepting the call surfaces as ``ActorDiedError`` (a
#: ``RayActorError``) or ``ActorUnavailableError`` when the caller awaits the result: not retried.
#: ``ReplicaUnavailableError`` comes only from ``choose_replica``/``dispatch`` (a chosen replica
#: gone before dispatch: never sent), kept here should a handle raise it.
RETRYABLE = (ReplicaUnavailableError,)


async def call_with_deadline(make_call: Callable[[], Any], what: str, timeout_s: float, retries: int) -> Any:
    """Await ``make_call()`` (a ``DeploymentResponse``) within ``timeout_s`` in total.

    A call no replica received (``ReplicaUnavailableError``) is sent again, up to ``retries``
    times, inside the same deadline. A full queue (``BackPressureError``), timeouts, other
    failures and running out of retries raise :class:`Unavailable` with a reason (the full error
    goes to the log only); :class:`UnknownTaskError` and :class:`RequestError` (the caller's
    fault) pass through.
    """
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        response = make_call()
        try:
            return await asyncio.wait_for(_await(response), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            _cancel(response)
            raise Unavailable(f"{what} did not answer within {timeout_s:g} s") from None
        except (UnknownTaskError, RequestError):
            raise
        except BackPressureError:
            raise Unavailable(f"{what} is overloaded (its queue is full)") from None
        except RETRYABLE as e:
            attempt += 1
            if attempt > retries or time.monotonic() >= deadline:
                raise Unavailable(f"{what} replica unavailable ({_short(e)}); gave up after {attempt} attempt(s)") from e
            await asyncio.sleep(min(0.1 * attempt, max(0.0, deadline - time.monotonic())))
        except Exception as e:  # noqa: BLE001 - any other failure is the deployment's, reported as 503
            logger.warning("%s failed: %r", what, e)
            raise Unavailable(f"{what} failed: {_short(e)}") from e


async def _await(response: Awaitable) -> Any:
    return await response


def _cancel(response: Any) -> None:
    try:
        response.cancel()
    except Exception:  # noqa: BLE001 - best effort
        pass


# An absolute or home-relative filesystem path inside an error message: never sent to clients.
_PATH = re.compile(r"(?<![\w.:/])(?:~|\.{1,2})?/[^\s'\",:;)\]}]+")


def _short(e: BaseException, n: int = 300) -> str:
    """One line naming the failure for a client: its exception type and last message line, with
    filesystem paths replaced by ``<path>``."""
    cause = getattr(e, "cause", None)  # RayTaskError: the replica's own exception
    text = f"{type(cause or e).__name__}: {cause or e}"
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(e).__name__
    if not text.startswith(type(cause or e).__name__):
        text = f"{type(cause or e).__name__}: {text}"
    return _PATH.sub("<path>", text)[:n]


def _unavailable(e: Unavailable) -> HTTPException:
    from serve_app.args import RETRY_AFTER_S

    return HTTPException(503, detail=str(e), headers={"Retry-After": str(RETRY_AFTER_S)})


def openai_model_task(model: str) -> str | None:
    """The task an OpenAI ``model`` names: ``cappy`` → None (the pretrained scorer),
    ``cappy:<task>`` → that task's scorer; anything else is a 404 ``model_not_found``."""
    from serve_app.args import TASK_ID_PATTERN

    if model == "cappy":
        return None
    if model.startswith("cappy:") and re.fullmatch(TASK_ID_PATTERN.strip("^$"), model[len("cappy:"):]):
        return model[len("cappy:"):]
    raise OpenAIError(404, f"The model {model[:160]!r} does not exist: use 'cappy' or 'cappy:<task>' (GET /v1/models)",
                      param="model", code="model_not_found")


def plan_select(req: SelectRequest, lim: Any) -> tuple:
    """The decoding specs of a /v1/select request, after every bound is checked, cheapest first
    and before any work (``lim``: :class:`serve_app.args.IngressArgs`). Raises a 422 naming the
    field."""
    from cappy_core.generation import candidates_per_instruction, decoding_plan

    if len(req.instruction) > lim.max_instruction_chars:
        raise field_error("instruction", f"instruction has {len(req.instruction)} characters; the limit is "
                          f"{lim.max_instruction_chars}", "string_too_long")
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


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class IngressDeployment:
    def __init__(self, generator: DeploymentHandle, scorer: DeploymentHandle, limits: dict | None = None,
                 warnings: list[str] | None = None):
        from serve_app.args import IngressArgs

        self.generator = generator
        self.scorer = scorer
        self.limits = IngressArgs(**(limits or {}))
        app.state.max_body_bytes = self.limits.max_body_bytes
        app.state.max_generating = self.limits.max_generating
        self._gen_info: dict | None = None  # backend and model, asked once
        self.warnings = list(warnings or [])  # shown by /healthz

    # -- helpers -----------------------------------------------------------------------------

    def _check_instruction(self, instruction: str) -> None:
        most = self.limits.max_instruction_chars
        if len(instruction) > most:
            raise field_error("instruction", f"instruction has {len(instruction)} characters; the limit is {most}",
                              "string_too_long")

    def _check_texts(self, instruction: str, field: str, texts: list[str], most: int) -> None:
        self._check_instruction(instruction)
        if len(texts) > most:
            raise field_error(field, f"{len(texts)} {field} given; the limit is {most}", "too_long")
        longest = self.limits.max_response_chars
        for i, t in enumerate(texts):
            if len(t) > longest:
                raise field_error(field, f"{field}[{i}] has {len(t)} characters; the limit is {longest}",
                                  "string_too_long")

    async def _score(self, instruction: str, texts: list[str], task: str | None) -> dict:
        handle = self.scorer.options(multiplexed_model_id=task or "")
        try:
            return await call_with_deadline(lambda: handle.score.remote(instruction, texts), "scorer",
                                            self.limits.score_timeout_s, self.limits.retries)
        except UnknownTaskError as e:
            raise field_error("task", _short(getattr(e, "cause", None) or e).split(": ", 1)[-1]) from None
        except RequestError as e:
            raise field_error("responses", _short(getattr(e, "cause", None) or e).split(": ", 1)[-1]) from None
        except Unavailable as e:
            raise _unavailable(e) from None

    async def generate_select(self, instruction: str, specs: tuple, max_new_tokens: int | None, seed: int | None,
                              task: str | None, selector: str = "auto", prompt: list[dict] | None = None) -> dict:
        """Generate-then-select, the one path of /v1/select and the OpenAI routes: the candidates
        (dicts), their scores, the fused values (a task's stored selector, ``selector="auto"``),
        the pick's index, the scorer's meta, prompt tokens and timings. The generator reads
        ``prompt`` (chat messages) when given, else ``instruction``; the scorer reads ``instruction``."""
        from cappy_core.scorer import select_best

        t0 = time.monotonic()
        try:
            gen = await call_with_deadline(
                lambda: self.generator.generate.remote(prompt or instruction, specs, max_new_tokens, seed),
                "generator", self.limits.generate_timeout_s, self.limits.retries)
        except RequestError as e:
            raise field_error("body", _short(getattr(e, "cause", None) or e).split(": ", 1)[-1]) from None
        except Unavailable as e:
            raise _unavailable(e) from None
        cands = gen["candidates"]
        t1 = time.monotonic()
        result = await self._score(instruction, [c["text"] for c in cands], task)
        t2 = time.monotonic()
        scores = result["scores"]
        weights = result.get("selector") if selector == "auto" else None
        fused = None
        if weights:
            from cappy_core.selectors import fused_for_candidates

            fused = [float(x) for x in fused_for_candidates(scores, [c["logprob_mean"] for c in cands],
                                                            [c["text"] for c in cands], weights)]
        return {"candidates": cands, "scores": scores, "fused": fused, "weights": weights or None,
                "best": select_best(fused if fused is not None else scores), "meta": self._meta(result),
                "prompt_tokens": gen["prompt_tokens"], "max_new_tokens": gen["max_new_tokens"],
                "timings_ms": {"generate": round(1e3 * (t1 - t0), 1), "score": round(1e3 * (t2 - t1), 1)}}

    @staticmethod
    def _meta(result: dict) -> ScoreMeta:
        return ScoreMeta(**{k: result[k] for k in ScoreMeta.model_fields})

    # -- routes ------------------------------------------------------------------------------

    @app.post("/v1/score", response_model=ScoreResponse, summary="Score responses to an instruction")
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        self._check_texts(req.instruction, "responses", req.responses, self.limits.max_responses)
        result = await self._score(req.instruction, req.responses, req.task)
        return ScoreResponse(scores=result["scores"], meta=self._meta(result))

    @app.post("/v1/classify", response_model=ClassifyResponse, summary="Pick the best answer choice")
    async def classify(self, req: ClassifyRequest) -> ClassifyResponse:
        from cappy_core.scorer import select_best

        self._check_texts(req.instruction, "choices", req.choices, self.limits.max_choices)
        result = await self._score(req.instruction, req.choices, req.task)
        best = select_best(result["scores"])
        return ClassifyResponse(label=req.choices[best], index=best, scores=result["scores"],
                                meta=self._meta(result))

    @app.post("/v1/select", response_model=SelectResponse, response_model_exclude_none=True,
              summary="Generate candidates and return the one the scorer ranks highest")
    async def select(self, req: SelectRequest) -> SelectResponse:
        specs = plan_select(req, self.limits)
        out = await self.generate_select(req.instruction, specs, req.max_new_tokens, req.seed, req.task, req.selector)
        cands, scores, fused, best = out["candidates"], out["scores"], out["fused"], out["best"]
        gen_info = self._gen_info or await self._generator_info()
        return SelectResponse(
            response=cands[best]["text"], score=scores[best],
            selector="cappy+lm+mbr" if out["weights"] else "cappy", selector_weights=out["weights"], index=best,
            decoding=cands[best]["decoding"], sample_idx=cands[best]["sample_idx"], num_candidates=len(cands),
            generator=gen_info, meta=out["meta"], timings_ms=out["timings_ms"],
            candidates=[CandidateOut(**c, score=sc, fused=f) for c, sc, f in
                        zip(cands, scores, fused or [None] * len(cands))] if req.return_candidates else None)

    # -- OpenAI-compatible routes: the same generate-then-select -----------------------------

    @app.post("/v1/chat/completions", summary="OpenAI chat completion: generate, let Cappy pick")
    async def chat_completions(self, req: ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await self._openai(req, "chat.completion", plain_chat(messages), messages,
                                  req.max_completion_tokens or req.max_tokens)

    @app.post("/v1/completions", summary="OpenAI completion: generate, let Cappy pick")
    async def completions(self, req: CompletionRequest):
        return await self._openai(req, "text_completion", req.prompt, None, req.max_tokens)

    @app.get("/v1/models", summary="OpenAI model list: cappy and cappy:<task> per task scorer")
    async def models(self):
        try:
            info = await call_with_deadline(lambda: self.scorer.info.remote(), "scorer", 10.0, 0)
        except Unavailable as e:
            raise _unavailable(e) from None
        ids = ["cappy"] + [f"cappy:{t}" for t in info.get("tasks", [])]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "cappy"}
                                           for i in ids]}

    async def _openai(self, req, kind: str, instruction: str, messages: list[dict] | None,
                      max_new_tokens: int | None) -> dict:
        import uuid

        task = openai_model_task(req.model)
        if req.stream:
            raise OpenAIError(400, "stream=true is not supported: candidates are scored once all are generated",
                              param="stream", code="unsupported_value")
        if not instruction.strip():
            raise OpenAIError(400, "the prompt is empty", param="messages" if messages else "prompt",
                              code="invalid_value")
        sel = SelectRequest.model_construct(instruction=instruction, num_candidates=req.n, decodings=None,
                                            num_samples=None, max_new_tokens=max_new_tokens, seed=req.seed,
                                            task=task, return_candidates=req.return_candidates, selector="auto")
        try:
            specs = plan_select(sel, self.limits)
        except RequestValidationError as e:  # name the client's fields, not /v1/select's
            (err,) = e.errors()
            field = err["loc"][-1]
            param = _OPENAI_PARAM.get(field, "messages" if messages and field == "instruction" else
                                      "prompt" if field == "instruction" else field)
            raise OpenAIError(400, f"{param}: {err['msg']}".replace(f"{field}=", f"{param}="), param=param,
                              code="invalid_value") from None
        try:
            out = await self.generate_select(instruction, specs, max_new_tokens, req.seed, task, prompt=messages)
        except RequestValidationError as e:
            (err,) = e.errors()
            if err["loc"][-1] == "task":
                raise OpenAIError(404, f"The model {req.model!r} does not exist: {err['msg']}", param="model",
                                  code="model_not_found") from None
            raise OpenAIError(400, err["msg"], param=None, code="invalid_value") from None
        cands, best = out["candidates"], out["best"]
        pick = cands[best]
        # a candidate as long as the token limit was cut there (one that ended exactly then reads the same)
        finish = "length" if pick["num_tokens"] >= out["max_new_tokens"] else "stop"
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        if kind == "chat.completion":
            choice["message"] = {"role": "assistant", "content": pick["text"]}
        else:
            choice["text"] = pick["text"]
        generated = sum(c["num_tokens"] for c in cands)
        cappy = {"score": out["scores"][best], "selector": "cappy+lm+mbr" if out["weights"] else "cappy",
                 "scorer": out["meta"].scorer, "decoding": pick["decoding"], "sample_idx": pick["sample_idx"],
                 "index": best, "num_candidates": len(cands), "choice_tokens": pick["num_tokens"],
                 "timings_ms": out["timings_ms"]}
        if req.return_candidates:
            cappy["candidates"] = [CandidateOut(**c, score=sc, fused=f).model_dump(exclude_none=True) for c, sc, f
                                   in zip(cands, out["scores"], out["fused"] or [None] * len(cands))]
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": req.model, "choices": [choice], "system_fingerprint": None,
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": generated,
                          "total_tokens": out["prompt_tokens"] + generated},
                "cappy": cappy}

    async def _generator_info(self) -> dict:
        try:
            info = await call_with_deadline(lambda: self.generator.info.remote(), "generator", 5.0, 0)
        except Unavailable:
            return {}
        self._gen_info = {"backend": info.get("backend"), "model": info.get("model")}
        return self._gen_info

    @app.get("/healthz", response_model=Health, response_model_exclude_none=True, summary="Liveness / readiness")
    async def healthz(self, deep: bool = False):
        warnings = self.warnings or None
        if not deep:
            return Health(status="ok", warnings=warnings)
        try:
            gen, sc = await asyncio.gather(
                call_with_deadline(lambda: self.generator.info.remote(), "generator", 10.0, 0),
                call_with_deadline(lambda: self.scorer.info.remote(), "scorer", 10.0, 0))
        except Unavailable as e:
            return JSONResponse({"status": "unavailable", "detail": str(e)}, status_code=503)
        if sc.get("untrained_head") and not warnings:
            warnings = ["the default scorer has an untrained head: its picks mean nothing"]
        return Health(status="ok", warnings=warnings, generator={k: gen.get(k) for k in ("backend", "model")},
                      scorer={k: sc.get(k) for k in ("model", "replica")})
