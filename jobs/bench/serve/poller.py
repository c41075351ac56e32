"""The Scorer's replica counts over the whole run, sampled from ``serve.status()`` in a thread
(the autoscaling figures and the timeline), and a fresh read to wait for a count."""

from __future__ import annotations

import threading
import time

from jobs.bench.serve.config import APP, log


class ReplicaPoller:
    """Samples the Scorer's replica states from ``serve.status()`` every ``period`` seconds."""

    def __init__(self, period: float):
        self.period = period
        self.samples: list[tuple[float, int, int]] = []  # (t, running, all)
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> tuple[int, int]:
        from ray import serve

        dep = serve.status().applications[APP].deployments["Scorer"]
        states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
        return states.get("RUNNING", 0), sum(states.values())

    def _run(self):
        while not self._stop.is_set():
            try:
                running, total = self.read()
                self.samples.append((round(time.monotonic() - self.t0, 1), running, total))
            except Exception as e:  # noqa: BLE001 - keep sampling
                log(f"serve.status failed: {e}")
            self._stop.wait(self.period)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def changes(self) -> list[list]:
        """[t, running, total] at the start and whenever the counts change."""
        out: list[list] = []
        for t, r, a in self.samples:
            if not out or (out[-1][1], out[-1][2]) != (r, a):
                out.append([t, r, a])
        return out

    def wait_for(self, pred, timeout: float) -> float | None:
        """Seconds until ``pred(running)`` holds (checked on fresh reads), or None."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if pred(self.read()[0]):
                    return round(time.monotonic() - t0, 1)
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.5)
        return None
