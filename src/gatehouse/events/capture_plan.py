"""What capturing the changes of one evented contract version takes, read from the database's own catalog.

For ``[events.orders] version = 1`` apply needs to know:

* the contract's **key** and its **key table**: the base table whose primary key the contract shows unchanged
  (:func:`gatehouse.contracts.relations.contract_keys`); one row of it is one aggregate, its key the event's
  ``aggregateid``;
* how to **shape** a row of the key table as the contract version shows it: the view's own definition, as
  PostgreSQL prints it with every name qualified (``pg_get_viewdef`` under ``search_path = pg_catalog``), with
  the key table's entry in ``FROM`` replaced by the one row at hand, ``(SELECT ($1).*)``. Everything else in
  the definition (joins, expressions, ``WHERE``, ``GROUP BY``) stays PostgreSQL's own text, so the shape is
  exactly the view's, and it needs neither the view (which a migration may be re-creating) nor a scan of it;
* the **other tables** the view reads (its lineage, from ``pg_depend`` as in :mod:`gatehouse.cache.tables`) and,
  for each, a path of foreign keys to the key table: a change there changes the contract rows of the key rows
  it joins to. A table with no such path cannot say which rows it changed, and is reported;
* which **columns** of each table the view reads (``pg_depend`` records them per column): an update that
  changes none of them changes nothing any consumer can see, and produces no event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from gatehouse.contracts.lineage import column_sources
from gatehouse.contracts.model import ContractVersion
from gatehouse.contracts.relations import DEFAULT_SCHEMA, contract_keys
from gatehouse.contracts.versions import schema_name
from gatehouse.db import Connection, quote_ident
from gatehouse.db.catalog import Constraint
from gatehouse.errors import ProjectError

PLAIN_TEXT_KEY = """
SELECT bool_and(format_type(atttypid, NULL) IN ('smallint', 'integer', 'bigint', 'numeric', 'text', 'character varying',
                                               'character', 'uuid', 'boolean', 'oid', 'name'))
FROM pg_attribute WHERE attrelid = $1 AND attname = ANY($2::text[])
"""
"""Whether every key column is of a type whose text no session setting changes."""

ROW = "(SELECT ($1).*)"
"""What replaces the key table in the view's definition: the one row passed to the shaping function."""

VIEW_READS = r"""
WITH RECURSIVE views(oid, depth) AS (
    SELECT $1::regclass::oid, 0
  UNION
    SELECT d.refobjid, views.depth + 1
    FROM views
    JOIN pg_rewrite r ON r.ev_class = views.oid
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
         AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
    JOIN pg_class c ON c.oid = d.refobjid AND c.relkind = 'v'
)
SELECT c.oid AS relid, n.nspname AS schema, c.relname AS table, c.relkind::text AS kind,
       bool_and(views.depth = 0) AS direct,
       bool_or(d.refobjsubid = 0) AS whole,
       coalesce(array_agg(DISTINCT a.attname::text) FILTER (WHERE a.attname IS NOT NULL), '{}') AS columns
FROM views
JOIN pg_rewrite r ON r.ev_class = views.oid
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
     AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
JOIN pg_class c ON c.oid = d.refobjid AND c.relkind IN ('r', 'p', 'm', 'f')
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid AND d.refobjsubid > 0
GROUP BY c.oid, n.nspname, c.relname, c.relkind
ORDER BY n.nspname, c.relname
"""
"""Every relation the view reads, through views of views: per relation, whether the contract's own view reads
it, whether as a whole (``count(*)``), and the columns it reads."""


