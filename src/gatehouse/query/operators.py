"""PostgREST's filter operators as SQL: ``eq``, ``in``, ``like``, full-text search, range and array operators, with
every value a bound parameter cast to the column's type (a row filter's claim that cannot be such a value is a
403 before any SQL)."""

from __future__ import annotations

from collections.abc import Callable

from gatehouse.query.row_filters import claim_does_not_fit
from gatehouse.query.tree import ClaimValue, Filter
from gatehouse.query.values import certainly_refused

SQL_OPERATORS = {
    "eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "like": "LIKE", "ilike": "ILIKE",
    "match": "~", "imatch": "~*", "isdistinct": "IS DISTINCT FROM", "cs": "@>", "cd": "<@", "ov": "&&",
    "sl": "<<", "sr": ">>", "nxr": "&<", "nxl": "&>", "adj": "-|-",
}
TEXT_OPERATORS = frozenset({"like", "ilike", "match", "imatch"})
TSQUERY = {"fts": "to_tsquery", "plfts": "plainto_tsquery", "phfts": "phraseto_tsquery",
           "wfts": "websearch_to_tsquery"}
IS_SQL = {"null": "NULL", "not_null": "NOT NULL", "true": "TRUE", "false": "FALSE", "unknown": "UNKNOWN"}
COMPARISON_OPERATORS = frozenset({"eq", "neq", "gt", "gte", "lt", "lte", "isdistinct"})
"""The operators whose value is cast to the column's own type (``in`` casts each item)."""


def check_claim(value: object, column_type: str) -> None:
    """403 before any SQL when a row filter's claim certainly cannot be a value of the column's type."""
    if isinstance(value, ClaimValue) and certainly_refused(value, column_type):
        raise claim_does_not_fit(value)


def operation(column: str, column_type: str, flt: Filter, bind: Callable[[object], str]) -> str:
    """One filter's test of ``column`` (of ``column_type``) as SQL, its values bound as parameters by ``bind``."""
    op = flt.operator
    if op == "is":
        return f"{column} IS {IS_SQL[str(flt.value)]}"
    if op == "in":
        for item in flt.value:
            check_claim(item, column_type)
        return f"{column} = ANY({bind(list(flt.value))}::text[]::{column_type}[])"
    if op in COMPARISON_OPERATORS and not flt.quantifier:
        check_claim(flt.value, column_type)
    value = str(flt.value)
    if op in TSQUERY:
        vector = column if column_type == "tsvector" else (
            f"to_tsvector({bind(flt.language)}::regconfig, {column})" if flt.language
            else f"to_tsvector({column})")
        language = f"{bind(flt.language)}::regconfig, " if flt.language else ""
        return f"{vector} @@ {TSQUERY[op]}({language}{bind(value)})"
    target = "text" if op in TEXT_OPERATORS else column_type
    if flt.quantifier:
        return f"{column} {SQL_OPERATORS[op]} {flt.quantifier.upper()}({bind(value)}::text::{target}[])"
    return f"{column} {SQL_OPERATORS[op]} {bind(value)}::text::{target}"
