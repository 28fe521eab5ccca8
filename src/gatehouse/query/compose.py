"""Embeds across databases (API composition), planned: one statement per database and embedding level.

Contracts of two databases may be linked by ``[[relations]]`` (no foreign key can cross databases), and
``select=id,user:users(name)`` must then answer exactly as a same-database embed does. There is no JOIN, so a
read is split at each embed that leads into another database, and every part is compiled by the one compiler
(``query/sql.py``) that same-database reads use, under the app's readable contracts and row filters:

* **the top statement** is the read as today, except that in place of each such embed it selects a
  *marker*: a JSON string holding a nonce of the request, the embed's number and the parent's key as text;
* **each embed into another database** is one statement on that database for the keys of a whole level
  (``unnest($1::text[])``: never one query per row). Each key gets the very subquery a same-database embed
  is (its filters, order, limit and offset, its own embeds), joined to the key instead of to the parent's
  column, so order and limit stay per parent. Its answer is JSON text per key, which may hold markers of its
  own (an embed into a third database, or back), resolved one level down (``gatehouse/composed_read.py`` runs and
  stitches);
* **``!inner``** (and ``rel=not.is.null`` / ``rel=is.null``) filters the parent *in SQL*, before its
  limit, offset and count: a *key set* statement first asks the other database for the distinct keys its
  filtered rows have, and the parent tests ``key = ANY($n)``. So pages, ``count=exact`` and ``Content-Range``
  are exactly a same-database read's.

Embeds nest at most :data:`MAX_LEVELS` databases deep (400 beyond), checked while planning, before any
statement runs. A plan depends only on the query's *shape*, as a single-database read's does
(``query/plans.py``): it is cached per shape, and each request puts its own values in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from gatehouse.contracts.relations import Relation
from gatehouse.errors import ApiError, CompositionTooDeep
from gatehouse.query.grammar import query_pairs
from gatehouse.query.plans import value_marker
from gatehouse.query.sql import CompiledQuery, ReadCompiler
from gatehouse.query.tree import Condition, EmbedItem, ReadQuery
from gatehouse.schema_cache import ApiSchema

MAX_KEYS_PER_BATCH = 1000
"""Keys sent in one statement; more are split over several."""
MAX_KEYS_PER_EMBED = 10_000
"""Distinct keys one embed may need from the level above (e.g. a page of 1,000 with 10 embedded rows each)."""
MAX_INNER_KEYS = 10_000
"""Keys an ``!inner`` embed (or ``rel=not.is.null``) may match on its side."""
MAX_LEVELS = 3
"""Embeds across databases, one inside another."""

EMBED_NAME = re.compile(r'"?([^,():!"]+)"?\s*[(!]')
"""What an embed's name looks like in ``select``: a name before ``(`` or ``!`` (``users(``, ``user:users!inner(``)."""
JOIN_HINTS = frozenset({"inner", "left"})


def crosses_databases(schema: ApiSchema, contract: str, query_string: str) -> bool:
    """Does this read's ``select`` embed a contract of another database? Some embed's target is then served
    from another database than the top contract (the first such embed on its path is one that crosses).

    Looked up in the text, without parsing: a name that only looks like an embed (a hint named like a
    contract) sends a read here that needs no composing, which answers it all the same (no marker, one
    statement). So does a name that is no contract (a key's or a column's name, ``select=*,user_id(*)``, or a
    hint): where it leads is known once it is resolved. Free when no relation of the API version crosses
    databases."""
    if not schema.crosses or "select=" not in query_string:
        return False
    try:
        select = [value for name, value in query_pairs(query_string) if name == "select"]
    except ApiError:
        return False  # (the usual path answers the 400)
    databases = schema.databases
    home = databases.get(contract)
    names = {name.strip() for name in EMBED_NAME.findall(select[-1])} - JOIN_HINTS if select else set()
    return any(databases.get(name) != home for name in names)


