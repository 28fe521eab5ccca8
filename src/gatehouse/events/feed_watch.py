"""Long-polling the outbox without a query per waiting client, and without ``NOTIFY`` per write.

A client of the HTTP feed that is caught up waits (``wait=S``) for the next event of its contract. Rather than
each waiting request polling the outbox, one :class:`OutboxWatch` per database asks, every
:data:`POLL_S`, one question for all of them: which of the (contract, position) pairs being waited on has a
readable event after it (a row of a transaction complete in the snapshot, as :func:`read_after` reads them).
Waiters at the same pair share one probe, so the database sees at most ten small queries a second per
database, however many clients wait. The watch runs only while someone waits.

A writer never notifies: a ``NOTIFY`` per write takes a database-wide lock at commit (DESIGN.md §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from gatehouse.events.outbox import Position

log = logging.getLogger(__name__)
POLL_S = 0.1
MAX_WAITERS = 10_000
"""Waiting clients per database at most; beyond, a request is answered at once (empty) instead of waiting."""

PROBE = """
SELECT w.i
FROM unnest($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY AS w(contract, txid, seq, i)
WHERE EXISTS (
    SELECT 1 FROM gatehouse.outbox o
    WHERE (o.txid, o.seq) > (w.txid::xid8, w.seq) AND o.txid < pg_snapshot_xmin(pg_current_snapshot())
      AND o.aggregatetype = w.contract
)
"""

WaitKey = tuple[str, Position]


class _Slot:
    """The requests waiting at one (contract, position): woken together by one event."""

    __slots__ = ("count", "event")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0


class OutboxWatch:
    """The waiters of one database's outbox, and the task that polls for them."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout_s: float, on_idle: Callable[[], None]) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s
        self._on_idle = on_idle
        self._waiting: dict[WaitKey, _Slot] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def waiters(self) -> int:
        return sum(slot.count for slot in self._waiting.values())

    async def wait(self, contract: str, after: Position, timeout_s: float) -> bool:
        """Until an event of ``contract`` after ``after`` is readable (True), or ``timeout_s`` passed (False)."""
        if self.waiters >= MAX_WAITERS:
            return False
        key = (contract, after)
        slot = self._waiting.get(key)
        if slot is None:
            slot = self._waiting[key] = _Slot()
        slot.count += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="gatehouse/events-feed")
        try:
            async with asyncio.timeout(timeout_s):
                await slot.event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            slot.count -= 1
            # A woken slot is not joined again: whoever waits at this key next waits for the next probe.
            if (slot.count <= 0 or slot.event.is_set()) and self._waiting.get(key) is slot:
                del self._waiting[key]

    async def _poll(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(POLL_S)
                keys = [key for key, slot in self._waiting.items() if not slot.event.is_set()]
                if not keys:
                    continue
                try:
                    found = await self._probe(keys)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    log.debug("the events feed could not poll the outbox: %s", type(exc).__name__)
                    continue  # the waiters time out; the next tick tries again
                for index in found:
                    slot = self._waiting.get(keys[index - 1])
                    if slot is not None:
                        slot.event.set()
        finally:
            if not self._waiting:
                self._on_idle()

    async def _probe(self, keys: list[WaitKey]) -> list[int]:
        args: tuple[list[Any], ...] = ([c for c, _ in keys], [str(p.txid) for _, p in keys], [p.seq for _, p in keys])
        async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
            return [row["i"] for row in await conn.fetch(PROBE, *args)]


_watches: dict[int, tuple[asyncpg.Pool, OutboxWatch]] = {}
"""The watch of each pool (by identity: asyncpg pools take no weak references) while it has waiters."""


def watch_for(pool: asyncpg.Pool, acquire_timeout_s: float) -> OutboxWatch:
    """The watch of the database ``pool`` reads, started on first use, forgotten once nobody waits."""
    found = _watches.get(id(pool))
    if found is not None and found[0] is pool:
        return found[1]
    key = id(pool)

    def forget() -> None:
        with contextlib.suppress(KeyError):
            if _watches[key][1] is watch:
                del _watches[key]

    watch = OutboxWatch(pool, acquire_timeout_s, forget)
    _watches[key] = (pool, watch)
    return watch
