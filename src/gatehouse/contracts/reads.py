"""Everything a contract's SQL *reads*: its tables and table columns, wherever they appear.

:mod:`gatehouse.contracts.lineage` traces only the plain columns of the outermost ``SELECT`` (what relations
need). Safety checks need more: a contract depends on every column it filters, joins, groups or orders by,
and on every table of every subquery and CTE. A migration that drops ``orders.status`` breaks
``customer_summary`` even though ``status`` is only in its ``JOIN ... ON``. So this module walks every scope
of the query (sqlglot's scope analysis) and resolves each column to the table it comes from.

Unqualified columns of a scope with several tables cannot be resolved from the SQL alone; pass the
database's tables and columns (``schema``) and they are resolved the way PostgreSQL does. What still
cannot be resolved (a column of no known table) is left out, never guessed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, traverse_scope

TableColumns = Mapping[str, Mapping[str, Iterable[str]]]
"""schema → table → its column names: what the database has."""


@dataclass(frozen=True, slots=True, order=True)
class TableRef:
    """A table (or view) the SQL reads. ``schema`` is None when the SQL does not name one (search path)."""

    catalog: str | None
    """A database name (``otherdb.public.t``). PostgreSQL refuses cross-database references outright."""
    schema: str | None
    table: str

    def __str__(self) -> str:
        return ".".join(part for part in (self.catalog, self.schema, self.table) if part)


@dataclass(frozen=True, slots=True, order=True)
class ColumnRef:
    schema: str | None
    table: str
    column: str

    def __str__(self) -> str:
        return ".".join(part for part in (self.schema, self.table, self.column) if part)


def _parse(sql: str) -> exp.Expr:
    return sqlglot.parse_one(sql, read="postgres")


def _table_ref(table: exp.Table) -> TableRef | None:
    if not isinstance(table.this, exp.Identifier):
        return None  # a set-returning function in FROM (generate_series(...), unnest(...)): no table
    return TableRef(table.catalog or None, table.db or None, table.name)


def _scopes(query: exp.Expr) -> list[Scope]:
    try:
        return list(traverse_scope(query))
    except SqlglotError:
        return []


def tables_read(sql: str) -> frozenset[TableRef]:
    """Every table of every scope: FROM, JOIN, subqueries in SELECT/WHERE, CTEs and set operations.

    A name that refers to a CTE is not a table and is left out."""
    found: set[TableRef] = set()
    for scope in _scopes(_parse(sql)):
        for source in scope.sources.values():
            if isinstance(source, exp.Table) and (ref := _table_ref(source)) is not None:
                found.add(ref)
    return frozenset(found)


def _qualify_schema(schema: TableColumns) -> dict[str, object]:
    # sqlglot wants types; only the names matter here.
    return {s: {t: dict.fromkeys(columns, "text") for t, columns in tables.items()} for s, tables in schema.items()}


def _lookup(scope: Scope | None, alias: str) -> exp.Table | Scope | None:
    """The source an alias names, searching outward for correlated subqueries (``WHERE o.user_id = u.id``)."""
    while scope is not None:
        source = scope.sources.get(alias)
        if source is not None:
            return source
        scope = scope.parent
    return None


def _has_column(schema: TableColumns | None, table: TableRef, column: str) -> bool:
    if schema is None:
        return False
    for schema_name in ([table.schema] if table.schema else list(schema)):
        if column in set(schema.get(schema_name, {}).get(table.table, ())):
            return True
    return False


def _resolve_unqualified(scope: Scope, column: str, schema: TableColumns | None) -> TableRef | None:
    """The table of this scope's own FROM/JOIN an unqualified column belongs to (CTEs visible from the
    scope but not selected in it do not count)."""
    selected = [source for _, source in scope.selected_sources.values()]
    tables = [ref for source in selected if isinstance(source, exp.Table) and (ref := _table_ref(source)) is not None]
    if len(tables) == 1 and len(selected) == 1:
        return tables[0]
    owners = [table for table in tables if _has_column(schema, table, column)]
    return owners[0] if len(owners) == 1 else None


def columns_read(sql: str, schema: TableColumns | None = None) -> frozenset[ColumnRef]:
    """Every table column the SQL reads: projected, filtered (WHERE, HAVING), joined (ON), grouped, ordered,
    and in subqueries and CTEs. A column of a CTE or derived table is traced inside that scope instead."""
    query = _parse(sql)
    if schema is not None:
        with contextlib.suppress(SqlglotError):  # else keep the SQL as written: single-table scopes still resolve
            query = qualify(query.copy(), schema=_qualify_schema(schema), dialect="postgres",
                            validate_qualify_columns=False, quote_identifiers=False, expand_stars=False,
                            identify=False)
    found: set[ColumnRef] = set()
    for scope in _scopes(query):
        for column in scope.columns:
            if isinstance(column.this, exp.Star) or not column.name:
                continue
            if isinstance(scope.expression, exp.Select) and column.find_ancestor(exp.Select) is not scope.expression:
                continue  # a subquery's column, listed here as a possible outer reference: its own scope has it
            if column.table:
                source = _lookup(scope, column.table)
                ref = _table_ref(source) if isinstance(source, exp.Table) else None
            else:
                ref = _resolve_unqualified(scope, column.name, schema)
            if ref is not None:
                found.add(ColumnRef(ref.schema, ref.table, column.name))
    return frozenset(found)


def projection_stars(sql: str) -> list[str]:
    """``*`` and ``t.*`` in any select list (``count(*)`` is fine): what a contract may never contain."""
    stars: list[str] = []
    for select in _parse(sql).find_all(exp.Select):
        for projection in select.expressions:
            if isinstance(projection, exp.Star) or (
                isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star)
            ):
                stars.append(projection.sql(dialect="postgres"))
    return stars
