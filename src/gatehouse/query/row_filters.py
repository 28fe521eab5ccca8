"""Row filters of grants: ``filter = "tenant_id=eq.{claims.tenant_id}"`` limits an app to some rows.

A filter is written in the request dialect and parsed once, at load (a mistake is a load error naming the
app and contract). Per request, each ``{claims.NAME}`` placeholder is replaced by that claim of the caller's
token — as a *value*, so it stays a bound parameter like any other. The compiler adds the result to every
read, embed, update and delete of that contract by that app, and checks every inserted row against it.
A claim the token does not carry refuses the request: a filter is never silently dropped.

A claim whose value cannot be a value of the filtered column's type (``user_id=eq.{claims.sub}`` with an
integer ``user_id`` and ``sub = "abc"``) refuses the request too, with 403 like a missing claim: the token does
not fit this app's filter, and the answer names neither the column's type nor any SQL. The compiler decides it
before the query for the common types (``query/values.py``); for the others :func:`claim_refused_by_database`
recognizes PostgreSQL's refusal of a claim's value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gatehouse.errors import ClaimDoesNotFit, ClaimNotScalar, MissingClaim
from gatehouse.query.grammar import parse_query
from gatehouse.query.tree import ClaimValue, Condition, Filter, Logic

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
            raise MissingClaim("The caller's token lacks a claim this application's row filter needs",
                               details=f"missing claim: {path}")
        value = value[part]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        raise ClaimNotScalar("A claim used in a row filter must be a single value",
                             details=f"claim {path} is a {type(value).__name__}")
    return str(value)


def _substitute(text: str, claims: Mapping[str, Any]) -> str:
    """The text with its placeholders replaced: a :class:`ClaimValue` when it had any."""
    paths = tuple(PLACEHOLDER.findall(text))
    if not paths:
        return text
    return ClaimValue(PLACEHOLDER.sub(lambda match: _claim(claims, match.group(1)), text), paths)


def claim_does_not_fit(value: ClaimValue) -> ClaimDoesNotFit:
    return ClaimDoesNotFit("The caller's token does not fit this application's row filter",
                           details=f"claim {', '.join(value.claims)} cannot match the filtered column",
                           hint="Call with a token whose claims this application's grant can filter by.")


def claim_values(filters: Mapping[str, tuple[Condition, ...]]) -> list[ClaimValue]:
    """Every value the bound row filters took from the caller's token."""
    found: list[ClaimValue] = []
    stack = [condition for conditions in filters.values() for condition in conditions]
    while stack:
        condition = stack.pop()
        if isinstance(condition, Logic):
            stack.extend(condition.children)
            continue
        values = condition.value if isinstance(condition.value, tuple) else (condition.value,)
        found.extend(v for v in values if isinstance(v, ClaimValue))
    return found


def claim_refused_by_database(sqlstate: str, message: str,
                              filters: Mapping[str, tuple[Condition, ...]]) -> ClaimDoesNotFit | None:
    """The 403 to answer when PostgreSQL refused a claim's value (a data exception, class 22, whose message
    quotes the value: ``invalid input value for enum mood: "abc"``), for the types the compiler cannot judge
    before the query; None when the refused value is not a claim's."""
    if not sqlstate.startswith("22"):
        return None
    for value in claim_values(filters):
        if f'"{value}"' in message:
            return claim_does_not_fit(value)
    return None


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
