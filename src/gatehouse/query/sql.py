"""Query tree → one SQL statement that returns the response body, built by PostgreSQL.

Identifiers come only from the schema cache (a name the caller sends is looked up there and the cache's
spelling is quoted); every value, JSON key, limit and offset is a bound parameter; a cast's type name has
passed a strict pattern. So the SQL text depends only on the *shape* of the query, and asyncpg reuses
one prepared statement per shape.

Every value is bound as text and cast to the column's type inside SQL (``$1::text::integer``), so
PostgreSQL parses it exactly as PostgREST has it do, and a malformed value is a clear 400 from
PostgreSQL's own input functions.

Embeds are correlated scalar subqueries in the select list: ``row_to_json`` for to-one (``null`` when
missing), ``json_agg`` for to-many (``[]`` when empty). ``!inner`` and ``rel=not.is.null`` become
``EXISTS`` on the parent; ``rel=is.null`` becomes ``NOT EXISTS``. Which relation an embed means is
``query/embeds.py``'s to say; one through a junction (many-to-many) reads the target's view and the
junction's side by side, the junction's rows pairing the parent's row with the target's.

An embed into a contract of another database cannot be a subquery: with a :class:`CrossDatabase` set
(``query/compose.py``), the compiler puts a marker holding the parent's key where the embed goes, and a
key-set test (``key = ANY($n)``, the set read from the other database first) where its ``EXISTS`` would go;
:meth:`ReadCompiler.batch` and :meth:`ReadCompiler.keyset` compile the other database's side. Without one,
such an embed is refused (:class:`NotComposable`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gatehouse.contracts.relations import Relation
from gatehouse.db import quote_ident
from gatehouse.db.catalog import ViewShape
from gatehouse.errors import (
    DuplicateOutputName,
    InvalidEmbedFilter,
    JsonPathOnNonJsonColumn,
    NotComposable,
    NotEmbedded,
    QueryParseError,
    RelatedOrderNotToOne,
    UndefinedColumn,
)
from gatehouse.query.embeds import find_relation
from gatehouse.query.operators import operation
from gatehouse.query.suggest import missing_column_hint
from gatehouse.query.tree import (
    ColumnItem,
    Condition,
    EmbedItem,
    Field,
    Filter,
    Level,
    Logic,
    OrderTerm,
    ReadQuery,
    SelectItem,
    StarItem,
)
from gatehouse.schema_cache import ApiSchema

JSON_INDEX = re.compile(r"-?[0-9]{1,9}")  # ASCII digits only: str.isdigit() accepts "²" and "١٢"
JSON_TYPES = frozenset({"json", "jsonb"})


def shown(item: EmbedItem) -> bool:
    """Is the embed part of the response? Not when empty (``rel()``), nor when it holds only embeds that are not
    shown (``users_tasks(tasks(projects()))``): as in PostgREST, those only filter (``!inner``, ``rel=is.null``)."""
    return any(not isinstance(i, EmbedItem) or shown(i) for i in item.items)


@dataclass(slots=True)
class CompiledQuery:
    sql: str
    params: list[object] = field(default_factory=list)


@dataclass(slots=True)
class _Scope:
    """One FROM item: a contract's view under a unique alias, at one embed path."""

    contract: str
    shape: ViewShape
    alias: str
    path: tuple[str, ...]


class CrossDatabase(Protocol):
    """What a compiler puts in place of an embed into another database (``query/compose.py`` implements it)."""

    def link(self, parent: tuple[str, tuple[str, ...]], item: EmbedItem, relation: Relation) -> object:
        """A parameter that will hold the marker (text) of the embed of ``item`` under ``parent`` (its contract
        and embed path): the embed's JSON will take the place of the marker and key in the parent's JSON."""
        ...

    def keys(self, parent: tuple[str, tuple[str, ...]], item: EmbedItem, relation: Relation) -> object:
        """A parameter that will hold the keys (as text) for which the embed has rows, for its ``EXISTS``."""
        ...


