"""``gatehouse apply``'s part for mirrors: in each consuming database, the mirror tables and their positions.

A mirror table has the copied columns of the source contract version (with the types its view has in the source
database), its key as primary key, and three columns of its own: ``_gh_version`` (the version of the state the row
holds), ``_gh_deleted`` (a tombstone: the row was deleted at the source; kept so that a late, older event cannot
bring it back) and ``_gh_event_at`` (when the event of that state was written at the source). It is created and
owned by the database's owner; gatehouse writes it, the service reads it (``WHERE NOT _gh_deleted``).

``gatehouse.mirror_positions`` holds one row per mirror: where in the source's outbox it is, whether its snapshot is
done, the shape it was made for. When the shape changes (a new contract version is evented, columns are added to
the copy), apply adds the new columns and marks the snapshot as to be taken again: the next sync replaces the
copy's rows in one transaction, so readers see the old copy until the new one is complete.

A mirror fed from a broker declares its columns' types itself (:func:`broker_shape` asks the database what they
are); its database also gets ``gatehouse.mirror_feed_gaps`` (:mod:`gatehouse.events.mirror_broker`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from gatehouse.contracts.lineage import column_sources
from gatehouse.contracts.relations import contract_keys
from gatehouse.contracts.versions import schema_name
from gatehouse.db import Connection, quote_ident
from gatehouse.db.catalog import load_catalog, load_constraints
from gatehouse.db.targets import DatabaseTarget, resolve_targets
from gatehouse.errors import ProjectError
from gatehouse.events.mirror_plan import (
    RESERVED,
    BrokerMirrorPlan,
    MirrorPlan,
    TablePlan,
    plan_broker_mirrors,
    plan_mirrors,
)
from gatehouse.project import Project

MIRROR_POSITIONS_DDL = """
CREATE SCHEMA IF NOT EXISTS gatehouse;
CREATE TABLE IF NOT EXISTS gatehouse.mirror_positions (
    mirror           text PRIMARY KEY,
    table_name       text NOT NULL,
    source           text NOT NULL,
    source_database  text NOT NULL,
    key_columns      text[] NOT NULL,
    columns          jsonb NOT NULL,
    txid             bigint NOT NULL DEFAULT 0,
    seq              bigint NOT NULL DEFAULT 0,
    snapshot_done    boolean NOT NULL DEFAULT false,
    version_source   text,
    snapshot_at      timestamptz,
    snapshot_rows    bigint,
    last_event_id    text,
    last_event_at    timestamptz,
    applied          bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
"""
"""``(txid, seq)`` is the outbox :class:`~gatehouse.events.outbox.Position` the copy is complete up to; ``columns``
the copied ``[name, type]`` pairs and ``source`` the contract version, as apply made the table for them;
``version_source`` the outbox column the rows' ``_gh_version`` came from (a change means a new snapshot)."""

TABLE_COLUMNS = """
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type
FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
"""
PRIMARY_KEY = """
SELECT ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY AS k(num, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num ORDER BY k.n) AS columns
FROM pg_index i WHERE i.indrelid = to_regclass($1) AND i.indisprimary
"""


@dataclass(frozen=True, slots=True)
class MirrorShape:
    """The table a mirror needs: the copied columns with their types, and the key."""

    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]

    def columns_json(self) -> str:
        return json.dumps([list(c) for c in self.columns])


async def _view_types(source: Connection, plan: MirrorPlan) -> dict[str, str]:
    """column → type of the source contract version, from its view; when the source database is not applied yet
    (apply goes through the databases in the order they are declared), from a throw-away view of its SQL."""
    shape = (await load_catalog(source)).get((schema_name(plan.api_version), plan.source.name))
    if shape is not None:
        return dict(shape.columns)
    probe = "gh_mirror_probe"
    await source.execute(f"CREATE TEMPORARY VIEW {probe} AS\n{plan.source.sql}\n")
    return {r["name"]: r["type"] for r in await source.fetch(TABLE_COLUMNS, f"pg_temp.{probe}")}


