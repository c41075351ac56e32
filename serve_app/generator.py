"""``Generator`` deployment: candidates with log-likelihoods from a ``cappy_core.generation`` backend.

A thin shell over :func:`cappy_core.generation.load_generator`: the vLLM backend (``vllm.LLM``)
when it is installed, the transformers backend otherwise (or when asked); the model name means
what :func:`cappy_core.generation.resolve_generator` says. Requests are batched
with ``@serve.batch`` (sizes from ``user_config``) and requests that share decodings, length and
seed go to the backend as one ``generate`` call; seeds are keyed by instruction text, so a
candidate does not depend on what else was in its batch. The backend is created and called on one
dedicated thread: the replica's event loop never blocks, and vLLM's engine always sees the same
caller thread.
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

logger = logging.getLogger("ray.serve")


def _load(backend: str, model: str | None, load_kwargs: dict[str, Any]):
    from cappy_core.generation import load_generator, resolve_generator

    resolved = resolve_generator(model, backend, option="generator.model")
    path = resolved.path
    load_kwargs = {"max_prompt_tokens": resolved.max_prompt_tokens, **load_kwargs}
    if backend == "auto":
        try:
            return load_generator("vllm", path, **load_kwargs)
        except ImportError as e:
            logger.info("generator: vLLM not usable (%s); using the transformers backend", e)
            hf_kwargs = {k: v for k, v in load_kwargs.items()
                         if k in ("max_prompt_tokens", "dtype", "device", "batch_rows", "trust_remote_code",
                                   "allow_pickle")}
            return load_generator("hf", path, **hf_kwargs)
    return load_generator(backend, path, **load_kwargs)


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class GeneratorDeployment:
    def __init__(self, backend: str = "auto", model: str | None = None, load_kwargs: dict | None = None,
                 max_new_tokens: int = 64, min_new_tokens: int = 3, seed: int = 0):
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator")
        t0 = time.monotonic()
        self.gen = self._thread.submit(_load, backend, model, dict(load_kwargs or {})).result()
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.seed = seed
        self.batch_sizes: list[int] = []
        self.info_ = {"backend": self.gen.backend, "model": self.gen.model,
                      "load_s": round(time.monotonic() - t0, 2), "pid": os.getpid()}
        logger.info("generator ready: %s", self.info_)

    def __del__(self):  # Serve calls it when the replica stops: free vLLM's engine processes
        gen = getattr(self, "gen", None)
        if gen is not None:
            self._thread.submit(gen.close).result(timeout=30)
        self._thread.shutdown(wait=False)

    def reconfigure(self, user_config: dict) -> None:
        """``user_config``: ``max_batch_size`` and ``batch_wait_timeout_s`` of the batched call."""
        if "max_batch_size" in user_config:
            self.generate.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.generate.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    async def info(self) -> dict:
        return dict(self.info_, recent_batch_sizes=self.batch_sizes[-32:])

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate(self, instructions: list[str], decodings: list[tuple], max_new_tokens: list[int | None],
                       seeds: list[int | None]) -> list[list[dict]]:
        """Candidates of each instruction as dicts (``cappy_core.generation.Candidate`` fields).

        ``decodings``: a tuple of ``DecodingSpec`` per request; ``max_new_tokens`` / ``seeds``:
        None → the deployment's defaults.
        """
        self.batch_sizes = (self.batch_sizes + [len(instructions)])[-256:]
        groups: dict[tuple, list[int]] = {}
        for i, (d, n, s) in enumerate(zip(decodings, max_new_tokens, seeds)):
            key = (tuple(d), n or self.max_new_tokens, self.seed if s is None else s)
            groups.setdefault(key, []).append(i)
        out: list[list[dict]] = [[] for _ in instructions]
        loop = asyncio.get_running_loop()
        for (specs, n_new, seed), idx in groups.items():
            call = partial(self.gen.generate, [instructions[i] for i in idx], specs, max_new_tokens=n_new,
                           min_new_tokens=min(self.min_new_tokens, n_new), seed=seed)
            cands = await loop.run_in_executor(self._thread, call)
            for i, cs in zip(idx, cands):
                out[i] = [dataclasses.asdict(c) for c in cs]
        return out

