"""A circuit breaker in front of the shared store: after a few failures in a row, or one timeout, stop asking.

A Redis that is slow costs every request that waits for it; one that is down costs a connection attempt per
request. Once the breaker is *open* the limiter decides locally without trying Redis at all (cost: nothing),
until a jittered backoff has passed; then exactly one call is let through as a trial (*half-open*). Its success
closes the breaker, its failure opens it again for twice as long (up to a cap). The jitter keeps a fleet of
instances that lost Redis together from all coming back in the same millisecond.

The breaker logs once per outage (when it opens from closed, and when it closes again), never per request: an
outage of a minute at 5 000 requests a second must not write 300 000 lines.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Callable

log = logging.getLogger("gatehouse.limits")


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Whether the shared store may be asked now; fed with the outcome of every call that was let through."""

    def __init__(self, clock: Callable[[], float], *, failures: int = 3, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0, jitter: Callable[[], float] = random.random,
                 user: str = "rate limits", fallback: str = "each instance enforces its share (1/{share}) of "
                                                            "every limit") -> None:
        self._user, self._fallback = user, fallback
        """Who uses the store, and what happens without it: the two halves of the log lines."""
        self._clock = clock
        self._threshold = failures
        self._base = backoff_s
        self._max = max_backoff_s
        self._jitter = jitter
        self.state = State.CLOSED
        """Read on every decision: ``CLOSED`` is the only state in which the store is asked without a trial."""
        self.opened = 0
        """How many times it opened from closed (outages)."""
        self._failed = 0
        self._backoff = backoff_s
        self._retry_at = 0.0
        self._outage_began = 0.0

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def trial_due(self, now: float) -> bool:
        """Open, and its backoff has passed: the next call may be the trial."""
        return self.state is State.OPEN and now >= self._retry_at

    def permit(self) -> bool:
        """May a call go to the store now? Closed: yes. Open past its backoff: yes, once (it becomes the trial
        and the breaker half-open until it ends). Otherwise no."""
        if self.state is State.CLOSED:
            return True
        if self.trial_due(self._clock()):
            self.state = State.HALF_OPEN
            return True
        return False

    def succeeded(self) -> None:
        if self.state is not State.CLOSED:
            log.warning("%s: the shared store answers again after %.1f s", self._user,
                        self._clock() - self._outage_began)
            self.state = State.CLOSED
            self._backoff = self._base
        self._failed = 0

    def failed(self, reason: str, *, timeout: bool, share: int = 1) -> None:
        """A call failed (``reason`` names the error's class, never its text: it may hold an address)."""
        self._failed += 1
        now = self._clock()
        if self.state is State.CLOSED:
            if not timeout and self._failed < self._threshold:
                return
            self.opened += 1
            self._outage_began = now
            log.warning("%s: the shared store failed (%s); %s until it answers again", self._user, reason,
                        self._fallback.format(share=share))
        elif self.state is State.HALF_OPEN:  # the trial failed: wait longer before the next one
            self._backoff = min(self._max, self._backoff * 2)
        self.state = State.OPEN
        self._retry_at = now + self._backoff * (0.5 + self._jitter() / 2)
