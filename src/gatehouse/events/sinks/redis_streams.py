"""Redis Streams: each event is one entry (``XADD <key> *``) of the stream named by the subject template, with
the fields ``id`` (the event's id), ``aggregateid``, ``type`` and ``event`` (the JSON every sink sends).

A batch is one pipeline (one round trip); each ``XADD``'s reply is the only acknowledgement Redis gives, and
an entry counts as delivered when its reply is an entry id. Redis has **no deduplication**: an event the
relay publishes again (after a crash between publishing and storing its position) is a second entry with the
same ``id`` field, and consumers drop it by that id (an inbox of seen ids, or a version guard). Streams are
never trimmed by the relay (``MAXLEN`` would drop entries no consumer has read). Whether an acknowledged
entry survives a crash of Redis depends on its persistence: only ``appendonly yes`` with ``appendfsync
always`` loses nothing (reliability.md §2.5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import redis.asyncio as aioredis
import redis.exceptions

from gatehouse.config_events import SinkConfig
from gatehouse.errors import ProjectError
from gatehouse.events.outbox import Event
from gatehouse.events.sinks import Published, Subjects, body, describe
from gatehouse.redis_connection import open_redis


class RedisStreamSink:
    kind = "redis"
    logs_deliveries = False

    def __init__(self, name: str, config: SinkConfig, url: str, database: str) -> None:
        self.name, self.config = name, config
        self._subjects = Subjects(config.subject, database)
        try:
            self._redis: aioredis.Redis = open_redis(url, config.timeout_ms / 1000, max_connections=2)
        except ProjectError:
            raise ProjectError(f"[sinks.{name}] url is not a Redis URL",
                               hint="write redis://host:6379/0 (rediss:// for TLS), or env:VAR naming one") from None

    async def publish(self, events: Sequence[Event]) -> Published:
        pipe = self._redis.pipeline(transaction=False)
        for event in events:
            pipe.xadd(self._subjects.of(event), {"id": event.id, "aggregateid": event.key, "type": event.type,
                                                 "event": body(event)})
        try:
            replies = await pipe.execute(raise_on_error=False)
        except (redis.exceptions.RedisError, OSError) as exc:
            await self._reset()
            return Published(0, describe(exc))
        for acked, reply in enumerate(replies):
            if isinstance(reply, Exception):
                return Published(acked, f"{type(reply).__name__}: {str(reply)[:120]}")
        return Published(len(replies))

    async def _reset(self) -> None:
        """Drop the pool's connections: one may be half-read after a timeout."""
        with contextlib.suppress(Exception):
            await self._redis.connection_pool.disconnect()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._redis.aclose()
