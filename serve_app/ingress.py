"""``Ingress`` deployment: the FastAPI front of generate-then-select.

Routes (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

- ``POST /v1/select``: generate candidates (``Generator``), score them (``Scorer``), return the
  one the scorer ranks highest (ties: the first in decoding order), optionally all of them.
- ``POST /v1/score``: raw scores of given responses.
- ``POST /v1/classify``: the highest-scoring answer choice.
- ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``: OpenAI-compatible,
  the same generate-then-select (``best_of`` = candidates generated, ``n`` = the best ones
  returned as choices, ``stream``, ``stop``, ``temperature``/``top_p``, ``logprobs``, a list of
  prompts: :mod:`serve_app.openai_routes`; ``model`` = ``cappy`` or ``cappy:<task>``); errors in
  OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (400 invalid or unsupported
  input, naming the parameter; 404 unknown model; 503 unavailable).
- ``GET /healthz``: 200 while the ingress runs; ``?deep=true`` also asks both deployments.

Errors: a body over ``max_body_bytes`` → 413; invalid or over-limit fields → 422 whose
``detail[].loc`` and ``message`` name the field; a generator or scorer that fails, times out or
is unavailable → 503 with the reason (and ``Retry-After``); a generate-then-select request over
``max_generating`` in this replica → 503 at once (:mod:`serve_app.middleware`). Every call to
another deployment has a deadline (``generate_timeout_s`` / ``score_timeout_s``), so no request
hangs; what is retried and what is a 503 is :mod:`serve_app.call_policy`.
Route handlers only validate and delegate: scoring is ``cappy_core.scorer.model``, generation is
``cappy_core.generation``, the pick is :func:`cappy_core.scorer.model.select_best`.
"""

# No `from __future__ import annotations` here: FastAPI must see the route parameters' real
# classes, and Serve's ingress re-binds the methods outside this module's globals.
import asyncio
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from cappy_core.data.tasks import UnknownTaskError
from serve_app.api import (CandidateOut, ClassifyRequest, ClassifyResponse, Health, RequestError, ScoreMeta,
                           ScoreRequest, ScoreResponse, SelectRequest, SelectResponse)
from serve_app.args import IngressArgs
from serve_app.call_policy import Unavailable, call_or_503, call_with_deadline, caller_message
from serve_app.errors import add_error_handlers, field_error
from serve_app.limits import check_texts, plan_select
from serve_app.middleware import add_middleware
from serve_app.openai_api import ChatCompletionRequest, CompletionRequest
from serve_app.openai_routes import CHAT, COMPLETION, openai_answer

app = FastAPI(
    title="Cappy on Ray",
    version="0.1.0",
    description="Generate candidates with an LLM and pick the best with a Cappy scorer "
                "(a small (instruction, response) → correctness regressor).",
)
add_middleware(app)
add_error_handlers(app)


