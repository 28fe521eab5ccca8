"""Data versions: a counter per base table that moves with every statement that writes it.

A cached answer is only as good as the proof that its data has not changed since. That proof comes from
PostgreSQL itself: a statement-level trigger on every base table a cached contract reads adds one to the
table's *data version* in the same transaction as the write, so the new version becomes visible exactly
when the written rows do (a sequence would not do: ``nextval`` is not transactional, and a reader could see
the new number before the rows). The trigger catches every writer: gatehouse, a migration, a cron job,
``psql``.

Why 16 rows per table: one counter row per table would be a row lock held by every writing transaction
until it commits, serialising all writers of a table (measured here: commit throughput down to 24-58 %).
Each backend bumps the row of its own stripe (``pg_backend_pid() % 16``); the version is the sum of the
stripes, which only grows. And why not ``NOTIFY``: a transaction with a pending notification takes a
database-wide lock at commit; one per write cut commit throughput by more than half here.

The server learns which base tables a served view reads from PostgreSQL's own dependency records, through
views of views, down to tables and partitions (:data:`VIEW_TABLES`), so a contract's lineage is exact, not
parsed. A contract is cached only when every relation it reads is a versioned table: a materialized view,
a foreign table or a user function (which may read any table) make it uncacheable, with the reason logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from gatehouse.contracts.versions import schema_name
from gatehouse.db import Connection, quote_ident
from gatehouse.project import Project

SCHEMA = "gatehouse_versions"
"""Its own schema: app roles read the counters (in the same statement as their data) and nothing else."""
TRIGGER = "gatehouse_data_version"
STRIPES = 16

DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.data_versions (
    relid   oid NOT NULL,
    stripe  int2 NOT NULL,
    v       int8 NOT NULL,
    PRIMARY KEY (relid, stripe)
);
CREATE OR REPLACE FUNCTION {SCHEMA}.bump() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO {SCHEMA}.data_versions AS d (relid, stripe, v)
    VALUES (TG_RELID, pg_backend_pid() % {STRIPES}, 1)
    ON CONFLICT (relid, stripe) DO UPDATE SET v = d.v + 1;
    RETURN NULL;
END $$;
"""

VIEW_TABLES = r"""
WITH RECURSIVE reads(view_oid, rel) AS (
    SELECT r.ev_class, d.refobjid
    FROM pg_rewrite r
    JOIN pg_class v ON v.oid = r.ev_class AND v.relkind = 'v'
    JOIN pg_namespace n ON n.oid = v.relnamespace AND n.nspname ~ '^api_v[0-9]+$'
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
         AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
  UNION
    SELECT reads.view_oid, next.rel
    FROM reads
    JOIN pg_class c ON c.oid = reads.rel AND c.relkind IN ('v', 'p')
    CROSS JOIN LATERAL (
        SELECT d.refobjid AS rel  -- a view: what its rule reads
        FROM pg_rewrite r
        JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
             AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
        WHERE c.relkind = 'v' AND r.ev_class = c.oid
      UNION ALL
        SELECT p.relid  -- a partitioned table: its partitions (a write may name one directly)
        FROM pg_partition_tree(c.oid) p
        WHERE c.relkind = 'p' AND p.relid <> c.oid
    ) AS next
)
SELECT vn.nspname AS schema, v.relname AS view, c.oid AS relid, c.relkind::text AS kind,
       format('%I.%I', cn.nspname, c.relname) AS name,
       EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = $1) AS versioned
FROM reads
JOIN pg_class v ON v.oid = reads.view_oid
JOIN pg_namespace vn ON vn.oid = v.relnamespace
JOIN pg_class c ON c.oid = reads.rel
JOIN pg_namespace cn ON cn.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm', 'f')
ORDER BY 1, 2, 3
"""

VIEW_FUNCTIONS = r"""
WITH RECURSIVE reads(view_oid, rel) AS (
    SELECT v.oid, v.oid FROM pg_class v JOIN pg_namespace n ON n.oid = v.relnamespace
    WHERE v.relkind = 'v' AND n.nspname ~ '^api_v[0-9]+$'
  UNION
    SELECT reads.view_oid, d.refobjid
    FROM reads
    JOIN pg_rewrite r ON r.ev_class = reads.rel
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
         AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
)
SELECT DISTINCT vn.nspname AS schema, v.relname AS view, format('%I.%I', pn.nspname, p.proname) AS function
FROM reads
JOIN pg_rewrite r ON r.ev_class = reads.rel
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.refclassid = 'pg_proc'::regclass
JOIN pg_proc p ON p.oid = d.refobjid AND p.provolatile <> 'i'
JOIN pg_namespace pn ON pn.oid = p.pronamespace
JOIN pg_class v ON v.oid = reads.view_oid
JOIN pg_namespace vn ON vn.oid = v.relnamespace
"""


