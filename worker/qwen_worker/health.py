"""Readiness of one worker process: model loaded and warmed, not draining, and not cooling down after failures."""
from __future__ import annotations

import threading
import time


class Health:
    def __init__(self, failure_threshold: int, cooldown_s: float, clock=time.monotonic):
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._lock = threading.Lock()
        self.state = "loading"  # loading -> ready, or loading -> failed
        self.load_error: str | None = None
        self._failures_in_a_row = 0
        self._cooldown_until = 0.0
        self.draining = False  # an operator asked it to take no new work (POST /admin/drain)
        self.broken: str | None = None  # a sticky device error: /healthz fails, the instance must restart

    def mark_ready(self) -> None:
        with self._lock:
            self.state = "ready"

    def set_draining(self, draining: bool) -> None:
        with self._lock:
            self.draining = draining

    def mark_failed(self, error: str) -> None:
        with self._lock:
            self.state = "failed"
            self.load_error = error

    def mark_broken(self, error: str) -> None:
        """The device failed for good: nothing is accepted any more and the liveness probe fails."""
        with self._lock:
            self.state = "failed"
            self.load_error = self.broken = error

    def record_success(self) -> None:
        with self._lock:
            self._failures_in_a_row = 0

    def record_failure(self) -> None:
        with self._lock:
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= self.failure_threshold:
                self._cooldown_until = self.clock() + self.cooldown_s
                self._failures_in_a_row = 0

    def cooling_down(self) -> bool:
        return self.clock() < self._cooldown_until

    def accepting(self) -> bool:
        """Whether requests may be queued: the model is loaded and no drain was asked for (a cool-down
        only steers balancers away)."""
        return self.state == "ready" and not self.draining

    def ready(self) -> bool:
        return self.accepting() and not self.cooling_down()

    def reason(self) -> str:
        if self.state != "ready":
            return self.state
        if self.draining:
            return "draining"
        return "cooling_down" if self.cooling_down() else "ready"
