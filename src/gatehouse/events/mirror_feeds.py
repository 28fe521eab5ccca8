"""Where a mirror fed from a broker reads its events: the :class:`Feed` protocol, one module per broker.

A feed is read in the broker's own order (a JetStream stream's sequence, a Redis stream's entry ids), and its
position is a pair of integers (:class:`~gatehouse.events.outbox.Position`, reused: ``(0, stream sequence)`` for
NATS, ``(milliseconds, sequence)`` of the entry id for Redis) that the mirror stores in its own database, in the
transaction that applies what it read (:mod:`gatehouse.events.mirror_broker`). That stored position is the truth;
the broker's idea of it (a durable consumer's ack floor) follows it: :meth:`Feed.align` puts the broker back where
the database says whenever they disagree (a crash between the commit and the ack, a database restored from a
backup, a copy made anew), so nothing is skipped and nothing read twice does harm.

Messages are the ones :mod:`gatehouse.events.sinks` publish (``body`` = :meth:`Event.as_json`); one that is not is
skipped and logged (:func:`decode`), never retried forever.

Drivers are imported only by the feed that needs them (``pip install 'gatehouse[events]'`` for NATS).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

import orjson

from gatehouse.errors import ProjectError
from gatehouse.events.outbox import START, Event, Position
from gatehouse.secrets import resolve_secret

if TYPE_CHECKING:
    from gatehouse.events.mirror_plan import BrokerMirrorPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message of the feed, in its order."""

    position: Position
    event: Event | None
    """None when the message is not a gatehouse event (it is skipped)."""
    handle: object = None
    """The driver's message, for :meth:`Feed.settle`."""


@dataclass(frozen=True, slots=True)
class FeedState:
    """The feed as the broker sees it now, relative to a mirror's position."""

    first: Position | None
    """The first message still kept (None: the stream is empty)."""
    tip: Position
    """The last message ever added that is still counted by the stream (START when none)."""
    lost: str | None
    """Set when messages after the position are gone (retention, a purge, a trim) before the mirror read them:
    which ones, as words (the copy may lack their effect)."""
    pending: int | None
    """Messages after the position waiting for this mirror (None: not counted; NATS counts the consumer's, Redis
    the stream's entries up to :data:`~.mirror_feed_redis.PENDING_CAP`)."""


class Feed(Protocol):
    kind: str

    def label(self, position: Position) -> str:
        """A position as the broker names it (a stream sequence, an entry id)."""
        ...

    async def state(self, after: Position, *, count: bool = False) -> FeedState:
        """What the broker holds after ``after`` (``count``: with the messages pending, which may cost a read); a
        :class:`ProjectError` when the stream does not exist."""
        ...

    async def align(self, after: Position, *, again: bool = False) -> None:
        """Make the next :meth:`read` start right after ``after`` (``again``: even if the broker agrees already)."""
        ...

    async def read(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` next messages, in order, without waiting for new ones ([] when there is none)."""
        ...

    async def settle(self, through: Delivery) -> None:
        """Tell the broker everything up to ``through`` is done (after the commit); never raises."""
        ...

    async def close(self) -> None:
        ...


def decode(data: bytes, where: str) -> Event | None:
    """A message body as the relay's sinks write it (:func:`gatehouse.events.sinks.body`), or None (logged)."""
    try:
        body = orjson.loads(data)
        payload = body.get("payload")
        position = body.get("position")
        return Event(seq=0, id=str(body["id"]), contract=str(body["aggregatetype"]), key=str(body["aggregateid"]),
                     type=str(body["type"]), payload=orjson.dumps(payload).decode() if payload is not None else None,
                     version=int(body["version"]),
                     position=Position.parse(position) if isinstance(position, str) else START,
                     created_at=datetime.fromisoformat(body["created_at"]),
                     aggregate_version=int(body.get("aggregate_version") or 0))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        log.warning("%s: a message that is not a gatehouse event (skipped)", where)
        return None


def open_feed(plan: BrokerMirrorPlan) -> Feed:
    """The feed of ``plan``; it connects on first use. A URL missing from the environment, or a driver that is not
    installed, is a :class:`ProjectError` here."""
    url = resolve_secret(plan.feed.url, what=f"{plan.key}.from.url")
    if url is None:  # (the config requires it)
        raise ProjectError(f"{plan.key}.from has no url", hint='set url, e.g. url = "env:NATS_URL"')
    if plan.feed.kind == "nats":
        try:
            from gatehouse.events.mirror_feed_nats import NatsFeed
        except ImportError as missing:
            raise ProjectError(f"{plan.key}.from.kind = 'nats' needs {missing.name or 'nats-py'}, which is not "
                               "installed", hint="pip install 'gatehouse[events]'") from None
        return NatsFeed(plan, url)
    from gatehouse.events.mirror_feed_redis import RedisFeed

    return RedisFeed(plan, url)
