"""Admission control: refuse at once (503 + Retry-After) what could not be answered within the
latency budget, instead of letting every request wait.

The service rate is measured, not configured: while at least one request is in flight the
service is busy, and busy time divided by the requests completed in it is the time the
service spends per request at the current load, whatever the hardware, model, batching or
worker count. A new request is admitted while ``(in_flight + 1)`` such intervals fit in the
budget; a floor of a few requests keeps a cold or idle service open.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from service.errors import Overloaded

_ALPHA = 0.2  # weight of each new measurement in the moving average
_WINDOW_S = 0.25  # under sustained load, fold a measurement this often


class AdmissionControl:
    def __init__(
        self,
        budget_s: float,
        min_in_flight: int = 4,
        initial_interval_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_s = budget_s
        self.min_in_flight = min_in_flight
        self.interval_s = initial_interval_s
        self.in_flight = 0
        self._clock = clock
        self._busy_since = 0.0
        self._done = 0
        self._measured = False  # the first measurement replaces the initial guess

    @property
    def limit(self) -> int:
        """Requests that may be in flight at once at the measured rate."""
        return max(self.min_in_flight, int(self.budget_s / self.interval_s))

    def expected_wait_s(self) -> float:
        return (self.in_flight + 1) * self.interval_s

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place for one request; raise :class:`Overloaded` when none is left."""
        if self.in_flight >= self.limit:
            raise Overloaded(
                "the service is at capacity for its latency budget",
                retry_after=max(1.0, math.ceil(self.expected_wait_s() - self.budget_s)),
            )
        if self.in_flight == 0:
            self._busy_since = self._clock()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._done += 1
            self._measure()

    def _measure(self) -> None:
        now = self._clock()
        busy = now - self._busy_since
        if self.in_flight > 0 and busy < _WINDOW_S:
            return
        if busy > 0:
            sample = busy / self._done
            weight = _ALPHA if self._measured else 1.0
            self.interval_s += weight * (sample - self.interval_s)
            self._measured = True
        self._busy_since, self._done = now, 0
