"""One request, top to bottom (DESIGN.md §4).

Each step is a call into its own package and no step reaches back. The order matters: authentication
comes before anything touches a database, and a contract the app may not read is answered exactly like
one that does not exist.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import asyncpg
import orjson
from asyncpg.transaction import Transaction

from gatehouse.access import (
    choose_version,
    granted_contract,
    lifecycle_headers,
    readable_contracts,
    row_filters,
)
from gatehouse.auth.identity import Identity, authenticate
from gatehouse.contracts.model import ContractVersion
from gatehouse.db import Connection
from gatehouse.db.sqlstate import api_error_from_postgres
from gatehouse.errors import ApiError, Unauthenticated, UnknownContract
from gatehouse.http import render
from gatehouse.http.body import Payload, parse_payload
from gatehouse.http.exchange import HttpRequest, HttpResponse
from gatehouse.http.negotiate import (
    CONTENT_TYPES,
    Format,
    Preferences,
    parse_prefer,
    range_header,
    response_format,
)
from gatehouse.observe.audit import AuditUnavailable, audit_cte, audit_in_transaction
from gatehouse.observe.redact import redact_query
from gatehouse.project import App
from gatehouse.query.grammar import parse_pairs, parse_query, query_pairs
from gatehouse.query.plans import ReadPlan, shape_of
from gatehouse.query.sql import CompiledQuery, ReadCompiler
from gatehouse.query.tree import Condition, Filter, Level, ReadQuery
from gatehouse.query.writes import WRITTEN, InsertOptions, WriteCompiler
from gatehouse.runtime import Runtime


async def identify(request: HttpRequest, runtime: Runtime) -> tuple[Identity, App]:
    """Authenticate (401, or 429 after too many failures; no database work either way) and record who calls."""
    assert runtime.keys is not None
    apps = runtime.project.apps
    client = request.client
    runtime.auth_failures.check(client)
    try:
        identity = await authenticate(request.headers, runtime.keys, runtime.tokens,
                                      lambda name: apps[name].config.require_user)
    except Unauthenticated:
        runtime.auth_failures.failed(client)
        raise
    app = apps[identity.app]
    labels = request.labels
    labels.app, labels.key_id, labels.subject = app.name, identity.key_id, identity.subject
    return identity, app


def _intersect_range(level: Level, requested: tuple[int, int | None] | None) -> None:
    """The Range header and limit/offset both apply: keep the rows inside both."""
    if requested is None:
        return
    first, length = requested
    start = max(level.offset, first)
    ends = [end for end in (
        None if level.limit is None else level.offset + level.limit,
        None if length is None else first + length,
    ) if end is not None]
    level.offset = start
    if ends:
        level.limit = max(0, min(ends) - start)


async def _estimated_count(conn: Connection, rows: CompiledQuery, *, exact_up_to: int) -> int:
    """``count=estimated``: exact while there are at most ``exact_up_to`` rows, else the planner's estimate
    (``count=planned`` is ``exact_up_to=0``)."""
    if exact_up_to > 0:
        limit = f"${len(rows.params) + 1}"
        counted = await conn.fetchval(f"SELECT count(*) FROM ({rows.sql} LIMIT {limit}) AS _gh_n",
                                      *rows.params, exact_up_to + 1)
        if counted <= exact_up_to:
            return int(counted)
    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {rows.sql}", *rows.params)
    return int(orjson.loads(plan)[0]["Plan"]["Plan Rows"])


@dataclass(frozen=True, slots=True, eq=False)
class ReadRoute:
    """What a read's app, path and headers decide before its query is looked at. Each step is a function of
    those and the (immutable) project alone, so the route is worked out once per distinct set of them
    (``Runtime.routes``); a request that fails a step (404, 406, 416) is never cached."""

    version: int
    contract: ContractVersion
    fmt: Format
    count_mode: str | None
    requested: tuple[int, int | None] | None
    readable: frozenset[str]
    headers: dict[str, str]
    """The answer's own headers (``Content-Profile``, a deprecated version's, ``Preference-Applied``); copied
    per request."""


def _read_route(request: HttpRequest, runtime: Runtime, app: App, contract_name: str,
               path_version: int | None) -> ReadRoute:
    headers = request.headers
    get = request.method == "GET"
    key = (app.name, contract_name, path_version, get, headers.get("accept-profile"), headers.get("accept"),
           headers.get("prefer"), headers.get("range") if get else None)
    route = runtime.routes.get(key)
    if route is None:
        project = runtime.project
        version = choose_version(project, app, headers.get("accept-profile"), path_version)  # 406
        contract = granted_contract(project, app, version, contract_name, "read")  # 404 / 403
        fmt = response_format(headers.get("accept"))  # 406
        prefs = parse_prefer(headers.get("prefer"))
        requested = range_header(headers.get("range")) if get else None  # 416
        out = {"Content-Profile": f"v{version}", **lifecycle_headers(project, version)}
        applied = prefs.applied({"count"})
        if applied:
            out["Preference-Applied"] = applied
        route = ReadRoute(version, contract, fmt, prefs.get("count"), requested,
                          readable_contracts(project, app, version), out)
        runtime.routes.put(key, route)
    return route


def _compile_read(runtime: Runtime, app: App, route: ReadRoute, pairs: list[tuple[str, str]],
                  filters: dict[str, tuple[Condition, ...]]) -> tuple[CompiledQuery, ReadQuery, tuple[str, ...]]:
    query = parse_pairs(pairs)  # 400
    _intersect_range(query.top, route.requested)  # 416
    name = route.contract.name
    compiler = ReadCompiler(runtime.schemas[route.version], route.readable, runtime.project.max_rows(app, name),
                            filters)
    compiled = compiler.read(name, query, exact_count=route.count_mode == "exact")  # 400
    return compiled, query, tuple(compiler.output_names)


async def read(request: HttpRequest, runtime: Runtime, contract_name: str, path_version: int | None) -> HttpResponse:
    assert runtime.pools is not None
    project, labels = runtime.project, request.labels

    identity, app = await identify(request, runtime)  # 401
    if runtime.audit is not None and not runtime.audit.accepting():
        raise AuditUnavailable()  # 503: no read goes unrecorded
    route = _read_route(request, runtime, app, contract_name, path_version)  # 406 / 404 / 403 / 416
    contract, version, count_mode = route.contract, route.version, route.count_mode
    labels.contract, labels.api_version = contract.name, version
    filters = row_filters(app, identity, route.readable) if app.row_filters else {}  # 403 when a claim is missing

    # The SQL of this query's shape is compiled once (query/plans.py); each request puts its values in.
    shape = shape_of(request.query_string) if count_mode not in ("planned", "estimated") else None
    key = (route, tuple(filters.items()) if filters else (), shape.key) if shape is not None else None
    plan = runtime.plans.get(key) if key is not None else None
    query: ReadQuery | None
    if plan is None and shape is not None:
        compiled, query, names = _compile_read(runtime, app, route, shape.template(), filters)  # 400 / 416
        plan = ReadPlan.of(compiled, len(shape.values), offset=query.top.offset, output_names=names,
                           redacted_query=redact_query(request.query_string))
        if plan is not None:
            runtime.plans.put(key, plan)
    if plan is not None and shape is not None:
        sql, params, offset, columns = plan.sql, plan.bind(shape.values), plan.offset, plan.output_names
        labels.redacted_query, query = plan.redacted_query, None
    else:  # a planned or estimated count needs the query itself: compiled for this request alone
        compiled, query, columns = _compile_read(runtime, app, route, query_pairs(request.query_string),
                                                 filters)  # 400 / 416
        sql, params, offset = compiled.sql, compiled.params, query.top.offset

    async with runtime.pools.connection(app.name, contract.database) as conn:  # the app's role
        try:
            row = await conn.fetchrow(sql, *params)
            assert row is not None  # an aggregate always returns one row
            total: int | None = row[2] if count_mode == "exact" else None
            if count_mode in ("planned", "estimated") and query is not None:
                max_rows = project.max_rows(app, contract.name)
                rows = ReadCompiler(runtime.schemas[version], route.readable, max_rows, filters).filtered(
                    contract.name, query)
                total = await _estimated_count(conn, rows, exact_up_to=max_rows if count_mode == "estimated" else 0)
        except asyncpg.PostgresError as exc:
            raise api_error_from_postgres(exc, columns=contract.columns, debug=project.config.server.debug) from None

    labels.rows = row[1]
    page = render.Page(row[0], row[1], offset, total, columns)
    return render.read_response(page, route.fmt, dict(route.headers), head=request.method == "HEAD")


WRITE_ACTIONS = {"POST": ("insert",), "PATCH": ("update",), "DELETE": ("delete",), "PUT": ("insert", "update")}


def _put_row(query: ReadQuery, payload: Payload, key: tuple[str, ...]) -> dict[str, object]:
    """PUT replaces one row named by its full key: check the URL and the body agree on it."""
    if query.top.limit is not None or query.top.offset:
        raise ApiError("limit/offset querystring parameters are not allowed for PUT", code="PGRST114", status=400)
    filters = query.top.where
    names = {f.field.column for f in filters if isinstance(f, Filter)}
    if (not key or len(filters) != len(key) or names != set(key)
            or any(not isinstance(f, Filter) or f.operator != "eq" or f.negated or f.field.json_path
                   for f in filters)):
        raise ApiError("Filters must include all and only primary key columns with 'eq' operators",
                       code="PGRST105", status=405,
                       hint=f"Name the row by its key: {', '.join(f'{k}=eq.<value>' for k in key) or 'no key'}")
    row = payload.rows[0] if payload.rows else {}
    url_values = {f.field.column: f.value for f in filters if isinstance(f, Filter)}
    if any(str(row.get(k)) != url_values[k] for k in key):
        raise ApiError("Payload values do not match URL in primary key column(s)", code="PGRST115", status=400)
    return row


def _location(contract: str, key: tuple[str, ...], values: str | None) -> dict[str, str]:
    if not key or not values:
        return {}
    parts = orjson.loads(values)
    query = "&".join(f"{k}={'is.null' if v is None else 'eq.' + str(v)}" for k, v in zip(key, parts, strict=True))
    return {"Location": f"/{contract}?{query}"}


async def write(request: HttpRequest, runtime: Runtime, contract_name: str, path_version: int | None) -> HttpResponse:
    assert runtime.pools is not None
    project, method = runtime.project, request.method
    labels = request.labels

    identity, app = await identify(request, runtime)  # 401
    version = choose_version(project, app, request.headers.get("content-profile"), path_version)  # 406
    contract = granted_contract(project, app, version, contract_name, WRITE_ACTIONS[method][0])  # 404 / 403
    for action in WRITE_ACTIONS[method][1:]:
        granted_contract(project, app, version, contract_name, action)
    labels.contract, labels.api_version = contract.name, version
    fmt = response_format(request.headers.get("accept"))  # 406
    prefs = parse_prefer(request.headers.get("prefer"))  # 400 with handling=strict
    query = parse_query(request.query_string)  # 400
    settings = project.config.contracts.get(contract.name)
    if method in ("PATCH", "DELETE") and not query.top.where and not (settings and settings.allow_unfiltered_writes):
        raise ApiError(f"{method} without a filter would change every row of '{contract.name}'", code="GH400",
                       status=400, hint="Add a filter (e.g. ?id=eq.5), or set allow_unfiltered_writes for the "
                                        "contract in gatehouse.toml.")
    payload = Payload([], single=True)
    if method != "DELETE":
        raw = await request.body(project.config.server.max_body_bytes)  # 413
        payload = parse_payload(raw, request.headers.get("content-type"), project.config.server)  # 400

    schema = runtime.schemas[version]
    key = schema.keys.get(contract.name, ())
    readable = readable_contracts(project, app, version)
    filters = row_filters(app, identity, readable | {contract.name})  # 403 when the token lacks a claim
    reader = ReadCompiler(schema, readable, project.max_rows(app, contract.name), filters)
    writer = WriteCompiler(reader, contract.name)
    representation = prefs.get("return") == "representation"
    rollback = prefs.get("tx") == "rollback"
    max_affected = prefs.get("max-affected") if prefs.strict and method in ("PATCH", "DELETE") else None
    # The record goes into the write's own statement when its status is known before it runs; the write then
    # needs a transaction of its own only if a check after the statement may still refuse it.
    known_status = _known_status(method, representation, prefs)
    audited_in_statement = False
    if known_status is not None and not rollback:
        record = labels.audit_record(known_status, keep_values=project.config.server.audit_query_values)
        writer.also.append(audit_cte(record, reader.bind, WRITTEN))
        audited_in_statement = True
    checked_after = max_affected is not None or fmt in ("object", "object_stripped") or bool(filters.get(contract.name))
    needs_transaction = not audited_in_statement or checked_after
    applied = {"return", "count", "tx"}
    if method == "POST":
        if not payload.rows:
            return _written(HttpResponse(201, {"Content-Range": "*/*"}), prefs, applied)
        conflict = query.on_conflict or key
        resolution = prefs.get("resolution") if conflict else None
        if resolution:
            applied.add("resolution")
        if prefs.get("missing"):
            applied.add("missing")
        options = InsertOptions(representation, resolution, prefs.get("missing") == "default", conflict)
        compiled = writer.insert(query, payload, options, key)  # 400
    elif method == "PUT":
        row = _put_row(query, payload, key)  # 405 / 400
        options = InsertOptions(representation, "merge-duplicates", False, key)
        compiled = writer.insert(query, Payload([row], single=True), options, key)
    elif method == "PATCH":
        if payload.rows and (not payload.single or len(payload.rows) != 1):
            raise ApiError("PATCH takes one JSON object", code="PGRST102", status=400)
        row = payload.rows[0] if payload.rows else {}
        if not row:
            return _written(HttpResponse(204, {"Content-Range": "*/*"}), prefs, applied)
        compiled = writer.update(query, row, representation, key)
    else:
        compiled = writer.delete(query, representation, key)
    if max_affected is not None:
        applied |= {"handling", "max-affected"}

    async with runtime.pools.connection(app.name, contract.database) as conn:  # the app's role
        transaction = conn.transaction() if needs_transaction else None
        if transaction is not None:
            await transaction.start()
        try:
            row_out = await conn.fetchrow(compiled.sql, *compiled.params)
            assert row_out is not None
            body, written, first_key, existing, outside = row_out[0], row_out[1], row_out[2], row_out[3], row_out[4]
            if outside:
                raise ApiError("The change would put rows outside what this application may see", code="42501",
                               status=403, details=f"{outside} row(s) do not match the application's row filter")
            if max_affected is not None and written > int(max_affected):
                raise ApiError("Query result exceeds max-affected preference constraint", code="PGRST124",
                               status=400, details=f"The query affects {written} rows")
            if fmt in ("object", "object_stripped") and written != 1:
                raise ApiError("Cannot coerce the result to a single JSON object", code="PGRST116", status=406,
                               details=f"The result contains {written} rows")
            status = known_status or _upsert_status(existing, written)
            labels.rows = written
            if not audited_in_statement and not rollback:  # no write without its record: both commit, or neither
                record = labels.audit_record(status, keep_values=project.config.server.audit_query_values)
                await audit_in_transaction(conn, record)
        except asyncpg.PostgresError as exc:
            if transaction is not None:
                await _rollback(transaction)
            raise api_error_from_postgres(exc, columns=contract.columns, debug=project.config.server.debug) from None
        except BaseException:
            if transaction is not None:
                await _rollback(transaction)
            raise
        if transaction is None:
            labels.audited = True  # the statement committed, its record with it
        elif rollback:
            await transaction.rollback()
        else:
            await transaction.commit()
            labels.audited = True

    counted = f"*/{written}" if prefs.get("count") == "exact" else "*/*"
    headers = {"Content-Profile": f"v{version}", "Content-Range": counted, **lifecycle_headers(project, version)}
    if method == "PATCH":
        total = written if prefs.get("count") == "exact" else "*"
        headers["Content-Range"] = f"0-{written - 1}/{total}" if written else f"*/{total}"
    if method == "POST" and prefs.get("return") == "headers-only":
        headers.update(_location(contract.name, key, first_key))
    if not representation:
        return _written(HttpResponse(status, headers), prefs, applied)
    page = render.Page(body=body, count=written, offset=0, columns=reader.output_names)
    content = render.encode(page, fmt)
    response = HttpResponse(status, headers, content, CONTENT_TYPES[fmt])
    return _written(response, prefs, applied)


def _known_status(method: str, representation: bool, prefs: Preferences) -> int | None:
    """A successful write's status, as PostgREST answers it, when it does not depend on what the statement
    finds: 201 for inserts, 204 without a body, 200 with one. None for an upsert that merges (PUT with a
    body, POST with ``resolution=merge-duplicates``): see :func:`_upsert_status`."""
    if method == "PUT":
        return None if representation else 204
    if method == "POST":
        return None if prefs.get("resolution") == "merge-duplicates" else 201
    return 200 if representation else 204


def _upsert_status(existing: int | None, written: int) -> int:
    """A merging upsert answers 200 when it only updated rows that were there, else 201."""
    return 200 if existing is not None and written and existing >= written else 201


async def _rollback(transaction: Transaction) -> None:
    """Roll back, unless the connection is already gone (then the server rolled back for us)."""
    with contextlib.suppress(asyncpg.InterfaceError, asyncpg.InternalClientError, OSError):
        await transaction.rollback()


def _written(response: HttpResponse, prefs: Preferences, names: set[str]) -> HttpResponse:
    applied = prefs.applied(names)
    if applied:
        response.headers["Preference-Applied"] = applied
    return response


async def options(request: HttpRequest, runtime: Runtime, contract_name: str, path_version: int | None) -> HttpResponse:
    """``OPTIONS``: which methods this app may use on the contract (``Allow``), from its grant."""
    project = runtime.project
    _, app = await identify(request, runtime)
    version = choose_version(project, app, request.headers.get("accept-profile"), path_version)
    contract = project.versions.resolve(version, contract_name)
    grant = app.grant_for(contract_name)
    if contract is None or not grant:
        raise UnknownContract(f"Could not find the contract '{contract_name}' in API v{version}")
    shape = runtime.schemas[version].shapes[contract.name]
    has_key = contract.name in runtime.schemas[version].keys
    allowed = ["OPTIONS"]
    allowed += ["GET", "HEAD"] if "read" in grant else []
    allowed += ["POST"] if "insert" in grant and shape.insertable else []
    allowed += ["PUT"] if {"insert", "update"} <= grant and shape.insertable and shape.updatable and has_key else []
    allowed += ["PATCH"] if "update" in grant and shape.updatable else []
    allowed += ["DELETE"] if "delete" in grant and shape.deletable else []
    return HttpResponse(200, {"Allow": ",".join(allowed)})
