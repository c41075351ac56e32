"""``Scorer`` deployment: the Cappy scorer behind ``@serve.batch``, per-task scorers multiplexed.

A thin shell over :class:`cappy_core.scorer.model.Scorer`: one batched method, :meth:`score`, takes
``(instruction, responses)`` per request, concatenates the pairs of every request in the batch
into one :meth:`Scorer.score` call (which sorts them by length and pads per bucket), and splits
the scores back. Batch size and wait come from ``user_config`` (``reconfigure``), so ``serve
deploy`` changes them without restarting replicas. Scoring runs on a worker thread, so the event
loop keeps queueing the next batch meanwhile.

Per-task scorers: the request's multiplexed model id (``handle.options(multiplexed_model_id=id)``
or the ``serve_multiplexed_model_id`` HTTP header) names a task; Serve splits batches by id and
routes an id to replicas that already hold it. :func:`serve_app.args.resolve_task_scorer` maps an
id to a checkpoint; loaded task scorers live in an LRU of ``max_models_per_replica``. The empty
id, and ids without a checkpoint (unless ``unknown_task="error"``), use the default scorer.

A failing request fails alone: a batch that raises is scored again one request at a time.
:meth:`check_health` scores one pair with the default scorer (a finite score) unless a batch
succeeded in the last ``HEALTH_FRESH_S``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time

from ray import serve

from cappy_core.data.tasks import UnknownTaskError
from cappy_core.selection.selectors import read_selector
from serve_app.args import list_task_scorers, resolve_task_scorer

logger = logging.getLogger("ray.serve")

DEFAULT_ID = "default"
HEALTH_FRESH_S = 30.0  # a batch scored this recently proves the model works: no probe


class ScorerReplica:
    def __init__(self, model: str = "minilm", *, dtype: str = "float32", device: str | None = None,
                 max_length: int | None = None, seed: int = 0, task_scorers: dict | None = None,
                 scorers_dir: str | None = None, unknown_task: str = "default",
                 max_models_per_replica: int = 3, score_batch_size: int = 128,
                 score_max_tokens: int | None = 1024, torch_threads: int | None = None,
                 selector: dict | None = None):
        import torch

        from cappy_core.scorer.model import Scorer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._load_kwargs = dict(dtype=dtype, device=device)
        self.default = Scorer.from_pretrained(model, max_length=max_length, seed=seed, **self._load_kwargs)
        # The default scorer's fused weights: given, else those stored beside it (the sweep's selector scorer).
        self.default.selector = selector or (read_selector(model) if os.path.isdir(model) else None)
        self.model = model
        self.task_scorers = dict(task_scorers or {})
        self.scorers_dir = scorers_dir
        self.unknown_task = unknown_task
        self.score_kwargs = dict(batch_size=score_batch_size, max_tokens=score_max_tokens)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else str(os.getpid())
        self.batches: list[tuple[int, int]] = []  # (requests, pairs) of recent batches
        self._last_ok = time.monotonic()

        async def load_task_scorer(model_id: str):
            path = resolve_task_scorer(model_id, self.task_scorers, self.scorers_dir)
            logger.info("scorer: loading task scorer %r from %s", model_id, path)
            scorer = await asyncio.to_thread(Scorer.from_pretrained, path, **self._load_kwargs)
            scorer.selector = read_selector(path)  # fused weights the sweep fitted for this task, if any
            return scorer

        # Built here, not as a decorated method, so the LRU size comes from the config.
        self._task_scorer = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load_task_scorer)

    def reconfigure(self, user_config: dict) -> None:
        """``user_config``: ``max_batch_size`` and ``batch_wait_timeout_s`` of :meth:`score`."""
        if "max_batch_size" in user_config:
            self._score_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._score_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    async def _scorer_for(self, model_id: str):
        if model_id and resolve_task_scorer(model_id, self.task_scorers, self.scorers_dir) is not None:
            return await self._task_scorer(model_id), model_id
        if model_id and self.unknown_task == "error":
            # the client sees the id only; where we looked stays in the log
            logger.info("scorer: no scorer for %r (scorers_dir=%r, task_scorers=%s)", model_id, self.scorers_dir,
                        sorted(self.task_scorers))
            raise UnknownTaskError(f"no scorer for task {model_id!r}")
        return self.default, DEFAULT_ID

    async def score(self, instruction: str, responses: list[str]) -> dict:
        """Raw scores of one request's responses, batched with concurrent requests; this
        request's own error is raised here."""
        result = await self._score_batch(instruction, responses)
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, instructions: list[str], responses: list[list[str]]) -> list:
        """Per request, its scores plus which scorer and what batch made them, or its exception."""
        scorer, name = await self._scorer_for(serve.get_multiplexed_model_id())
        flat_i = [ins for ins, rs in zip(instructions, responses) for _ in rs]
        flat_r = [r for rs in responses for r in rs]
        try:
            scores = await asyncio.to_thread(scorer.score, flat_i, flat_r, **self.score_kwargs)
        except Exception:  # noqa: BLE001 - find which request failed: score them one by one
            if len(instructions) == 1:
                raise
            scores = None
        self.batches = (self.batches + [(len(instructions), len(flat_r))])[-1024:]
        out, start = [], 0
        for ins, rs in zip(instructions, responses):
            meta = {"scorer": name, "selector": getattr(scorer, "selector", None),
                    "batch_requests": len(instructions), "batch_pairs": len(flat_r), "replica": self.replica}
            if scores is not None:
                out.append({"scores": scores[start:start + len(rs)], **meta})
            else:
                try:
                    out.append({"scores": await asyncio.to_thread(scorer.score, [ins] * len(rs), rs,
                                                                  **self.score_kwargs), **meta})
                except Exception as e:  # noqa: BLE001 - this request's own failure
                    out.append(e)
            start += len(rs)
        if any(not isinstance(o, BaseException) for o in out):
            self._last_ok = time.monotonic()
        return out

    async def check_health(self) -> None:
        """Serve's periodic probe: raises when the default scorer cannot score one pair."""
        if time.monotonic() - self._last_ok < HEALTH_FRESH_S:
            return
        (value,) = await asyncio.to_thread(self.default.score, ["ping"], ["pong"])
        if not math.isfinite(value):
            raise RuntimeError(f"the default scorer gives {value} for a test pair")
        self._last_ok = time.monotonic()

    async def info(self) -> dict:
        """What this replica serves (the default scorer, the task ids it has scorers for), its
        process id and its recent batch sizes."""
        return {"model": self.model, "replica": self.replica, "pid": os.getpid(), "time": time.time(),
                "tasks": list_task_scorers(self.task_scorers, self.scorers_dir), "recent_batches": self.batches[-64:],
                "untrained_head": bool(getattr(self.default, "fresh_params", ())),
                "selector": self.default.selector}


# The replica class is a module attribute of its own, so cloudpickle sends it by reference (the replica
# imports it) rather than by value: a by-value copy would carry the @serve.batch queue, which after any
# in-process use holds an unpicklable weakref.
ScorerDeployment = serve.deployment(ScorerReplica, name="Scorer",
                                    ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