async def source_shape(source: Connection, plan: MirrorPlan, pending: Path | None = None) -> MirrorShape:
    """The columns (types as the source database has them) and key of what ``plan`` copies, read in a
    transaction that is rolled back; with ``pending`` (the source's migrations folder), after running the
    source's pending migrations in it. A ProjectError when the contract version does not compile or has no key."""
    transaction = source.transaction()
    await transaction.start()
    try:
        if pending is not None:
            from gatehouse.migrate.runner import migrate  # (here: the runner's modules import apply's)

            await migrate(source, pending, skip_no_transaction=True)  # type: ignore[arg-type]
        types = await _view_types(source, plan)
        constraints = await load_constraints(source)
    except asyncpg.PostgresError as exc:
        raise ProjectError(f"{plan.key}: {plan.source_label} does not compile in database "
                           f"{plan.source_database} ({type(exc).__name__})",
                           hint=f"run `gatehouse migrate` for {plan.source_database}, then apply again") from None
    finally:
        await transaction.rollback()
    keys = contract_keys([plan.source], {plan.source_label: column_sources(plan.source.sql)}, constraints)
    key = keys.get(plan.source.name)
    if not key:
        raise ProjectError(f"{plan.key}: {plan.source_label} has no key, so its rows cannot be told apart",
                           hint="a mirror copies rows by the base table's primary key: the contract must show "
                                "every column of it, unchanged")
    copied = [c for c in plan.source.columns if c in plan.columns or c in key]
    return MirrorShape(tuple((c, types[c]) for c in copied), tuple(key))


async def broker_shape(conn: Connection, plan: BrokerMirrorPlan) -> MirrorShape:
    """The declared columns of a broker-fed mirror with their types as the database names them (``int`` is
    ``integer``), from a throw-away table in a transaction that is rolled back: a type it does not know is a
    ProjectError naming the column."""
    probe = "gh_mirror_type_probe"
    types: dict[str, str] = {}
    transaction = conn.transaction()
    await transaction.start()
    try:
        for name, declared in plan.columns:
            try:
                await conn.execute(f"CREATE TEMPORARY TABLE {probe} (c {declared})")
            except asyncpg.PostgresError as exc:
                raise ProjectError(f"{plan.key}.columns: {name} = {declared!r} is not a type database "
                                   f"{plan.database} knows ({type(exc).__name__})",
                                   hint="write a PostgreSQL type: integer, text, numeric(10,2), timestamptz, ...") \
                    from None
            found = await conn.fetch(TABLE_COLUMNS, f"pg_temp.{probe}")
            await conn.execute(f"DROP TABLE pg_temp.{probe}")
            if len(found) != 1:
                raise ProjectError(f"{plan.key}.columns: {name} = {declared!r} is not one type",
                                   hint="write a PostgreSQL type: integer, text, numeric(10,2), timestamptz, ...")
            types[name] = found[0]["type"]
    finally:
        await transaction.rollback()
    return MirrorShape(tuple((name, types[name]) for name, _ in plan.columns), plan.key_columns)


async def _create_table(conn: Connection, plan: TablePlan, shape: MirrorShape, changes: list[str]) -> None:
    if plan.schema != "public" and not await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1",
                                                           plan.schema):
        await conn.execute(f"CREATE SCHEMA {quote_ident(plan.schema)}")
        changes.append(f"created schema {plan.schema}")
    await conn.execute(_table_ddl(plan, shape))
    await conn.execute(f"COMMENT ON TABLE {plan.local_table} IS "
                       f"'gatehouse mirror {plan.name} of {plan.source_label}: read WHERE NOT _gh_deleted'")