# --- what a plan holds ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placeholder:
    """A parameter each run fills in: a batch's keys, an embed's marker, or a key set's keys."""

    kind: str
    """``keys`` (a batch's), ``marker`` (of embed ``index``) or ``keyset`` (key set ``index``)."""
    index: int = 0


BATCH_KEYS = Placeholder("keys")


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a plan, on one database, with the parameters each run fills in."""

    database: str
    sql: str
    params: tuple[object, ...]
    fills: tuple[tuple[int, Placeholder], ...] = ()
    """(position, placeholder) of each parameter a run fills in."""
    slots: tuple[tuple[int, int], ...] = ()
    """(position, value index) of each value of the request's query string taken out of the shape."""

    @classmethod
    def of(cls, database: str, compiled: CompiledQuery) -> Statement:
        fills = tuple((i, p) for i, p in enumerate(compiled.params) if isinstance(p, Placeholder))
        return cls(database, compiled.sql, tuple(compiled.params), fills)


@dataclass(slots=True)
class RemoteEmbed:
    """An embed into another database, selected by its parent's statement as a marker."""

    index: int
    parent: tuple[str, tuple[str, ...]]
    """The parent's contract and embed path."""
    item: EmbedItem
    database: str
    depth: int
    empty: str
    """What a parent without a match shows: a same-database embed's ``null`` (to-one) or ``[]`` (to-many)."""
    statement: Statement | None = None


@dataclass(slots=True)
class KeySet:
    """The keys for which an embed into another database has rows: a parameter of its parent's statements."""

    index: int
    parent: tuple[str, tuple[str, ...]]
    item: EmbedItem
    database: str
    depth: int
    statement: Statement | None = None


@dataclass(slots=True)
class ComposedPlan:
    top: Statement
    embeds: list[RemoteEmbed]
    keysets: list[KeySet]
    """In the order they were found: a key set's statement may test key sets found after it."""
    output_names: tuple[str, ...]
    offset: int
    estimate: Statement | None = None
    """The top level's rows without paging, for ``count=planned|estimated``."""
    cacheable: bool = field(default=False)


# --- planning -------------------------------------------------------------------------------------------------


class Planner:
    """Compiles every statement of a composed read; the compiler's :class:`~gatehouse.query.sql.CrossDatabase`."""

    def __init__(self, schema: ApiSchema, readable: frozenset[str], max_rows: int,
                 filters: Mapping[str, tuple[Condition, ...]], contract: str, query: ReadQuery, *,
                 profile: str | None = None) -> None:
        self.schema, self.readable, self.max_rows, self.filters = schema, readable, max_rows, filters
        self.contract, self.query, self.profile = contract, query, profile
        self.embeds: list[RemoteEmbed] = []
        self.keysets: dict[tuple[str, ...], KeySet] = {}
        self._depth = 0
        self._used: set[tuple[str, ...]] = set()

    def link(self, parent: tuple[str, tuple[str, ...]], item: EmbedItem, relation: Relation) -> Placeholder:
        embed = RemoteEmbed(len(self.embeds), parent, item, self.schema.databases[relation.target],
                            self._deeper(item), "null" if relation.to_one else "[]")
        self.embeds.append(embed)
        return Placeholder("marker", embed.index)

    def keys(self, parent: tuple[str, tuple[str, ...]], item: EmbedItem, relation: Relation) -> Placeholder:
        path = (*parent[1], item.output_name)
        found = self.keysets.get(path)
        if found is None:
            found = self.keysets[path] = KeySet(len(self.keysets), parent, item,
                                                self.schema.databases[relation.target], self._deeper(item))
        return Placeholder("keyset", found.index)

    def _deeper(self, item: EmbedItem) -> int:
        depth = self._depth + 1
        if depth > MAX_LEVELS:
            raise CompositionTooDeep(f"The embed '{item.output_name}' is the {depth}th database in a row",
                                     details=f"A read embeds across databases at most {MAX_LEVELS} levels deep",
                                     hint="Read the deeper levels with a request of their own.")
        return depth

    def _compiler(self, depth: int) -> ReadCompiler:
        compiler = ReadCompiler(self.schema, self.readable, self.max_rows, self.filters, profile=self.profile)
        compiler.across = self
        self._depth = depth
        return compiler

    def plan(self, *, exact_count: bool = False, estimate: bool = False) -> ComposedPlan:
        """Every statement, compiled now: a mistake anywhere is a 400 before any of them runs."""
        compiler = self._compiler(0)
        top = compiler.read(self.contract, self.query, exact_count=exact_count)
        names = tuple(compiler.output_names)
        self._used |= compiler.levels_used
        filtered = self._compiler(0).filtered(self.contract, self.query) if estimate else None
        while True:  # the statements found while compiling others, until none is left
            embed = next((e for e in self.embeds if e.statement is None), None)
            keyset = next((k for k in self.keysets.values() if k.statement is None), None)
            if embed is not None:
                compiler = self._compiler(embed.depth)
                embed.statement = Statement.of(embed.database,
                                               compiler.batch(embed.parent, embed.item, self.query, BATCH_KEYS))
            elif keyset is not None:
                compiler = self._compiler(keyset.depth)
                keyset.statement = Statement.of(keyset.database, compiler.keyset(
                    keyset.parent, keyset.item, self.query, MAX_INNER_KEYS + 1))
            else:
                break
            self._used |= compiler.levels_used
        compiler.check_levels(self.query, self._used)
        database = self.schema.databases[self.contract]
        return ComposedPlan(Statement.of(database, top), self.embeds, list(self.keysets.values()), names,
                            self.query.top.offset, Statement.of(database, filtered) if filtered else None)


