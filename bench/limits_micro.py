"""CPU per rate-limit check: local only, shared through Redis with leases, and one EVALSHA per check.

    .venv/bin/python bench/limits_micro.py [redis://127.0.0.1:6379/0]

CPU is ``time.process_time`` of this process (the client's cost; Redis's own CPU is not counted), per check of
one app limit that never refuses. ``shared, leased`` runs as fast as it can (leases grow to their cap);
``shared, N/s`` feeds the limiter a clock that advances 1/N s per check, so its leases are sized for a steady N
requests a second (one call per ~N/10 checks), which is what a server sees; ``naive`` asks Redis for every
check (lease horizon 0: one token per call).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Callable

from gatehouse.config import AppConfig, Quota
from gatehouse.limits.admission import RateLimiter
from gatehouse.limits.shared import SharedLimits
from gatehouse.project import App

APP = App("bench", AppConfig(quota=Quota(rate="100000000/s", burst=100_000_000)), "bench")


class Steady:
    """A clock that advances by ``step`` on every reading after the first of a check: N requests a second."""

    def __init__(self, per_second: float) -> None:
        self.now = time.monotonic()
        self.step = 1 / per_second

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step


async def _per_check(limiter: RateLimiter, n: int, tick: Callable[[], None] = lambda: None) -> tuple[float, int]:
    for _ in range(min(n, 2000)):  # warm up: script loaded, leases sized
        tick()
        headers = limiter.check(APP, None, ("read",))
        if not isinstance(headers, dict):
            await headers
    calls = limiter.shared.stats.lease_calls if limiter.shared else 0
    start = time.process_time()
    for _ in range(n):
        tick()
        headers = limiter.check(APP, None, ("read",))
        if not isinstance(headers, dict):
            await headers
    took = time.process_time() - start
    calls = (limiter.shared.stats.lease_calls if limiter.shared else 0) - calls
    return took / n * 1e6, calls


async def _shared(url: str, n: int, *, steady: int = 0, horizon: float = 0.1) -> tuple[float, int]:
    clock = Steady(steady) if steady else None
    shared = SharedLimits(url, key_prefix=f"bench:{uuid.uuid4().hex}:", horizon=horizon,
                          clock=clock or time.monotonic)
    limiter = RateLimiter(shared=shared)
    await limiter.start()
    try:
        return await _per_check(limiter, n, clock.tick if clock else lambda: None)
    finally:
        await limiter.stop()


async def main(url: str) -> None:
    rows = [("local only (no Redis)", *await _per_check(RateLimiter(), 200_000))]
    rows.append(("shared, leased (as fast as it goes)", *await _shared(url, 200_000)))
    for rate in (1000, 5000):
        rows.append((f"shared, steady {rate}/s (leases ~{rate // 10})", *await _shared(url, 50_000, steady=rate)))
    rows.append(("naive: one EVALSHA per check", *await _shared(url, 5_000, horizon=0)))
    print(f"{'case':<44} {'CPU µs/check':>12} {'Redis calls':>12}")
    for name, micros, calls in rows:
        print(f"{name:<44} {micros:>12.2f} {calls:>12}")


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"
    try:
        import uvloop  # what the server runs on
    except ImportError:  # pragma: no cover - as on Windows
        asyncio.run(main(target))
    else:
        uvloop.run(main(target))
