"""The deadlines of the request bodies being read on one port: one timer for all of them, not one per body.

Why: ``asyncio.timeout`` around each body read made, started, stopped and freed a timer per request: about 4 µs
of the event loop's thread on uvloop, a thirtieth of what an insert costs that thread, and that thread serves
every request. A body's deadline is coarse (``[server] body_timeout_s``, 30 s by default), so one timer that
looks at the readers every :func:`sweep_interval` refuses a late body as surely: up to that interval later.

A reader past its deadline is cancelled, and :meth:`BodyDeadlines.refusal` turns that cancellation, and only
that one, into :class:`~gatehouse.errors.BodyTimeout` (408), as ``asyncio.timeout`` turns its own into
``TimeoutError``: a cancellation from elsewhere (the server stopping) stays a cancellation.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gatehouse.errors import BodyTimeout

SWEEP_MAX_S = 1.0
"""The longest a late body is read past its deadline (less for short deadlines: :func:`sweep_interval`)."""


def sweep_interval(timeout_s: float) -> float:
    """How often the readers are looked at: a quarter of the deadline, at most :data:`SWEEP_MAX_S`."""
    return min(SWEEP_MAX_S, timeout_s / 4)


class BodyDeadlines:
    """The tasks reading a body now, each with the loop time its body must have arrived by."""

    __slots__ = ("_expired", "_loop", "_readers", "_timer", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._readers: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop of the last reader: ``asyncio.current_task()`` without it asks for the running loop, which on
        CPython 3.11 is a ``getpid()`` system call each time."""

    def __len__(self) -> int:
        return len(self._readers)

    def enter(self) -> tuple[asyncio.Task[Any], int]:
        """The calling task starts reading its body: its deadline is set. What this returns goes to
        :meth:`refusal` and :meth:`leave`."""
        loop = self._loop
        task = None if loop is None else asyncio.current_task(loop)
        if loop is None or task is None:  # the first reader (or one on another loop: a test's)
            loop = self._loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
        assert task is not None  # (a request is always served in a task)
        self._readers[task] = loop.time() + self.timeout_s
        if self._timer is None:
            self._timer = loop.call_later(sweep_interval(self.timeout_s), self._sweep, loop)
        return task, task.cancelling()

    def refusal(self, reader: tuple[asyncio.Task[Any], int]) -> BodyTimeout | None:
        """For a reader that was cancelled: the 408 to raise instead when its deadline did it (and nothing else
        cancelled it too, which then wins), else None (raise the cancellation)."""
        task, cancelling = reader
        if task not in self._expired:
            return None
        self._expired.discard(task)
        if task.uncancel() > cancelling:
            return None
        return BodyTimeout("The request body did not arrive in time",
                           details=f"The whole body must arrive within {self.timeout_s:g} s",
                           headers={"Connection": "close"})

    def leave(self, reader: tuple[asyncio.Task[Any], int]) -> None:
        """The reader is done, whichever way."""
        task = reader[0]
        self._readers.pop(task, None)
        self._expired.discard(task)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the readers past their deadline; come back while any is still reading."""
        self._timer = None
        now = loop.time()
        late = [task for task, deadline in self._readers.items() if deadline <= now]
        for task in late:
            del self._readers[task]
            self._expired.add(task)
            task.cancel()
        if self._readers:
            self._timer = loop.call_later(sweep_interval(self.timeout_s), self._sweep, loop)
