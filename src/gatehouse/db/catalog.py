"""The schema cache: each served view's columns and their PostgreSQL types, read once at start.

The types let the compiler bind every filter value as text and cast it to the column's type inside SQL
(``$1::text::integer``), so PostgreSQL parses values exactly as PostgREST has it do, and a malformed value
becomes a clear 400 from the database's own input functions instead of a Python-side guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gatehouse.db import Connection

CATALOG_QUERY = r"""
SELECT n.nspname AS schema, c.relname AS view, a.attname AS column,
       format_type(a.atttypid, a.atttypmod) AS type,
       pg_relation_is_updatable(c.oid::regclass, true) AS view_events,
       pg_column_is_updatable(c.oid::regclass, a.attnum, true) AS column_writable
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname ~ '^api_v[0-9]+$' AND c.relkind IN ('v', 'm')
ORDER BY n.nspname, c.relname, a.attnum
"""
# pg_relation_is_updatable's bits: which statements PostgreSQL can run through the view.
_UPDATE, _INSERT, _DELETE = 4, 8, 16


@dataclass(frozen=True, slots=True)
class ViewShape:
    schema: str
    name: str
    columns: dict[str, str]
    """column → type, in the view's order."""
    writable_columns: frozenset[str] = frozenset()
    """Columns PostgreSQL can write through the view (plain references to a base column)."""
    insertable: bool = False
    updatable: bool = False
    deletable: bool = False


async def load_catalog(conn: Connection) -> dict[tuple[str, str], ViewShape]:
    rows: dict[tuple[str, str], list[Any]] = {}
    for row in await conn.fetch(CATALOG_QUERY):
        rows.setdefault((row["schema"], row["view"]), []).append(row)
    shapes: dict[tuple[str, str], ViewShape] = {}
    for (schema, view), columns in rows.items():
        events = columns[0]["view_events"]
        shapes[(schema, view)] = ViewShape(
            schema, view, {r["column"]: r["type"] for r in columns},
            frozenset(r["column"] for r in columns if r["column_writable"]),
            insertable=bool(events & _INSERT), updatable=bool(events & _UPDATE), deletable=bool(events & _DELETE),
        )
    return shapes


CONSTRAINTS_QUERY = r"""
SELECT c.conname::text AS name, c.contype::text AS kind, ns.nspname AS schema, cl.relname AS table,
       ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY AS k(num, i)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.num ORDER BY k.i) AS columns,
       fns.nspname AS ref_schema, fcl.relname AS ref_table,
       ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY AS k(num, i)
             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.num ORDER BY k.i) AS ref_columns
FROM pg_constraint c
JOIN pg_class cl ON cl.oid = c.conrelid
JOIN pg_namespace ns ON ns.oid = cl.relnamespace
LEFT JOIN pg_class fcl ON fcl.oid = c.confrelid
LEFT JOIN pg_namespace fns ON fns.oid = fcl.relnamespace
WHERE c.contype IN ('f', 'p', 'u')
  AND ns.nspname NOT IN ('pg_catalog', 'information_schema', 'gatehouse') AND ns.nspname !~ '^api_v[0-9]+$'
ORDER BY c.conname
"""


@dataclass(frozen=True, slots=True)
class Constraint:
    """A primary key, unique or foreign key constraint of a base table."""

    name: str
    kind: str  # 'p', 'u' or 'f'
    schema: str
    table: str
    columns: tuple[str, ...]
    ref_schema: str | None = None
    ref_table: str | None = None
    ref_columns: tuple[str, ...] = ()


async def load_constraints(conn: Connection) -> list[Constraint]:
    return [
        Constraint(r["name"], r["kind"], r["schema"], r["table"], tuple(r["columns"]), r["ref_schema"],
                   r["ref_table"], tuple(r["ref_columns"]))
        for r in await conn.fetch(CONSTRAINTS_QUERY)
    ]
