"""Writes → one SQL statement through the contract's view: INSERT (and upsert), UPDATE, DELETE.

PostgreSQL's updatable views carry the write to the table, under the app's role, so the database checks
the app's INSERT/UPDATE/DELETE privilege itself. The rows travel as one JSON parameter expanded by
``json_populate_recordset`` into the view's row type, so PostgreSQL parses every value by the column's type.

Every statement has the same tail, so the pipeline reads every write the same way:
``(representation JSON or NULL, rows written, key of the first row as JSON or NULL, rows that already
existed — for upserts)``. All of it runs on one snapshot, so "already existed" is counted before the write.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from gatehouse.db import quote_ident
from gatehouse.db.catalog import ViewShape
from gatehouse.errors import ApiError
from gatehouse.http.body import Payload
from gatehouse.query.sql import CompiledQuery, ReadCompiler
from gatehouse.query.tree import ReadQuery

WRITTEN = "_gh_written"


@dataclass(frozen=True, slots=True)
class InsertOptions:
    representation: bool = False
    resolution: str | None = None
    """``merge-duplicates`` or ``ignore-duplicates``: an upsert."""
    missing_default: bool = False
    conflict_columns: tuple[str, ...] = ()


class WriteCompiler:
    def __init__(self, reader: ReadCompiler, contract: str) -> None:
        self.reader = reader
        self.contract = contract
        self.scope = reader.root(contract)
        self.shape: ViewShape = self.scope.shape
        self.view = reader.view_sql(self.scope)
        self.also: list[str] = []
        """More CTEs for the statement, after the write's own: they may read ``_gh_written`` (the audit's
        record does); bind their values with ``reader.bind``."""

    # -- checks ---------------------------------------------------------------------------------------

    def writable(self, columns: tuple[str, ...]) -> None:
        for column in columns:
            if column not in self.shape.columns:
                raise ApiError(f"Could not find the '{column}' column of '{self.contract}' in the schema cache",
                               code="PGRST204", status=400,
                               hint=f"Columns of {self.contract}: {', '.join(self.shape.columns)}")
            if column not in self.shape.writable_columns:
                raise ApiError(f"Column '{column}' of '{self.contract}' is read-only", code="0A000", status=400,
                               details="It is computed or comes from another table, so it cannot be written "
                                       "through this contract.")

    def _refuse(self, action: str) -> ApiError:
        return ApiError(f"The contract '{self.contract}' cannot be written ({action})", code="GH405", status=405,
                        details="Only a contract that selects from one table, without grouping or joins, "
                                "can be written; this one is read-only.")

    # -- statements -------------------------------------------------------------------------------------

    def _tail(self, query: ReadQuery, representation: bool, key: tuple[str, ...], existing: str = "NULL") -> str:
        body = self.reader.representation(self.contract, query, WRITTEN) if representation else "NULL"
        if key:
            first = ", ".join(f"{quote_ident(k)}" for k in key)
            location = f"(SELECT json_build_array({first})::text FROM {WRITTEN} LIMIT 1)"
        else:
            location = "NULL"
        violations = self.reader.row_filter_violations(self.contract, WRITTEN)
        also = "".join(f", {cte}" for cte in self.also)
        return f"{also} SELECT {body}, (SELECT count(*) FROM {WRITTEN}), {location}, {existing}, {violations}"

    def insert(self, query: ReadQuery, payload: Payload, options: InsertOptions,
               key: tuple[str, ...]) -> CompiledQuery:
        if not self.shape.insertable:
            raise self._refuse("insert")
        if query.columns is not None:
            columns = query.columns
        else:
            columns = payload.keys
            if any(tuple(row) != columns and set(row) != set(columns) for row in payload.rows):
                raise ApiError("All object keys must match", code="PGRST102", status=400)
        self.writable(columns)
        groups = self._groups(payload, columns, options.missing_default)
        conflict = options.conflict_columns
        self.writable(conflict)
        ctes: list[str] = []
        row_params: list[str] = []
        for index, (group_columns, rows) in enumerate(groups):
            names = ", ".join(quote_ident(c) for c in group_columns)
            row_params.append(self.reader.bind(orjson.dumps(rows).decode()))
            source = f"json_populate_recordset(NULL::{self.view}, {row_params[-1]}::json)"
            # A row that sets no column is all defaults: a zero-column SELECT inserts exactly that.
            target_list = f" ({names})" if group_columns else ""
            sql = f"INSERT INTO {self.view} AS _gh_t{target_list} SELECT {names} FROM {source}"
            if options.resolution and conflict:
                target = ", ".join(quote_ident(c) for c in conflict)
                updates = [c for c in group_columns if c not in conflict] or list(conflict)
                action = ("DO NOTHING" if options.resolution == "ignore-duplicates" else
                          "DO UPDATE SET " + ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}"
                                                       for c in updates))
                sql += f" ON CONFLICT ({target}) {action}"
            ctes.append(f"_gh_w{index} AS ({sql} RETURNING _gh_t.*)")
        union = " UNION ALL ".join(f"SELECT * FROM _gh_w{i}" for i in range(len(groups)))
        existing = "NULL"
        if options.resolution and conflict:
            target = ", ".join(quote_ident(c) for c in conflict)
            sources = " UNION ALL ".join(
                f"SELECT {target} FROM json_populate_recordset(NULL::{self.view}, {param}::json)"
                for param in row_params
            )
            existing = f"(SELECT count(*) FROM {self.view} WHERE ({target}) IN ({sources}))"
        sql = f"WITH {', '.join(ctes)}, {WRITTEN} AS ({union})" + self._tail(query, options.representation, key,
                                                                               existing)
        return CompiledQuery(sql, self.reader.params)

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

    def update(self, query: ReadQuery, row: dict[str, object], representation: bool,
               key: tuple[str, ...]) -> CompiledQuery:
        if not self.shape.updatable:
            raise self._refuse("update")
        columns = tuple(row)
        self.writable(columns)
        alias = self.scope.alias
        values = self.reader.bind(orjson.dumps(row).decode())
        sets = ", ".join(f"{quote_ident(c)} = _gh_b.{quote_ident(c)}" for c in columns)
        where = self.reader.where_sql(self.scope, query)
        sql = (f"WITH {WRITTEN} AS (UPDATE {self.view} AS {alias} SET {sets} "
               f"FROM json_populate_record(NULL::{self.view}, {values}::json) AS _gh_b{where} RETURNING {alias}.*)")
        return CompiledQuery(sql + self._tail(query, representation, key), self.reader.params)

    def delete(self, query: ReadQuery, representation: bool, key: tuple[str, ...]) -> CompiledQuery:
        if not self.shape.deletable:
            raise self._refuse("delete")
        alias = self.scope.alias
        where = self.reader.where_sql(self.scope, query)
        sql = f"WITH {WRITTEN} AS (DELETE FROM {self.view} AS {alias}{where} RETURNING {alias}.*)"
        return CompiledQuery(sql + self._tail(query, representation, key), self.reader.params)
