"""Which table column each contract column comes from (lineage), read from the contract's SQL with sqlglot.

Only plain column references of the outermost ``SELECT`` are traced (``p.id``, ``c.name AS category``):
that is what relations need, because a foreign key between two base columns becomes a relation between
the contracts that expose them unchanged. Computed columns (``count(*)``, ``a || b``) have no source.
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


def _direct_tables(select: exp.Select) -> dict[str, exp.Table]:
    """Alias (or name) → table, for the tables named directly in FROM and JOIN (not subqueries or CTEs)."""
    sources: list[exp.Expression] = []
    from_clause = select.args.get("from_") or select.args.get("from")
    if isinstance(from_clause, exp.From):
        sources.append(from_clause.this)
    for join in select.args.get("joins") or []:
        sources.append(join.this)
    ctes = {cte.alias_or_name for cte in select.find_all(exp.CTE)}
    return {
        source.alias_or_name: source
        for source in sources
        if isinstance(source, exp.Table) and not (source.name in ctes and not source.db)
    }


def column_sources(sql: str) -> dict[str, SourceColumn]:
    query = sqlglot.parse_one(sql, read="postgres")
    if not isinstance(query, exp.Select):
        return {}  # UNION and friends: no single source per column
    tables = _direct_tables(query)
    sources: dict[str, SourceColumn] = {}
    for projection in query.selects:
        column = projection.this if isinstance(projection, exp.Alias) else projection
        if not isinstance(column, exp.Column) or isinstance(column.this, exp.Star):
            continue
        if column.table:
            table = tables.get(column.table)
        else:
            table = next(iter(tables.values())) if len(tables) == 1 else None
        if table is not None:
            sources[projection.alias_or_name] = SourceColumn(table.db or None, table.name, column.name)
    return sources
