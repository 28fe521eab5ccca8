"""The models of ``[events.<contract>]`` and ``[sinks.<name>]`` in ``gatehouse.toml`` (imported by
:mod:`gatehouse.config`; nothing here imports it back).

```toml
[events.orders]
version = 1               # the contract version whose rows the events carry (a new version: new events)
sinks = ["bus"]           # where the relay publishes them (default: every sink; none: the HTTP feed only)

[sinks.bus]
kind = "nats"             # nats (JetStream) | rabbitmq | redis (Streams) | webhook
url = "env:NATS_URL"
subject = "gatehouse.{contract}.{type}"   # NATS subject, RabbitMQ routing key, Redis stream key
```
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gatehouse.secrets import EndpointUrl, SecretRef

_NAME = r"^[a-z][a-z0-9_]{0,39}$"
PLACEHOLDERS = ("{contract}", "{type}", "{version}", "{database}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventsSettings(_Strict):
    version: int = Field(ge=1, description="the contract version whose rows the events carry")
    sinks: tuple[Annotated[str, Field(pattern=_NAME)], ...] | None = Field(
        default=None, description="the [sinks.<name>] the relay publishes to (default: all; [] for the feed only)")


class SinkConfig(_Strict):
    kind: Literal["nats", "rabbitmq", "redis", "webhook"]
    url: EndpointUrl = Field(description="the broker's or receiver's URL, or 'env:VAR' naming one (with a "
                                             "password)")
    subject: str = Field(default="gatehouse.{contract}.{type}", max_length=200,
                         description="NATS subject, RabbitMQ routing key or Redis stream key; may hold "
                                     + ", ".join(PLACEHOLDERS))
    exchange: str = Field(default="gatehouse", max_length=200, description="RabbitMQ: the (topic) exchange")
    secret: SecretRef = Field(default=None, description="webhook: 'env:VAR' with the HMAC-SHA256 key")
    batch: int = Field(default=500, ge=1, le=10_000, description="events claimed and published at once")
    timeout_ms: int = Field(default=5000, ge=10, le=600_000, description="a publish not acknowledged by then "
                                                                          "counts as failed (retried)")

    stream: str = Field(default="GATEHOUSE", pattern=r"^[A-Za-z0-9_-]{1,64}$",
                        description="NATS: the JetStream stream the subjects belong to (created, with the subject's "
                                    "placeholders as wildcards, when it does not exist)")
    retry_max_s: float = Field(default=30.0, gt=0, le=3600, description="the longest wait between two attempts "
                               "of a failed publish (the wait doubles from 0.1 s; a publish is never skipped)")

    @field_validator("subject")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        import re

        for found in re.findall(r"\{[^}]*\}", value):
            if found not in PLACEHOLDERS:
                raise ValueError(f"unknown placeholder {found}: use {', '.join(PLACEHOLDERS)}")
        return value
