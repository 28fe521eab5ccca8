"""The requests waiting for a pooled connection: first come, first served, each with its own deadline.

Deadlines are kept by one timer per queue (:meth:`Waiters._sweep`), not one per waiter: a busy app's requests
wait here often, and a timer per wait was a measurable part of a request. That single timer is what times out
every waiter, so it is guarded: an error in a sweep is logged, and the sweep still comes back.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TypeAlias

from gatehouse.db import Connection

log = logging.getLogger(__name__)

SWEEP_RETRY_S = 0.05
"""How soon a sweep that could not fail a late waiter comes back (not at once: it would spin)."""

Waiter: TypeAlias = "asyncio.Future[Connection | None]"


class Waiters:
    """A FIFO of waiters; each gets a connection, ``None`` (look again), or the error ``timed_out()`` makes."""

    __slots__ = ("_name", "_queue", "_timed_out", "_timer")

    def __init__(self, timed_out: Callable[[], BaseException], name: str = "-") -> None:
        self._queue: deque[tuple[float, Waiter]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = timed_out
        self._name = name

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Waiter:
        waiter: Waiter = loop.create_future()
        self._queue.append((deadline, waiter))
        if self._timer is None or deadline < self._timer.when():
            self._schedule(loop, deadline)
        return waiter

    def wake_one(self, value: Connection | None) -> bool:
        """Hand ``value`` to the first waiter still waiting; False when there is none."""
        queue = self._queue
        while queue:
            _, waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(value)
                return True
        return False

    def close(self) -> None:
        """Wake every waiter with ``None`` (to look again and find the pool closed); no more sweeps."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.wake_one(None):
            pass

    def _schedule(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the waiters whose deadline has passed; come back for the next deadline, whatever happens."""
        self._timer = None
        now = loop.time()
        again = False
        try:
            again = self._fail_late(now)
        except Exception as exc:
            log.error("pool %s: timing out waiters failed (%s); trying again", self._name, type(exc).__name__)
            again = True
        finally:
            if self._queue:
                when = min(deadline for deadline, _ in self._queue)
                self._schedule(loop, max(when, now + SWEEP_RETRY_S) if again else when)

    def _fail_late(self, now: float) -> bool:
        """True when a late waiter could not be failed: it stays in the queue, to be tried again shortly."""
        pending: deque[tuple[float, Waiter]] = deque()
        stuck = False
        for deadline, waiter in self._queue:
            if waiter.done():  # served or cancelled already
                continue
            if deadline <= now:
                try:
                    waiter.set_exception(self._timed_out())
                    continue
                except Exception as exc:
                    log.error("pool %s: could not time out a waiter (%s)", self._name, type(exc).__name__)
                    stuck = True
            pending.append((deadline, waiter))
        self._queue = pending
        return stuck