def _table_ddl(plan: TablePlan, shape: MirrorShape) -> str:
    columns = [f"    {quote_ident(name)} {type_}{' NOT NULL' if name in shape.key else ''}"
               for name, type_ in shape.columns]
    columns += ["    _gh_version bigint NOT NULL", "    _gh_deleted boolean NOT NULL DEFAULT false",
                "    _gh_event_at timestamptz",
                f"    PRIMARY KEY ({', '.join(quote_ident(k) for k in shape.key)})"]
    return f"CREATE TABLE {plan.local_table} (\n" + ",\n".join(columns) + "\n)"


async def _adjust_table(conn: Connection, plan: TablePlan, shape: MirrorShape, changes: list[str]) -> None:
    """Bring an existing mirror table to ``shape``: new columns are added; a changed key or type is refused (views
    over the table would have to go); columns no longer copied stay, empty after the next snapshot."""
    have = {r["name"]: r["type"] for r in await conn.fetch(TABLE_COLUMNS, plan.table_label)}
    key = tuple(await conn.fetchval(PRIMARY_KEY, plan.table_label) or ())
    if key != shape.key:
        raise ProjectError(f"{plan.key}: the table {plan.table_label} is keyed by {', '.join(key) or 'nothing'}, "
                           f"{plan.source_label} by {', '.join(shape.key)}",
                           hint=f"drop {plan.table_label} (and what reads it) and run apply again: it is copied anew")
    for name, type_ in shape.columns:
        if name not in have:
            await conn.execute(f"ALTER TABLE {plan.local_table} ADD COLUMN {quote_ident(name)} {type_}")
            changes.append(f"added column {name} ({type_}) to mirror table {plan.table_label}")
        elif have[name] != type_:
            raise ProjectError(f"{plan.key}: column {name} of {plan.table_label} is {have[name]}, while "
                               f"{plan.source_label} has {type_}",
                               hint=f"drop {plan.table_label} (and what reads it) and run apply again, or alter "
                                    "the column's type yourself")
    copied = {name for name, _ in shape.columns}
    for name in have:
        if name not in copied and name not in RESERVED:
            changes.append(f"column {name} of {plan.table_label} is no longer copied: it stays, empty after the "
                           "next snapshot (drop it when nothing reads it)")


async def _sync_one(conn: Connection, plan: TablePlan, shape: MirrorShape, changes: list[str]) -> None:
    recorded = await conn.fetchrow("SELECT table_name, source, columns::text AS columns, key_columns "
                                   "FROM gatehouse.mirror_positions WHERE mirror = $1", plan.name)
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", plan.table_label)
    ours = recorded is not None and recorded["table_name"] == plan.table_label
    if exists and not ours:
        raise ProjectError(f"{plan.key}.table = {plan.table_label!r}: that table exists and is not this mirror's",
                           hint="name a table gatehouse may create (it never takes over a table it did not make)")
    if not exists:
        if recorded is not None:
            changes.append(f"mirror {plan.name} now writes {plan.table_label}; {recorded['table_name']} is kept as it "
                           "is and no longer updated (drop it when nothing reads it)")
        await _create_table(conn, plan, shape, changes)
        changes.append(f"created mirror table {plan.table_label} ({plan.source_label}, key "
                       f"{', '.join(shape.key)}): filled by the next sync")
    else:
        await _adjust_table(conn, plan, shape, changes)
    same = (recorded is not None and ours and recorded["source"] == plan.source_label
            and json.loads(recorded["columns"]) == json.loads(shape.columns_json()))
    if same:
        return
    if recorded is not None and exists:
        changes.append(f"mirror {plan.name} now copies {plan.source_label} ({len(shape.columns)} columns): it is "
                       "copied anew by the next sync")
    await conn.execute(
        """
        INSERT INTO gatehouse.mirror_positions (mirror, table_name, source, source_database, key_columns, columns)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb)
        ON CONFLICT (mirror) DO UPDATE SET table_name = $2, source = $3, source_database = $4, key_columns = $5,
            columns = $6::jsonb, snapshot_done = false, updated_at = now()
        """, plan.name, plan.table_label, plan.source_label, plan.source_database, list(shape.key),
        shape.columns_json())


