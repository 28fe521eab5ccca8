"""What ``[mirrors.<name>]`` asks for, checked against the project: which contract version it copies, from which
database and view, into which local table.

The checks that need only the project folder are here (a database that exists, a source contract that is evented,
columns it has); the ones that need the source database (the contract's key, its columns' types) are made by
``gatehouse apply`` when it creates the table (:mod:`gatehouse.events.mirror_tables`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gatehouse.config import ProjectConfig
from gatehouse.contracts.model import ContractVersion
from gatehouse.contracts.versions import ApiVersions, schema_name
from gatehouse.db import quote_ident
from gatehouse.errors import ProjectError

if TYPE_CHECKING:  # (project.py may call check_mirrors at load: no import of it here at run time)
    from gatehouse.project import Project

RESERVED = ("_gh_version", "_gh_deleted", "_gh_event_at")
"""The mirror's own columns: the version of the row's state, whether it is a tombstone, and when its event was
written at the source."""


@dataclass(frozen=True, slots=True)
class MirrorPlan:
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
    def key(self) -> str:
        return f"mirrors.{self.name}"

    @property
    def source_database(self) -> str:
        return self.source.database

    @property
    def source_view(self) -> str:
        return f"{quote_ident(schema_name(self.api_version))}.{quote_ident(self.source.name)}"

    @property
    def local_table(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    @property
    def table_label(self) -> str:
        return f"{self.schema}.{self.table}"


def check_mirrors(config: ProjectConfig, contracts: Sequence[ContractVersion], versions: ApiVersions,
                  where: str) -> list[MirrorPlan]:
    """Every ``[mirrors.*]`` resolved, or a ProjectError naming the key and what to do."""
    plans: list[MirrorPlan] = []
    tables: dict[tuple[str, str, str], str] = {}
    for name, mirror in config.mirrors.items():
        key = f"mirrors.{name}"
        if mirror.database not in config.databases:
            raise ProjectError(f"{key}.database = {mirror.database!r}: no database of that name", where=where,
                               hint=f"declared databases: {', '.join(config.databases)}")
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
        wanted = mirror.columns or source.columns
        unknown = [c for c in wanted if c not in source.columns]
        if unknown:
            raise ProjectError(f"{key}.columns names {', '.join(unknown)}, not a column of {source.label}",
                               where=where, hint=f"its columns: {', '.join(source.columns)}")
        reserved = [c for c in source.columns if c in RESERVED]
        if reserved:
            raise ProjectError(f"{source.label} has a column {reserved[0]}, which a mirror keeps for itself",
                               where=where, hint="rename it in the contract (AS ...) in a new contract version")
        schema, _, table = mirror.table.rpartition(".")
        schema = schema or "public"
        other = tables.get((mirror.database, schema, table))
        if other is not None:
            raise ProjectError(f"{key}.table = {mirror.table!r}: mirrors.{other} writes that table already",
                               where=where, hint="give each mirror a table of its own")
        tables[(mirror.database, schema, table)] = name
        plans.append(MirrorPlan(name=name, database=mirror.database, source=source, api_version=api_version,
                                schema=schema, table=table, columns=tuple(c for c in source.columns if c in wanted),
                                poll_s=mirror.poll_ms / 1000, batch=mirror.batch))
    return plans


def plan_mirrors(project: Project) -> list[MirrorPlan]:
    from gatehouse.project import CONFIG_FILE

    return check_mirrors(project.config, project.contracts, project.versions, str(project.root / CONFIG_FILE))