def selector_label(weights: dict | None) -> str:
    """What picked: ``cappy`` (no weights), ``cappy+lm+mbr`` (fused weights with Cappy in them), or the
    signals a Cappy-free default weighs (``mbr``: no trained scorer on the machine)."""
    if not weights:
        return "cappy"
    if weights.get("cappy"):
        return "cappy+lm+mbr"
    return "+".join(label for key, label in (("logprob_mean", "lm"), ("mbr", "mbr"), ("length", "length"))
                    if weights.get(key))


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class IngressDeployment:
    def __init__(self, generator: DeploymentHandle, scorer: DeploymentHandle, limits: dict | None = None,
                 warnings: list[str] | None = None):
        self.generator = generator
        self.scorer = scorer
        self.limits = IngressArgs(**(limits or {}))
        # The served app's state: @serve.ingress serves a pickled copy of `app`, and in a replica
        # (where this class arrives pickled along with it) this global is that copy.
        app.state.max_body_bytes = self.limits.max_body_bytes
        app.state.max_generating = self.limits.max_generating
        app.state.api_key_sha256 = tuple(self.limits.api_key_sha256)
        self._gen_info: dict | None = None  # backend and model, asked once
        self.warnings = list(warnings or [])  # shown by /healthz
        from cappy_core.selection.selectors import mbr_scores

        mbr_scores(["warm", "up"])  # the first Rouge-L builds its scorer (~1 s): here, not in a request's select step

    # -- helpers -----------------------------------------------------------------------------

    async def _score(self, instruction: str, texts: list[str], task: str | None) -> dict:
        handle = self.scorer.options(multiplexed_model_id=task or "")
        try:
            return await call_or_503(lambda: handle.score.remote(instruction, texts), "scorer",
                                     self.limits.score_timeout_s, self.limits.retries)
        except UnknownTaskError as e:
            raise field_error("task", caller_message(e)) from None
        except RequestError as e:
            raise field_error("responses", caller_message(e)) from None

    async def _generate(self, prompt: str | list[dict], specs: tuple, max_new_tokens: int | None,
                        seed: int | None, stop: tuple[str, ...]) -> dict:
        try:
            return await call_or_503(
                lambda: self.generator.generate.remote(prompt, specs, max_new_tokens, seed, stop),
                "generator", self.limits.generate_timeout_s, self.limits.retries)
        except RequestError as e:
            raise field_error("body", caller_message(e)) from None

    async def generate_select(self, instruction: str, specs: tuple, max_new_tokens: int | None, seed: int | None,
                              task: str | None, selector: str = "auto", prompt: list[dict] | None = None,
                              stop: tuple[str, ...] = (), route: str = "/v1/select", adaptive: bool = False) -> dict:
        """Generate-then-select, the one path of /v1/select and the OpenAI routes: the candidates
        (dicts, cut by ``stop``), their scores, the fused values (a task's stored selector,
        ``selector="auto"``), the pick's index and every index best first (``ranked``), the
        scorer's meta, prompt tokens and timings. The generator reads ``prompt`` (chat messages)
        when given, else ``instruction``; the scorer reads ``instruction``.

        ``adaptive``: the candidates come in rounds (1, 2, 4, 8, then the rest: generation order,
        :func:`~cappy_core.selection.adaptive.adaptive_rounds`), each scored as it arrives, and
        generation stops once the fused margin reaches the ingress's ``adaptive_tau``
        (:func:`~cappy_core.selection.adaptive.margin`, the rule ``cappy cost-curve`` fits on dev);
        ``adaptive`` in the result says where it stopped."""
        from cappy_core.scorer.pick import rank_best
        from cappy_core.selection.adaptive import adaptive_rounds, margin
        from cappy_core.selection.selectors import fused_for_candidates
        from serve_app.metrics import record_selection, score_margin

        tau = self.limits.adaptive_tau
        if adaptive and tau is None:
            raise field_error("adaptive", "this endpoint has no adaptive threshold: serve a sweep whose cost curve "
                              "fitted one (`cappy serve --sweep OUT`) or set ingress.adaptive_tau")
        if adaptive and selector != "auto":
            raise field_error("adaptive", "the adaptive rule reads the fused selector: use selector 'auto'")
        rounds = adaptive_rounds(specs) if adaptive else [list(specs)]
        cands, scores, fused, weights, result, gen = [], [], None, None, {}, {}
        gen_s = score_s = select_s = 0.0
        stopped = None
        for n, part in enumerate(rounds, 1):
            t0 = time.monotonic()
            gen = await self._generate(prompt or instruction, tuple(part), max_new_tokens, seed, stop)
            t1 = time.monotonic()
            result = await self._score(instruction, [c["text"] for c in gen["candidates"]], task)
            t2 = time.monotonic()
            cands, scores = cands + gen["candidates"], scores + list(result["scores"])
            weights = result.get("selector") if selector == "auto" else None
            if adaptive and not weights:
                raise field_error("adaptive", f"the {'task ' + repr(task) if task else 'default'} scorer has no "
                                  "fused weights: the adaptive rule needs them (a sweep's scorer)")
            if weights:
                fused = [float(x) for x in fused_for_candidates(scores, [c["logprob_mean"] for c in cands],
                                                                [c["text"] for c in cands], weights)]
            gen_s, score_s, select_s = gen_s + t1 - t0, score_s + t2 - t1, select_s + time.monotonic() - t2
            if adaptive and len(cands) > 1 and margin(fused, weights) >= tau:
                stopped = n
                break
        t2 = time.monotonic()
        values = fused if fused is not None else scores
        ranked = rank_best(values)
        select_s += time.monotonic() - t2
        record_selection(route, candidates=len(cands), generated_tokens=sum(c["generated_tokens"] for c in cands),
                         generate_s=gen_s, score_s=score_s, select_s=select_s, margin=score_margin(values))
        return {"candidates": cands, "scores": scores, "fused": fused, "weights": weights or None,
                "selector": selector_label(weights), "best": ranked[0], "ranked": ranked,
                "meta": self._meta(result), "prompt_tokens": gen["prompt_tokens"],
                "max_new_tokens": gen["max_new_tokens"],
                "adaptive": {"tau": tau, "rounds": n, "of_rounds": len(rounds), "stopped_early": stopped is not None,
                             "margin": margin(fused, weights)} if adaptive else None,
                "timings_ms": {"generate": round(1e3 * gen_s, 1), "score": round(1e3 * score_s, 1),
                               "select": round(1e3 * select_s, 2)}}

    async def token_logprobs(self, prompt: str | list[dict], token_ids: list[int]) -> list[tuple[str, float]]:
        """The generator's ``(token, log-probability)`` for each of a candidate's tokens after ``prompt``."""
        try:
            return await call_or_503(lambda: self.generator.token_logprobs.remote(prompt, token_ids), "generator",
                                     self.limits.generate_timeout_s, self.limits.retries)
        except RequestError as e:
            raise field_error("body", caller_message(e)) from None

    @staticmethod
    def _meta(result: dict) -> ScoreMeta:
        return ScoreMeta(**{k: result[k] for k in ScoreMeta.model_fields})

    @staticmethod
    def candidates(out: dict) -> list[CandidateOut]:
        """Every candidate of a generate-then-select result, with its score (and fused value)."""
        return [CandidateOut(**c, score=sc, fused=f) for c, sc, f in
                zip(out["candidates"], out["scores"], out["fused"] or [None] * len(out["candidates"]))]

    # -- routes ------------------------------------------------------------------------------

    @app.post("/v1/score", response_model=ScoreResponse, summary="Score responses to an instruction")
    async def score(self, req: ScoreRequest) -> ScoreResponse:
        check_texts(req.instruction, "responses", req.responses, self.limits.max_responses, self.limits)
        result = await self._score(req.instruction, req.responses, req.task)
        return ScoreResponse(scores=result["scores"], meta=self._meta(result))

    @app.post("/v1/classify", response_model=ClassifyResponse, summary="Pick the best answer choice")
    async def classify(self, req: ClassifyRequest) -> ClassifyResponse:
        from cappy_core.scorer.model import select_best

        check_texts(req.instruction, "choices", req.choices, self.limits.max_choices, self.limits)
        result = await self._score(req.instruction, req.choices, req.task)
        best = select_best(result["scores"])
        return ClassifyResponse(label=req.choices[best], index=best, scores=result["scores"],
                                meta=self._meta(result))

    @app.post("/v1/select", response_model=SelectResponse, response_model_exclude_none=True,
              summary="Generate candidates and return the one the scorer ranks highest")
    async def select(self, req: SelectRequest) -> SelectResponse:
        specs = plan_select(req, self.limits)
        out = await self.generate_select(req.instruction, specs, req.max_new_tokens, req.seed, req.task, req.selector,
                                         adaptive=req.adaptive)
        cands, best = out["candidates"], out["best"]
        gen_info = self._gen_info or await self._generator_info()
        return SelectResponse(
            response=cands[best]["text"], score=out["scores"][best],
            selector=out["selector"], selector_weights=out["weights"], index=best,
            decoding=cands[best]["decoding"], sample_idx=cands[best]["sample_idx"], num_candidates=len(cands),
            generator=gen_info, meta=out["meta"], timings_ms=out["timings_ms"], adaptive=out["adaptive"],
            candidates=self.candidates(out) if req.return_candidates else None)

    # -- OpenAI-compatible routes: the same generate-then-select -----------------------------

    @app.post("/v1/chat/completions", summary="OpenAI chat completion: generate best_of, return the n best")
    async def chat_completions(self, req: ChatCompletionRequest):
        return await openai_answer(self, req, CHAT)

    @app.post("/v1/completions", summary="OpenAI completion: generate best_of, return the n best")
    async def completions(self, req: CompletionRequest):
        return await openai_answer(self, req, COMPLETION)

    @app.get("/v1/models", summary="OpenAI model list: cappy and cappy:<task> per task scorer")
    async def models(self):
        info = await call_or_503(lambda: self.scorer.info.remote(), "scorer", 10.0, 0)
        ids = ["cappy"] + [f"cappy:{t}" for t in info.get("tasks", [])]
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "cappy"} for i in ids]
        # what "cappy" picks with (an extension field; clients ignore it): the default scorer and its weights
        data[0]["cappy"] = {"scorer": info.get("model"), "selector": selector_label(info.get("selector")),
                            "selector_weights": info.get("selector")}
        return {"object": "list", "data": data}

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
                      scorer={k: sc.get(k) for k in ("model", "replica", "selector")})
