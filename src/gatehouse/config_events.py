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


class MirrorConfig(_Strict):
    """``[mirrors.<name>]``: a local read copy, in ``database``, of the rows of an evented contract of this project,
    kept up to date from its events (:mod:`gatehouse.events.mirrors`, docs/mirrors.md).

    ```toml
    [mirrors.customers]
    database = "billing"          # where the copy lives (the consuming service's database)
    source = "customers"          # an evented contract ([events.customers]); its events' version is copied
    table = "customers_copy"      # the local table gatehouse creates and writes (schema-qualified allowed)
    columns = ["id", "name"]      # optional subset (the contract's key is always copied)
    ```
    """

    database: str = Field(pattern=_NAME, description="the database that holds the copy")
    source: str = Field(pattern=_NAME, description="the evented contract ([events.<source>]) whose rows are copied")
    table: str = Field(pattern=r"^([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$",
                       description="the local table gatehouse creates and keeps: name or schema.name")
    columns: tuple[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")], ...] | None = Field(
        default=None, description="the contract's columns to copy (default: all; its key is always copied)")
    poll_ms: int = Field(default=200, ge=10, le=60_000, description="how often serve looks for new events when idle")
    batch: int = Field(default=500, ge=1, le=10_000, description="events applied in one transaction")

    @field_validator("table")
    @classmethod
    def _own_schema(cls, value: str) -> str:
        import re

        schema = value.split(".", 1)[0] if "." in value else "public"
        if schema in ("gatehouse", "information_schema") or schema.startswith("pg_") or re.match(r"^api_v\d+$",
                                                                                                   schema):
            raise ValueError(f"schema {schema!r} belongs to gatehouse or PostgreSQL: put the table in public or a "
                             "schema of the service's own")
        return value

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("list at least one column, or leave columns out to copy them all")
        reserved = [c for c in value if c.startswith("_gh_")]
        if reserved:
            raise ValueError(f"{reserved[0]!r}: columns starting with _gh_ are the mirror's own")
        twice = sorted({c for c in value if value.count(c) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice")
        return value
