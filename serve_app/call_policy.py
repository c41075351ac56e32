"""How the ingress calls another deployment: every call has a deadline, so no request hangs; only
a call no replica received is sent again; a failure reaches the client as a one-line reason with
no filesystem path in it (the full error goes to the replica's log)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Awaitable, Callable

from fastapi import HTTPException
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from cappy_core.data.tasks import UnknownTaskError
from serve_app.api import RequestError
from serve_app.args import RETRY_AFTER_S

logger = logging.getLogger("ray.serve")


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
        except asyncio.CancelledError:  # our caller left (a client that disconnected): so does the call
            _cancel(response)
            raise
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


async def call_or_503(make_call: Callable[[], Any], what: str, timeout_s: float, retries: int) -> Any:
    """:func:`call_with_deadline`, with :class:`Unavailable` answered as a 503 carrying the reason
    and ``Retry-After``."""
    try:
        return await call_with_deadline(make_call, what, timeout_s, retries)
    except Unavailable as e:
        raise HTTPException(503, detail=str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None


def caller_message(e: BaseException) -> str:
    """The message of an error that is the caller's fault (raised in a replica), for a 422: its
    last line without the exception type, paths hidden as by :func:`_short`."""
    return _short(getattr(e, "cause", None) or e).split(": ", 1)[-1]


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
