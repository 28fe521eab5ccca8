"""The query tree: what a request asks for, after parsing and before SQL.

Names in the tree are still the caller's words; :mod:`gatehouse.query.sql` checks each one against the
contract's columns before any of them reaches SQL, and every value stays a bound parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Operator = Literal["eq", "neq", "gt", "gte", "lt", "lte", "like", "ilike", "in", "is"]
IsValue = Literal["null", "not_null", "true", "false", "unknown"]


@dataclass(frozen=True, slots=True)
class SelectItem:
    column: str
    alias: str | None = None

    @property
    def output_name(self) -> str:
        return self.alias or self.column


@dataclass(frozen=True, slots=True)
class Filter:
    column: str
    operator: Operator
    value: str | tuple[str, ...]
    negated: bool = False


@dataclass(frozen=True, slots=True)
class OrderTerm:
    column: str
    descending: bool = False
    nulls: Literal["first", "last"] | None = None


@dataclass(frozen=True, slots=True)
class ReadQuery:
    select: tuple[SelectItem, ...] | None = None
    """None means every column of the contract (``select`` absent or ``*``)."""
    filters: tuple[Filter, ...] = ()
    order: tuple[OrderTerm, ...] = ()
    limit: int | None = None
    offset: int = 0
    params: tuple[str, ...] = field(default=(), compare=False)
    """The raw parameter names seen, for logs and audit (never the values)."""