class ReadCompiler:
    """Compiles reads of one app in one API version; embeds only reach contracts in ``readable``."""

    def __init__(self, schema: ApiSchema, readable: frozenset[str], max_rows: int,
                 row_filters: Mapping[str, tuple[Condition, ...]] | None = None, *,
                 profile: str | None = None) -> None:
        self.schema = schema
        self.readable = readable
        self.max_rows = max_rows
        self.row_filters = row_filters or {}
        """contract → the app's row filter, claims already bound: added wherever the contract is read."""
        self.profile = profile or f"v{schema.version}"
        """The schema PostgREST's messages name (its profile): ``vN`` unless the caller says otherwise."""
        self.params: list[object] = []
        self._aliases = 0
        self._used_levels: set[tuple[str, ...]] = set()
        self.output_names: list[str] = []
        self.across: CrossDatabase | None = None
        """Set by ``query/compose.py``: embeds into other databases are composed, not refused."""

    # -- entry points ------------------------------------------------------------------------------

    def read(self, contract: str, query: ReadQuery, *, exact_count: bool = False) -> CompiledQuery:
        """The page of rows as a JSON array, its length and, when asked, the filtered total."""
        scope = self._scope(contract, ())
        level = query.top
        projection = self._projection(scope, query.select, query)
        self.output_names = self._output_names(scope, query.select)
        where = self._where(scope, level, query)
        from_clause = f"{self._view(scope)} AS {scope.alias}"
        inner = f"SELECT {projection} FROM {from_clause}{where}{self._order(scope, level, query)}{self._limit(level)}"
        if self.across is None:  # (a composed read checks them once every statement of it is compiled)
            self.check_levels(query)
        total = f", (SELECT count(*) FROM {from_clause}{where})" if exact_count else ""
        sql = f"SELECT coalesce(json_agg(_gh_row), '[]')::text, count(*){total} FROM ({inner}) AS _gh_row"
        return CompiledQuery(sql, self.params)

    def filtered(self, contract: str, query: ReadQuery) -> CompiledQuery:
        """The rows the filters select, without paging: what ``count=planned`` asks the planner about."""
        scope = self._scope(contract, ())
        where = self._where(scope, query.top, query)
        return CompiledQuery(f"SELECT 1 FROM {self._view(scope)} AS {scope.alias}{where}", self.params)

    def batch(self, parent: tuple[str, tuple[str, ...]], item: EmbedItem, query: ReadQuery,
              keys: object) -> CompiledQuery:
        """An embed into this database for a batch of its parents' keys (``keys``, bound first: a text array):
        its JSON text for each key, in the keys' order, as an array of text. Each key's embed is the very
        subquery a same-database embed is, joined to the key instead of to the parent's column."""
        bound = self.bind(keys)
        embed = self._embed(self._scope(*parent), item, query, key="_gh_k.v")
        return CompiledQuery(f"SELECT coalesce(array_agg(({embed})::text ORDER BY _gh_k.n), '{{}}') "
                             f"FROM unnest({bound}::text[]) WITH ORDINALITY AS _gh_k(v, n)", self.params)

    def keyset(self, parent: tuple[str, tuple[str, ...]], item: EmbedItem, query: ReadQuery,
               bound: int) -> CompiledQuery:
        """The distinct keys (as text) for which the embed of ``item`` has rows, with its filters and the app's
        row filter: what its parent's ``EXISTS`` tests (``!inner``, ``rel=not.is.null``). At most ``bound``."""
        scope = self._scope(*parent)
        relation = self._relation(scope, item)
        child = self._scope(relation.target, (*scope.path, item.output_name))
        level = self._embed_level(query, child.path, item.relation)
        key = self._column(child, self._single(relation)[1])
        where = self._where(child, level, query, extra=[f"{key} IS NOT NULL"])
        return CompiledQuery(f"SELECT coalesce(array_agg(_gh_v), '{{}}') FROM (SELECT DISTINCT {key}::text AS _gh_v "
                             f"FROM {self._view(child)} AS {child.alias}{where} LIMIT {self.bind(bound)}) AS _gh_s",
                             self.params)

    def root(self, contract: str) -> _Scope:
        return self._scope(contract, ())

    def view_sql(self, scope: _Scope) -> str:
        return self._view(scope)

    def where_sql(self, scope: _Scope, query: ReadQuery) -> str:
        """`` WHERE ...`` (or nothing) for the top-level filters, as reads apply them."""
        return self._where(scope, query.top, query)

    def row_filter_test(self, contract: str, row: str) -> str | None:
        """The app's row filter on ``contract`` as one SQL condition on the row named ``row`` (a FROM item's or
        a write target's alias), or None when it has none. NULL counts as outside, as in a read's WHERE."""
        conditions = self.row_filters.get(contract, ())
        if not conditions:
            return None
        scope = self._scope(contract, ())
        scope.alias = row
        return "(" + " AND ".join(self._condition(scope, c, {}, ReadQuery()) for c in conditions) + ")"

    def row_filter_violations(self, contract: str, source: str) -> str:
        """How many rows in ``source`` fall outside the app's row filter (``0`` when it has none)."""
        test = self.row_filter_test(contract, source)
        if test is None:
            return "0"
        return f"(SELECT count(*) FROM {source} WHERE {test} IS NOT TRUE)"

    def representation(self, contract: str, query: ReadQuery, source: str) -> str:
        """The written rows (in ``source``) shaped by ``select=``, embeds included, as a JSON array."""
        scope = self._scope(contract, ())
        scope.alias = source
        projection = self._projection(scope, query.select, query)
        self.output_names = self._output_names(scope, query.select)
        inner = f"SELECT {projection} FROM {source}{self._order(scope, query.top, query)}"
        return f"(SELECT coalesce(json_agg(_gh_row), '[]')::text FROM ({inner}) AS _gh_row)"

    # -- building blocks ------------------------------------------------------------------------------

    def bind(self, value: object) -> str:
        self.params.append(value)
        return f"${len(self.params)}"

    def _scope(self, contract: str, path: tuple[str, ...]) -> _Scope:
        shape = self.schema.shapes[contract]
        alias = f"_gh_{self._aliases}"
        self._aliases += 1
        return _Scope(contract, shape, alias, path)

    @staticmethod
    def _view(scope: _Scope) -> str:
        return f"{quote_ident(scope.shape.schema)}.{quote_ident(scope.shape.name)}"

    def _column(self, scope: _Scope, name: str) -> str:
        if name not in scope.shape.columns:
            # PostgreSQL's words, which PostgREST passes on: its hint names a close column of the contract, or
            # none (the contract's columns are all the app may see of it).
            raise UndefinedColumn(f"column {scope.contract}.{name} does not exist",
                                  hint=missing_column_hint(scope.contract, name, scope.shape.columns))
        return f"{scope.alias}.{quote_ident(name)}"

    def _field(self, scope: _Scope, fld: Field) -> tuple[str, str]:
        """SQL of a field and its type (for casting values compared with it)."""
        sql = self._column(scope, fld.column)
        column_type = scope.shape.columns[fld.column]
        if fld.json_path and column_type not in JSON_TYPES:
            raise JsonPathOnNonJsonColumn(
                f"Cannot apply the JSON path to the column '{fld.column}' of '{scope.contract}'",
                details=f"'{fld.column}' is of type {column_type}; -> and ->> apply to json and jsonb columns",
                hint=f"Name '{fld.column}' without -> or ->>.",
            )
        for arrow, key in fld.json_path:
            index = JSON_INDEX.fullmatch(key) is not None
            sql = f"({sql} {arrow} {self.bind(int(key) if index else key)}::{'int' if index else 'text'})"
            column_type = "text" if arrow == "->>" else ("jsonb" if column_type.startswith("jsonb") else "json")
        return sql, column_type

    # -- select ----------------------------------------------------------------------------------------

    def _projection(self, scope: _Scope, items: tuple[SelectItem, ...], query: ReadQuery) -> str:
        parts: list[str] = []
        for item in items:
            if isinstance(item, StarItem):
                parts.extend(f"{self._column(scope, c)} AS {quote_ident(c)}" for c in scope.shape.columns)
            elif isinstance(item, ColumnItem):
                sql, _ = self._field(scope, item.field)
                if item.cast:
                    sql = f"CAST({sql} AS {item.cast})"
                parts.append(f"{sql} AS {quote_ident(item.output_name)}")
            elif shown(item):
                parts.append(f"{self._embed(scope, item, query)} AS {quote_ident(item.output_name)}")
        if not parts:
            raise QueryParseError('"failed to parse select"', details="select names no column to return")
        self._refuse_duplicates(scope, items)
        return ", ".join(parts)

    def _refuse_duplicates(self, scope: _Scope, items: tuple[SelectItem, ...]) -> None:
        """Each output of one level is a key of one JSON object: two with the same name would make the
        object hold a key twice (PostgREST sends that, and JSON parsers keep one of them, unsaid)."""
        seen: set[str] = set()
        for name in self._output_names(scope, items):
            if name in seen:
                where = f" of the '{scope.path[-1]}' embed" if scope.path else ""
                raise DuplicateOutputName(
                    f"The select{where} returns '{name}' twice",
                    details="Each column and embed of one level of select needs a name of its own",
                    hint=f"Give one of them an alias, e.g. other_{name}:{name}.",
                )
            seen.add(name)

    @staticmethod
    def _output_names(scope: _Scope, items: tuple[SelectItem, ...]) -> list[str]:
        names: list[str] = []
        for item in items:
            if isinstance(item, StarItem):
                names.extend(scope.shape.columns)
            elif isinstance(item, ColumnItem) or shown(item):
                names.append(item.output_name)
        return names

    def _relation(self, scope: _Scope, item: EmbedItem) -> Relation:
        return find_relation(self.schema, self.readable, scope.contract, item.relation, item.hint, self.profile)

    def _join(self, parent: _Scope, child: _Scope, relation: Relation) -> str:
        return " AND ".join(
            f"{self._column(child, tc)} = {self._column(parent, sc)}"
            for sc, tc in zip(relation.source_columns, relation.target_columns, strict=True)
        )

    def _linked(self, parent: _Scope, child: _Scope, relation: Relation) -> tuple[str, list[str]]:
        """The FROM items of an embed's rows and what ties them to the parent's row: the child's view joined on
        the key; or, through a junction, the child's view and the junction's, whose rows pair the parent's row
        with the child's (only those the app's row filter on the junction lets it read). As in PostgREST, a
        child paired twice by the junction (its key has more columns than the two keys) is listed twice."""
        child_from = f"{self._view(child)} AS {child.alias}"
        junction = relation.junction
        if junction is None:
            return child_from, [self._join(parent, child, relation)]
        link = self._scope(junction.contract, child.path)
        conditions = [f"{self._column(link, jc)} = {self._column(child, tc)}"
                      for jc, tc in zip(junction.target_columns, relation.target_columns, strict=True)]
        conditions += [f"{self._column(link, jc)} = {self._column(parent, sc)}"
                       for jc, sc in zip(junction.source_columns, relation.source_columns, strict=True)]
        conditions += [self._condition(link, c, {}, ReadQuery()) for c in self.row_filters.get(junction.contract, ())]
        return f"{child_from}, {self._view(link)} AS {link.alias}", conditions

    def _embed_level(self, query: ReadQuery, path: tuple[str, ...], relation_name: str) -> Level:
        for candidate in (path, (*path[:-1], relation_name)):
            if candidate in query.levels:
                self._used_levels.add(candidate)
                return query.levels[candidate]
        return Level()

    def _embed(self, parent: _Scope, item: EmbedItem, query: ReadQuery, *, key: str | None = None) -> str:
        """The embed as a subquery joined to the parent's row, or (``key``) to a key given as text."""
        relation = self._relation(parent, item)
        if key is None and self._crosses(relation):
            across = self._across(relation)
            marker = self.bind(across.link((parent.contract, parent.path), item, relation))
            return f"({marker}::text || coalesce(':' || {self._column(parent, self._single(relation)[0])}::text, ''))"
        child = self._scope(relation.target, (*parent.path, item.output_name))
        level = self._embed_level(query, child.path, item.relation)
        projection = self._projection(child, item.items, query)
        if key is None:
            from_items, link = self._linked(parent, child, relation)
        else:  # (an embed across databases: never through a junction, which is always in one database)
            column = self._single(relation)[1]
            from_items = f"{self._view(child)} AS {child.alias}"
            link = [f"{self._column(child, column)} = {key}::{child.shape.columns[column]}"]
        where = self._where(child, level, query, extra=link)
        body = f"SELECT {projection} FROM {from_items}{where}"
        if relation.to_one:
            return f"(SELECT row_to_json(_gh_r) FROM ({body} LIMIT 1) AS _gh_r)"
        body += f"{self._order(child, level, query)}{self._limit(level)}"
        return f"(SELECT coalesce(json_agg(_gh_r), '[]') FROM ({body}) AS _gh_r)"

    def _exists(self, parent: _Scope, item: EmbedItem, query: ReadQuery) -> str:
        """EXISTS over an embed's filtered rows: for !inner and rel=not.is.null. For an embed into another
        database: whether the parent's key is among those the other side has rows for."""
        relation = self._relation(parent, item)
        if self._crosses(relation):
            keys = self.bind(self._across(relation).keys((parent.contract, parent.path), item, relation))
            column = self._single(relation)[0]
            key_type = parent.shape.columns[column]
            return f"(({self._column(parent, column)} = ANY({keys}::text[]::{key_type}[])) IS TRUE)"
        child = self._scope(relation.target, (*parent.path, item.output_name))
        level = self._embed_level(query, child.path, item.relation)
        from_items, link = self._linked(parent, child, relation)
        where = self._where(child, level, query, extra=link)
        return f"EXISTS (SELECT 1 FROM {from_items}{where})"

    def _crosses(self, relation: Relation) -> bool:
        """Does the relation lead into another database (no JOIN possible)?"""
        databases = self.schema.databases
        return databases.get(relation.source) != databases.get(relation.target)

    def _across(self, relation: Relation) -> CrossDatabase:
        if self.across is None:
            raise NotComposable(f"'{relation.target}' is served from another database than '{relation.source}': "
                                "it can be embedded only in a read's select",
                                hint=f"Read '{relation.target}' with a request of its own.")
        return self.across

    @staticmethod
    def _single(relation: Relation) -> tuple[str, str]:
        """The one column on each side of a relation across databases (``[[relations]]`` name one each)."""
        if len(relation.source_columns) != 1:
            raise NotComposable(f"'{relation.source}' and '{relation.target}' are linked by several columns "
                                "across databases", hint="Declare the link with [[relations]] on one column.")
        return relation.source_columns[0], relation.target_columns[0]

    # -- where -------------------------------------------------------------------------------------------

    def _embeds_at(self, scope: _Scope, query: ReadQuery) -> dict[str, EmbedItem]:
        items = query.select
        for name in scope.path:
            nested = {i.output_name: i for i in items if isinstance(i, EmbedItem)}
            nested.update({i.relation: i for i in items if isinstance(i, EmbedItem) and i.relation not in nested})
            items = nested[name].items if name in nested else ()
        found = {i.output_name: i for i in items if isinstance(i, EmbedItem)}
        for item in items:
            if isinstance(item, EmbedItem):
                found.setdefault(item.relation, item)
        return found

    def _where(self, scope: _Scope, level: Level, query: ReadQuery, *, extra: list[str] | None = None) -> str:
        """The scope's conditions: ``extra`` (its link to the parent), the app's row filter, the level's filters,
        and an EXISTS for each of its ``!inner`` embeds (whose own conditions nest the same way: an ``!inner``
        inside an ``!inner`` filters the top through both, as in PostgREST)."""
        embeds = self._embeds_at(scope, query)
        conditions = list(extra or [])
        conditions.extend(self._condition(scope, c, embeds, query) for c in self.row_filters.get(scope.contract, ()))
        conditions.extend(self._condition(scope, c, embeds, query) for c in level.where)
        conditions.extend(self._exists(scope, e, query) for e in dict.fromkeys(embeds.values()) if e.inner)
        return f" WHERE {' AND '.join(conditions)}" if conditions else ""

    def _condition(self, scope: _Scope, condition: Condition, embeds: dict[str, EmbedItem],
                   query: ReadQuery) -> str:
        if isinstance(condition, Logic):
            joiner = " AND " if condition.operator == "and" else " OR "
            inner = joiner.join(self._condition(scope, c, embeds, query) for c in condition.children)
            return f"NOT ({inner})" if condition.negated else f"({inner})"
        return self._filter(scope, condition, embeds, query)

    def _filter(self, scope: _Scope, flt: Filter, embeds: dict[str, EmbedItem], query: ReadQuery) -> str:
        name = flt.field.column
        if name in embeds and not flt.field.json_path and name not in scope.shape.columns:
            if flt.operator != "is" or flt.value != "null":
                raise InvalidEmbedFilter(f"Bad operator on the '{name}' embedded resource",
                                         details="Only is null or not is null filters are allowed on embedded "
                                                 "resources")
            exists = self._exists(scope, embeds[name], query)
            return exists if flt.negated else f"NOT {exists}"
        column, column_type = self._field(scope, flt.field)
        sql = operation(column, column_type, flt, self.bind)
        return f"NOT ({sql})" if flt.negated else sql

    # -- order, limit -----------------------------------------------------------------------------------

    def _order(self, scope: _Scope, level: Level, query: ReadQuery) -> str:
        terms: list[str] = []
        for term in level.order:
            terms.append(self._order_term(scope, term, query))
        return f" ORDER BY {', '.join(terms)}" if terms else ""

    def _order_term(self, scope: _Scope, term: OrderTerm, query: ReadQuery) -> str:
        if term.relation is None:
            sql, _ = self._field(scope, term.field)
        else:  # the embed of that name (or alias) in the select, else the relation the name means
            embedded = self._embeds_at(scope, query).get(term.relation)
            item = EmbedItem(embedded.relation, hint=embedded.hint) if embedded else EmbedItem(term.relation)
            relation = self._relation(scope, item)
            if self._crosses(relation):
                raise NotComposable(f"A related order on '{term.relation}' is not possible",
                                    details=f"'{term.relation}' is served from another database than "
                                            f"'{scope.contract}': rows cannot be ordered by its columns",
                                    hint=f"Order by columns of '{scope.contract}', or sort the answer yourself.")
            if not relation.to_one:
                raise RelatedOrderNotToOne(f"A related order on '{term.relation}' is not possible",
                                           details=f"'{scope.contract}' and '{term.relation}' do not form a "
                                                   "many-to-one or one-to-one relationship")
            child = self._scope(relation.target, (*scope.path, term.relation))
            value, _ = self._field(child, term.field)
            sql = (f"(SELECT {value} FROM {self._view(child)} AS {child.alias} "
                   f"WHERE {self._join(scope, child, relation)} LIMIT 1)")
        text = sql + (" DESC" if term.descending else " ASC")
        return text + (f" NULLS {term.nulls.upper()}" if term.nulls else "")

    def _limit(self, level: Level) -> str:
        """The limit as a literal (an int, at most ``max_rows``); the offset bound, and left out when 0.

        A bound limit makes PostgreSQL's generic plan guess the rows it keeps, and an ``OFFSET $n`` guesses a
        tenth of the rows skipped: the generic plan of a list then looks dearer than a custom one, so every
        execution was planned again (a list of 50 filtered on ``price >= $1``: 185-209 µs a statement against
        135-143 with ``LIMIT 50``, pgbench, prepared). The SQL text varies with the limit only, which the plan
        cache's key (``query/plans.py``) already holds: a request's ``limit`` or Range is part of its shape."""
        limit = int(self.max_rows if level.limit is None else min(level.limit, self.max_rows))
        return f" LIMIT {limit}" + (f" OFFSET {self.bind(level.offset)}" if level.offset else "")

    @property
    def levels_used(self) -> frozenset[tuple[str, ...]]:
        """The embed paths whose filters, order and limit this compiler took."""
        return frozenset(self._used_levels)

    def check_levels(self, query: ReadQuery, used: Iterable[tuple[str, ...]] = ()) -> None:
        """NotEmbedded for a level's filter, order or limit that no embed took (``used``: the levels that the
        other statements of a composed read took)."""
        taken = self._used_levels.union(used)
        for path, level in query.levels.items():
            if path and path not in taken and (level.where or level.order or level.limit is not None
                                               or level.offset):
                raise NotEmbedded(f"'{path[-1]}' is not an embedded resource in this request",
                                  hint=f"Verify that '{path[-1]}' is included in the 'select' query parameter.")
