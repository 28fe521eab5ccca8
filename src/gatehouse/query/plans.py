"""Compiled reads, cached per query *shape*: the query string with its simple filter values taken out.

``id=eq.17`` and ``id=eq.4711`` have one shape, ``id=eq.?``. The first request of a shape is parsed and
compiled as usual, but with a marker in place of each value; the SQL text comes out the same for every value
(values are always bound parameters), so the plan keeps the SQL and its parameters with the markers'
positions, and later requests only put their own values in those positions: no parsing, no compiling, and
the same SQL text, so the connection's prepared statement is reused too.

Only the comparisons ``eq neq gt gte lt lte`` have their values taken out: their value reaches SQL as it is.
Every other value (``in`` lists, ``like`` patterns, ``limit``…) stays part of the shape. A plan is cached only
if each marker turned up exactly once among the parameters and nowhere in the SQL text.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from gatehouse.query.grammar import LEVEL_KEYS, RESERVED, query_pairs
from gatehouse.query.sql import CompiledQuery

SLOT_OPERATORS = frozenset({"eq", "neq", "gt", "gte", "lt", "lte"})
_NOT_FILTERS = RESERVED | LEVEL_KEYS | {"and", "or"}
MAX_PLANS = 2048
T = TypeVar("T")


def value_marker(index: int) -> str:
    return f"\x00gatehouse-value-{index}\x00"  # a client's value never holds NUL: PostgreSQL refuses it in text


@dataclass(slots=True)  # not frozen: one per request, and a frozen dataclass costs twice as much to make
class Shape:
    key: tuple[tuple[str, str], ...]
    """Each parameter as ``(name, value)``, or ``(name, "\\x00op")`` for a value taken out (a NUL starts no
    value of a query string that has a shape)."""
    values: tuple[str, ...]
    """The values taken out, in order."""

    def template(self) -> list[tuple[str, str]]:
        """The parameters with a marker in place of each value taken out."""
        pairs: list[tuple[str, str]] = []
        taken = 0
        for name, value in self.key:
            if value.startswith("\x00"):
                pairs.append((name, f"{value[1:]}.{value_marker(taken)}"))
                taken += 1
            else:
                pairs.append((name, value))
        return pairs


def shape_of(query_string: str) -> Shape | None:
    """The shape of a query string, or None when it cannot have one (a NUL anywhere in it)."""
    key: list[tuple[str, str]] = []
    values: list[str] = []
    for name, value in query_pairs(query_string):
        if "\x00" in value or "\x00" in name:
            return None
        operator, dot, rest = value.partition(".")
        if dot and operator in SLOT_OPERATORS and name.rpartition(".")[2] not in _NOT_FILTERS:
            key.append((name, "\x00" + operator))
            values.append(rest)
        else:
            key.append((name, value))
    return Shape(tuple(key), tuple(values))


@dataclass(frozen=True, slots=True)
class ReadPlan:
    sql: str
    params: tuple[object, ...]
    slots: tuple[tuple[int, int], ...]
    """``(parameter index, value index)`` for each value taken out of the shape."""
    offset: int
    output_names: tuple[str, ...]
    redacted_query: str

    def bind(self, values: tuple[str, ...]) -> list[object]:
        params = list(self.params)
        for position, index in self.slots:
            params[position] = values[index]
        return params

    @classmethod
    def of(cls, compiled: CompiledQuery, value_count: int, *, offset: int, output_names: Sequence[str],
           redacted_query: str) -> ReadPlan | None:
        """The plan of a query compiled from a shape's template, or None if its markers did not come out
        cleanly (then the request is compiled from its own values, and nothing is cached)."""
        slots: list[tuple[int, int]] = []
        for index in range(value_count):
            marker = value_marker(index)
            positions = [i for i, param in enumerate(compiled.params) if param == marker]
            if len(positions) != 1 or marker in compiled.sql:
                return None
            slots.append((positions[0], index))
        return cls(compiled.sql, tuple(compiled.params), tuple(slots), offset, tuple(output_names), redacted_query)


class PlanCache(Generic[T]):
    """At most ``MAX_PLANS`` plans, least recently used out first. One per process, filled as requests come.
    Also holds what a read's headers decide (``routes.ReadRoute``)."""

    def __init__(self, max_plans: int = MAX_PLANS) -> None:
        self._plans: OrderedDict[Hashable, T] = OrderedDict()
        self._max_plans = max_plans
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> T | None:
        plan = self._plans.get(key)
        if plan is None:
            self.misses += 1
            return None
        self._plans.move_to_end(key)
        self.hits += 1
        return plan

    def put(self, key: Hashable, plan: T) -> None:
        self._plans[key] = plan
        if len(self._plans) > self._max_plans:
            self._plans.popitem(last=False)

    def __len__(self) -> int:
        return len(self._plans)
