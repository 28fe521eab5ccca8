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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


MIRROR_FEEDS = ("nats", "redis")
COLUMN_TYPE = r"^[A-Za-z_][A-Za-z0-9_ .]{0,62}(\(\s*\d+(\s*,\s*\d+)?\s*\))?(\[\])*$"
"""A PostgreSQL type as written in ``CREATE TABLE`` (``integer``, ``numeric(10,2)``, ``timestamp with time zone``,
``text[]``); ``apply`` then asks the database whether it is one."""


class MirrorFrom(_Strict):
    """``from = {...}`` of a ``[mirrors.<name>]`` fed from a broker: where another project's relay publishes the
    source contract's events (that project's ``[sinks.<name>]``), read by :mod:`gatehouse.events.mirror_broker`."""

    kind: str = Field(description="nats (a JetStream stream, read by a durable pull consumer) | redis (a stream)")
    url: EndpointUrl = Field(description="the broker's URL, or 'env:VAR' naming one (with a password)")
    stream: str = Field(pattern=r"^[A-Za-z0-9_:.{}-]{1,200}$",
                        description="NATS: the JetStream stream (the sink's stream); Redis: the stream's key (the "
                                    "sink's subject, filled in)")
    subject: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_*>.-]{1,200}$",
                                description="NATS: only the stream's messages on this subject (wildcards allowed), "
                                            "e.g. gatehouse.customers.*; default: the whole stream")
    consumer: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                 description="NATS: the durable consumer's name (default: "
                                             "gatehouse_<project>_<mirror>)")
    timeout_ms: int = Field(default=5000, ge=10, le=600_000, description="a broker call not answered by then fails "
                                                                          "(the step is retried)")

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value == "rabbitmq":
            raise ValueError("a mirror cannot be fed from RabbitMQ yet (its classic queues cannot be replayed, and "
                             "RabbitMQ streams are not read by gatehouse): publish the source's events to NATS "
                             "JetStream or Redis Streams too (docs/mirrors.md)")
        if value not in MIRROR_FEEDS:
            raise ValueError(f"unknown kind {value!r}: use {' or '.join(MIRROR_FEEDS)}")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            raise ValueError('give the broker\'s URL, e.g. url = "env:NATS_URL"')
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

    Fed from a broker (events another project's relay publishes), the source contract is not in this project, so
    the mirror declares what it copies: ``from``, ``version`` (of the source contract, which its events carry),
    ``key`` (the contract's key, in its order) and ``columns`` with their PostgreSQL types:

    ```toml
    [mirrors.customers]
    database = "billing"
    source = "customers"          # the contract of the other project (its events' aggregatetype)
    version = 1
    table = "customers_copy"
    key = ["id"]
    columns = { id = "integer", name = "text", email = "text" }
    from = { kind = "nats", url = "env:NATS_URL", stream = "GATEHOUSE", subject = "gatehouse.customers.*" }
    ```
    """

    database: str = Field(pattern=_NAME, description="the database that holds the copy")
    source: str = Field(pattern=_NAME, description="the evented contract ([events.<source>]) whose rows are copied; "
                        "with `from`, the other project's contract (its events' aggregatetype)")
    from_: MirrorFrom | None = Field(default=None, alias="from",
                                     description="the broker the events come from (default: this project's outbox)")
    version: int | None = Field(default=None, ge=1, description="with `from`: the source contract version the "
                                                                "events carry (others are skipped)")
    key: tuple[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")], ...] | None = Field(
        default=None, description="with `from`: the source contract's key columns, in its order")
    table: str = Field(pattern=r"^([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$",
                       description="the local table gatehouse creates and keeps: name or schema.name")
    columns: (tuple[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")], ...]
              | dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")],
                     Annotated[str, Field(pattern=COLUMN_TYPE)]] | None) = Field(
        default=None, description="the contract's columns to copy (default: all; its key is always copied); with "
                                  "`from`: every column copied, with its PostgreSQL type ({ id = \"integer\" })")
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

    @field_validator("columns", mode="before")
    @classmethod
    def _columns(cls, value: object) -> object:
        """Checked here, before the union (list or table) is tried, so that one error says what is wrong."""
        import re

        if value is None:
            return None
        if not isinstance(value, (list, tuple, dict)):
            raise ValueError('a list of names (columns = ["id", "name"]) or, fed from a broker, a table of names and '
                             'types (columns = { id = "integer" })')
        if not value:
            raise ValueError("list at least one column, or leave columns out to copy them all")
        names = [str(c) for c in value]
        bad = [c for c in names if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", c)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a column name (letters, digits, _)")
        reserved = [c for c in names if c.startswith("_gh_")]
        if reserved:
            raise ValueError(f"{reserved[0]!r}: columns starting with _gh_ are the mirror's own")
        twice = sorted({c for c in names if names.count(c) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice")
        if isinstance(value, dict):
            for name, type_ in value.items():
                if not isinstance(type_, str) or not re.match(COLUMN_TYPE, type_):
                    raise ValueError(f"{name} = {type_!r} is not a PostgreSQL type as CREATE TABLE takes it (e.g. "
                                     '"integer", "numeric(10,2)", "timestamp with time zone", "text[]")')
        return value

    @model_validator(mode="after")
    def _fed_from(self) -> MirrorConfig:
        """A mirror fed from a broker declares what an outbox mirror reads from its contract, and only it does."""
        if self.from_ is None:
            for name in ("version", "key"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is only for a mirror fed from a broker (with from = {{...}}): this one "
                                     f"copies {self.source} of this project, whose {name} gatehouse knows")
            if isinstance(self.columns, dict):
                raise ValueError("columns of a mirror of this project's contract is a list of names "
                                 "(their types come from the contract): columns = [\"id\", \"name\"]")
            return self
        if self.version is None:
            raise ValueError("a mirror fed from a broker names the source contract's version its events carry: "
                             "version = 1")
        if not isinstance(self.columns, dict):
            raise ValueError("a mirror fed from a broker declares its columns with their PostgreSQL types (the "
                             "source contract is not in this project): columns = { id = \"integer\", name = \"text\" }")
        if not self.key:
            raise ValueError("a mirror fed from a broker names the source contract's key, in its order: key = [\"id\"]")
        missing = [k for k in self.key if k not in self.columns]
        if missing:
            raise ValueError(f"key {', '.join(missing)} is not in columns: add it with its type")
        if len(set(self.key)) < len(self.key):
            raise ValueError("a key column is listed twice in key")
        return self
