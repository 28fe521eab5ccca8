"""The connection to the shared Redis (``[redis] url``): one way to open it, for the limits and the cache.

Every call must fail fast, since both users fall back to something local: the pool waits at most the timeout
for a connection, sockets time out after it, and redis-py's own retries are off (a retry would double the
time a request waits for an answer it can do without).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gatehouse.errors import ProjectError


def open_redis(url: str, timeout_s: float, max_connections: int = 16) -> aioredis.Redis:
    """A client of ``url`` that connects lazily; ProjectError when the URL is not a Redis URL."""
    try:
        pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                               socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                               retry=Retry(NoBackoff(), 0))
    except ValueError:
        raise ProjectError("[redis] url is not a Redis URL",
                           hint="write redis://host:6379/0 (rediss:// for TLS), or env:VAR naming one") from None
    return aioredis.Redis(connection_pool=pool)
