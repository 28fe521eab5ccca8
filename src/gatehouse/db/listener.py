"""One ``LISTEN`` connection kept open for as long as the server runs, whatever happens to it.

A notification is the fast path (a key revoked, a project applied, a migration committed: every server
hears it within milliseconds); it is not a guarantee, because a notification sent while the listening
connection was down is lost. So when the connection ends (the database restarted, a proxy cut it) another
is opened, every ``RELISTEN_S`` until one opens, and ``on_reopen`` runs then: its owner catches up on what
it may have missed. Owners also poll now and then, for the case nobody can see (a silent network).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

import asyncpg

from gatehouse.background import stop_tasks

log = logging.getLogger(__name__)
RELISTEN_S = 1.0
"""How often a lost LISTEN connection is asked for again."""

Connect = Callable[[], Awaitable[asyncpg.Connection]]


class Listener:
    """``channels`` maps a channel to what to do with each payload (called in the event loop, must not block)."""

    def __init__(self, connect: Connect, channels: Mapping[str, Callable[[str], None]], *,
                 on_reopen: Callable[[], Awaitable[None]], what: str) -> None:
        self._connect = connect
        self._channels = dict(channels)
        self._on_reopen = on_reopen
        self._what = what
        self._connection: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Open the first connection (a failure here fails the caller's start) and follow from then on."""
        self._connection = await self._connect()
        self._task = asyncio.create_task(self._follow(self._connection))

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await stop_tasks([self._task])  # (the flag also ends the loop: a cancel may be lost)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 5)

    async def _follow(self, connection: asyncpg.Connection | None) -> None:
        while not self._stopping:
            if connection is None:
                try:
                    connection = self._connection = await asyncio.wait_for(self._connect(), RELISTEN_S * 5)
                except Exception as exc:  # also what a cancelled connect may turn into: hence the flag
                    log.debug("cannot listen for %s yet: %s", self._what, type(exc).__name__)
                    await asyncio.sleep(RELISTEN_S)
                    continue
                log.info("listening for %s again", self._what)
                await self._on_reopen()
            ended = asyncio.Event()
            connection.add_termination_listener(_setter(ended))
            try:
                for channel, handle in self._channels.items():
                    await connection.add_listener(channel, _payload_to(handle))
            except Exception:  # it died between opening and listening
                ended.set()
            await ended.wait()
            log.warning("the connection listening for %s ended; opening another", self._what)
            connection = self._connection = None


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _: event.set()


def _payload_to(handle: Callable[[str], None]) -> Callable[[object, int, str, object], None]:
    return lambda _connection, _pid, _channel, payload: handle(str(payload))
