"""Query tree → one SQL statement that returns the response body, built by PostgreSQL.

Identifiers come only from the contract's catalog entry (a name the caller sends is looked up there and
the catalog's spelling is quoted); every value, limit and offset is a bound parameter. So the SQL text
depends only on the *shape* of the query, and asyncpg reuses one prepared statement per shape.

The statement returns two columns: the JSON array as text (``json_agg``, so no per-row Python objects
exist) and the number of rows in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gatehouse.db.catalog import ViewShape
from gatehouse.errors import ApiError
from gatehouse.query.tree import Filter, ReadQuery

COMPARISONS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=",
               "like": "LIKE", "ilike": "ILIKE"}
IS_SQL = {"null": "NULL", "not_null": "NOT NULL", "true": "TRUE", "false": "FALSE", "unknown": "UNKNOWN"}


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(slots=True)
class CompiledQuery:
    sql: str
    params: list[object] = field(default_factory=list)


class _Binder:
    def __init__(self) -> None:
        self.params: list[object] = []

    def bind(self, value: object) -> str:
        self.params.append(value)
        return f"${len(self.params)}"


def _column(shape: ViewShape, name: str, contract: str) -> str:
    if name not in shape.columns:
        raise ApiError(f"column {contract}.{name} does not exist", code="42703", status=400,
                       hint=f"Columns of {contract}: {', '.join(shape.columns)}")
    return quote_ident(name)


def _condition(flt: Filter, shape: ViewShape, contract: str, binder: _Binder) -> str:
    column = _column(shape, flt.column, contract)
    column_type = shape.columns[flt.column]
    if flt.operator == "is":
        assert isinstance(flt.value, str)
        sql = f"{column} IS {IS_SQL[flt.value]}"
    elif flt.operator == "in":
        sql = f"{column} = ANY({binder.bind(list(flt.value))}::text[]::{column_type}[])"
    elif flt.operator in ("like", "ilike"):
        sql = f"{column} {COMPARISONS[flt.operator]} {binder.bind(flt.value)}::text"
    else:
        sql = f"{column} {COMPARISONS[flt.operator]} {binder.bind(flt.value)}::text::{column_type}"
    return f"NOT ({sql})" if flt.negated else sql


def compile_read(query: ReadQuery, shape: ViewShape, contract: str, max_rows: int) -> CompiledQuery:
    binder = _Binder()
    if query.select is None:
        projection = ", ".join(quote_ident(c) for c in shape.columns)
    else:
        projection = ", ".join(
            _column(shape, item.column, contract)
            + (f" AS {quote_ident(item.alias)}" if item.alias else "")
            for item in query.select
        )
    parts = [f"SELECT {projection} FROM {quote_ident(shape.schema)}.{quote_ident(shape.name)}"]
    if query.filters:
        parts.append("WHERE " + " AND ".join(_condition(f, shape, contract, binder) for f in query.filters))
    if query.order:
        terms = []
        for term in query.order:
            text = _column(shape, term.column, contract) + (" DESC" if term.descending else " ASC")
            if term.nulls:
                text += f" NULLS {term.nulls.upper()}"
            terms.append(text)
        parts.append("ORDER BY " + ", ".join(terms))
    limit = max_rows if query.limit is None else min(query.limit, max_rows)
    parts.append(f"LIMIT {binder.bind(limit)} OFFSET {binder.bind(query.offset)}")
    inner = " ".join(parts)
    sql = f"SELECT coalesce(json_agg(_gh_row), '[]')::text, count(*) FROM ({inner}) AS _gh_row"
    return CompiledQuery(sql=sql, params=binder.params)
