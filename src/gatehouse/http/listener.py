"""One listening port of ``gatehouse serve``: accepts HTTP/1.1 connections (``http/h1.py``), caps how many are
open, enforces their deadlines, and stops gracefully.

Deadlines (a request's headers, an idle keep-alive connection, a lingering close) are a time stored on each
connection and checked by one sweep every ``_SWEEP_SECONDS``, instead of a timer armed and cancelled per
request: on a point lookup that bookkeeping would otherwise be a measurable share of the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gatehouse.http.exchange import Handler
from gatehouse.http.h1 import Connection, Limits

log = logging.getLogger("gatehouse.http")
_SWEEP_SECONDS = 0.5


class Listener:
    """``handler`` served on ``host:port`` once :meth:`start` returns, until :meth:`stop`."""

    def __init__(self, handler: Handler, limits: Limits | None = None,
                 on_refusal: Callable[[int], None] | None = None) -> None:
        self.handler = handler
        self.limits = limits or Limits()
        self.on_refusal = on_refusal
        """Called with the status of every answer the connection layer gives itself, without the handler: a
        request that could not be read (400, 408, 414, 431, too many pipelined 503) or a connection over
        ``max_connections`` (503). They never reach the handler, so its metrics would not see them."""
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, *, backlog: int = 1024) -> None:
        """Listen; raises ``OSError`` when the address cannot be bound (in use, not resolvable)."""
        self._server = await self.loop.create_server(lambda: Connection(self), host, port, backlog=backlog,
                                                     reuse_address=True)
        self._sweeper = self.loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        """The port listened on (useful after asking for port 0)."""
        assert self._server is not None and self._server.sockets, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    def admit(self, connection: Connection) -> bool:
        """Count a new connection in, unless the port is at its limit or stopping."""
        if self.closing or len(self.connections) >= self.limits.max_connections:
            return False
        self.connections.add(connection)
        return True

    def forget(self, connection: Connection) -> None:
        self.connections.discard(connection)

    def refused(self, status: int) -> None:
        if self.on_refusal is not None:
            self.on_refusal(status)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; close idle connections now and busy ones after their current response; after
        ``grace`` seconds drop whatever is still open."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.shutdown()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            log.warning("dropping a connection from %s still busy after %.0f s of shutdown", connection.client, grace)
            connection.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            await self._server.wait_closed()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            now = self.loop.time()
            for connection in list(self.connections):
                deadline = connection.deadline
                if deadline is not None and now >= deadline:
                    connection.expire()
