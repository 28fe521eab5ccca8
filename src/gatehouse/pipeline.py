"""One request, top to bottom (DESIGN.md §4).

Each step is a call into its own package and no step reaches back. The order matters: authentication
comes before anything touches a database, and a contract the app may not read is answered exactly like
one that does not exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import dataclass

import asyncpg
import orjson
from asyncpg.transaction import Transaction

from gatehouse.access import (
    allowed_methods,
    choose_version,
    granted_contract,
    lifecycle_headers,
    readable_contracts,
    row_filters,
)
from gatehouse.auth.failures import credential_id
from gatehouse.auth.identity import Identity, authenticate
from gatehouse.contracts.model import ContractVersion
from gatehouse.db import Connection
from gatehouse.db.sqlstate import api_error_from_postgres
from gatehouse.errors import (
    ApiError,
    InvalidBody,
    MaxAffectedExceeded,
    PutFilterNotKey,
    PutKeyMismatch,
    PutWithPaging,
    SingularResultRequired,
    Unauthenticated,
    UnfilteredWrite,
    UnknownContract,
)
from gatehouse.http import render
from gatehouse.http.body import Payload, parse_payload
from gatehouse.http.exchange import HttpRequest, HttpResponse
from gatehouse.http.labels import RequestLabels
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
from gatehouse.project import App, Project
from gatehouse.query.grammar import parse_pairs, parse_query, query_pairs
from gatehouse.query.plans import ReadPlan, shape_of
from gatehouse.query.row_filters import claim_refused_by_database
from gatehouse.query.sql import CompiledQuery, ReadCompiler
from gatehouse.query.tree import Condition, Filter, Level, ReadQuery
from gatehouse.query.writes import WRITTEN, InsertOptions, WriteCompiler, WriteOutcome
from gatehouse.runtime import Runtime


async def identify(request: HttpRequest, runtime: Runtime) -> tuple[Identity, App]:
    """Authenticate (401, or 429 for a caller or credential that keeps failing; a valid credential always
    passes; no database work either way) and record who calls."""
    assert runtime.keys is not None
    apps = runtime.project.apps
    try:
        identity = await authenticate(request.headers, runtime.keys, runtime.tokens,
                                      lambda name: apps[name].config.require_user)
    except Unauthenticated as refused:
        throttled = runtime.auth_failures.failed(request.client, credential_id(request.headers))
        raise (throttled or refused) from None
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

    try:  # the app's role; a pooled connection found dead is replaced and the read sent again, once
        row = await runtime.pools.read_row(app.name, contract.database, sql, params)
        assert row is not None  # an aggregate always returns one row
        total: int | None = row[2] if count_mode == "exact" else None
        if count_mode in ("planned", "estimated") and query is not None:
            max_rows = project.max_rows(app, contract.name)
            rows = ReadCompiler(runtime.schemas[version], route.readable, max_rows, filters).filtered(
                contract.name, query)
            async with runtime.pools.connection(app.name, contract.database) as conn:
                total = await _estimated_count(conn, rows, exact_up_to=max_rows if count_mode == "estimated" else 0)
    except asyncpg.PostgresError as exc:
        raise _database_error(exc, project, contract.columns, filters) from None

    labels.rows = row[1]
    page = render.Page(row[0], row[1], offset, total, columns)
    return render.read_response(page, route.fmt, dict(route.headers))


WRITE_ACTIONS = {"POST": ("insert",), "PATCH": ("update",), "DELETE": ("delete",), "PUT": ("insert", "update")}


@dataclass(slots=True, eq=False)
class WritePlan:
    """Everything a write decides before it touches the database."""

    method: str
    version: int
    contract: ContractVersion
    key: tuple[str, ...]
    fmt: Format
    prefs: Preferences
    applied: set[str]
    """The preferences the write honours, named in ``Preference-Applied`` when they were sent."""
    statement: CompiledQuery | None
    """None when the body holds nothing to write (an empty array, an empty PATCH object)."""
    output_names: list[str]
    """The representation's columns, in order (for CSV)."""
    max_affected: int | None
    known_status: int | None
    """The status when it does not depend on what the statement finds (:func:`_known_status`)."""
    audited_in_statement: bool
    """The audit record is a CTE of the statement itself, so both commit together without a transaction."""
    needs_transaction: bool
    filters: dict[str, tuple[Condition, ...]]
    """The app's row filters, claims bound (a database error about a claim's value is the token's: 403)."""
    allow: tuple[str, ...]
    """The app's methods on the contract: the ``Allow`` of a 405."""

    @property
    def representation(self) -> bool:
        return self.prefs.get("return") == "representation"

    @property
    def rollback(self) -> bool:
        return self.prefs.get("tx") == "rollback"

    def status(self, outcome: WriteOutcome) -> int:
        return self.known_status or _upsert_status(outcome.existing, outcome.written)


