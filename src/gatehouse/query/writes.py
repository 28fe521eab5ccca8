"""Writes → one SQL statement through the contract's view: INSERT (and upsert), UPDATE, DELETE.

PostgreSQL's updatable views carry the write to the table, under the app's role, so the database checks
the app's INSERT/UPDATE/DELETE privilege itself. The rows travel as one JSON parameter expanded by
``json_populate_recordset`` into the view's row type, so PostgreSQL parses every value by the column's type.

Every statement ends with the same tail, which the pipeline and logic functions both read as one
:class:`WriteOutcome`: the representation (JSON or NULL), the rows written, the key of the first row (JSON when
the answer's ``Location`` needs it, else NULL), the rows that already existed (upserts), and the two counts that
refuse a write under a row filter (``outside``, ``hidden``). All of it runs on one snapshot, so "already existed"
is counted before the write.

A grant's row filter holds for every write, as PostgreSQL's row-level security would hold it:

- UPDATE and DELETE carry it in their WHERE, like reads: a row outside it is neither changed nor counted.
- Every written row is checked against it (``outside``): no write may put a row where the app cannot see it.
- A merging upsert (``ON CONFLICT ... DO UPDATE``, which PUT is too) carries it as the DO UPDATE's own WHERE,
  tested on the existing row, so PostgreSQL itself never overwrites a row outside it, even one a concurrent
  transaction committed after this statement's snapshot. Such a row is skipped instead, and every row sent
  must come back written: the shortfall (``hidden``) refuses the whole statement with 403, code 42501, as
  PostgreSQL does when ON CONFLICT meets a row its UPDATE policy hides. A ``DO NOTHING`` upsert skips such a
  row exactly like a conflicting row inside the filter, and its representation never contains it.

Both counts are zero without a filter. With one, the caller runs the statement in a transaction (a savepoint
in a logic function) and :meth:`WriteOutcome.check_row_filter` rolls a refused write back entirely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gatehouse.db import quote_ident
from gatehouse.db.catalog import ViewShape
from gatehouse.errors import (
    ContractNotWritable,
    HiddenRowConflict,
    InvalidBody,
    ReadOnlyColumn,
    UnknownColumn,
    WriteOutsideFilter,
)
from gatehouse.query.sql import CompiledQuery, ReadCompiler
from gatehouse.query.tree import Payload, ReadQuery

if TYPE_CHECKING:
    import asyncpg

WRITTEN = "_gh_written"
TARGET = "_gh_t"
"""The alias of an INSERT's target: an upsert's DO UPDATE reads the existing row under it."""


@dataclass(frozen=True, slots=True)
class InsertOptions:
    representation: bool = False
    resolution: str | None = None
    """``merge-duplicates`` or ``ignore-duplicates``: an upsert."""
    missing_default: bool = False
    conflict_columns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """The tail every write statement ends with, by name (see the module's docstring)."""

    representation: str | None
    """The written rows shaped by ``select=``, as a JSON array; None unless asked for."""
    written: int
    first_key: str | None
    """The first written row's key as a JSON array (for ``Location``); None without a key or a row, or when the
    statement was compiled without one (no ``Location`` to send)."""
    existing: int | None
    """How many of an upsert's rows were there before it; None for any other write."""
    outside: int
    """Written rows that fall outside the app's row filter."""
    hidden: int
    """Rows a merging upsert skipped because the row they conflict with is outside the app's row filter."""
    xid: int | None = None
    """The writing transaction's id (None when nothing was written): the read-your-writes token of
    :mod:`gatehouse.db.consistency`."""

    @classmethod
    def from_row(cls, row: asyncpg.Record | Mapping[str, Any] | None) -> WriteOutcome:
        assert row is not None  # the tail is one row of aggregates
        xid = row["xid"]
        return cls(row["representation"], row["written"], row["first_key"], row["existing"], row["outside"],
                   row["hidden"], int(xid) if xid is not None else None)

    def check_row_filter(self, contract: str) -> None:
        """403 (code 42501, as PostgreSQL and PostgREST answer under row-level security) when the write reached
        outside the app's row filter. The caller rolls back, so nothing of the statement is kept; the message
        names the contract, never a table, and shows no value of a row the app may not see."""
        if self.hidden:
            raise HiddenRowConflict(f"The upsert would overwrite rows of '{contract}' that this application may not "
                                    "change",
                                    details=f"{self.hidden} row(s) conflict with rows outside the application's row "
                                            "filter; nothing was written")
        if self.outside:
            raise WriteOutsideFilter(f"The change would put rows of '{contract}' outside what this application may "
                                     "see",
                                     details=f"{self.outside} row(s) do not match the application's row filter; "
                                             "nothing was written")


class WriteCompiler:
    def __init__(self, reader: ReadCompiler, contract: str, allow: tuple[str, ...] | None = None) -> None:
        self.reader = reader
        self.contract = contract
        self.scope = reader.root(contract)
        self.shape: ViewShape = self.scope.shape
        self.view = reader.view_sql(self.scope)
        self.allow = allow if allow is not None else _view_methods(self.shape)
        """What a 405 names in ``Allow``: the app's methods on the contract (the pipeline gives them, as
        ``OPTIONS`` answers them), else what the view itself can take."""
        self.also: list[str] = []
        """More CTEs for the statement, after the write's own: they may read ``_gh_written`` (the audit's
        record does); bind their values with ``reader.bind``."""

    @property
    def filtered(self) -> bool:
        """Whether the app's row filter applies to this contract: then :meth:`WriteOutcome.check_row_filter`
        may still refuse the write after its statement ran, so the statement needs a transaction around it."""
        return bool(self.reader.row_filters.get(self.contract))

    # -- checks ---------------------------------------------------------------------------------------

    def writable(self, columns: tuple[str, ...]) -> None:
        for column in columns:
            if column not in self.shape.columns:
                raise UnknownColumn(f"Could not find the '{column}' column of '{self.contract}' in the schema cache")
            if column not in self.shape.writable_columns:
                raise ReadOnlyColumn(f"Column '{column}' of '{self.contract}' is read-only",
                                     details="It is computed or comes from another table, so it cannot be written "
                                             "through this contract.")

    def _refuse(self, action: str) -> ContractNotWritable:
        return ContractNotWritable(f"The contract '{self.contract}' cannot be written ({action})", allow=self.allow,
                                   details="Only a contract that selects from one table, without grouping or joins, "
                                           "can be written; this one is read-only.")

    # -- statements -------------------------------------------------------------------------------------

    def _tail(self, query: ReadQuery, representation: bool, location_key: tuple[str, ...] = (), existing: str = "NULL",
              hidden: str = "0") -> str:
        """``, <also CTEs> SELECT <the columns of WriteOutcome>``: one aggregate over the written rows.

        One pass over ``_gh_written`` counts the rows and keeps the first one's key, where a subquery each (and a
        third to learn the transaction's id after the write) cost PostgreSQL about 10 µs more per insert. The id is
        read once the aggregate has consumed every written row, so after the write has run. ``location_key`` (the
        contract's key, for ``Location``) is empty when none will be sent: then no key is built at all."""
        body = self.reader.representation(self.contract, query, WRITTEN) if representation else "NULL"
        if location_key:
            first = ", ".join(f"{quote_ident(k)}" for k in location_key)
            location = f"(array_agg(json_build_array({first})::text))[1]"
        else:
            location = "NULL"
        violations = self.reader.row_filter_violations(self.contract, WRITTEN)
        also = "".join(f", {cte}" for cte in self.also)
        return (f"{also} SELECT {body} AS representation, count(*) AS written, {location} AS first_key, "
                f"{existing} AS existing, {violations} AS outside, {hidden} AS hidden, "
                f"pg_current_xact_id_if_assigned()::text AS xid FROM {WRITTEN}")

    def insert(self, query: ReadQuery, payload: Payload, options: InsertOptions,
               location_key: tuple[str, ...] = ()) -> CompiledQuery:
        if not self.shape.insertable:
            raise self._refuse("insert")
        if query.columns is not None:
            columns = query.columns
        else:
            columns = payload.keys
            if any(tuple(row) != columns and set(row) != set(columns) for row in payload.rows):
                raise InvalidBody("All object keys must match")
        self.writable(columns)
        groups = self._groups(payload, columns, options.missing_default)
        conflict = options.conflict_columns
        self.writable(conflict)
        upsert = bool(options.resolution and conflict)
        merge = upsert and options.resolution != "ignore-duplicates"
        # A merge overwrites only existing rows inside the app's row filter (see the module's docstring).
        inside = self.reader.row_filter_test(self.contract, TARGET) if merge else None
        ctes: list[str] = []
        row_params: list[str] = []
        for index, (group_columns, rows) in enumerate(groups):
            names = ", ".join(quote_ident(c) for c in group_columns)
            row_params.append(self.reader.bind(orjson.dumps(rows).decode()))
            source = f"json_populate_recordset(NULL::{self.view}, {row_params[-1]}::json)"
            # A row that sets no column is all defaults: a zero-column SELECT inserts exactly that.
            target_list = f" ({names})" if group_columns else ""
            sql = f"INSERT INTO {self.view} AS {TARGET}{target_list} SELECT {names} FROM {source}"
            if upsert:
                target = ", ".join(quote_ident(c) for c in conflict)
                sql += f" ON CONFLICT ({target}) {self._conflict_action(group_columns, conflict, merge, inside)}"
            ctes.append(f"_gh_w{index} AS ({sql} RETURNING {TARGET}.*)")
        union = " UNION ALL ".join(f"SELECT * FROM _gh_w{i}" for i in range(len(groups)))
        existing = self._existing(conflict, row_params) if upsert else "NULL"
        hidden = "0"
        if inside is not None:  # every row sent must come back: one the DO UPDATE's WHERE skipped met a hidden row
            hidden = f"{self.reader.bind(len(payload.rows))}::bigint - count(*)"
        tail = self._tail(query, options.representation, location_key, existing, hidden)
        return CompiledQuery(f"WITH {', '.join(ctes)}, {WRITTEN} AS ({union}){tail}", self.reader.params)

    def merged_insert(self, columns: tuple[str, ...], also: str) -> str:
        """A plain insert of ``columns`` for a whole statement group at once (``db/statement_groups.py``'s
        ``Merge``): ``$1`` every request's rows as one JSON array, ``$2`` what ``also`` (a CTE: the group's audit
        records) reads, ``$3`` how many rows were sent. It answers the columns of :class:`WriteOutcome`, and fails
        when it wrote another number of rows than were sent (a trigger that skipped some): the cast of a text that
        is no number is its refusal, so the group runs again, each request alone, and each learns its own count."""
        names = ", ".join(quote_ident(c) for c in columns)
        written = ("CASE WHEN count(*) = $3::bigint THEN count(*) ELSE "
                   "('gatehouse: a merged insert wrote ' || count(*) || ' rows of ' || $3::bigint)::bigint END")
        return (f"WITH _gh_w0 AS (INSERT INTO {self.view} AS {TARGET} ({names}) SELECT {names} "
                f"FROM json_populate_recordset(NULL::{self.view}, $1::json) RETURNING 1), {also} "
                f"SELECT NULL AS representation, {written} AS written, NULL AS first_key, NULL AS existing, "
                f"0 AS outside, 0 AS hidden, pg_current_xact_id_if_assigned()::text AS xid FROM _gh_w0")

    def _existing(self, conflict: tuple[str, ...], row_params: list[str]) -> str:
        """How many rows sent to an upsert match a row already there (on its snapshot, so before the write)."""
        target = ", ".join(quote_ident(c) for c in conflict)
        sources = " UNION ALL ".join(
            f"SELECT {target} FROM json_populate_recordset(NULL::{self.view}, {param}::json)" for param in row_params
        )
        return f"(SELECT count(*) FROM {self.view} WHERE ({target}) IN ({sources}))"

    @staticmethod
    def _conflict_action(columns: tuple[str, ...], conflict: tuple[str, ...], merge: bool, inside: str | None) -> str:
        if not merge:
            return "DO NOTHING"
        updates = [c for c in columns if c not in conflict] or list(conflict)
        action = "DO UPDATE SET " + ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in updates)
        return action if inside is None else f"{action} WHERE {inside}"

    def _groups(self, payload: Payload, columns: tuple[str, ...],
                missing_default: bool) -> list[tuple[tuple[str, ...], list[dict[str, object]]]]:
        """Rows grouped by the columns they set. Without missing=default every row sets every column (a missing
        key is NULL); with it, each group inserts only its own columns, so the others take their DEFAULT."""
        if not missing_default:
            return [(columns, [{c: row.get(c) for c in columns} for row in payload.rows])]
        groups: dict[tuple[str, ...], list[dict[str, object]]] = {}
        for row in payload.rows:
            present = tuple(c for c in columns if c in row)
            groups.setdefault(present, []).append({c: row[c] for c in present})
        return list(groups.items())

    def patch(self, query: ReadQuery, payload: Payload, representation: bool, *,
              missing_default: bool = False) -> CompiledQuery | None:
        """A PATCH's statement, or None when it sets nothing. Its body is one object, or an array of one (as
        PostgREST takes it); an empty array, or objects that are all empty, set nothing (``{}`` too, without
        ``?columns``). Several objects are refused: which one a row would get is not defined."""
        rows = payload.rows
        if not rows:
            return None
        if len(rows) > 1 and any(rows):
            raise InvalidBody("PATCH takes one JSON object")
        row = rows[0]
        if not row and query.columns is None:
            return None
        return self.update(query, row, representation, missing_default=missing_default)

    def update(self, query: ReadQuery, row: dict[str, object], representation: bool, *,
               missing_default: bool = False) -> CompiledQuery:
        """UPDATE of the rows the filters select. It sets the body's keys; with ``?columns``, those columns
        instead, as PostgREST does: a key outside them is ignored, and one they name that the body lacks is set
        to NULL, or with ``missing_default`` to its DEFAULT as PostgreSQL applies it through the view (the
        view's own default, else NULL; PostgREST reads a view's defaults the same way)."""
        if not self.shape.updatable:
            raise self._refuse("update")
        columns = query.columns if query.columns is not None else tuple(row)
        self.writable(columns)
        alias = self.scope.alias
        values = self.reader.bind(orjson.dumps({c: row[c] for c in columns if c in row}).decode())
        sets = ", ".join(f"{quote_ident(c)} = DEFAULT" if missing_default and c not in row
                         else f"{quote_ident(c)} = _gh_b.{quote_ident(c)}" for c in columns)
        where = self.reader.where_sql(self.scope, query)
        sql = (f"WITH {WRITTEN} AS (UPDATE {self.view} AS {alias} SET {sets} "
               f"FROM json_populate_record(NULL::{self.view}, {values}::json) AS _gh_b{where} RETURNING {alias}.*)")
        return CompiledQuery(sql + self._tail(query, representation), self.reader.params)

    def delete(self, query: ReadQuery, representation: bool) -> CompiledQuery:
        if not self.shape.deletable:
            raise self._refuse("delete")
        alias = self.scope.alias
        where = self.reader.where_sql(self.scope, query)
        sql = f"WITH {WRITTEN} AS (DELETE FROM {self.view} AS {alias}{where} RETURNING {alias}.*)"
        return CompiledQuery(sql + self._tail(query, representation), self.reader.params)


def _view_methods(shape: ViewShape) -> tuple[str, ...]:
    """The methods a contract's view can take, whoever calls."""
    writes = [m for m, able in (("POST", shape.insertable), ("PATCH", shape.updatable), ("DELETE", shape.deletable))
              if able]
    return ("OPTIONS", "GET", "HEAD", *writes)