@dataclass(frozen=True, slots=True)
class ReadTable:
    relid: int
    name: str
    kind: str
    """``r`` table, ``p`` partitioned table, ``m`` materialized view, ``f`` foreign table."""
    versioned: bool


@dataclass(frozen=True, slots=True)
class ViewLineage:
    """The base relations one served view reads, and whether its answers may be cached."""

    tables: tuple[ReadTable, ...]
    functions: tuple[str, ...] = ()

    @property
    def uncacheable(self) -> str | None:
        """Why answers of this view cannot be proven fresh, or None when they can."""
        for table in self.tables:
            if table.kind == "m":
                return f"it reads the materialized view {table.name} (a REFRESH is not a write a trigger sees)"
            if table.kind == "f":
                return f"it reads the foreign table {table.name} (its data changes elsewhere)"
        if self.functions:
            return f"it calls {', '.join(self.functions)}, which may read any table"
        unversioned = [table.name for table in self.tables if not table.versioned]
        if unversioned:
            return f"{', '.join(unversioned)} has no data-version trigger yet: run `gatehouse apply`"
        return None


async def read_lineage(conn: Connection) -> dict[tuple[str, str], ViewLineage]:
    """(schema, view) → its lineage, for every view of every ``api_vN`` schema of this database."""
    tables: dict[tuple[str, str], list[ReadTable]] = {}
    for row in await conn.fetch(VIEW_TABLES, TRIGGER):
        tables.setdefault((row["schema"], row["view"]), []).append(
            ReadTable(row["relid"], row["name"], row["kind"], row["versioned"]))
    functions: dict[tuple[str, str], list[str]] = {}
    for row in await conn.fetch(VIEW_FUNCTIONS):
        functions.setdefault((row["schema"], row["view"]), []).append(row["function"])
    return {view: ViewLineage(tuple(tables.get(view, ())), tuple(sorted(functions.get(view, ()))))
            for view in tables.keys() | functions.keys()}


def cached_views(project: Project, database: str) -> set[tuple[str, str]]:
    """(schema, view) of every served view of a contract with a ``cache`` setting in this database."""
    settings = project.config.contracts
    return {(schema_name(number), contract.name) for number, contract in project.versions.views()
            if contract.database == database and (s := settings.get(contract.name)) is not None and s.cache}


async def sync_data_versions(conn: asyncpg.Connection, project: Project, database: str,
                             roles: Mapping[str, str]) -> list[str]:
    """``apply``: the counters, and the trigger on exactly the tables cached contracts read (removed from
    tables no cached contract reads any more). ``roles`` are the app roles (and the authenticator), which
    read the counters. Returns the changes, one line each."""
    changes: list[str] = []
    await conn.execute(DDL)
    for role in sorted(roles.values()):
        await conn.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {quote_ident(role)}")
        await conn.execute(f"GRANT SELECT ON {SCHEMA}.data_versions TO {quote_ident(role)}")
    lineage = await read_lineage(conn)
    wanted: dict[int, str] = {}
    for view in sorted(cached_views(project, database)):
        found = lineage.get(view)
        for table in found.tables if found is not None else ():
            if table.kind in ("r", "p"):
                wanted[table.relid] = table.name
    existing = {row["relid"]: row["name"] for row in await conn.fetch(
        "SELECT t.tgrelid AS relid, format('%I.%I', n.nspname, c.relname) AS name FROM pg_trigger t "
        "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = $1",
        TRIGGER)}
    for relid, name in sorted(existing.items(), key=lambda item: item[1]):
        if relid not in wanted:
            await conn.execute(f"DROP TRIGGER {TRIGGER} ON {name}")
            changes.append(f"removed the data-version trigger from {name} (no cached contract reads it)")
    for relid, name in sorted(wanted.items(), key=lambda item: item[1]):
        if relid not in existing:
            try:
                async with conn.transaction():  # a savepoint: one table refused leaves the rest of apply alone
                    await conn.execute(f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
                                       f"ON {name} FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.bump()")
            except asyncpg.InsufficientPrivilegeError:
                changes.append(f"could not add a data-version trigger to {name}: only its owner may; the contracts "
                               "reading it stay uncached until `gatehouse apply` runs as that owner")
                continue
            changes.append(f"added a data-version trigger to {name} (read by a cached contract)")
    return changes
