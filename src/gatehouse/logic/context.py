"""What a logic function gets: the caller's identity, and contracts to read and write *as the calling app*.

Every read and write goes through the same compiler, grants and row filters as an HTTP request, on one
connection of the app's pool inside one transaction, which commits only if the function returns. So a
function can never reach a table, a contract the app was not granted, or a row its filter hides, and a
function that raises leaves nothing behind. A write its row filter refuses (403, see ``query/writes.py``) is
undone at once, even if the function catches the error. A call works within one database.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import asyncpg
import orjson

from gatehouse import suggestions
from gatehouse.access import database_refusal, granted_contract, readable_contracts, row_filters
from gatehouse.auth.identity import Identity
from gatehouse.db import Connection
from gatehouse.errors import LogicError, LogicMisuse
from gatehouse.project import App, Project
from gatehouse.query.grammar import parse_query
from gatehouse.query.sql import CompiledQuery, ReadCompiler
from gatehouse.query.tree import Field, Filter, Payload, ReadQuery
from gatehouse.query.writes import InsertOptions, WriteCompiler, WriteOutcome
from gatehouse.schema_cache import ApiSchema

Row = dict[str, Any]
__all__ = ["Context", "LogicError", "Row"]  # LogicError lives in the error tree; functions import it from here


class Context:
    def __init__(self, *, project: Project, app: App, identity: Identity, version: int, schema: ApiSchema,
                 connection: Connection, database: str) -> None:
        self.project = project
        self.app = app
        self.identity = identity
        self.version = version
        self._schema = schema
        self._conn = connection
        self._database = database

    @property
    def claims(self) -> Mapping[str, Any]:
        return self.identity.claims

    @property
    def subject(self) -> str | None:
        return self.identity.subject

    # -- reads -------------------------------------------------------------------------------------------

    def _query(self, query: str, equals: Mapping[str, Any]) -> ReadQuery:
        parsed = parse_query(query)
        parsed.top.where.extend(Filter(Field(k), "eq", str(v)) for k, v in equals.items())
        return parsed

    def _compiler(self, contract: str, action: str) -> ReadCompiler:
        found = granted_contract(self.project, self.app, self.version, contract, action)
        if found.database != self._database:
            raise LogicMisuse(f"'{contract}' lives in database '{found.database}'; a logic call works within "
                              f"'{self._database}'")
        readable = readable_contracts(self.project, self.app, self.version)
        filters = row_filters(self.app, self.identity, readable | {contract})
        return ReadCompiler(self._schema, readable, self.project.max_rows(self.app, contract), filters,
                            profile=suggestions.schema_label(self.project, self.app, self.version))

    async def _run(self, compiled: CompiledQuery, contract: str) -> asyncpg.Record:
        try:
            row = await self._conn.fetchrow(compiled.sql, *compiled.params)
        except asyncpg.PostgresError as exc:  # 403 when the value PostgreSQL refused was a claim's
            readable = readable_contracts(self.project, self.app, self.version)
            filters = row_filters(self.app, self.identity, readable | {contract})
            raise database_refusal(exc, self.project, self._schema.shapes[contract].columns, filters) from None
        assert row is not None
        return cast(asyncpg.Record, row)

    async def read(self, contract: str, query: str = "", **equals: Any) -> list[Row]:
        """Rows of a contract, in PostgREST's dialect: ``await ctx.read("orders", "select=id,status", id=5)``."""
        compiled = self._compiler(contract, "read").read(contract, self._query(query, equals))
        rows: list[Row] = orjson.loads((await self._run(compiled, contract))[0])
        return rows

    async def one(self, contract: str, query: str = "", **equals: Any) -> Row | None:
        """The single matching row, or None when there is none (more than one is an error)."""
        rows = await self.read(contract, query + ("&" if query else "") + "limit=2", **equals)
        if len(rows) > 1:
            raise LogicMisuse(f"more than one row of '{contract}' matches")
        return rows[0] if rows else None

    # -- writes ------------------------------------------------------------------------------------------

    async def _write(self, contract: str, writer: WriteCompiler, compiled: CompiledQuery) -> list[Row]:
        """Run a write and hand back its rows; 403 when it reached outside the app's row filter.

        Under a filter the write runs in a savepoint, so a refused write leaves nothing behind even when the
        function catches the error and goes on (the function's own transaction would otherwise keep it)."""
        if writer.filtered:
            async with self._conn.transaction():  # nested in the function's transaction: a savepoint
                outcome = WriteOutcome.from_row(await self._run(compiled, contract))
                outcome.check_row_filter(contract)  # 403: rolls back to the savepoint
        else:
            outcome = WriteOutcome.from_row(await self._run(compiled, contract))
        assert outcome.representation is not None  # logic writes always ask for their rows
        written: list[Row] = orjson.loads(outcome.representation)
        return written

    def _writer(self, contract: str, action: str) -> WriteCompiler:
        return WriteCompiler(self._compiler(contract, action), contract)

    async def insert(self, contract: str, rows: Row | list[Row], *, select: str = "") -> list[Row]:
        payload = Payload([rows] if isinstance(rows, dict) else list(rows), single=isinstance(rows, dict))
        writer = self._writer(contract, "insert")
        query = parse_query(f"select={select}" if select else "")
        compiled = writer.insert(query, payload, InsertOptions(representation=True))  # (no Location: no key)
        return await self._write(contract, writer, compiled)

    async def update(self, contract: str, values: Row, query: str = "", **equals: Any) -> list[Row]:
        parsed = self._query(query, equals)
        if not parsed.top.where:
            raise LogicMisuse("update needs a filter")
        writer = self._writer(contract, "update")
        return await self._write(contract, writer, writer.update(parsed, values, True))

    async def delete(self, contract: str, query: str = "", **equals: Any) -> list[Row]:
        parsed = self._query(query, equals)
        if not parsed.top.where:
            raise LogicMisuse("delete needs a filter")
        writer = self._writer(contract, "delete")
        return await self._write(contract, writer, writer.delete(parsed, True))
