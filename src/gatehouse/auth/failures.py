"""Failed authentication is throttled per client address, more strictly than normal traffic.

Only failures count, so callers with good credentials never reach the limit; an address that guessed
``per_minute`` times within a minute gets 429 (with ``Retry-After``) for every request until the window
passes, before its next guess is even checked. It all happens in memory: a refused guess costs no database
connection.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from gatehouse.errors import ApiError

MAX_TRACKED = 10_000


class TooManyFailures(ApiError):
    status, code = 429, "GH429"


class FailureThrottle:
    def __init__(self, per_minute: int) -> None:
        self._limit = RateLimitItemPerMinute(per_minute)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._last_failure: dict[str, float] = {}
        """Addresses that failed within the window: every other caller skips the limiter entirely."""

    def check(self, client: str) -> None:
        """429 when this client has used up its failures for the window."""
        last = self._last_failure.get(client)
        if last is None:
            return
        if time.monotonic() - last > 60:
            del self._last_failure[client]
            return
        if not self._limiter.test(self._limit, client):
            stats = self._limiter.get_window_stats(self._limit, client)
            wait = max(1, math.ceil(stats.reset_time - time.time()))
            raise TooManyFailures("Too many failed authentication attempts", headers={"Retry-After": str(wait)},
                                  hint=f"Wait {wait} s; check the key or token before retrying.")

    def failed(self, client: str) -> None:
        self._limiter.hit(self._limit, client)
        now = time.monotonic()
        self._last_failure[client] = now
        if len(self._last_failure) > MAX_TRACKED:  # many failing addresses: forget those past their window
            self._last_failure = {c: t for c, t in self._last_failure.items() if now - t <= 60}