async def write(request: HttpRequest, runtime: Runtime, contract_name: str, path_version: int | None) -> HttpResponse:
    identity, app = await identify(request, runtime)  # 401
    plan = await _plan_write(request, runtime, identity, app, contract_name, path_version)  # 406/404/403/413/400/405
    if plan.statement is None:  # nothing to write: answered without the database
        nothing = HttpResponse(201 if plan.method == "POST" else 204, {"Content-Range": "*/*"})
        return _written(nothing, plan.prefs, {"return", "count", "tx"})
    outcome = await _execute_write(runtime, app, plan, request.labels)  # 403/409/400/406: nothing kept
    return _write_response(runtime.project, plan, outcome)


# -- plan: everything decided before the database ---------------------------------------------------------


async def _plan_write(request: HttpRequest, runtime: Runtime, identity: Identity, app: App, contract_name: str,
                      path_version: int | None) -> WritePlan:
    project, method, headers, labels = runtime.project, request.method, request.headers, request.labels
    version = choose_version(project, app, headers.get("content-profile"), path_version)  # 406
    contract = _write_contract(project, app, version, contract_name, method)  # 404 / 403
    labels.contract, labels.api_version = contract.name, version
    fmt = response_format(headers.get("accept"))  # 406
    prefs = parse_prefer(headers.get("prefer"))  # 400 with handling=strict
    query = parse_query(request.query_string)  # 400
    _refuse_unfiltered(project, method, contract.name, query)  # 400
    payload = await _write_body(request, project)  # 413 / 400

    schema = runtime.schemas[version]
    key = schema.keys.get(contract.name, ())
    readable = readable_contracts(project, app, version)
    filters = row_filters(app, identity, readable | {contract.name})  # 403 when the token lacks a claim
    allow = tuple(allowed_methods(schema.shapes[contract.name], bool(key), app.grant_for(contract.name)))
    writer = WriteCompiler(ReadCompiler(schema, readable, project.max_rows(app, contract.name), filters),
                           contract.name, allow)
    limit = prefs.get("max-affected") if prefs.strict and method in ("PATCH", "DELETE") else None
    max_affected = None if limit is None else int(limit)
    # The record goes into the write's own statement when its status is known before it runs; the write then
    # needs a transaction of its own only if a check after the statement may still refuse it.
    known_status = _known_status(method, prefs.get("return") == "representation", prefs)
    audited_in_statement = False
    if known_status is not None and prefs.get("tx") != "rollback":
        record = labels.audit_record(known_status, keep_values=project.config.server.audit_query_values)
        writer.also.append(audit_cte(record, writer.reader.bind, WRITTEN))
        audited_in_statement = True
    checked_after = max_affected is not None or fmt in ("object", "object_stripped") or writer.filtered
    statement = _compile_write(method, writer, query, payload, prefs, key)  # 400 / 403 / 405
    return WritePlan(method, version, contract, key, fmt, prefs, _applied(method, query, key, prefs, max_affected),
                     statement, list(writer.reader.output_names), max_affected, known_status, audited_in_statement,
                     needs_transaction=not audited_in_statement or checked_after, filters=filters, allow=allow)


def _write_contract(project: Project, app: App, version: int, name: str, method: str) -> ContractVersion:
    """The contract, when the app's grant allows every action the method needs (PUT: insert and update)."""
    first, *more = WRITE_ACTIONS[method]
    contract = granted_contract(project, app, version, name, first)  # 404 / 403
    for action in more:
        granted_contract(project, app, version, name, action)
    return contract


