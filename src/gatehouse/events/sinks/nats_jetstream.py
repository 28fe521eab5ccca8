"""NATS JetStream: each event is one message on the subject of its template, with ``Nats-Msg-Id`` = the event's
id, so the stream drops a republished event within its duplicate window (the server's default: 2 minutes).

A batch is published with ``publish_async`` (all messages written on the one connection, in order, which is
the order the stream stores them in) and its acknowledgements gathered afterwards, within ``timeout_ms``: one
ack per message awaited in turn was measured at a third of the throughput (next-wave.md §4.3). A stream whose
subjects hold the template's subjects must exist; when the one named ``stream`` does not, it is created with
the template's wildcard subject (``gatehouse.{contract}.{type}`` → ``gatehouse.*.*``), file storage and the
server's default duplicate window. Connection trouble closes the connection; the next publish connects again
(no buffering inside the client while it is down: the outbox is the buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType

from gatehouse.config_events import SinkConfig
from gatehouse.events.outbox import Event
from gatehouse.events.sinks import Published, Subjects, body, describe

log = logging.getLogger(__name__)
MSG_ID = "Nats-Msg-Id"


def _why(exc: BaseException) -> str:
    """A failure as the delivery log and the log lines say it; JetStream's own refusals with their text (e.g.
    a subject that no stream takes), which holds no secret."""
    if isinstance(exc, nats.js.errors.APIError) and exc.description:
        return f"{type(exc).__name__}: {exc.description}"[:200]
    return describe(exc)


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback (its default logs a traceback): the relay reports failures itself."""
    log.debug("nats: %s", type(exc).__name__)


class JetStreamSink:
    kind = "nats"
    logs_deliveries = False

    def __init__(self, name: str, config: SinkConfig, url: str, database: str) -> None:
        self.name, self.config, self._url = name, config, url
        self._subjects = Subjects(config.subject, database)
        self._timeout_s = config.timeout_ms / 1000
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self.duplicates = 0
        """Messages the stream acknowledged as duplicates (``PubAck.duplicate is True``) since start."""

    async def _connect(self) -> JetStreamContext:
        if self._js is not None and self._nc is not None and self._nc.is_connected:
            return self._js
        await self.close()
        nc = await nats.connect(self._url, allow_reconnect=False, connect_timeout=max(1, round(self._timeout_s)),
                                error_cb=_quiet, name="gatehouse-relay")
        try:
            js = nc.jetstream(timeout=self._timeout_s, publish_async_max_pending=max(4000, self.config.batch * 2))
            await self._ensure_stream(js)
        except BaseException:
            await nc.close()
            raise
        self._nc, self._js = nc, js
        return js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        name = self.config.stream
        try:
            await js.stream_info(name)
            return
        except nats.js.errors.NotFoundError:
            pass
        subject = self._subjects.wildcard()
        await js.add_stream(name=name, subjects=[subject], storage=StorageType.FILE)
        log.info("relay: created the JetStream stream %s for %s (sink %s)", name, subject, self.name)

    async def publish(self, events: Sequence[Event]) -> Published:
        try:
            async with asyncio.timeout(self._timeout_s):
                js = await self._connect()
        except Exception as exc:
            await self.close()
            return Published(0, f"connect: {_why(exc)}")
        futures: list[asyncio.Future[PubAck]] = []
        error: str | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                for event in events:
                    headers: dict[str, Any] = {MSG_ID: event.id}
                    futures.append(await js.publish_async(self._subjects.of(event), body(event),
                                                          stream=self.config.stream, headers=headers))
                await asyncio.wait(futures)
        except Exception as exc:
            error = _why(exc)
        acked = 0
        for future in futures:
            if not future.done() or future.cancelled():
                error = error or "TimeoutError"
                break
            failed = future.exception()
            if failed is not None:
                error = _why(failed)
                break
            if future.result().duplicate is True:
                self.duplicates += 1
            acked += 1
        for future in futures[acked:]:
            future.cancel()  # frees its slot of publish_async_max_pending
        if acked < len(events):
            await self.close()
            return Published(acked, error or "not acknowledged")
        return Published(acked)

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)
