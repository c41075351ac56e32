"""HTTP request and response models of the ingress (they are the OpenAPI schema at ``/docs``).

Static constraints (non-empty lists and strings, task id pattern, unknown fields refused) live
here; the configurable limits (``ingress`` args: longest instruction, most responses, ...) are
checked by the ingress and answered with the same 422 format, naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cappy_core.generation import MAX_DECODING_NAME_CHARS
from serve_app.args import TASK_ID_PATTERN

#: A hard cap on the decodings list, checked while the body is parsed (the ingress's configurable
#: ``max_decodings`` is checked next, before any work).
MAX_DECODINGS_LISTED = 64
DecodingName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_DECODING_NAME_CHARS)]


class RequestError(ValueError):
    """A request the generator or scorer cannot serve as asked: the caller's fault, answered 422,
    never retried (raised inside a replica; Ray re-raises it in the ingress as a subclass)."""

_TASK = Field(None, pattern=TASK_ID_PATTERN, examples=["word_sorting"],
              description="use this task's finetuned scorer (multiplexed); absent: the pretrained scorer")


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Req):
    instruction: str = Field(min_length=1, description="the instruction (prompt)")
    responses: list[str] = Field(min_length=1, description="candidate responses to score")
    task: Optional[str] = _TASK

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"instruction": "Sort the words: pear apple fig\nA:", "responses": ["apple fig pear", "pear fig apple"]}]})


class ClassifyRequest(_Req):
    instruction: str = Field(min_length=1, description="the question")
    choices: list[str] = Field(min_length=1, description="answer choices; the highest-scoring one wins")
    task: Optional[str] = _TASK

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"instruction": "Is the sentence in the past tense? 'I walked home.'\nA:", "choices": ["yes", "no"]}]})


class SelectRequest(_Req):
    instruction: str = Field(min_length=1, description="the instruction to answer")
    num_candidates: Optional[int] = Field(None, ge=1, description="total candidates, spread over the default "
                                          "decodings (17 = the paper's beam4 + 4 × 4 samples); "
                                          "excludes decodings/num_samples")
    decodings: Optional[list[DecodingName]] = Field(None, min_length=1, max_length=MAX_DECODINGS_LISTED,
                                                    description="decoding names: greedy, beam<N> (N <= 8), "
                                                    "sample, temp<T>, topk<K>, topp<P>",
                                                    examples=[["beam4", "sample", "temp0.9", "topk40", "topp0.95"]])
    num_samples: Optional[int] = Field(None, ge=1, description="candidates per sampling decoding (default 4)")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="new tokens per candidate (default: the "
                                          "generator's, 64)")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="sampling seed (default: the generator's)")
    task: Optional[str] = _TASK
    return_candidates: bool = Field(False, description="also return every candidate with its score and "
                                    "log-likelihoods")
    selector: Literal["auto", "cappy"] = Field(
        "auto", description="auto: the task's fused selector (cappy+lm+mbr, weights fitted by the sweep on "
        "held-out train instructions and stored beside its scorer) when it has one, else Cappy alone; "
        "cappy: the scorer alone")
    adaptive: bool = Field(False, description="generate the candidates in rounds (1, 2, 4, 8, then the rest, in "
                           "generation order: beam first, then one sample of each decoding in turn) and stop once "
                           "the fused selector's margin between its top two reaches the endpoint's threshold "
                           "(fitted by the sweep on held-out train instructions): fewer candidates when the pick "
                           "is clear. Needs fused weights (a sweep's scorer) and selector 'auto'")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"instruction": "Q: What is the capital of France?\nA:", "num_candidates": 17, "return_candidates": True}]})

    @model_validator(mode="after")
    def _one_way(self):
        if self.num_candidates is not None and (self.decodings is not None or self.num_samples is not None):
            raise ValueError("num_candidates: give num_candidates, or decodings/num_samples, not both")
        return self


class ScoreMeta(BaseModel):
    scorer: str = Field(description="'default' or the task whose scorer was used")
    batch_requests: int = Field(description="requests in the scorer batch this one was part of")
    batch_pairs: int = Field(description="(instruction, response) pairs in that batch")
    replica: str = Field(description="scorer replica id")


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="raw scorer logits, in request order (higher = better)")
    meta: ScoreMeta


class ClassifyResponse(BaseModel):
    label: str = Field(description="the chosen choice")
    index: int = Field(description="its position in choices (ties: the first)")
    scores: list[float]
    meta: ScoreMeta


class CandidateOut(BaseModel):
    text: str
    decoding: str
    sample_idx: int
    num_tokens: int = Field(description="its tokens (after a stop string cut it, the tokens kept)")
    generated_tokens: Optional[int] = Field(None, description="tokens generated for it (what it cost)")
    stopped: Optional[bool] = Field(None, description="a stop string ended it (OpenAI routes' `stop`)")
    logprob_sum: float = Field(description="generator log-likelihood of the candidate's tokens")
    logprob_mean: float
    score: float = Field(description="scorer logit")
    fused: Optional[float] = Field(None, description="fused selector value (when it picked)")


class SelectResponse(BaseModel):
    response: str = Field(description="the candidate the selector ranks highest")
    score: float = Field(description="its scorer logit")
    selector: str = Field(description="what picked it: 'cappy', 'cappy+lm+mbr' with the task's weights, or 'mbr' "
                          "(consensus: no trained scorer on the machine)")
    selector_weights: Optional[dict[str, float]] = Field(None, description="the fused selector's weights")
    index: int = Field(description="its position among the candidates (decoding order; with adaptive, the "
                       "order the rounds generated them)")
    decoding: str
    sample_idx: int
    num_candidates: int
    generator: dict = Field(description="backend and model that generated the candidates")
    meta: ScoreMeta
    timings_ms: dict[str, float]
    adaptive: Optional[dict] = Field(None, description="with adaptive: the threshold (tau), rounds generated of "
                                     "those planned, whether it stopped early, and the last round's fused margin")
    candidates: Optional[list[CandidateOut]] = None


class Health(BaseModel):
    status: str
    warnings: Optional[list[str]] = Field(None, description="e.g. a default scorer with an untrained head")
    generator: Optional[dict] = None
    scorer: Optional[dict] = None


# The OpenAI routes' request models: serve_app/openai_api.py.
