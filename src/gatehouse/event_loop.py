"""The event loop every ``gatehouse`` command runs its work on: uvloop's when it is installed, else asyncio's own.

uvloop is a dependency everywhere but on Windows, where it does not build; there the plain asyncio loop runs, which
served about a quarter fewer requests in ``bench/README.md``. Kept apart from the server so that a command which
only talks to the database does not load the HTTP stack to get its loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_in_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end on a new loop (uvloop's when installed) and return its result."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
