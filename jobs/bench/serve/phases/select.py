"""Phase ``select`` (3 of the docstring's list): ``/v1/select`` (``--select-candidates``
candidates) at each ``--select-concurrency``; its p50 is also the ``poison`` phase's baseline."""

from __future__ import annotations

from jobs.bench.serve.client import closed_loop_steps


def select_phase(cfg, url, bodies, poller, marks) -> dict:
    """The figures of :func:`closed_loop` on /v1/select at each concurrency, by concurrency."""
    return closed_loop_steps(url, "/v1/select", bodies, cfg.select_concurrency, cfg.select_duration_s, poller, marks)
