"""``POST /rpc/<name>`` (and ``GET`` for read-only functions): validate, call in one transaction, answer.

The arguments are validated by the function's pydantic model before any database work; the function runs
with a :class:`Context` on the app's own pool inside one transaction (read-only for read-only functions),
committed only if it returns (and ``Prefer: tx=rollback`` was not sent). Its result is serialised by its return
annotation; ``None`` answers 204.

What PostgREST decides by the argument names, so do we, in its words: names that are not the function's
parameters, or that leave out a required one, find no function (404 ``PGRST202``, hinting the parameter list);
values of the wrong type are the function's model's to refuse (400). ``OPTIONS`` answers the methods the
function takes; any method but ``GET``, ``HEAD``, ``POST`` and ``OPTIONS`` is PostgREST's 405 ``PGRST101``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import asyncpg
import orjson
from pydantic import BaseModel, ValidationError

from gatehouse import suggestions
from gatehouse.access import choose_version
from gatehouse.auth.identity import Identity
from gatehouse.db import Connection, consistency, rollback_quietly
from gatehouse.db.faults import is_dead
from gatehouse.db.sqlstate import api_error_from_postgres
from gatehouse.errors import (
    ApiError,
    InternalError,
    InvalidArguments,
    InvalidBody,
    RpcMethodNotAllowed,
)
from gatehouse.http.exchange import JSON, HttpRequest, HttpResponse
from gatehouse.http.negotiate import parse_prefer
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


RPC_ALLOW = ("OPTIONS", "GET", "HEAD", "POST")
"""What ``/rpc/<name>`` takes from some app (a 405's ``Allow``, before the caller or the function is known)."""


def _granted(runtime: Runtime, app: App, version: int, name: str, arguments: Collection[str],
             post: bool) -> LogicFunction:
    """The function ``name`` granted to ``app``; 404 in PostgREST's words otherwise, its hint chosen among the
    functions granted to the app only (a function it may not call looks exactly like one that does not exist)."""
    project = runtime.project
    function = project.functions.get(name)
    if function is None or name not in app.config.functions:
        raise suggestions.unknown_function(project, app, version, name, arguments, post=post)
    return function


async def rpc_options(request: HttpRequest, runtime: Runtime, name: str) -> HttpResponse:
    """``OPTIONS /rpc/<name>``: the methods the function takes (``Allow``), as PostgREST answers it."""
    _, app = await identify(request, runtime)  # 401
    version = choose_version(runtime.project, app, request.headers.get("accept-profile"), None)  # 406 / 410
    function = _granted(runtime, app, version, name, (), post=False)  # 404
    return HttpResponse(200, {"Allow": ",".join(("OPTIONS", *rpc_methods(function)))})


async def call_rpc(request: HttpRequest, runtime: Runtime, name: str) -> HttpResponse:
    assert runtime.pools is not None
    project, method = runtime.project, request.method
    if method == "OPTIONS":
        return await rpc_options(request, runtime, name)
    if method not in RPC_ALLOW:
        raise RpcMethodNotAllowed(f"Cannot use the {method} method on RPC", allow=RPC_ALLOW)
    identity, app = await identify(request, runtime)  # 401
    prefs = parse_prefer(request.headers.get("prefer"))  # 400 with handling=strict
    read = method in ("GET", "HEAD")
    profile = request.headers.get("accept-profile" if read else "content-profile")
    version = choose_version(project, app, profile, None)  # 406 / 410
    arguments = await _arguments(request, project.config.server.max_body_bytes)  # 400 / 413
    function = _granted(runtime, app, version, name, arguments, post=not read)  # 404
    request.labels.contract = f"rpc:{name}"
    parameters_required = {field: info.is_required() for field, info in function.parameters.model_fields.items()}
    if not suggestions.arguments_fit(arguments, parameters_required):  # no function of that name takes them: 404
        raise suggestions.unknown_function(project, app, version, name, arguments, post=not read,
                                           parameters=parameters_required)
    if read and not function.read_only:
        raise RpcMethodNotAllowed(f"Cannot use the {method} method on RPC", allow=rpc_methods(function),
                                  hint="This function changes data: call it with POST.")
    try:
        parameters = function.parameters.model_validate(arguments)  # 400, before any database work
    except ValidationError as exc:
        raise _arguments_error(exc) from None

    labels = request.labels
    database = function.database or project.home_database
    commit = prefs.get("tx") != "rollback"  # Prefer: tx=rollback runs the function and keeps nothing
    written: list[int] = []  # the transaction's id, for read-your-writes on replicas

    async def record(conn: Connection, result: Any) -> None:  # a writing function's record commits with it
        await audit_in_transaction(conn, labels.audit_record(204 if result is None else 200,
                                                             keep_values=project.config.server.audit_query_values))
        if runtime.replicas.has(database):
            written.append(int(await conn.fetchval("SELECT pg_current_xact_id()::text")))

    result = await invoke(runtime, function, app, identity, version, parameters, commit=commit,
                          before_commit=None if function.read_only else record)
    labels.audited = commit and not function.read_only  # (else the request's own record, after the answer)
    response = HttpResponse(204) if result is None else \
        HttpResponse(200, {}, function.result.dump_json(result), JSON)  # for HEAD the server sends no body
    applied = prefs.applied(set())  # tx and handling, as PostgREST echoes them for a function
    if applied:
        response.headers["Preference-Applied"] = applied
    if written:
        runtime.replicas.wrote(app.name, database, written[0])
        response.headers[consistency.HEADER] = consistency.token(database, written[0])
    return response