async def _remove_gone(conn: Connection, plans: Sequence[TablePlan], changes: list[str]) -> None:
    if not await conn.fetchval("SELECT to_regclass('gatehouse.mirror_positions') IS NOT NULL"):
        return
    for row in await conn.fetch("SELECT mirror, table_name FROM gatehouse.mirror_positions WHERE NOT "
                                "(mirror = ANY($1::text[])) ORDER BY mirror", [p.name for p in plans]):
        await conn.execute("DELETE FROM gatehouse.mirror_positions WHERE mirror = $1", row["mirror"])
        changes.append(f"mirror {row['mirror']} is no longer in the project: {row['table_name']} is kept as it is "
                       "and no longer updated (drop it when nothing reads it)")


class _Sources:
    """Owner connections to the source databases, opened when first needed (``conn`` for its own database)."""

    def __init__(self, project: Project, database: str, conn: Connection, stack: AsyncExitStack) -> None:
        self.project, self.stack = project, stack
        self.opened: dict[str, Connection] = {database: conn}
        self.targets: dict[str, DatabaseTarget] | None = None

    async def __call__(self, database: str) -> Connection:
        if database not in self.opened:
            self.targets = self.targets or await resolve_targets(self.project)
            conn = await self.targets[database].connect_owner()
            self.stack.push_async_callback(conn.close)
            self.opened[database] = conn
        return self.opened[database]


async def sync_mirrors(conn: Connection, project: Project, database: str) -> list[str]:
    """Make ``database``'s mirror tables and positions match ``[mirrors.*]``; one line per change. Runs inside
    apply's transaction on ``conn`` (the owner); the source databases are read on connections of their own."""
    plans = [p for p in plan_mirrors(project) if p.database == database]
    fed = [p for p in plan_broker_mirrors(project) if p.database == database]
    changes: list[str] = []
    await _remove_gone(conn, [*plans, *fed], changes)
    if not plans and not fed:
        return changes
    await conn.execute(MIRROR_POSITIONS_DDL)
    if fed:
        from gatehouse.events.mirror_broker import FEED_GAPS_DDL

        await conn.execute(FEED_GAPS_DDL)
    for broker_plan in fed:
        await _sync_one(conn, broker_plan, await broker_shape(conn, broker_plan), changes)
    async with AsyncExitStack() as stack:
        sources = _Sources(project, database, conn, stack)
        for plan in plans:
            await _sync_one(conn, plan, await source_shape(await sources(plan.source_database), plan), changes)
    return changes


async def stand_in_mirror_tables(conn: Connection, project: Project, database: str) -> list[str]:
    """Create, in ``conn``'s transaction, each mirror table of ``database`` that apply has not made yet, as apply
    will make it: for the checks that compile every contract in a transaction they roll back (``migrate``'s plan,
    ``lock``, ``check``), so that a contract over a mirror table compiles before the first apply. The source's
    column types come from its view, else from its contract's SQL after its pending migrations (rolled back). A
    mirror whose source cannot be read is left out (its contracts then fail to compile, as they would). Returns
    the tables made."""
    plans = [p for p in plan_mirrors(project) if p.database == database]
    missing = [p for p in plans if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", p.table_label)]
    made: list[str] = []
    async with AsyncExitStack() as stack:
        sources = _Sources(project, database, conn, stack)
        for plan in missing:
            try:
                source = await sources(plan.source_database)
                shape = await source_shape(source, plan, project.migrations_dir(plan.source_database))
                async with conn.transaction():
                    await _create_table(conn, plan, shape, [])
            except (ProjectError, asyncpg.PostgresError, OSError):
                continue
            made.append(plan.table_label)
    for fed in plan_broker_mirrors(project):
        if fed.database != database or await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", fed.table_label):
            continue
        try:
            shape = await broker_shape(conn, fed)
            async with conn.transaction():
                await _create_table(conn, fed, shape, [])
        except (ProjectError, asyncpg.PostgresError):
            continue
        made.append(fed.table_label)
    return made
