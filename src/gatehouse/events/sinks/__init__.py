"""Where the relay publishes events: one module per kind of sink, all behind the small :class:`Sink` protocol.

A sink publishes a batch of events *in order* and says how many of them, counted from the first, the broker
acknowledged (:class:`Published`). The relay stores its position after that prefix only, and publishes the
rest again later: so a sink may publish concurrently within a batch only where the broker keeps the order of
one connection (NATS, RabbitMQ's channel, a Redis pipeline), and must never report an event as acknowledged
when one before it was not. A sink never raises for a broker that is down or refuses: it reports it in
:class:`Published` (``error``), and connects again on the next call. Every message carries the event's id
(the same on every delivery), which is what consumers and brokers dedupe on.

Drivers (nats-py, aio-pika) are imported only by the sink that needs them: ``pip install 'gatehouse[events]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from gatehouse.config_events import SinkConfig
from gatehouse.errors import ProjectError
from gatehouse.events.outbox import Event
from gatehouse.secrets import resolve_secret


@dataclass(frozen=True, slots=True)
class Published:
    """What came of one publish of a batch."""

    acked: int
    """How many events, from the first, the broker acknowledged (all of them when ``error`` is None)."""
    error: str | None = None
    """Why the event at ``acked`` was not: short, without secrets (e.g. ``TimeoutError``, ``HTTP 503``)."""
    retry_after_s: float | None = None
    """How long the receiver asked to be left alone (a webhook's ``Retry-After``), if it did."""
    status: str | None = None
    """What the receiver answered (a webhook's ``HTTP 200``), for the delivery log."""


class Sink(Protocol):
    name: str
    kind: str
    logs_deliveries: bool
    """True when each attempt is written to ``gatehouse.event_deliveries`` (webhooks)."""

    async def publish(self, events: Sequence[Event]) -> Published:
        """Publish ``events`` in order, within the sink's ``timeout_ms``; never raises for broker trouble."""
        ...

    async def close(self) -> None:
        ...


class Subjects:
    """A ``subject`` template (NATS subject, RabbitMQ routing key, Redis stream key) filled in per event."""

    def __init__(self, template: str, database: str) -> None:
        self.template, self.database = template, database
        self._made: dict[tuple[str, str, int], str] = {}

    def of(self, event: Event) -> str:
        key = (event.contract, event.type, event.version)
        subject = self._made.get(key)
        if subject is None:
            subject = (self.template.replace("{contract}", event.contract).replace("{type}", event.type)
                       .replace("{version}", str(event.version)).replace("{database}", self.database))
            self._made[key] = subject
        return subject

    def wildcard(self) -> str:
        """The NATS subject filter that every subject of this template matches (``{contract}`` → ``*``)."""
        tokens = [("*" if "{" in token and token != "{database}" else token) for token in self.template.split(".")]
        return ".".join(token.replace("{database}", self.database) for token in tokens)


def body(event: Event) -> bytes:
    """The message body every sink sends for one event: :meth:`Event.as_json`, as JSON."""
    return orjson.dumps(event.as_json())


def describe(exc: BaseException) -> str:
    """An exception as a delivery outcome: its class, and its text when that cannot hold a secret."""
    return type(exc).__name__


def endpoint(name: str, config: SinkConfig) -> str:
    """The sink's URL, read from the environment when it is ``env:VAR``."""
    url = resolve_secret(config.url, what=f"[sinks.{name}] url")
    if url is None:
        raise ProjectError(f"[sinks.{name}] has no url", hint="set url, e.g. url = \"nats://127.0.0.1:4222\"")
    return url


def open_sink(name: str, config: SinkConfig, database: str) -> Sink:
    """The sink of ``[sinks.<name>]`` for the relay of ``database``; it connects at its first publish. A URL or
    secret missing from the environment, or a driver that is not installed, is a :class:`ProjectError` here."""
    url = endpoint(name, config)
    try:
        if config.kind == "nats":
            from gatehouse.events.sinks.nats_jetstream import JetStreamSink

            return JetStreamSink(name, config, url, database)
        if config.kind == "rabbitmq":
            from gatehouse.events.sinks.rabbitmq import RabbitSink

            return RabbitSink(name, config, url, database)
    except ImportError as missing:
        raise ProjectError(f"[sinks.{name}] kind = {config.kind!r} needs {missing.name or 'its driver'}, which "
                           "is not installed", hint="pip install 'gatehouse[events]'") from None
    if config.kind == "redis":
        from gatehouse.events.sinks.redis_streams import RedisStreamSink

        return RedisStreamSink(name, config, url, database)
    from gatehouse.events.sinks.webhook import WebhookSink

    return WebhookSink(name, config, url)
