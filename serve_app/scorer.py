"""``Scorer`` deployment: the Cappy scorer behind ``@serve.batch``, per-task scorers multiplexed.

A thin shell over :class:`cappy_core.scorer.Scorer`: one batched method, :meth:`score`, takes
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
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve

from cappy_core.selectors import read_selector
from serve_app.args import resolve_task_scorer

logger = logging.getLogger("ray.serve")

DEFAULT_ID = "default"


class UnknownTaskError(ValueError):
    """The multiplexed id names no scorer and ``unknown_task="error"``."""


@serve.deployment(name="Scorer", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class ScorerDeployment:
    def __init__(self, model: str = "minilm", *, dtype: str = "float32", device: str | None = None,
                 max_length: int | None = None, seed: int = 0, task_scorers: dict | None = None,
                 scorers_dir: str | None = None, unknown_task: str = "default",
                 max_models_per_replica: int = 3, score_batch_size: int = 128,
                 score_max_tokens: int | None = 1024, torch_threads: int | None = None):
        import torch

        from cappy_core.scorer import Scorer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._load_kwargs = dict(dtype=dtype, device=device)
        self.default = Scorer.from_pretrained(model, max_length=max_length, seed=seed, **self._load_kwargs)
        self.model = model
        self.task_scorers = dict(task_scorers or {})
        self.scorers_dir = scorers_dir
        self.unknown_task = unknown_task
        self.score_kwargs = dict(batch_size=score_batch_size, max_tokens=score_max_tokens)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else str(os.getpid())
        self.batches: list[tuple[int, int]] = []  # (requests, pairs) of recent batches

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
            self.score.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.score.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    async def _scorer_for(self, model_id: str):
        if model_id and resolve_task_scorer(model_id, self.task_scorers, self.scorers_dir) is not None:
            return await self._task_scorer(model_id), model_id
        if model_id and self.unknown_task == "error":
            raise UnknownTaskError(f"no scorer for task {model_id!r} (scorers_dir={self.scorers_dir!r}, "
                                   f"task_scorers={sorted(self.task_scorers)})")
        return self.default, DEFAULT_ID

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score(self, instructions: list[str], responses: list[list[str]]) -> list[dict]:
        """Raw scores of each request's responses, plus which scorer and what batch made them."""
        scorer, name = await self._scorer_for(serve.get_multiplexed_model_id())
        flat_i = [ins for ins, rs in zip(instructions, responses) for _ in rs]
        flat_r = [r for rs in responses for r in rs]
        scores = await asyncio.to_thread(scorer.score, flat_i, flat_r, **self.score_kwargs)
        self.batches = (self.batches + [(len(instructions), len(flat_r))])[-1024:]
        out, start = [], 0
        for rs in responses:
            out.append({"scores": scores[start:start + len(rs)], "scorer": name,
                        "selector": getattr(scorer, "selector", None),
                        "batch_requests": len(instructions), "batch_pairs": len(flat_r), "replica": self.replica})
            start += len(rs)
        return out

    async def info(self) -> dict:
        """What this replica serves, its process id and its recent batch sizes."""
        return {"model": self.model, "replica": self.replica, "pid": os.getpid(), "time": time.time(),
                "recent_batches": self.batches[-64:]}
