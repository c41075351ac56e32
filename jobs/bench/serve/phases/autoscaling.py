"""Phase ``autoscaling`` (5 of the docstring's list): the Scorer replica counts sampled every
``--poll-s`` through the phases before it (their peak), then, the load stopped, the time until the
count is back at ``min_replicas``."""

from __future__ import annotations

from jobs.bench.serve.config import log


def autoscaling_phase(cfg, poller, marks) -> dict:
    """Peak replica counts so far and the seconds idle until the Scorer scaled back down (None: it
    did not within ``--settle-timeout-s``)."""
    peak = max((r for _, r, _ in poller.samples), default=0)
    peak_all = max((a for _, _, a in poller.samples), default=0)  # starting ones too: the decision
    down = poller.wait_for(lambda r: r <= cfg.min_replicas, cfg.settle_timeout_s)
    marks.append([poller.now(), f"back to {cfg.min_replicas}" if down is not None else "no scale-down"])
    log(f"autoscaling: peak {peak} running; back to min after {down} s idle")
    return {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "peak_running": peak, "peak_replicas_incl_starting": peak_all, "scale_down_after_idle_s": down}