def with_slots(plan: ComposedPlan, value_count: int) -> ComposedPlan:
    """The plan, compiled from a shape's template, with each statement's positions of the shape's values; not
    ``cacheable`` unless every value came out whole (then the request is compiled with its own values)."""
    statements = [plan.top, *(s for s in (plan.estimate,) if s is not None),
                  *(e.statement for e in plan.embeds if e.statement is not None),
                  *(k.statement for k in plan.keysets if k.statement is not None)]
    markers = {value_marker(index): index for index in range(value_count)}
    seen: set[int] = set()
    slotted: dict[int, Statement] = {}
    for statement in statements:
        if any(marker in statement.sql for marker in markers):
            return plan
        slots = []
        for position, param in enumerate(statement.params):
            if not isinstance(param, str):
                continue
            index = markers.get(param)
            if index is not None:
                slots.append((position, index))
                seen.add(index)
            elif "\x00" in param:  # a marker inside a larger value: its value would not reach SQL as it is
                return plan
        slotted[id(statement)] = Statement(statement.database, statement.sql, statement.params, statement.fills,
                                           tuple(slots))
    if len(seen) != value_count:
        return plan
    for embed in plan.embeds:
        embed.statement = slotted[id(embed.statement)]
    for keyset in plan.keysets:
        keyset.statement = slotted[id(keyset.statement)]
    plan.top = slotted[id(plan.top)]
    plan.estimate = slotted[id(plan.estimate)] if plan.estimate is not None else None
    plan.cacheable = True
    return plan


def plan_read(schema: ApiSchema, readable: frozenset[str], max_rows: int, filters: Mapping[str, tuple[Condition, ...]],
              contract: str, query: ReadQuery, *, exact_count: bool, estimate: bool,
              value_count: int | None = None, profile: str | None = None) -> ComposedPlan:
    """The plan of ``query``; ``value_count``: it was parsed from a shape's template with that many values;
    ``profile``: the schema PostgREST's messages name (:class:`~gatehouse.query.sql.ReadCompiler`)."""
    plan = Planner(schema, readable, max_rows, filters, contract, query,
                   profile=profile).plan(exact_count=exact_count, estimate=estimate)
    return with_slots(plan, value_count) if value_count is not None else plan
