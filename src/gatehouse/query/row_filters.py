"""Row filters of grants: ``filter = "tenant_id=eq.{claims.tenant_id}"`` limits an app to some rows.

A filter is written in the request dialect and parsed once, at load (a mistake is a load error naming the
app and contract). Per request, each ``{claims.NAME}`` placeholder is replaced by that claim of the caller's
token — as a *value*, so it stays a bound parameter like any other. The compiler adds the result to every
read, embed, update and delete of that contract by that app, and checks every inserted row against it.
A claim the token does not carry refuses the request: a filter is never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gatehouse.errors import ApiError
from gatehouse.query.grammar import parse_query
from gatehouse.query.tree import Condition, Filter, Logic

PLACEHOLDER = re.compile(r"\{claims\.([A-Za-z_][A-Za-z0-9_.]*)\}")


def parse_row_filter(text: str) -> tuple[Condition, ...]:
    """Parse a grant's filter (a query string of filters and logic trees, nothing else)."""
    query = parse_query(text)
    extra = [path for path in query.levels if path]
    top = query.top
    if extra or top.order or top.limit is not None or top.offset or query.columns or query.on_conflict:
        raise ValueError("a row filter holds only filters, e.g. tenant_id=eq.{claims.tenant_id}")
    if not top.where:
        raise ValueError("the row filter is empty")
    return tuple(top.where)


def columns_of(conditions: tuple[Condition, ...]) -> set[str]:
    found: set[str] = set()
    for condition in conditions:
        if isinstance(condition, Logic):
            found |= columns_of(condition.children)
        else:
            found.add(condition.field.column)
    return found


def _claim(claims: Mapping[str, Any], path: str) -> str:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ApiError("The caller's token lacks a claim this application's row filter needs", code="GH403",
                           status=403, details=f"missing claim: {path}")
        value = value[part]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        raise ApiError("A claim used in a row filter must be a single value", code="GH403", status=403,
                       details=f"claim {path} is a {type(value).__name__}")
    return str(value)


def _substitute(text: str, claims: Mapping[str, Any]) -> str:
    return PLACEHOLDER.sub(lambda match: _claim(claims, match.group(1)), text)


def bind_claims(conditions: tuple[Condition, ...], claims: Mapping[str, Any]) -> tuple[Condition, ...]:
    bound: list[Condition] = []
    for condition in conditions:
        if isinstance(condition, Logic):
            bound.append(Logic(condition.operator, bind_claims(condition.children, claims), condition.negated))
            continue
        value = condition.value
        if isinstance(value, tuple):
            value = tuple(_substitute(v, claims) for v in value)
        else:
            value = _substitute(value, claims)
        bound.append(Filter(condition.field, condition.operator, value, condition.negated, condition.quantifier,
                            condition.language))
    return tuple(bound)
