"""``Ingress`` deployment: the FastAPI front of generate-then-select.

Routes (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

- ``POST /v1/select``: generate candidates (``Generator``), score them (``Scorer``), return the
  one the scorer ranks highest (ties: the first in decoding order), optionally all of them.
- ``POST /v1/score``: raw scores of given responses.
- ``POST /v1/classify``: the highest-scoring answer choice.
- ``GET /healthz``: 200 while the ingress runs; ``?deep=true`` also asks both deployments.

Errors: a body over ``max_body_bytes`` → 413; invalid or over-limit fields → 422 whose
``detail[].loc`` and ``message`` name the field; a generator or scorer that fails, times out or
is unavailable → 503 with the reason (and ``Retry-After``). Every call to another deployment has
a deadline (``generate_timeout_s`` / ``score_timeout_s``), so no request hangs; a call whose
replica died is sent again (``retries``): Serve routes it to a live replica or the replacement.
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
from ray import serve
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app.api import (CandidateOut, ClassifyRequest, ClassifyResponse, Health, RequestError, ScoreMeta,
                           ScoreRequest, ScoreResponse, SelectRequest, SelectResponse)
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


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = jsonable_encoder(exc.errors(), exclude={"input", "ctx", "url"})
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
    return JSONResponse({"detail": errors, "message": message}, status_code=422)


def field_error(field: str, msg: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 for a body field, in FastAPI's own format."""
    return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": kind}])


class Unavailable(Exception):
    """A deployment did not answer: failed, timed out, overloaded or has no replica. → 503."""


#: Re-sent to another replica: only a call that never reached one. A replica that died while
#: serving a call (``RayActorError``) is not retried: the call may be what killed it.
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
    return HTTPException(503, detail=str(e), headers={"Retry-After": "1"})


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
    def __init__(self, generator: DeploymentHandle, scorer: DeploymentHandle, limits: dict | None = None):
        from serve_app.args import IngressArgs

        self.generator = generator
        self.scorer = scorer
        self.limits = IngressArgs(**(limits or {}))
        app.state.max_body_bytes = self.limits.max_body_bytes
        self._gen_info: dict | None = None  # backend and model, asked once

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
                              task: str | None, selector: str = "auto") -> dict:
        """Generate-then-select, the one path of /v1/select and the OpenAI routes: the candidates
        (dicts), their scores, the fused values (a task's stored selector, ``selector="auto"``),
        the pick's index, the scorer's meta and timings."""
        from cappy_core.scorer import select_best

        t0 = time.monotonic()
        try:
            cands = await call_with_deadline(
                lambda: self.generator.generate.remote(instruction, specs, max_new_tokens, seed),
                "generator", self.limits.generate_timeout_s, self.limits.retries)
        except RequestError as e:
            raise field_error("body", _short(getattr(e, "cause", None) or e).split(": ", 1)[-1]) from None
        except Unavailable as e:
            raise _unavailable(e) from None
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

    async def _generator_info(self) -> dict:
        try:
            info = await call_with_deadline(lambda: self.generator.info.remote(), "generator", 5.0, 0)
        except Unavailable:
            return {}
        self._gen_info = {"backend": info.get("backend"), "model": info.get("model")}
        return self._gen_info

    @app.get("/healthz", response_model=Health, response_model_exclude_none=True, summary="Liveness / readiness")
    async def healthz(self, deep: bool = False):
        if not deep:
            return Health(status="ok")
        try:
            gen, sc = await asyncio.gather(
                call_with_deadline(lambda: self.generator.info.remote(), "generator", 10.0, 0),
                call_with_deadline(lambda: self.scorer.info.remote(), "scorer", 10.0, 0))
        except Unavailable as e:
            return JSONResponse({"status": "unavailable", "detail": str(e)}, status_code=503)
        return Health(status="ok", generator={k: gen.get(k) for k in ("backend", "model")},
                      scorer={k: sc.get(k) for k in ("model", "replica")})