@dataclass(frozen=True, slots=True)
class Table:
    relid: int
    schema: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def text(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Hop:
    """One step of a path of foreign keys: from a table to the next, joined on any of ``ways`` (each a tuple of
    (column here, column there) pairs; two foreign keys between the same tables make two ways)."""

    to: Table
    ways: tuple[tuple[tuple[str, str], ...], ...]


@dataclass(frozen=True, slots=True)
class Captured:
    """A table whose row changes make events of the contract."""

    table: Table
    watched: tuple[str, ...] | None
    """The columns whose change can change what the contract shows (None: any column)."""
    path: tuple[Hop, ...] = ()
    """From this table to the key table (empty for the key table itself)."""


@dataclass(frozen=True, slots=True)
class CapturePlan:
    contract: str
    version: int
    view: str
    """The view this version is served by (``api_vN.name``), whose definition shapes the events."""
    key_table: Table
    key: tuple[tuple[str, str], ...]
    """(contract column, key table column) for each column of the key, in order."""
    shape_sql: str
    """The view's definition with the key table replaced by :data:`ROW`."""
    tables: tuple[Captured, ...]
    """The key table first."""
    uncaptured: tuple[str, ...] = ()
    """Why changes of some other table of the view make no events (one line each)."""
    key_follows_datestyle: bool = False
    """A key column's text depends on ``DateStyle`` (a date or time): the capture pins it."""

    @property
    def label(self) -> str:
        return f"{self.contract}.v{self.version}"


def served_view(contract: ContractVersion, numbers: Iterable[tuple[int, ContractVersion]]) -> str | None:
    """``api_vN.<name>`` of the lowest API version that serves exactly this contract version."""
    for number, served in numbers:
        if served.name == contract.name and served.version == contract.version:
            return f"{quote_ident(schema_name(number))}.{quote_ident(contract.name)}"
    return None


async def view_definition(conn: Connection, view: str) -> str:
    """The view's definition with every name qualified (PostgreSQL prints what is not on the search path
    qualified, and only ``pg_catalog`` is on it here); the caller's search path is put back after."""
    before = await conn.fetchval("SELECT current_setting('search_path')")
    await conn.execute("SELECT set_config('search_path', 'pg_catalog', true)")
    try:
        text: str = await conn.fetchval("SELECT pg_get_viewdef($1::regclass)", view)
    finally:
        await conn.execute("SELECT set_config('search_path', $1, true)", before)
    return text.strip().rstrip(";").strip()


def _top_select(definition: str, label: str) -> exp.Select:
    try:
        query = sqlglot.parse_one(definition, read="postgres")
    except SqlglotError:
        query = None
    if not isinstance(query, exp.Select):
        raise ProjectError(f"[events.{label.split('.')[0]}]: the view of {label} cannot be read as one SELECT, so "
                           "its rows cannot be shaped as events", hint="events need a contract that is one SELECT "
                           "(no UNION) over its key table")
    return query


def _scope_tables(query: exp.Select) -> list[exp.Table]:
    """The tables named in the ``FROM`` and ``JOIN`` of the outermost query (parenthesised joins included)."""
    return [t for t in query.find_all(exp.Table) if t.find_ancestor(exp.Select) is query]


def shape_query(definition: str, label: str, key_column: str, key_table: Table) -> str:
    """The definition with the key table's entry (the one the key column is read from) replaced by :data:`ROW`."""
    query = _top_select(definition, label)
    projection = next((p for p in query.expressions if p.alias_or_name == key_column), None)
    column = projection.this if isinstance(projection, exp.Alias) else projection
    tables = _scope_tables(query)
    alias = column.table if isinstance(column, exp.Column) else ""
    if not alias and len(tables) == 1:
        alias = tables[0].alias_or_name
    found = [t for t in tables if t.alias_or_name == alias and t.name == key_table.name
             and (t.db or DEFAULT_SCHEMA) == key_table.schema]
    if len(found) != 1:
        raise ProjectError(f"[events.{label.split('.')[0]}]: cannot find where the view of {label} reads its key "
                           f"table {key_table.text}", hint="the key column must be read straight from the key table "
                                                          "in the contract's FROM")
    table = found[0]
    first = table.args.get("db") or table.this
    start, end = first.meta.get("start"), table.this.meta.get("end")
    if start is None or end is None:
        raise ProjectError(f"[events.{label.split('.')[0]}]: cannot place the changed row in the view of {label}")
    head = definition[:start].rstrip()
    if head.upper().endswith("ONLY"):
        start = len(head) - 4
    replacement = ROW if table.args.get("alias") is not None else f"{ROW} AS {quote_ident(table.name)}"
    return definition[:start] + replacement + definition[end + 1:]


def whole_row_aliases(definition: str, label: str, table: Table) -> bool:
    """Does the outermost query read ``table`` as a whole row (``to_jsonb(t.*)``), which ``pg_depend`` does not
    record per column?"""
    query = _top_select(definition, label)
    aliases = {t.alias_or_name for t in _scope_tables(query) if t.name == table.name
               and (t.db or DEFAULT_SCHEMA) == table.schema}
    return any(isinstance(c.this, exp.Star) and c.table in aliases for c in query.find_all(exp.Column))


def foreign_key_paths(key_table: Table, tables: Iterable[Table],
                      constraints: Iterable[Constraint]) -> dict[int, tuple[Hop, ...]]:
    """For each table with a path of foreign keys (either direction, among ``tables`` only) to the key table,
    the shortest such path from it to the key table."""
    by_name = {(t.schema, t.name): t for t in (key_table, *tables)}
    links: dict[tuple[int, int], list[tuple[tuple[str, str], ...]]] = {}
    for fk in constraints:
        if fk.kind != "f" or fk.ref_schema is None or fk.ref_table is None:
            continue
        here, there = by_name.get((fk.schema, fk.table)), by_name.get((fk.ref_schema, fk.ref_table))
        if here is None or there is None or here == there:
            continue
        pairs = tuple(zip(fk.columns, fk.ref_columns, strict=True))
        links.setdefault((here.relid, there.relid), []).append(pairs)
        links.setdefault((there.relid, here.relid), []).append(tuple((b, a) for a, b in pairs))
    relids = {t.relid: t for t in by_name.values()}
    paths: dict[int, tuple[Hop, ...]] = {key_table.relid: ()}
    queue = deque([key_table.relid])
    while queue:  # breadth first from the key table: each table's path is its first step, then the step's path
        current = queue.popleft()
        for (source, target), ways in sorted(links.items()):
            if target == current and source not in paths:
                paths[source] = (Hop(relids[current], tuple(ways)), *paths[current])
                queue.append(source)
    paths.pop(key_table.relid)
    return paths


async def plan_capture(conn: Connection, contract: ContractVersion, view: str,
                       constraints: list[Constraint]) -> CapturePlan:
    """What capturing ``contract``'s changes takes in this database (ProjectError when it cannot be done)."""
    label = contract.label
    lineage = column_sources(contract.sql)
    key = contract_keys([contract], {label: lineage}, constraints).get(contract.name)
    if not key:
        raise ProjectError(f"[events.{contract.name}]: {label} has no key, so its events could not say which row "
                           "changed", hint="show every column of the key table's primary key in the contract, "
                                           "read straight from the table (e.g. SELECT o.id, ... FROM orders o)")
    sources = [lineage[column] for column in key]
    schema, table_name = sources[0].schema or DEFAULT_SCHEMA, sources[0].table
    relid = await conn.fetchval("SELECT to_regclass($1)::oid", f"{quote_ident(schema)}.{quote_ident(table_name)}")
    if relid is None:
        raise ProjectError(f"[events.{contract.name}]: the key table {schema}.{table_name} of {label} is not there")
    key_table = Table(relid, schema, table_name)
    definition = await view_definition(conn, view)
    shape_sql = shape_query(definition, label, key[0], key_table)

    reads = await conn.fetch(VIEW_READS, view)
    tables = [Table(r["relid"], r["schema"], r["table"]) for r in reads if r["kind"] in ("r", "p")]
    paths = foreign_key_paths(key_table, tables, constraints)
    captured: list[Captured] = []
    uncaptured: list[str] = []
    for row in reads:
        table = Table(row["relid"], row["schema"], row["table"])
        if row["kind"] not in ("r", "p"):
            what = "a materialized view" if row["kind"] == "m" else "a foreign table"
            uncaptured.append(f"{table.text} is {what}: its changes are not writes a trigger sees")
            continue
        whole = row["whole"] or not row["direct"] or whole_row_aliases(definition, label, table)
        path = paths.get(table.relid, ())
        watched: tuple[str, ...] | None = None
        if not whole:
            own = {pair[0] for hop in path[:1] for way in hop.ways for pair in way}
            watched = tuple(sorted(set(row["columns"]) | own))
        if table == key_table:
            captured.insert(0, Captured(table, watched))
        elif path:
            captured.append(Captured(table, watched, path))
        else:
            uncaptured.append(f"{table.text} has no foreign key path to {key_table.text}: its changes make no "
                              f"events of {contract.name} (only changes of the rows they join to do)")
    if not captured or captured[0].table != key_table:
        captured.insert(0, Captured(key_table, None))
    pairs = tuple((column, source.column) for column, source in zip(key, sources, strict=True))
    plain = await conn.fetchval(PLAIN_TEXT_KEY, relid, [column for _, column in pairs])
    return CapturePlan(contract.name, contract.version, view, key_table, pairs, shape_sql, tuple(captured),
                       tuple(uncaptured), key_follows_datestyle=not plain)