def _refuse_unfiltered(project: Project, method: str, contract: str, query: ReadQuery) -> None:
    settings = project.config.contracts.get(contract)
    if method in ("PATCH", "DELETE") and not query.top.where and not (settings and settings.allow_unfiltered_writes):
        raise UnfilteredWrite(f"{method} without a filter would change every row of '{contract}'",
                              hint="Add a filter (e.g. ?id=eq.5), or set allow_unfiltered_writes for the contract in "
                                   "gatehouse.toml.")


async def _write_body(request: HttpRequest, project: Project) -> Payload:
    if request.method == "DELETE":
        return Payload([], single=True)
    raw = await request.body(project.config.server.max_body_bytes)  # 413
    return parse_payload(raw, request.headers.get("content-type"), project.config.server)  # 400


def _compile_write(method: str, writer: WriteCompiler, query: ReadQuery, payload: Payload, prefs: Preferences,
                   key: tuple[str, ...]) -> CompiledQuery | None:
    """The write's one statement; None when the body holds nothing to write."""
    representation = prefs.get("return") == "representation"
    if method == "POST":
        if not payload.rows:
            return None
        conflict = query.on_conflict or key
        options = InsertOptions(representation, prefs.get("resolution") if conflict else None,
                                prefs.get("missing") == "default", conflict)
        return writer.insert(query, payload, options, key)  # 400
    if method == "PUT":
        row = _put_row(query, payload, key, writer.allow)  # 405 / 400
        options = InsertOptions(representation, "merge-duplicates", False, key)
        return writer.insert(query, Payload([row], single=True), options, key)
    if method == "PATCH":
        if payload.rows and (not payload.single or len(payload.rows) != 1):
            raise InvalidBody("PATCH takes one JSON object")
        row = payload.rows[0] if payload.rows else {}
        return writer.update(query, row, representation, key) if row else None
    return writer.delete(query, representation, key)


def _applied(method: str, query: ReadQuery, key: tuple[str, ...], prefs: Preferences,
             max_affected: int | None) -> set[str]:
    applied = {"return", "count", "tx"}
    if method == "POST":
        if prefs.get("resolution") and (query.on_conflict or key):
            applied.add("resolution")
        if prefs.get("missing"):
            applied.add("missing")
    if max_affected is not None:
        applied |= {"handling", "max-affected"}
    return applied


def _put_row(query: ReadQuery, payload: Payload, key: tuple[str, ...], allow: tuple[str, ...]) -> dict[str, object]:
    """PUT replaces one row named by its full key: check the URL and the body agree on it."""
    if query.top.limit is not None or query.top.offset:
        raise PutWithPaging("limit/offset querystring parameters are not allowed for PUT")
    filters = query.top.where
    names = {f.field.column for f in filters if isinstance(f, Filter)}
    if (not key or len(filters) != len(key) or names != set(key)
            or any(not isinstance(f, Filter) or f.operator != "eq" or f.negated or f.field.json_path
                   for f in filters)):
        raise PutFilterNotKey("Filters must include all and only primary key columns with 'eq' operators",
                              allow=[m for m in allow if m != "PUT"],  # not on this URL: on one naming a row by key
                              hint=f"Name the row by its key: {', '.join(f'{k}=eq.<value>' for k in key) or 'no key'}")
    row = payload.rows[0] if payload.rows else {}
    url_values = {f.field.column: f.value for f in filters if isinstance(f, Filter)}
    if any(str(row.get(k)) != url_values[k] for k in key):
        raise PutKeyMismatch("Payload values do not match URL in primary key column(s)")
    return row


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


# -- execute: one statement, the checks after it, its audit record ----------------------------------------


async def _execute_write(runtime: Runtime, app: App, plan: WritePlan, labels: RequestLabels) -> WriteOutcome:
    """Run the statement on the app's own pool. In a transaction of its own when a check after it may still
    refuse the write, or when its audit record must follow it: the write and its record commit, or neither."""
    assert runtime.pools is not None and plan.statement is not None
    server = runtime.project.config.server
    async with runtime.pools.connection(app.name, plan.contract.database) as conn:  # the app's role
        transaction = conn.transaction() if plan.needs_transaction else None
        if transaction is not None:
            await transaction.start()
        try:
            outcome = WriteOutcome.from_row(await conn.fetchrow(plan.statement.sql, *plan.statement.params))
            _check_written(plan, outcome)  # 403 / 400 / 406
            labels.rows = outcome.written
            if not plan.audited_in_statement and not plan.rollback:  # no write without its record: both commit
                record = labels.audit_record(plan.status(outcome), keep_values=server.audit_query_values)
                await audit_in_transaction(conn, record)  # or neither
        except asyncpg.PostgresError as exc:
            if transaction is not None:
                await _rollback(transaction)
            raise _database_error(exc, runtime.project, plan.contract.columns, plan.filters, plan.allow) from None
        except BaseException:
            if transaction is not None:
                await _rollback(transaction)
            raise
        if transaction is None:
            labels.audited = True  # the statement committed, its record with it
        elif plan.rollback:
            await transaction.rollback()
        else:
            await transaction.commit()
            labels.audited = True
    return outcome


