"""A mirror's events from a NATS JetStream stream, by a durable pull consumer.

The consumer (``from.consumer``, default ``gatehouse_<project>_<mirror>``) acknowledges with ``AckPolicy.ALL``:
one ack of a batch's last message, sent after the batch's transaction committed, covers the batch. Its
``max_ack_pending`` is unlimited, so that a replay of the whole stream can be acknowledged once, after its commit.

The mirror's database holds the position; the consumer follows it (:meth:`NatsFeed.align`). It is deleted and
made again, starting right after the stored position, when it has messages delivered and not acknowledged (a step
that died after its fetch, before or after its commit: their redelivery after ``ack_wait`` would come *after*
messages delivered since, out of order) or when it is ahead of the position (a copy made anew, a database restored
from a backup). The one rule keeps it right whatever died where; a consumer that is behind (an ack that was lost)
redelivers messages the mirror has, which are skipped by their sequence.

Each read is one pull request with ``no_wait`` on an inbox of its own: the server answers with what it has and a
status, and no request lingers to deliver messages later into a read that is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from gatehouse.errors import ProjectError
from gatehouse.events.mirror_feeds import Delivery, FeedState, decode
from gatehouse.events.mirror_plan import BrokerMirrorPlan
from gatehouse.events.outbox import Position

log = logging.getLogger(__name__)
API_PREFIX = "$JS.API"


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback (its default logs a traceback): the mirror reports failures itself."""
    log.debug("nats: %s", type(exc).__name__)


class NatsFeed:
    kind = "nats"

    def __init__(self, plan: BrokerMirrorPlan, url: str) -> None:
        self.plan, self._url = plan, url
        self.stream, self.consumer, self.subject = plan.feed.stream, plan.consumer, plan.feed.subject
        self._timeout_s = plan.feed.timeout_ms / 1000
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self.resets = 0
        """How many times the consumer was made again to follow the stored position (for tests and the log)."""

    def label(self, position: Position) -> str:
        return str(position.seq)

    async def _connect(self) -> JetStreamContext:
        if self._js is not None and self._nc is not None and self._nc.is_connected:
            return self._js
        await self.close()
        nc = await nats.connect(self._url, allow_reconnect=False, connect_timeout=max(1, round(self._timeout_s)),
                                error_cb=_quiet, name=f"gatehouse-mirror-{self.plan.name}")
        self._nc, self._js = nc, nc.jetstream(timeout=self._timeout_s)
        return self._js

    async def state(self, after: Position, *, count: bool = False) -> FeedState:
        js = await self._connect()
        try:
            stream = (await js.stream_info(self.stream)).state
        except nats.js.errors.NotFoundError:
            raise ProjectError(f"{self.plan.key}: NATS has no stream {self.stream!r} (yet)",
                               hint="the source project's relay makes it at its first publish: check "
                                    "from.stream against its [sinks.<name>] stream") from None
        first = Position(0, stream.first_seq) if stream.messages else None
        lost = None
        if stream.first_seq > after.seq + 1 and stream.last_seq > after.seq:
            lost = (f"stream {self.stream}'s messages {after.seq + 1}..{stream.first_seq - 1} were gone (retention "
                    "or a purge) before this mirror read them")
        pending: int | None = None
        if not count:
            return FeedState(first, Position(0, stream.last_seq), lost, pending)
        try:
            info = await js.consumer_info(self.stream, self.consumer)
            pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
        except nats.js.errors.NotFoundError:
            pending = max(0, stream.last_seq - after.seq) if self.subject is None else None
        return FeedState(first, Position(0, stream.last_seq), lost, pending)

    async def align(self, after: Position, *, again: bool = False) -> None:
        js = await self._connect()
        try:
            info = await js.consumer_info(self.stream, self.consumer)
        except nats.js.errors.NotFoundError:
            await self._create(js, after)
            return
        delivered = info.delivered.stream_seq if info.delivered else 0
        acked = info.ack_floor.stream_seq if info.ack_floor else 0
        same = info.config.filter_subject == self.subject or (not info.config.filter_subject and not self.subject)
        if again or not same or (info.num_ack_pending or 0) > 0 or delivered > after.seq or acked > after.seq:
            log.info("mirror %s: the NATS consumer %s is made again to start after message %d (it had delivered "
                     "%d, acknowledged %d, %d unacknowledged)", self.plan.name, self.consumer, after.seq, delivered,
                     acked, info.num_ack_pending or 0)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(self.stream, self.consumer)
            await self._create(js, after)
            self.resets += 1

    async def _create(self, js: JetStreamContext, after: Position) -> None:
        config = ConsumerConfig(durable_name=self.consumer, ack_policy=AckPolicy.ALL, max_ack_pending=-1,
                                filter_subject=self.subject,
                                description=f"gatehouse mirror {self.plan.name} ({self.plan.source_label})",
                                **({"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": after.seq + 1}
                                   if after.seq else {"deliver_policy": DeliverPolicy.ALL}))
        try:
            await js.add_consumer(self.stream, config=config)
        except nats.js.errors.NotFoundError:
            raise ProjectError(f"{self.plan.key}: NATS has no stream {self.stream!r} (yet)",
                               hint="the source project's relay makes it at its first publish") from None

    async def read(self, limit: int) -> list[Delivery]:
        await self._connect()
        nc = self._nc
        assert nc is not None
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        found: list[Delivery] = []
        try:
            request: dict[str, Any] = {"batch": limit, "no_wait": True}
            await nc.publish(f"{API_PREFIX}.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}",
                             orjson.dumps(request), reply=inbox)
            while len(found) < limit:
                try:
                    msg = await sub.next_msg(timeout=self._timeout_s)
                except nats.errors.TimeoutError:
                    if found:
                        break  # what was not delivered is pending: the next align makes the consumer again
                    raise
                status = msg.headers.get("Status") if msg.headers else None
                if status is not None:
                    if status not in ("404", "408", "409"):
                        log.debug("mirror %s: pull ended with status %s", self.plan.name, status)
                    break  # no more now (404, 408) or the consumer is gone (409): the next step looks again
                found.append(Delivery(Position(0, msg.metadata.sequence.stream),
                                      decode(msg.data, f"mirror {self.plan.name}"), msg))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return found

    async def settle(self, through: Delivery) -> None:
        msg = through.handle
        if not isinstance(msg, Msg):
            return
        try:
            await msg.ack_sync(timeout=self._timeout_s)
        except Exception as exc:  # the stored position is the truth: the next align repairs the consumer
            log.debug("mirror %s: the ack of message %d failed (%s)", self.plan.name, through.position.seq,
                      type(exc).__name__)

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)
