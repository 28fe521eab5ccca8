"""Stopping background tasks for sure.

A cancellation can be lost. On Python 3.11, ``asyncio.wait_for`` returns the inner result when the cancel
arrives in the loop turn the inner awaitable finishes in, and ``asyncio.timeout`` turns a cancel that lands as it
expires into its ``TimeoutError``, which a loop takes for a failure and survives (both fixed in 3.12); and a
library may catch ``CancelledError`` while it closes. A loop whose one cancel was lost runs on, and whoever awaits
it waits forever: a server that never shuts down. It happened here: a mirror's task, cancelled while it closed its
NATS connection after a failed step, went on stepping, and ``MirrorRunner.stop`` never returned.

So every stop of gatehouse's background tasks goes through :func:`stop_tasks`, which cancels again, each
:data:`AGAIN_S`, until the tasks are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

AGAIN_S = 0.5
"""How long a task may take to end after a cancel before it is cancelled again."""


async def stop_tasks(tasks: Iterable[asyncio.Future[Any]], *, again_s: float = AGAIN_S) -> None:
    """Cancel ``tasks`` and wait until every one is done, cancelling again any that runs on. Their errors are
    taken (not raised, not logged as never retrieved): a task being stopped has nothing left to report."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()
