"""``Generator`` deployment: candidates with log-likelihoods from a ``cappy_core.generation`` backend.

A thin shell over :class:`cappy_core.generation.GeneratorSpec`: the vLLM backend on a GPU when it
is installed, the transformers backend otherwise (or when asked); the model name means what
:func:`cappy_core.generation.resolve_generator` says. Seeds are keyed by instruction text, so a
candidate does not depend on what else is generated with it.

* vLLM: the replica creates vLLM's async engine (``AsyncLLM``) on its event-loop thread and serves
  each request as its own coroutine (``Generator.agenerate``): the engine batches every ongoing
  request's steps continuously, so a short request does not wait for a long one. When Serve
  cancels a call (the client left, or the ingress's deadline called ``DeploymentResponse.cancel()``)
  its engine requests are aborted. ``info()`` reports ``unfinished_requests``.
* transformers: requests are batched with ``@serve.batch`` (sizes from ``user_config``); those
  sharing decodings, length and seed are one ``generate`` call, on one dedicated thread.

A failing request fails alone (a ``@serve.batch`` group that raises is run again one request at a
time). A ``ValueError`` from the backend (what the request asked for) comes back as
:class:`serve_app.api.RequestError` (422 at the ingress); anything else is the deployment's
failure (503). :meth:`check_health` runs a one-token generation unless a call succeeded in the
last ``HEALTH_FRESH_S`` (first asking an async engine if it lives): a dead engine takes the
replica out of service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from ray import serve

from cappy_core.generation.prompts import chat_prompt

logger = logging.getLogger("ray.serve")

HEALTH_FRESH_S = 30.0  # a successful call this recent proves the engine works: no probe
HEALTH_PROBE_S = 20.0  # the probe's own deadline (inside Serve's 30 s health-check timeout)
HEALTH_STUCK_S = 600.0  # a call running longer than this means the engine hangs


def _load(backend: str, model: str | None, load_kwargs: dict[str, Any]):
    """The replica's generator: vLLM on its async engine, or transformers. ``auto``: vLLM on a CUDA
    GPU, unless it is not installed or does not run the model (an encoder-decoder such as FLAN-T5);
    transformers without a GPU, where its KV-cached loop is ~12x vLLM-CPU's candidates/s for
    SmolLM2-135M (``python -m jobs.bench.sampling --paths hf vllm``)."""
    import torch
    from transformers import AutoConfig

    from cappy_core.generation import GeneratorSpec, resolve_generator

    resolved = resolve_generator(model, backend, option="generator.model")
    path = resolved.path
    spec = GeneratorSpec.from_kwargs(path, "vllm" if backend == "auto" else backend, **{
        "max_prompt_tokens": resolved.max_prompt_tokens, "async_engine": True, **load_kwargs})
    if backend == "auto":
        hf = dataclasses.replace(spec, backend="hf", engine_args={})  # vLLM's engine options do not apply
        config = AutoConfig.from_pretrained(path, trust_remote_code=bool(spec.trust_remote_code))
        if getattr(config, "is_encoder_decoder", False):
            logger.info("generator: %s is an encoder-decoder model, which vLLM does not run; using the "
                        "transformers backend", path)
            return hf.load()
        if not torch.cuda.is_available():
            logger.info("generator: no CUDA GPU; using the transformers backend (faster than vLLM on CPU; "
                        "--generator-backend vllm to override)")
            return hf.load()
        try:
            return spec.load()
        except ImportError as e:
            logger.info("generator: vLLM not usable (%s); using the transformers backend", e)
            return hf.load()
    return spec.load()


class GeneratorReplica:
    is_async = False  # serving on vLLM's async engine (set by __init__)

    def __init__(self, backend: str = "auto", model: str | None = None, load_kwargs: dict | None = None,
                 max_new_tokens: int = 64, min_new_tokens: int = 3, seed: int = 0):
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator")
        t0 = time.monotonic()
        # Serve runs the constructor on the replica's event-loop thread, where vLLM's async engine
        # must live (it is called from that loop); the transformers backend runs on the worker thread.
        self.gen = _load(backend, model, dict(load_kwargs or {}))
        self.is_async = getattr(self.gen, "engine", None) is not None
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.seed = seed
        self.batch_sizes: list[int] = []
        self.cancelled = 0  # calls whose caller left before they finished
        self._last_ok = time.monotonic()
        self._busy_since: float | None = None  # when the running backend call started
        self.info_ = {"backend": self.gen.backend, "model": self.gen.model,
                      "engine": "async" if self.is_async else "batched-thread",
                      "load_s": round(time.monotonic() - t0, 2), "pid": os.getpid()}
        logger.info("generator ready: %s", self.info_)

    def __del__(self):  # Serve calls it when the replica stops: free vLLM's engine processes
        gen = getattr(self, "gen", None)
        try:
            if gen is not None and getattr(self, "is_async", False):
                gen.close()
            elif gen is not None:
                self._thread.submit(gen.close).result(timeout=30)
            self._thread.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - at interpreter exit the thread may already be gone
            pass

    def reconfigure(self, user_config: dict) -> None:
        """``user_config``: ``max_batch_size`` and ``batch_wait_timeout_s`` of the batched call."""
        if "max_batch_size" in user_config:
            self._generate_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._generate_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    async def info(self) -> dict:
        """What the replica runs; ``unfinished_requests``: engine requests in flight (async engine);
        ``cancelled_requests``: calls whose caller left (e.g. a client that disconnected)."""
        if self.is_async:
            return dict(self.info_, unfinished_requests=self.gen.num_unfinished_requests(),
                        cancelled_requests=self.cancelled)
        return dict(self.info_, recent_batch_sizes=self.batch_sizes[-32:], cancelled_requests=self.cancelled)

    async def check_health(self) -> None:
        """Serve's periodic probe: raises when the engine cannot generate one token."""
        from cappy_core.generation import DecodingSpec

        now = time.monotonic()
        if self.is_async:
            await self.gen.engine.check_health()  # raises once the engine process is dead
            if now - self._last_ok >= HEALTH_FRESH_S:  # the probe is one more request in the running batch
                await asyncio.wait_for(self.gen.agenerate(["ping"], (DecodingSpec("greedy", "greedy"),),
                                                          max_new_tokens=1, min_new_tokens=0), timeout=HEALTH_PROBE_S)
                self._last_ok = time.monotonic()
            return
        if self._busy_since is not None:  # the single generator thread is working
            if now - self._busy_since > HEALTH_STUCK_S:
                raise RuntimeError(f"a generate call has run for {now - self._busy_since:.0f} s")
            return
        if now - self._last_ok < HEALTH_FRESH_S:
            return
        probe = partial(self.gen.generate, ["ping"], (DecodingSpec("greedy", "greedy"),), max_new_tokens=1,
                        min_new_tokens=0)
        await asyncio.wait_for(self._run(probe), timeout=HEALTH_PROBE_S)

    async def _run(self, call):
        """``call()`` on the generator thread, tracking when it ran and when it last succeeded."""
        self._busy_since = time.monotonic()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._thread, call)
        finally:
            self._busy_since = None
        self._last_ok = time.monotonic()
        return out

    async def generate(self, prompt: str | list[dict], decodings: tuple, max_new_tokens: int | None,
                       seed: int | None, stop: tuple[str, ...] = ()) -> dict:
        """``{"candidates": [Candidate's fields + generated_tokens, stopped], "prompt_tokens",
        "max_new_tokens", "chat_template"}`` for one prompt (an instruction, or chat messages
        rendered by :func:`chat_prompt`), cut by ``stop`` (:mod:`cappy_core.generation.stops`).
        On the async engine the request is its own coroutine (cancelling it aborts its engine
        requests); otherwise batched with others. This request's own error is raised here."""
        try:
            if self.is_async:
                result = await self._generate_async(prompt, decodings, max_new_tokens, seed)
            else:
                result = await self._generate_batch(prompt, decodings, max_new_tokens, seed)
                if isinstance(result, BaseException):
                    raise result
            return await self._with_stops(result, stop)
        except asyncio.CancelledError:  # the caller left: on vLLM, its engine requests are aborted
            self.cancelled += 1
            raise

    async def _with_stops(self, result: dict, stop: tuple[str, ...]) -> dict:
        """``result`` with its candidates as dicts, cut by ``stop`` and the cut ones rescored."""
        from cappy_core.generation.stops import apply_cuts, rescore_request, stop_cuts

        cands, text = result.pop("candidates"), result.pop("prompt_text")
        cuts = stop_cuts(cands, stop) if stop else []
        lps = []
        if cuts:
            texts, eos = rescore_request(cuts)
            try:
                lps = await self._call("token_logprobs", [text] * len(texts), texts, add_eos=eos)
            except Exception as e:  # noqa: BLE001 - a ValueError is the request's fault (422)
                raise _as_request_error(e) from e
        return dict(result, candidates=apply_cuts(cands, cuts, lps))

    async def _call(self, method: str, *args, **kwargs):
        """``gen.<method>`` on the async engine (its ``a<method>``), or on the generator thread."""
        if self.is_async:
            return await getattr(self.gen, "a" + method)(*args, **kwargs)
        return await self._run(partial(getattr(self.gen, method), *args, **kwargs))

    async def token_logprobs(self, prompt: str | list[dict], token_ids: list[int]) -> list[tuple[str, float]]:
        """``(token text, raw log-probability)`` of a candidate's tokens (its ``token_ids``, without
        the end-of-sequence token) after ``prompt``: an OpenAI ``logprobs`` answer for a choice."""
        ids = list(token_ids)
        if ids and ids[-1] in self.gen.eos_ids:
            ids = ids[:-1]
        if not ids:
            return []
        try:
            rendered = prompt if isinstance(prompt, str) else chat_prompt(prompt, self.gen.tokenizer)
            (lps,) = await self._call("ids_logprobs", [rendered], [ids])
        except Exception as e:  # noqa: BLE001 - a ValueError is the request's fault (422)
            raise _as_request_error(e) from e
        return [(self.gen.tokenizer.decode([tok]), float(lp)) for tok, lp in zip(ids, lps)]

    async def _generate_async(self, prompt, decodings: tuple, max_new_tokens: int | None, seed: int | None) -> dict:
        try:
            text = prompt if isinstance(prompt, str) else chat_prompt(prompt, self.gen.tokenizer)
            n_new = max_new_tokens or self.max_new_tokens
            (cands,) = await self.gen.agenerate([text], decodings, max_new_tokens=n_new,
                                                min_new_tokens=min(self.min_new_tokens, n_new),
                                                seed=self.seed if seed is None else seed)
        except Exception as e:  # noqa: BLE001 - a ValueError is the request's fault (422)
            raise _as_request_error(e) from e
        self._last_ok = time.monotonic()
        return _result(cands, len(self.gen.encode_prompts([text])[0]), n_new, self.gen.tokenizer, prompt, text)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, prompts: list, decodings: list[tuple], max_new_tokens: list[int | None],
                              seeds: list[int | None]) -> list:
        """Per request, its result (see :meth:`generate`) or the exception that request alone raised.

        ``decodings``: a tuple of ``DecodingSpec`` per request; ``max_new_tokens`` / ``seeds``:
        None → the deployment's defaults.
        """
        self.batch_sizes = (self.batch_sizes + [len(prompts)])[-256:]
        out: list = [None] * len(prompts)
        texts: dict[int, str] = {}
        for i, p in enumerate(prompts):
            try:
                texts[i] = p if isinstance(p, str) else chat_prompt(p, self.gen.tokenizer)
            except Exception as e:  # noqa: BLE001 - a template that refuses these messages
                out[i] = _as_request_error(e)
        groups: dict[tuple, list[int]] = {}
        for i in texts:
            n = max_new_tokens[i]
            key = (tuple(decodings[i]), n or self.max_new_tokens, self.seed if seeds[i] is None else seeds[i])
            groups.setdefault(key, []).append(i)
        for (specs, n_new, seed), idx in groups.items():
            def call(rows, specs=specs, n_new=n_new, seed=seed):
                def run():
                    batch = [texts[i] for i in rows]
                    cands = self.gen.generate(batch, specs, max_new_tokens=n_new,
                                              min_new_tokens=min(self.min_new_tokens, n_new), seed=seed)
                    return list(zip(cands, (len(ids) for ids in self.gen.encode_prompts(batch))))
                return run
            try:
                results = dict(zip(idx, await self._run(call(idx))))
            except Exception as e:  # noqa: BLE001 - find which request failed: run them one by one
                if len(idx) == 1:
                    results = {idx[0]: _as_request_error(e)}
                else:
                    results = {}
                    for i in idx:
                        try:
                            results[i] = (await self._run(call([i])))[0]
                        except Exception as e1:  # noqa: BLE001 - this request's own failure
                            results[i] = _as_request_error(e1)
            for i, r in results.items():
                out[i] = r if isinstance(r, BaseException) else _result(r[0], r[1], n_new, self.gen.tokenizer,
                                                                        prompts[i], texts[i])
        return out


def _result(cands: list, prompt_tokens: int, max_new_tokens: int, tokenizer: Any, prompt: str | list,
            text: str) -> dict:
    """One request's answer before its stop strings (see :meth:`GeneratorReplica.generate`):
    its ``Candidate`` records and the prompt text they continue."""
    templated = bool(getattr(tokenizer, "chat_template", None)) and not isinstance(prompt, str)
    return {"candidates": list(cands), "prompt_text": text, "prompt_tokens": prompt_tokens,
            "max_new_tokens": max_new_tokens, "chat_template": templated}


def _as_request_error(e: Exception) -> Exception:
    """A backend ``ValueError`` is about what the request asked for (→ 422); the rest stays as is."""
    from serve_app.api import RequestError

    if isinstance(e, ValueError) and not isinstance(e, RequestError):
        return RequestError(str(e))
    return e


# The replica class is a module attribute of its own, so cloudpickle sends it by reference (the replica
# imports it) rather than by value: a by-value copy would carry the @serve.batch queue, which after any
# in-process use holds an unpicklable weakref.
GeneratorDeployment = serve.deployment(GeneratorReplica, name="Generator",
                                       ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
