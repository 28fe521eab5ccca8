"""A mirror's events from a Redis stream (the key a ``kind = "redis"`` sink writes), read by entry id.

Redis needs no consumer group here: the mirror's position *is* the last entry id it applied, stored in its own
database in the transaction that applied it, and each read is ``XRANGE key (<that id> + COUNT n``. There is
nothing to acknowledge (:meth:`RedisFeed.settle` does nothing) and nothing to realign: a crash anywhere reads again
from the stored id.

The sink publishes one stream per filled-in subject: a template with ``{type}`` in it spreads a contract's events
over three streams, which one mirror does not read. Point the sink at one stream per contract (``subject =
"crm:{contract}"``). Entries deleted or trimmed away (``XDEL``, ``XTRIM``, ``MAXLEN``) after the mirror's position
are detected (:meth:`RedisFeed._lost`) and reported; the relay itself never trims.
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from gatehouse.errors import ProjectError
from gatehouse.events.mirror_feeds import Delivery, FeedState, decode
from gatehouse.events.mirror_plan import BrokerMirrorPlan
from gatehouse.events.outbox import START, Position
from gatehouse.redis_connection import open_redis

PENDING_CAP = 100_000
"""``state`` counts the entries after a position up to this many (Redis has no count of a range but reading it)."""


def entry_position(entry_id: bytes | str) -> Position:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return Position(int(ms), int(seq or 0))


def entry_id(position: Position) -> str:
    return f"{position.txid}-{position.seq}"


class RedisFeed:
    kind = "redis"

    def __init__(self, plan: BrokerMirrorPlan, url: str) -> None:
        self.plan, self.key = plan, plan.feed.stream
        try:
            self._redis: aioredis.Redis = open_redis(url, plan.feed.timeout_ms / 1000, max_connections=2)
        except ProjectError:
            raise ProjectError(f"{plan.key}.from.url is not a Redis URL",
                               hint="write redis://host:6379/0 (rediss:// for TLS), or env:VAR naming one") from None
        self._after = START

    def label(self, position: Position) -> str:
        return entry_id(position)

    async def state(self, after: Position, *, count: bool = False) -> FeedState:
        try:
            info: dict[Any, Any] = await self._redis.xinfo_stream(self.key)
        except redis.exceptions.ResponseError:  # no such key: nothing was published yet
            return FeedState(None, START, None, 0)
        first = info.get("first-entry")
        first_position = entry_position(first[0]) if first else None
        tip = entry_position(info.get("last-generated-id") or b"0-0")
        lost = await self._lost(after, info, first_position, tip)
        pending = None
        if count:
            low = f"({entry_id(after)}" if after != START else "-"
            pending = len(await self._redis.xrange(self.key, low, "+", count=PENDING_CAP) or [])
        return FeedState(first_position, tip, lost, pending)

    async def _lost(self, after: Position, info: dict[Any, Any], first: Position | None, tip: Position) -> str | None:
        """Entries after ``after`` that are gone: deleted (``XDEL`` moves ``max-deleted-entry-id``), or trimmed, which
        removes the oldest first: so when the entry at ``after`` is gone too (or, from the start, when fewer entries
        are left than were added) and the first one left is later, those in between were trimmed. (Trimmed exactly
        at ``after``, this says so without need: it errs towards reporting.)"""
        deleted = info.get("max-deleted-entry-id")
        if deleted is not None and entry_position(deleted) > after:
            return (f"entries of stream {self.key} after {entry_id(after)} up to {entry_id(entry_position(deleted))} "
                    "were deleted before this mirror read them")
        if tip <= after or (first is not None and first <= after):
            return None
        if after == START:
            gone = int(info.get("entries-added") or 0) > int(info.get("length") or 0)
        else:
            gone = not await self._redis.xrange(self.key, entry_id(after), entry_id(after))
        if not gone:
            return None
        upto = f"before {entry_id(first)}" if first is not None else "to its end"
        return f"entries of stream {self.key} after {entry_id(after)} {upto} were trimmed before this mirror read them"

    async def align(self, after: Position, *, again: bool = False) -> None:
        self._after = after

    async def read(self, limit: int) -> list[Delivery]:
        low = f"({entry_id(self._after)}" if self._after != START else "-"
        entries = await self._redis.xrange(self.key, low, "+", count=limit) or []
        found = []
        for raw_id, fields in entries:
            if raw_id is None:
                continue
            data = (fields or {}).get(b"event")
            event = decode(data, f"mirror {self.plan.name}") if isinstance(data, bytes) else None
            found.append(Delivery(entry_position(raw_id), event))
        if found:
            self._after = found[-1].position
        return found

    async def settle(self, through: Delivery) -> None:
        return None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._redis.aclose()
