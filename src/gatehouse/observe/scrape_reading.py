"""A reading from the database behind a Prometheus collector, refreshed without making a scrape wait.

Collectors are synchronous and a scrape runs on the event loop, which must not wait for a database: a scrape
shows the last reading and starts a new one in the background when that is older than :data:`REFRESH_S` (one at a
time). A caller that wants the reading of this very moment awaits ``refresh()`` before rendering.
"""

from __future__ import annotations

import asyncio
import time

REFRESH_S = 1.0


class ReadAtScrape:
    """Base of a collector whose ``refresh()`` reads the database; ``collect()`` calls :meth:`_refresh_soon`."""

    def __init__(self, task_name: str) -> None:
        self._task_name = task_name
        self._read_at = 0.0
        self._reading: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        raise NotImplementedError

    def _refresh_soon(self) -> None:
        if time.monotonic() - self._read_at < REFRESH_S or (self._reading is not None and not self._reading.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # scraped outside the server's loop: the last reading is all there is
        self._reading = loop.create_task(self.refresh(), name=self._task_name)
