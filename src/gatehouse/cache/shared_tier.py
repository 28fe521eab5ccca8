"""The Redis tier of the response cache: answers one instance read, served by the others.

An entry is stored under its ETag (``<prefix>cache:<tag>``), and the tag is a digest of everything that shaped
the answer *and the data versions it was read at*. So an instance that misses in memory asks Redis for the
tag its own current versions give: a found entry was read at exactly the versions this instance knows now,
and is as fresh as anything it could serve from memory. Entries of older versions are never looked up again
and expire with the contract's ``cache`` duration; nothing has to be deleted when data changes.

It pays only where a query costs more than a Redis round trip (about 200 µs of CPU with redis-py here, more
than a whole cheap gatehouse request): an expensive aggregate, a large list. Every call is bounded by
``[redis] timeout_ms`` and goes through a breaker; a Redis that is slow or down turns the tier into misses
(the database answers), logged once per outage, never an error for a client. Stores are sent in the
background: a miss never waits for Redis twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis

from gatehouse.background import stop_tasks
from gatehouse.cache.store import Entry
from gatehouse.config import RedisConfig
from gatehouse.limits.breaker import Breaker
from gatehouse.redis_connection import open_redis
from gatehouse.secrets import resolve_secret

log = logging.getLogger(__name__)


class SharedTier:
    """Entries by tag in Redis; :meth:`get` and :meth:`put` never raise and never wait past the timeout."""

    def __init__(self, url: str, *, timeout_ms: int, key_prefix: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout = timeout_ms / 1000
        self._prefix = f"{key_prefix}cache:"
        self._clock = clock
        self._breaker = Breaker(clock, user="response cache", fallback="reads that miss in memory go to the database")
        self._client: aioredis.Redis | None = open_redis(url, self._timeout)
        self._pending: set[asyncio.Task[None]] = set()
        self.hits = self.misses = self.errors = 0

    @classmethod
    def from_config(cls, config: RedisConfig) -> SharedTier | None:
        url = resolve_secret(config.url, what="[redis] url")
        if url is None:
            return None
        return cls(url, timeout_ms=config.timeout_ms, key_prefix=config.key_prefix)

    async def get(self, tag: str, versions: tuple[int, ...]) -> Entry | None:
        """The entry stored under ``tag`` (read at ``versions``), or None (absent, expired, Redis failing)."""
        raw = await self._call("GET", self._prefix + tag)
        if not isinstance(raw, bytes):
            self.misses += 1
            return None
        try:
            meta, _, body = raw.partition(b"\n")
            status, headers, media_type, rows, redacted, expires = orjson.loads(meta)
        except ValueError:
            self.misses += 1
            return None
        left = float(expires) - time.time()  # the writer's wall clock: instances' clocks agree closely enough
        if left <= 0:
            self.misses += 1
            return None
        self.hits += 1
        return Entry(status, tuple((str(n), str(v)) for n, v in headers), body, media_type, rows, redacted, versions,
                     self._clock() + left, tag)

    def put(self, entry: Entry, ttl: float) -> None:
        """Store ``entry`` under its tag for ``ttl`` seconds, in the background."""
        meta = orjson.dumps([entry.status, entry.headers, entry.media_type, entry.rows, entry.redacted_query,
                             time.time() + ttl])
        task = asyncio.get_running_loop().create_task(
            self._store(self._prefix + entry.etag, meta + b"\n" + entry.body, max(1, int(ttl * 1000))))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _store(self, key: str, value: bytes, ttl_ms: int) -> None:
        await self._call("SET", key, value, "PX", ttl_ms)

    async def _call(self, *command: Any) -> Any:
        client = self._client
        if client is None or not self._breaker.permit():
            return None
        run: Callable[..., Awaitable[Any]] = client.execute_command  # (redis-py leaves it untyped)
        try:
            async with asyncio.timeout(self._timeout):
                reply = await run(*command)
        except Exception as error:  # Redis slow or down: the database answers instead
            self.errors += 1
            self._breaker.failed(type(error).__name__, timeout=isinstance(error, TimeoutError))
            return None
        self._breaker.succeeded()
        return reply

    async def close(self) -> None:
        await stop_tasks(list(self._pending))
        client, self._client = self._client, None
        if client is not None:
            await client.aclose(close_connection_pool=True)
