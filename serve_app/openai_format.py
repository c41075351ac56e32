"""OpenAI's side of the OpenAI-compatible routes: its ``model`` names, its error shape
``{"error": {"message", "type", "param", "code"}}`` and its completion objects. The routes run the
same generate-then-select as ``/v1/select``; only what the client sends and reads is OpenAI's."""

from __future__ import annotations

import re
import time
import uuid

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.args import TASK_ID_PATTERN

OPENAI_PATHS = ("/chat/completions", "/completions", "/models")
_UNSUPPORTED = "this parameter is not supported (README: the OpenAI parameter table)"
_HTTP_CODE = {503: "service_unavailable", 413: "request_too_large", 404: "not_found"}


def is_openai_path(path: str) -> bool:
    return path.rstrip("/").endswith(OPENAI_PATHS)


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


def openai_http_error(exc: StarletteHTTPException) -> JSONResponse:
    """Any HTTP error of an OpenAI route in OpenAI's shape (5xx: ``server_error``)."""
    if isinstance(exc, OpenAIError):
        return openai_error(exc.status_code, exc.detail, exc.type, exc.param, exc.code, exc.headers)
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return openai_error(exc.status_code, str(exc.detail), kind, None, _HTTP_CODE.get(exc.status_code), exc.headers)


def openai_invalid_body(errors: list[dict]) -> JSONResponse:
    """Invalid input of an OpenAI route: OpenAI answers 400 naming the parameter, not 422."""
    loc = [str(p) for p in (errors[0].get("loc") or ()) if p != "body"] if errors else []
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
                        f"{_UNSUPPORTED if e.get('type') == 'extra_forbidden' else e.get('msg')}" for e in errors)
    return openai_error(400, message, "invalid_request_error", loc[0] if loc else None, "invalid_value")


def openai_model_task(model: str) -> str | None:
    """The task an OpenAI ``model`` names: ``cappy`` → None (the pretrained scorer),
    ``cappy:<task>`` → that task's scorer; anything else is a 404 ``model_not_found``."""
    if model == "cappy":
        return None
    if model.startswith("cappy:") and re.fullmatch(TASK_ID_PATTERN.strip("^$"), model[len("cappy:"):]):
        return model[len("cappy:"):]
    raise OpenAIError(404, f"The model {model[:160]!r} does not exist: use 'cappy' or 'cappy:<task>' (GET /v1/models)",
                      param="model", code="model_not_found")


def openai_select_error(e: RequestValidationError, model: str) -> OpenAIError:
    """A 422 of generate-then-select: an unknown task is OpenAI's unknown ``model`` (404)."""
    (err,) = e.errors()
    if err["loc"][-1] == "task":
        return OpenAIError(404, f"The model {model!r} does not exist: {err['msg']}", param="model",
                           code="model_not_found")
    return OpenAIError(400, err["msg"], param="adaptive" if err["loc"][-1] == "adaptive" else None,
                       code="invalid_value")


def finish_reason(cand: dict, max_new_tokens: int) -> str:
    """``stop`` (end of sequence, or a stop string), or ``length``: a candidate as long as the token
    limit was cut there (one that ended exactly then reads the same)."""
    if cand.get("stopped"):
        return "stop"
    return "length" if cand.get("generated_tokens", cand["num_tokens"]) >= max_new_tokens else "stop"


def openai_logprobs(kind: str, tokens: list[tuple[str, float]] | None) -> dict | None:
    """A choice's ``logprobs``: chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}``, or
    the completions API's ``{tokens, token_logprobs, top_logprobs, text_offset}``."""
    if tokens is None:
        return None
    if kind.startswith("chat.completion"):
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, lp in tokens], "refusal": None}
    offsets, at = [], 0
    for t, _ in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _ in tokens], "token_logprobs": [lp for _, lp in tokens], "top_logprobs": None,
            "text_offset": offsets}


def chosen(out: dict, n: int) -> list[int]:
    """The ``n`` candidates a result returns, best first by the selector: the best of each
    distinct text first (two samples that wrote the same text are one answer), then, when there
    are fewer than ``n`` distinct texts, the best of the rest."""
    seen: set[str] = set()
    first, rest = [], []
    for i in out["ranked"]:
        text = out["candidates"][i]["text"]
        (rest if text in seen else first).append(i)
        seen.add(text)
    return (first + rest)[:n]


def openai_choices(kind: str, outs: list[dict], n: int, logprobs: list[list] | None) -> list[dict]:
    """The choices of a generate-then-select result per prompt (``outs``): its ``n`` best
    candidates by the selector's value (:func:`chosen`), ``index`` counting over prompts
    (OpenAI's rule for a list of prompts: prompt ``p``'s ``k``-th choice is ``p * n + k``). Each
    carries the candidate's score, fused value and decoding in the ``cappy`` extension."""
    choices = []
    for p, out in enumerate(outs):
        for k, best in enumerate(chosen(out, n)):
            cand = out["candidates"][best]
            choice = {"index": p * n + k, "finish_reason": finish_reason(cand, out["max_new_tokens"]),
                      "logprobs": openai_logprobs(kind, logprobs[p][k] if logprobs else None)}
            if kind == "chat.completion":
                choice["message"] = {"role": "assistant", "content": cand["text"], "refusal": None}
            else:
                choice["text"] = cand["text"]
            choice["cappy"] = {"score": out["scores"][best], "candidate": best, "decoding": cand["decoding"],
                               "sample_idx": cand["sample_idx"], "tokens": cand["num_tokens"]}
            if out["fused"] is not None:
                choice["cappy"]["fused"] = out["fused"][best]
            choices.append(choice)
    return choices


def openai_usage(outs: list[dict]) -> dict:
    """Every prompt token, and every generated token (best-of costs them all)."""
    prompt = sum(out["prompt_tokens"] for out in outs)
    generated = sum(c.get("generated_tokens", c["num_tokens"]) for out in outs for c in out["candidates"])
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def openai_extension(outs: list[dict], candidates: list[list[dict]] | None) -> dict:
    """The response's ``cappy`` field: per prompt, what selected (selector and its weights, scorer),
    how many candidates it generated and how long each step took; with ``candidates`` when asked."""
    prompts = []
    for p, out in enumerate(outs):
        entry = {"selector": out["selector"], "scorer": out["meta"].scorer, "num_candidates": len(out["candidates"]),
                 "timings_ms": out["timings_ms"]}
        if out["weights"]:
            entry["selector_weights"] = out["weights"]
        if out.get("adaptive"):
            entry["adaptive"] = out["adaptive"]
        if candidates is not None:
            entry["candidates"] = candidates[p]
        prompts.append(entry)
    return {"prompts": prompts}


def response_id(kind: str) -> str:
    return f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"


def openai_completion(kind: str, model: str, outs: list[dict], n: int, candidates: list[list[dict]] | None,
                      logprobs: list[list] | None = None) -> dict:
    """The ``chat.completion`` or ``text_completion`` object of generate-then-select results (one
    per prompt): ``n`` choices per prompt, usage counting every candidate generated, Cappy's view
    in the extra ``cappy`` field."""
    return {"id": response_id(kind), "object": kind, "created": int(time.time()), "model": model,
            "choices": openai_choices(kind, outs, n, logprobs), "system_fingerprint": None,
            "usage": openai_usage(outs), "cappy": openai_extension(outs, candidates)}
