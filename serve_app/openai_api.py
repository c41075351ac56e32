"""Request models of the OpenAI-compatible routes (``/v1/chat/completions``, ``/v1/completions``).

The routes run generate-then-select: ``best_of`` candidates are generated and scored, the top
``n`` by the selector come back as choices. Every OpenAI parameter is either served or refused
with a 400 naming it; none is silently ignored (README: the parameter table). Parameters accepted
only at their no-op value (``echo: false``, ``logprobs: 0``, penalties of 0, ...) say so in their
400 otherwise.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cappy_core.generation.stops import check_stops

MAX_CHAT_MESSAGES = 64
MAX_PROMPTS = 16  # prompts in one /v1/completions request
ChatRole = Literal["system", "developer", "user", "assistant"]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Req):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name": harmless, not used

    role: ChatRole
    content: str | list[TextPart] = Field(description="text, or a list of text parts (joined)")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Req):
    include_usage: bool = Field(False, description="a last chunk with `usage` (every generated token)")


def _only(value, allowed, what: str):
    if value is not None and value not in allowed:
        raise ValueError(f"not supported: {what}")
    return value


class _OpenAIRequest(_Req):
    model: str = Field(description="'cappy' (the default scorer) or 'cappy:<task>' (that task's scorer)",
                       examples=["cappy"], max_length=160)
    n: int = Field(1, ge=1, description="choices returned: the n best distinct answers by the selector's value "
                   "(repeats only when fewer distinct answers were generated)")
    best_of: Optional[int] = Field(None, ge=1, description="candidates generated and scored (default: the app's "
                                   "plan, 17 = beam4 + 4 × 4 samples; at least n)")
    max_tokens: Optional[int] = Field(None, ge=1, description="new tokens per candidate")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="sampling seed: same seed, same candidates")
    stream: bool = Field(False, description="Server-Sent Events: the choices once selection is done")
    stream_options: Optional[StreamOptions] = None
    stop: Optional[str | list[str]] = Field(None, description="up to 4 strings; every candidate ends before the "
                                            "first one, before selection")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0: greedy and beam search only; else the "
                                         "sampled candidates' temperature (with beam4 as one more candidate)")
    top_p: Optional[float] = Field(None, ge=0, le=1, description="the sampled candidates' nucleus (0: as temperature 0)")
    frequency_penalty: Optional[float] = Field(None, description="only 0 (no penalty) is supported")
    presence_penalty: Optional[float] = Field(None, description="only 0 (no penalty) is supported")
    user: Optional[str] = Field(None, max_length=256, description="accepted, not used")
    return_candidates: bool = Field(False, description="Cappy extension: every candidate with its score "
                                    "in the response's `cappy.prompts[].candidates`")
    adaptive: bool = Field(False, description="Cappy extension: generate best_of in rounds (1, 2, 4, 8, the rest) "
                           "and stop once the fused selector's margin reaches the endpoint's threshold; "
                           "`cappy.prompts[].adaptive` says where it stopped (needs a sweep's scorer)")

    _stop = field_validator("stop")(lambda v: list(check_stops(v)) or None)
    _penalties = field_validator("frequency_penalty", "presence_penalty")(
        lambda v: _only(v, (0, 0.0), "only 0 (candidates are drawn without penalties)"))

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="same as max_tokens")
    logprobs: Optional[bool] = Field(None, description="each choice's token log-probabilities")
    top_logprobs: Optional[int] = Field(None, description="only 0: alternatives are not returned")

    _top = field_validator("top_logprobs")(lambda v: _only(v, (0,), "only 0 (alternative tokens are not returned)"))

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "cappy", "messages": [{"role": "user", "content": "Q: What is the capital of France?\nA:"}],
         "n": 2, "best_of": 8}]})

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = Field(description="a prompt, or a list of up to 16 (one result per prompt, "
                                    "generated together)")
    logprobs: Optional[int] = Field(None, description="only 0: each choice's token log-probabilities, "
                                    "no alternatives")
    echo: Optional[bool] = Field(None, description="only false")

    _logprobs = field_validator("logprobs")(lambda v: _only(v, (0,), "only 0 (the chosen tokens' log-probabilities; "
                                                           "alternatives are not returned)"))
    _echo = field_validator("echo")(lambda v: _only(v, (False,), "only false (the prompt is not echoed)"))

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "cappy", "prompt": "Q: What is the capital of France?\nA:", "best_of": 8, "n": 3}]})

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        texts = [v] if isinstance(v, str) else v
        if not texts or len(texts) > MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts, got {len(texts)}")
        if not all(t.strip() for t in texts):
            raise ValueError("a prompt is empty")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None