def _check_written(plan: WritePlan, outcome: WriteOutcome) -> None:
    """The checks after the statement. Any of them can refuse only inside the write's transaction
    (``needs_transaction``), which the caller then rolls back: a refused write keeps nothing."""
    outcome.check_row_filter(plan.contract.name)  # 403: the write reached outside the app's row filter
    if plan.max_affected is not None and outcome.written > plan.max_affected:
        raise MaxAffectedExceeded("Query result exceeds max-affected preference constraint",
                                  details=f"The query affects {outcome.written} rows")
    if plan.fmt in ("object", "object_stripped") and outcome.written != 1:
        raise SingularResultRequired("Cannot coerce the result to a single JSON object",
                                     details=f"The result contains {outcome.written} rows")


def _database_error(exc: asyncpg.PostgresError, project: Project, columns: Collection[str],
                    filters: dict[str, tuple[Condition, ...]], allow: tuple[str, ...] = ()) -> ApiError:
    """What the caller is told of an error PostgreSQL raised: 403 when the value it refused came from the
    caller's token (a row filter's claim), else ``db/sqlstate.py``'s mapping, with ``Allow`` on a 405."""
    refused = claim_refused_by_database(str(exc.sqlstate or ""), str(getattr(exc, "message", "") or ""), filters)
    if refused is not None:
        return refused
    error = api_error_from_postgres(exc, columns=columns, debug=project.config.server.debug)
    if error.status == 405 and allow:
        error.headers.setdefault("Allow", ", ".join(allow))
    return error


async def _rollback(transaction: Transaction) -> None:
    """Roll back, unless the connection is already gone (then the server rolled back for us)."""
    with contextlib.suppress(asyncpg.InterfaceError, asyncpg.InternalClientError, OSError):
        await transaction.rollback()


# -- respond ----------------------------------------------------------------------------------------------------


def _write_response(project: Project, plan: WritePlan, outcome: WriteOutcome) -> HttpResponse:
    written, prefs, version = outcome.written, plan.prefs, plan.version
    counted = f"*/{written}" if prefs.get("count") == "exact" else "*/*"
    headers = {"Content-Profile": f"v{version}", "Content-Range": counted, **lifecycle_headers(project, version)}
    if plan.method == "PATCH":
        total = written if prefs.get("count") == "exact" else "*"
        headers["Content-Range"] = f"0-{written - 1}/{total}" if written else f"*/{total}"
    if plan.method == "POST" and prefs.get("return") == "headers-only":
        headers.update(_location(plan.contract.name, plan.key, outcome.first_key))
    status = plan.status(outcome)
    if not plan.representation or outcome.representation is None:
        return _written(HttpResponse(status, headers), prefs, plan.applied)
    page = render.Page(body=outcome.representation, count=written, offset=0, columns=plan.output_names)
    response = HttpResponse(status, headers, render.encode(page, plan.fmt), CONTENT_TYPES[plan.fmt])
    return _written(response, prefs, plan.applied)


def _location(contract: str, key: tuple[str, ...], values: str | None) -> dict[str, str]:
    if not key or not values:
        return {}
    parts = orjson.loads(values)
    query = "&".join(f"{k}={'is.null' if v is None else 'eq.' + str(v)}" for k, v in zip(key, parts, strict=True))
    return {"Location": f"/{contract}?{query}"}


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
    schema = runtime.schemas[version]
    allowed = allowed_methods(schema.shapes[contract.name], contract.name in schema.keys, grant)
    return HttpResponse(200, {"Allow": ",".join(allowed)})
