"""A test that hangs shows where: shortly before pytest-timeout fails it, every asyncio task's stack is written
to stderr (which pytest prints with the failure).

pytest-timeout's own report shows only the main thread, and a hung asyncio test's main thread is always the
event loop waiting in ``select``: the await that never ends is in a task's stack, not in a thread's.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import pytest

AHEAD_S = 20.0
"""How long before the test's timeout the tasks are written out."""


def _loop_of(thread_id: int) -> asyncio.AbstractEventLoop | None:
    """The event loop running in that thread, found in its frames (a loop has no registry across threads)."""
    frame: FrameType | None = sys._current_frames().get(thread_id)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, asyncio.AbstractEventLoop):
            return candidate
        frame = frame.f_back
    return None


def _write_tasks(loop: asyncio.AbstractEventLoop) -> None:
    out = io.StringIO()
    tasks = asyncio.all_tasks(loop)
    print(f"\n=== hang_report: {len(tasks)} asyncio task(s) shortly before the timeout ===", file=out)
    for task in tasks:
        task.print_stack(file=out)
    sys.stderr.write(out.getvalue())
    sys.stderr.flush()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    timeout = float(item.config.getoption("timeout", None) or item.config.getini("timeout") or 0)
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        timeout = float(marker.args[0])
    if timeout <= AHEAD_S:
        return (yield)
    main = threading.get_ident()

    def report() -> None:
        loop = _loop_of(main)
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(_write_tasks, loop)

    timer = threading.Timer(timeout - AHEAD_S, report)
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()
