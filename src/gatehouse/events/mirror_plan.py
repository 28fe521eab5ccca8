"""What ``[mirrors.<name>]`` asks for, checked against the project: which contract version it copies, from which
database and view, into which local table.

The checks that need only the project folder are here (a database that exists, a source contract that is evented,
columns it has); the ones that need the source database (the contract's key, its columns' types) are made by
``gatehouse apply`` when it creates the table (:mod:`gatehouse.events.mirror_tables`).

A mirror fed from a broker (``from = {...}``) copies a contract of another project: it declares its key, columns and
types itself, and becomes a :class:`BrokerMirrorPlan` (:func:`plan_broker_mirrors`); :func:`plan_mirrors` answers
the others only, which read the outbox of a database of this project.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gatehouse.config import ProjectConfig
from gatehouse.config_events import MirrorFrom
from gatehouse.contracts.model import ContractVersion
from gatehouse.contracts.versions import ApiVersions, schema_name
from gatehouse.db import quote_ident
from gatehouse.errors import ProjectError

if TYPE_CHECKING:  # (project.py may call check_mirrors at load: no import of it here at run time)
    from gatehouse.project import Project

RESERVED = ("_gh_version", "_gh_deleted", "_gh_event_at")
"""The mirror's own columns: the version of the row's state, whether it is a tombstone, and when its event was
written at the source."""


class TablePlan(Protocol):
    """What ``apply`` needs of either kind of mirror to make and check its table (:mod:`.mirror_tables`)."""

    @property
    def name(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def schema(self) -> str: ...
    @property
    def local_table(self) -> str: ...
    @property
    def table_label(self) -> str: ...
    @property
    def source_label(self) -> str: ...
    @property
    def source_database(self) -> str: ...


class _LocalTable:
    """The names of a mirror's local table, worked out the same way for both kinds of plan."""

    __slots__ = ()
    name: str
    schema: str
    table: str

    @property
    def key(self) -> str:
        """The mirror's key in gatehouse.toml, for messages."""
        return f"mirrors.{self.name}"

    @property
    def local_table(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    @property
    def table_label(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True, slots=True)
class MirrorPlan(_LocalTable):
    name: str
    database: str
    """The consuming database: where the local table lives."""
    source: ContractVersion
    """The contract version the events carry (``[events.<contract>] version``)."""
    api_version: int
    """An API version that serves ``source``: its view ``api_v<N>.<contract>`` is what the snapshot reads."""
    schema: str
    table: str
    columns: tuple[str, ...]
    """The contract's columns that are copied, in the contract's order (the key is added by apply if missing)."""
    poll_s: float
    batch: int

    @property
    def source_database(self) -> str:
        return self.source.database

    @property
    def source_view(self) -> str:
        return f"{quote_ident(schema_name(self.api_version))}.{quote_ident(self.source.name)}"

    @property
    def source_label(self) -> str:
        return self.source.label


@dataclass(frozen=True, slots=True)
class BrokerMirrorPlan(_LocalTable):
    """A ``[mirrors.<name>]`` with ``from``: a copy of another project's contract, from the events its relay
    publishes to a broker (:mod:`gatehouse.events.mirror_broker`)."""

    name: str
    database: str
    contract: str
    """The source contract's name: the events' ``aggregatetype``."""
    version: int
    """The source contract version whose events are applied (the events' ``version``)."""
    schema: str
    table: str
    columns: tuple[tuple[str, str], ...]
    """(name, type as declared) of every copied column, in the declared order."""
    key_columns: tuple[str, ...]
    """The source contract's key, in its order (a key of several columns is a JSON array in ``aggregateid``)."""
    feed: MirrorFrom
    consumer: str
    """NATS: the durable consumer's name."""
    poll_s: float
    batch: int

    @property
    def source_label(self) -> str:
        return f"{self.contract}.v{self.version}"

    @property
    def source_database(self) -> str:
        """Where the events come from, for ``gatehouse.mirror_positions`` and the status."""
        if self.feed.kind == "nats":
            return f"nats stream {self.feed.stream}" + (f" ({self.feed.subject})" if self.feed.subject else "")
        return f"redis stream {self.feed.stream}"


def _broker_plan(config: ProjectConfig, name: str, schema: str, table: str) -> BrokerMirrorPlan:
    mirror = config.mirrors[name]
    assert mirror.from_ is not None and isinstance(mirror.columns, dict) and mirror.key and mirror.version
    return BrokerMirrorPlan(name=name, database=mirror.database, contract=mirror.source, version=mirror.version,
                            schema=schema, table=table, columns=tuple(mirror.columns.items()), key_columns=mirror.key,
                            feed=mirror.from_,
                            consumer=mirror.from_.consumer or f"gatehouse_{config.project.name}_{name}"[:64],
                            poll_s=mirror.poll_ms / 1000, batch=mirror.batch)


def check_mirrors(config: ProjectConfig, contracts: Sequence[ContractVersion], versions: ApiVersions,
                  where: str) -> list[MirrorPlan]:
    """Every ``[mirrors.*]`` checked, or a ProjectError naming the key and what to do; the plans of those that read
    this project's outbox (:func:`check_broker_mirrors` answers the others)."""
    return _check(config, contracts, versions, where)[0]


def check_broker_mirrors(config: ProjectConfig, contracts: Sequence[ContractVersion], versions: ApiVersions,
                         where: str) -> list[BrokerMirrorPlan]:
    return _check(config, contracts, versions, where)[1]


def _check(config: ProjectConfig, contracts: Sequence[ContractVersion], versions: ApiVersions,
           where: str) -> tuple[list[MirrorPlan], list[BrokerMirrorPlan]]:
    plans: list[MirrorPlan] = []
    fed: list[BrokerMirrorPlan] = []
    tables: dict[tuple[str, str, str], str] = {}
    for name, mirror in config.mirrors.items():
        key = f"mirrors.{name}"
        if mirror.database not in config.databases:
            raise ProjectError(f"{key}.database = {mirror.database!r}: no database of that name", where=where,
                               hint=f"declared databases: {', '.join(config.databases)}")
        schema, _, table = mirror.table.rpartition(".")
        schema = schema or "public"
        other = tables.get((mirror.database, schema, table))
        if other is not None:
            raise ProjectError(f"{key}.table = {mirror.table!r}: mirrors.{other} writes that table already",
                               where=where, hint="give each mirror a table of its own")
        tables[(mirror.database, schema, table)] = name
        if mirror.from_ is not None:
            fed.append(_broker_plan(config, name, schema, table))
            continue
        known = sorted({c.name for c in contracts})
        if mirror.source not in known:
            raise ProjectError(f"{key}.source = {mirror.source!r}: no contract has that name", where=where,
                               hint=f"known contracts: {', '.join(known) or 'none'}")
        events = config.events.get(mirror.source)
        if events is None:
            raise ProjectError(f"{key}.source = {mirror.source!r}: that contract publishes no events, so nothing "
                               "keeps a copy up to date", where=where,
                               hint=f"add [events.{mirror.source}] with version = <the contract version to copy>")
        source = next((c for c in contracts if c.name == mirror.source and c.version == events.version), None)
        if source is None:
            have = ", ".join(f"v{c.version}" for c in contracts if c.name == mirror.source)
            raise ProjectError(f"[events.{mirror.source}] version = {events.version}: there is no "
                               f"{mirror.source}.v{events.version} (the version {key} copies)", where=where,
                               hint=f"{mirror.source} has {have}")
        api_version = next((n for n, c in versions.views() if c is source), None)
        if api_version is None:
            raise ProjectError(f"{key} copies {source.label}, which no live API version serves (retired)",
                               where=where, hint=f"point [events.{mirror.source}] version at a served version")
        wanted = tuple(mirror.columns or source.columns)
        unknown = [c for c in wanted if c not in source.columns]
        if unknown:
            raise ProjectError(f"{key}.columns names {', '.join(unknown)}, not a column of {source.label}",
                               where=where, hint=f"its columns: {', '.join(source.columns)}")
        reserved = [c for c in source.columns if c in RESERVED]
        if reserved:
            raise ProjectError(f"{source.label} has a column {reserved[0]}, which a mirror keeps for itself",
                               where=where, hint="rename it in the contract (AS ...) in a new contract version")
        plans.append(MirrorPlan(name=name, database=mirror.database, source=source, api_version=api_version,
                                schema=schema, table=table, columns=tuple(c for c in source.columns if c in wanted),
                                poll_s=mirror.poll_ms / 1000, batch=mirror.batch))
    return plans, fed


def plan_mirrors(project: Project) -> list[MirrorPlan]:
    from gatehouse.project import CONFIG_FILE

    return check_mirrors(project.config, project.contracts, project.versions, str(project.root / CONFIG_FILE))


def plan_broker_mirrors(project: Project) -> list[BrokerMirrorPlan]:
    from gatehouse.project import CONFIG_FILE

    return check_broker_mirrors(project.config, project.contracts, project.versions,
                                str(project.root / CONFIG_FILE))
