"""Which table column each contract column comes from (lineage), read from the contract's SQL with sqlglot.

Only plain column references of the outermost ``SELECT`` are traced (``p.id``, ``c.name AS category``):
that is what relations need, because a foreign key between two base columns becomes a relation between
the contracts that expose them unchanged. Computed columns (``count(*)``, ``a || b``) have no source.

Each source also says whether its table sits on the *nullable side of an outer join* (the right side of a
``LEFT JOIN``, the left side of a ``RIGHT JOIN``, either side of a ``FULL JOIN``): such a column is null in
every row without a match, whatever the table's ``NOT NULL`` says, so a contract that promises it never is
null (``-- not null:``) breaks that promise (see :mod:`gatehouse.contracts.signature`).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlglot
from sqlglot import exp


@dataclass(frozen=True, slots=True)
class SourceColumn:
    schema: str | None
    """None when the SQL does not name it: the table is found on the search path (usually ``public``)."""
    table: str
    column: str
    outer: bool = False
    """True when the table is on the nullable side of an outer join: the column is null where nothing matched."""


def _from_clause(select: exp.Select) -> exp.Expression | None:
    from_clause = select.args.get("from_") or select.args.get("from")
    return from_clause.this if isinstance(from_clause, exp.From) else None


def _direct_tables(select: exp.Select) -> dict[str, exp.Table]:
    """Alias (or name) → table, for the tables named directly in FROM and JOIN (not subqueries or CTEs)."""
    sources: list[exp.Expression] = []
    first = _from_clause(select)
    if first is not None:
        sources.append(first)
    for join in select.args.get("joins") or []:
        sources.append(join.this)
    ctes = {cte.alias_or_name for cte in select.find_all(exp.CTE)}
    return {
        source.alias_or_name: source
        for source in sources
        if isinstance(source, exp.Table) and not (source.name in ctes and not source.db)
    }


def outer_joined(select: exp.Select) -> frozenset[str]:
    """Aliases (or names) of the FROM/JOIN items on the nullable side of an outer join.

    Joins read left to right: ``a LEFT JOIN b RIGHT JOIN c`` makes ``b`` nullable, then ``a`` and ``b``
    (everything joined so far) nullable again through the ``RIGHT JOIN``.
    """
    seen: list[str] = []
    first = _from_clause(select)
    if first is not None:
        seen.append(first.alias_or_name)
    nullable: set[str] = set()
    for join in select.args.get("joins") or []:
        side = (join.side or "").upper()
        name = join.this.alias_or_name
        if side in ("RIGHT", "FULL"):
            nullable.update(seen)
        if side in ("LEFT", "FULL"):
            nullable.add(name)
        seen.append(name)
    return frozenset(nullable)


def column_sources(sql: str) -> dict[str, SourceColumn]:
    query = sqlglot.parse_one(sql, read="postgres")
    if not isinstance(query, exp.Select):
        return {}  # UNION and friends: no single source per column
    tables = _direct_tables(query)
    nullable = outer_joined(query)
    sources: dict[str, SourceColumn] = {}
    for projection in query.selects:
        column = projection.this if isinstance(projection, exp.Alias) else projection
        if not isinstance(column, exp.Column) or isinstance(column.this, exp.Star):
            continue
        if column.table:
            alias: str | None = column.table
        else:
            alias = next(iter(tables)) if len(tables) == 1 else None
        table = tables.get(alias) if alias is not None else None
        if table is not None and alias is not None:
            sources[projection.alias_or_name] = SourceColumn(table.db or None, table.name, column.name,
                                                             alias in nullable)
    return sources
