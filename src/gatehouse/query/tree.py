"""The query tree: what a request asks for, after parsing and before SQL.

Names in the tree are still the caller's words; :mod:`gatehouse.query.sql` checks each one against the
contract's columns (and the app's readable relations) before any of them reaches SQL, and every value
stays a bound parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

Arrow = Literal["->", "->>"]
Quantifier = Literal["any", "all"]

COMPARISON_OPERATORS = ("eq", "neq", "gt", "gte", "lt", "lte")
PATTERN_OPERATORS = ("like", "ilike", "match", "imatch")
FTS_OPERATORS = ("fts", "plfts", "phfts", "wfts")
RANGE_OPERATORS = ("cs", "cd", "ov", "sl", "sr", "nxr", "nxl", "adj")
OPERATORS = frozenset(
    (*COMPARISON_OPERATORS, *PATTERN_OPERATORS, *FTS_OPERATORS, *RANGE_OPERATORS, "in", "is", "isdistinct")
)
QUANTIFIABLE = frozenset((*COMPARISON_OPERATORS, *PATTERN_OPERATORS)) - {"neq"}
IS_VALUES = frozenset({"null", "not_null", "true", "false", "unknown"})


@dataclass(frozen=True, slots=True)
class Field:
    """A column, maybe followed by a JSON path: ``data->a->>b`` is ``Field("data", (("->","a"),("->>","b")))``."""

    column: str
    json_path: tuple[tuple[Arrow, str], ...] = ()

    @property
    def default_name(self) -> str:
        """PostgREST names a JSON-path output after its last key."""
        return self.json_path[-1][1] if self.json_path else self.column


@dataclass(frozen=True, slots=True)
class ColumnItem:
    field: Field
    alias: str | None = None
    cast: str | None = None

    @property
    def output_name(self) -> str:
        return self.alias or self.field.default_name


@dataclass(frozen=True, slots=True)
class StarItem:
    """``*``: every column of the contract."""


@dataclass(frozen=True, slots=True)
class EmbedItem:
    relation: str
    alias: str | None = None
    hint: str | None = None
    inner: bool = False
    items: tuple[SelectItem, ...] = ()
    """Empty means ``rel()``: used for filtering only, not shown."""

    @property
    def output_name(self) -> str:
        return self.alias or self.relation


SelectItem: TypeAlias = ColumnItem | StarItem | EmbedItem


class ClaimValue(str):
    """A filter value that a grant's row filter took from the caller's token (``{claims.NAME}``). It compares
    and hashes as the text it is; the compiler checks it against the column's type before any SQL, because a
    value that cannot fit is the token's fault, not the query's (403, ``query/row_filters.py``)."""

    claims: tuple[str, ...]
    """The claims whose values the text holds."""

    def __new__(cls, value: str, claims: tuple[str, ...]) -> ClaimValue:
        made = super().__new__(cls, value)
        made.claims = claims
        return made

    def __getnewargs__(self) -> tuple[str, tuple[str, ...]]:  # type: ignore[override]  # copy and pickle
        return str(self), self.claims


@dataclass(frozen=True, slots=True)
class Filter:
    field: Field
    operator: str
    value: str | tuple[str, ...]
    negated: bool = False
    quantifier: Quantifier | None = None
    language: str | None = None
    """The text-search configuration of fts/plfts/phfts/wfts, e.g. ``fts(english)``."""


@dataclass(frozen=True, slots=True)
class Logic:
    operator: Literal["and", "or"]
    children: tuple[Condition, ...]
    negated: bool = False


Condition: TypeAlias = Filter | Logic


@dataclass(frozen=True, slots=True)
class OrderTerm:
    field: Field
    descending: bool = False
    nulls: Literal["first", "last"] | None = None
    relation: str | None = None
    """Order by a column of a to-one embed: ``order=rel(col).desc``."""


@dataclass(slots=True)
class Level:
    """The modifiers of one level of the response: the top, or one embed path (``rel``, ``rel.sub``)."""

    where: list[Condition] = field(default_factory=list)
    order: tuple[OrderTerm, ...] = ()
    limit: int | None = None
    offset: int = 0


@dataclass(slots=True)
class ReadQuery:
    select: tuple[SelectItem, ...] = (StarItem(),)
    levels: dict[tuple[str, ...], Level] = field(default_factory=lambda: {(): Level()})
    """Keyed by embed path; ``()`` is the top level."""
    columns: tuple[str, ...] | None = None
    """``columns=`` of a write."""
    on_conflict: tuple[str, ...] | None = None

    @property
    def top(self) -> Level:
        return self.levels[()]

    def level(self, path: tuple[str, ...]) -> Level:
        found = self.levels.get(path)
        if found is None:
            found = self.levels[path] = Level()
        return found


@dataclass(frozen=True, slots=True)
class Payload:
    """The rows of a write's body, as the body parser (``http/body.py``) read them."""

    rows: list[dict[str, Any]]
    single: bool
    """The body was one object, not an array."""

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key that appears in some row, in first-seen order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return tuple(seen)
