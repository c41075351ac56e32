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
#: the /v1/select field a bound names → the OpenAI request field the client sent
_OPENAI_PARAM = {"num_candidates": "n", "max_new_tokens": "max_tokens"}
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
                        f"{e.get('msg')}" for e in errors)
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


def openai_bound_error(e: RequestValidationError, chat: bool) -> OpenAIError:
    """A /v1/select bound's 422 (``plan_select``) as a 400 naming the client's field, not
    /v1/select's (``chat``: the prompt came as ``messages``)."""
    (err,) = e.errors()
    field = err["loc"][-1]
    param = _OPENAI_PARAM.get(field, "messages" if chat and field == "instruction" else
                              "prompt" if field == "instruction" else field)
    return OpenAIError(400, f"{param}: {err['msg']}".replace(f"{field}=", f"{param}="), param=param,
                       code="invalid_value")


def openai_select_error(e: RequestValidationError, model: str) -> OpenAIError:
    """A 422 of generate-then-select: an unknown task is OpenAI's unknown ``model`` (404)."""
    (err,) = e.errors()
    if err["loc"][-1] == "task":
        return OpenAIError(404, f"The model {model!r} does not exist: {err['msg']}", param="model",
                           code="model_not_found")
    return OpenAIError(400, err["msg"], param=None, code="invalid_value")


def openai_completion(kind: str, model: str, out: dict, candidates: list[dict] | None) -> dict:
    """The ``chat.completion`` or ``text_completion`` object of a generate-then-select result
    ``out``: one choice (the pick), usage counting every candidate generated, and Cappy's score
    in the extra ``cappy`` field (with ``candidates``, when asked for)."""
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
    cappy = {"score": out["scores"][best], "selector": out["selector"],
             "scorer": out["meta"].scorer, "decoding": pick["decoding"], "sample_idx": pick["sample_idx"],
             "index": best, "num_candidates": len(cands), "choice_tokens": pick["num_tokens"],
             "timings_ms": out["timings_ms"]}
    if candidates is not None:
        cappy["candidates"] = candidates
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": model, "choices": [choice], "system_fingerprint": None,
            "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": generated,
                      "total_tokens": out["prompt_tokens"] + generated},
            "cappy": cappy}
