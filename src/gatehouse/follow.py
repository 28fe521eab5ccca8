"""A running server follows its databases: after ``apply`` or ``migrate`` it reloads on its own.

``apply`` and every migration end with :func:`gatehouse.db.changes.announce`: a new revision in
``gatehouse.state`` and ``NOTIFY gatehouse_reload``, both at commit. :class:`Follower` listens on every
database (one connection each, opened again when it ends), waits ``DEBOUNCE_S`` so a burst of migrations
makes one reload, and asks the runtime to reload. It also compares the revisions every ``POLL_S``, which
catches a notification sent while a listening connection was down. A reload that fails keeps what is
served (and is tried again at the next change or poll): following never takes a server down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from gatehouse.background import stop_tasks
from gatehouse.db.changes import CHANNEL
from gatehouse.db.listener import Connect, Listener
from gatehouse.errors import GatehouseError

log = logging.getLogger(__name__)
DEBOUNCE_S = 0.05
POLL_S = 5.0
CATCH_UP_S = 10.0
"""How long a server may be behind a database's newest revision and still call itself consistent."""

Revisions = dict[str, str | None]


class Follower:
    """``revisions()`` reads each database's revision; ``reload()`` makes the runtime serve what is there."""

    def __init__(self, listen: Mapping[str, Connect], revisions: Callable[[], Awaitable[Revisions]],
                 reload: Callable[[], Awaitable[None]]) -> None:
        self._revisions = revisions
        self._reload = reload
        self._listeners = [
            Listener(connect, {CHANNEL: self._heard}, on_reopen=self._catch_up, what=f"changes to database {name}")
            for name, connect in listen.items()
        ]
        self._seen: Revisions = {}
        self._first_behind: dict[tuple[str, str | None], float] = {}
        self._pending: asyncio.Task[None] | None = None
        self._again = False
        self._poller: asyncio.Task[None] | None = None
        self.reloads = 0
        """How many reloads ran (for tests and metrics)."""

    async def start(self, seen: Revisions) -> None:
        """Follow from the revisions the runtime was loaded at."""
        self._seen = dict(seen)
        for listener in self._listeners:
            await listener.start()
        self._poller = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        await stop_tasks(task for task in (self._poller, self._pending) if task is not None)
        await asyncio.gather(*(listener.stop() for listener in self._listeners), return_exceptions=True)

    def catching_up(self, database: str, revision: str | None) -> bool:
        """True while this server has not loaded ``revision`` of ``database`` yet but will within
        ``CATCH_UP_S``: what it serves may lag the database by that one reload, which is not a fault."""
        if self._seen.get(database) == revision:
            return False
        now = asyncio.get_running_loop().time()
        first = self._first_behind.setdefault((database, revision), now)
        if len(self._first_behind) > 64:  # old revisions, long since loaded
            self._first_behind = {(database, revision): first}
        self.soon()
        return now - first < CATCH_UP_S

    def _heard(self, payload: str) -> None:
        log.info("the database changed (%s): reloading", payload.partition(" ")[2] or "unknown")
        self.soon()

    async def _catch_up(self) -> None:
        self.soon()

    def soon(self) -> None:
        """Reload after ``DEBOUNCE_S``; a change heard while a reload runs makes one more afterwards."""
        if self._pending is not None:
            self._again = True
            return
        self._pending = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await asyncio.sleep(DEBOUNCE_S)
            while True:
                self._again = False
                try:
                    seen = await self._revisions()
                    await self._reload()
                    self._seen = seen
                    self.reloads += 1
                except Exception as exc:  # any failure: what is served stays, the next change or poll retries
                    why = exc if isinstance(exc, GatehouseError) else type(exc).__name__  # never PostgreSQL's text
                    log.warning("could not reload the project; still serving the last good one: %s", why)
                if not self._again:
                    return
        finally:
            self._pending = None

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                now = await self._revisions()
            except Exception as exc:
                log.debug("cannot read the databases' revisions: %s", type(exc).__name__)
                continue
            if now != self._seen:
                self.soon()
