"""``POST /rpc/<name>`` (and ``GET`` for read-only functions): validate, call in one transaction, answer.

The arguments are validated by the function's pydantic model before any database work; the function runs
with a :class:`Context` on the app's own pool inside one transaction (read-only for read-only functions),
committed only if it returns. Its result is serialised by its return annotation; ``None`` answers 204.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from pydantic import BaseModel, ValidationError

from gatehouse.access import choose_version
from gatehouse.auth.identity import Identity
from gatehouse.db import Connection, consistency, rollback_quietly
from gatehouse.db.faults import is_dead
from gatehouse.db.sqlstate import api_error_from_postgres
from gatehouse.errors import (
    ApiError,
    FunctionNotFound,
    InternalError,
    InvalidArguments,
    InvalidBody,
    RpcMethodNotAllowed,
)
from gatehouse.http.exchange import JSON, HttpRequest, HttpResponse
from gatehouse.logic.context import Context
from gatehouse.logic.registry import LogicFunction
from gatehouse.observe.audit import audit_in_transaction
from gatehouse.pipeline import identify
from gatehouse.project import App
from gatehouse.runtime import Runtime

log = logging.getLogger(__name__)


def _arguments_error(exc: ValidationError) -> InvalidArguments:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
    return InvalidArguments("The function's arguments are not valid", details=problems)


def rpc_methods(function: LogicFunction) -> tuple[str, ...]:
    """The methods ``/rpc/<name>`` takes: ``GET`` and ``HEAD`` too when the function only reads."""
    return ("GET", "HEAD", "POST") if function.read_only else ("POST",)


async def _arguments(request: HttpRequest, limit: int) -> dict[str, Any]:
    if request.method in ("GET", "HEAD"):
        return request.query_params
    raw = await request.body(limit)
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidBody("Empty or invalid json") from None
    if not isinstance(value, dict):
        raise InvalidBody("The arguments are a JSON object of named values")
    return value


async def invoke(runtime: Runtime, function: LogicFunction, app: App, identity: Identity, version: int,
                 parameters: BaseModel, *, commit: bool = True,
                 before_commit: Callable[[Connection, Any], Awaitable[None]] | None = None) -> Any:
    """Call a function as ``app`` in one transaction: committed if it returns (and ``commit``), else rolled back."""
    database = function.database or runtime.project.home_database
    try:
        return await _invoke(runtime, function, app, identity, version, parameters, database, commit, before_commit)
    finally:
        if not function.read_only:  # it may have written any table: none of this instance's cached answers
            runtime.cache.versions.wrote_database(database)  # of this database is served before a read proves it fresh


async def _invoke(runtime: Runtime, function: LogicFunction, app: App, identity: Identity, version: int,
                  parameters: BaseModel, database: str, commit: bool,
                  before_commit: Callable[[Connection, Any], Awaitable[None]] | None) -> Any:
    assert runtime.pools is not None
    project = runtime.project
    async with runtime.pools.connection(app.name, database) as conn:
        transaction = conn.transaction(readonly=function.read_only)
        await transaction.start()
        context = Context(project=project, app=app, identity=identity, version=version,
                          schema=runtime.schemas[version], connection=conn, database=database)
        try:
            result = await function.call(context, parameters)
        except BaseException as exc:
            await rollback_quietly(transaction)
            if isinstance(exc, ApiError):
                if exc.status == 405:  # a write in a read-only function, or to a read-only contract
                    exc.headers["Allow"] = ", ".join(rpc_methods(function))  # the method is /rpc's, not the view's
                raise
            if isinstance(exc, asyncpg.PostgresError):
                error = api_error_from_postgres(exc, debug=project.config.server.debug)
                if error.status == 405:  # 25006: the function wrote inside its read-only transaction
                    error.headers["Allow"] = ", ".join(rpc_methods(function))
                raise error from None
            if isinstance(exc, Exception) and conn.is_closed() and is_dead(exc, conn):
                raise  # the connection died, not the function: the lease answers 503 PGRST001
            if isinstance(exc, Exception):
                log.error("logic function %s raised %s", function.name, type(exc).__name__)
                raise InternalError(f"The function '{function.name}' failed", hint="Nothing was written.") from None
            raise
        if commit:
            if before_commit is not None:
                try:
                    await before_commit(conn, result)
                except BaseException:
                    await rollback_quietly(transaction)
                    raise
            await transaction.commit()
        else:
            await transaction.rollback()
    return result


async def call_rpc(request: HttpRequest, runtime: Runtime, name: str) -> HttpResponse:
    assert runtime.pools is not None
    project = runtime.project
    identity, app = await identify(request, runtime)  # 401
    function = project.functions.get(name)
    if function is None or name not in app.config.functions:
        raise FunctionNotFound(f"Could not find the function '{name}' in the schema cache",
                               hint="Check the name; functions are granted to applications in gatehouse.toml.")
    request.labels.contract = f"rpc:{name}"
    if request.method in ("GET", "HEAD") and not function.read_only:
        raise RpcMethodNotAllowed(f"Cannot use the {request.method} method on RPC", allow=rpc_methods(function),
                                  hint="This function changes data: call it with POST.")
    profile = request.headers.get("accept-profile" if request.method in ("GET", "HEAD") else "content-profile")
    version = choose_version(project, app, profile, None)  # 406 / 410
    arguments = await _arguments(request, project.config.server.max_body_bytes)
    try:
        parameters = function.parameters.model_validate(arguments)  # 400, before any database work
    except ValidationError as exc:
        raise _arguments_error(exc) from None

    labels = request.labels
    database = function.database or project.home_database
    written: list[int] = []  # the transaction's id, for read-your-writes on replicas

    async def record(conn: Connection, result: Any) -> None:  # a writing function's record commits with it
        await audit_in_transaction(conn, labels.audit_record(204 if result is None else 200,
                                                             keep_values=project.config.server.audit_query_values))
        if runtime.replicas.has(database):
            written.append(int(await conn.fetchval("SELECT pg_current_xact_id()::text")))

    result = await invoke(runtime, function, app, identity, version, parameters,
                          before_commit=None if function.read_only else record)
    labels.audited = not function.read_only
    response = HttpResponse(204) if result is None else \
        HttpResponse(200, {}, function.result.dump_json(result), JSON)  # for HEAD the server sends no body
    if written:
        runtime.replicas.wrote(app.name, database, written[0])
        response.headers[consistency.HEADER] = consistency.token(database, written[0])
    return response
