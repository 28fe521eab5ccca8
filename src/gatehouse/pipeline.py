"""One request, top to bottom (DESIGN.md §4).

Each step is a call into its own package and no step reaches back. The order matters: authentication
comes before anything touches a database, and a contract the app may not read is answered exactly like
one that does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from gatehouse import composed_read, suggestions, writing
from gatehouse.access import allowed_methods, choose_version, database_refusal, row_filters
from gatehouse.auth.failures import credential_id
from gatehouse.auth.identity import Identity, authenticate
from gatehouse.cache.responses import Fill
from gatehouse.db import consistency
from gatehouse.db.replicas import AGE_HEADER, PRIMARY_SOURCE, SOURCE_HEADER
from gatehouse.errors import NoFreshReplica, Unauthenticated
from gatehouse.http import render
from gatehouse.http.exchange import HttpRequest, HttpResponse
from gatehouse.observe.audit import AuditUnavailable
from gatehouse.observe.redact import redact_query
from gatehouse.project import App
from gatehouse.query import compose
from gatehouse.query.grammar import parse_pairs, query_pairs
from gatehouse.query.plans import ReadPlan, shape_of
from gatehouse.query.sql import CompiledQuery, ReadCompiler
from gatehouse.query.tree import Condition, ReadQuery
from gatehouse.read_steps import estimated_count, intersect_range
from gatehouse.routes import ReadRoute, ReplicaPolicy, read_route
from gatehouse.runtime import Runtime

WRITE_ACTIONS = writing.WRITE_ACTIONS


async def identify(request: HttpRequest, runtime: Runtime, contract: str | None = None,
                   actions: tuple[str, ...] = ()) -> tuple[Identity, App]:
    """Authenticate (401, or 429 for a caller or credential that keeps failing; a valid credential always
    passes; no database work either way), record who calls, and admit the request under the app's rate limits
    (its own, and its grant's on ``contract`` for these ``actions``) and its requests in flight (429)."""
    assert runtime.keys is not None
    apps = runtime.project.apps
    try:
        identity = await authenticate(request.headers, runtime.keys, runtime.tokens,
                                      lambda name: _require_user(apps, name))
    except Unauthenticated as refused:
        throttled = runtime.auth_failures.failed(request.client, credential_id(request.headers))
        raise (throttled or refused) from None
    app = apps.get(identity.app)
    if app is None:  # removed from the project by a reload a moment ago: its keys are being forgotten
        raise Unauthenticated("Invalid API key or token", hint="The application no longer exists.")
    labels = request.labels
    labels.app, labels.key_id, labels.subject = app.name, identity.key_id, identity.subject
    limit_headers = runtime.limiter.check(app, contract, actions)  # 429
    if not isinstance(limit_headers, dict):  # shared limits and no token at hand: one Redis call, shared
        limit_headers = await limit_headers  # 429
    labels.limit_headers = limit_headers
    labels.release = await runtime.in_flight.enter(app)  # 429 after a short wait
    release = runtime.fair.enter(app)  # a work slot: at once while one is free or the app is under its share
    labels.release_work = release if release is not None else await runtime.fair.wait(app)  # by turns
    return identity, app


def _require_user(apps: dict[str, App], name: str) -> bool:
    """Whether the app needs a user in its token; an app a reload removed a moment ago (its keys still being
    forgotten) needs none here: it is refused as unknown just after (401), not with a 500."""
    app = apps.get(name)
    return app is not None and app.config.require_user


def _compile_read(runtime: Runtime, app: App, route: ReadRoute, pairs: list[tuple[str, str]],
                  filters: dict[str, tuple[Condition, ...]]) -> tuple[CompiledQuery, ReadQuery, tuple[str, ...]]:
    query = parse_pairs(pairs)  # 400
    intersect_range(query.top, route.requested)  # 416
    name = route.contract.name
    compiler = ReadCompiler(runtime.schemas[route.version], route.readable, runtime.project.max_rows(app, name),
                            filters, profile=suggestions.schema_label(runtime.project, app, route.version))
    compiled = compiler.read(name, query, exact_count=route.count_mode == "exact")  # 400
    return compiled, query, tuple(compiler.output_names)


async def read(request: HttpRequest, runtime: Runtime, contract_name: str, path_version: int | None) -> HttpResponse:
    assert runtime.pools is not None
    project, labels = runtime.project, request.labels

    identity, app = await identify(request, runtime, contract_name, ("read",))  # 401 / 429
    if runtime.audit is not None and not runtime.audit.accepting():
        raise AuditUnavailable()  # 503: no read goes unrecorded
    route = read_route(request, project, runtime.routes, app, contract_name, path_version)  # 406/404/403/416
    contract, version, count_mode = route.contract, route.version, route.count_mode
    labels.contract, labels.api_version = contract.name, version
    filters = row_filters(app, identity, route.readable) if app.row_filters else {}  # 403 when a claim is missing
    filter_key = tuple(filters.items()) if filters else ()

    # Embeds into contracts of other databases: composed, one query per database and level (query/compose.py).
    if compose.crosses_databases(runtime.schemas[version], contract.name, request.query_string):
        return await composed_read.read(request, runtime, app, route, filters)  # 400 / 416

    # A cached contract's answer, while the data versions of its tables are unchanged: no database work.
    cached = runtime.cache.consult(request, app, route, filter_key) if runtime.cache.active else None
    if isinstance(cached, Fill) and cached.current is not None:  # not in memory: maybe in the Redis tier
        cached = await cached.from_shared(request) or cached
    if isinstance(cached, HttpResponse):  # 200/206 from the cache, or 304 for the client's own copy
        labels.cached = True
        return cached

    # The SQL of this query's shape is compiled once (query/plans.py); each request puts its values in.
    shape = shape_of(request.query_string) if count_mode not in ("planned", "estimated") else None
    key = (route, filter_key, shape.key) if shape is not None else None
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
    if cached is not None:  # the data versions of the contract's tables, read with its rows
        sql, params = cached.sql(sql, params)

    try:  # the app's role; a pooled connection found dead is replaced and the read sent again, once
        # A replica within the app's staleness bound that has the caller's last write, else the primary.
        replica = await _read_replica(request, runtime, app, contract.database, route.replicas, sql, params) \
            if route.replicas is not None and cached is None else None  # (a cache fill reads the primary's versions)
        row = replica[0] if replica is not None else \
            await runtime.pools.read_row(app.name, contract.database, sql, params)
        assert row is not None  # an aggregate always returns one row
        total: int | None = row[2] if count_mode == "exact" else None
        if count_mode in ("planned", "estimated") and query is not None:
            max_rows = project.max_rows(app, contract.name)
            rows = ReadCompiler(runtime.schemas[version], route.readable, max_rows, filters,
                                profile=suggestions.schema_label(project, app, version)).filtered(contract.name, query)
            async with runtime.pools.connection(app.name, contract.database) as conn:
                total = await estimated_count(conn, rows, exact_up_to=max_rows if count_mode == "estimated" else 0)
    except asyncpg.PostgresError as exc:
        raise database_refusal(exc, project, contract.columns, filters) from None

    labels.rows = row[1]
    page = render.Page(row[0], row[1], offset, total, columns)
    response = render.read_response(page, route.fmt, dict(route.headers))
    response.headers["Content-Location"] = render.content_location(request.path, request.query_string)
    if runtime.replicas.has(contract.database):  # how old the data may be: a replica's bound, or the primary's 0
        labels.replica = replica is not None
        response.headers.update(replica[1] if replica is not None else PRIMARY_SOURCE)
    if cached is None:
        return response
    if labels.redacted_query is None:  # (a plan made for this request alone does not carry it)
        labels.redacted_query = redact_query(request.query_string)
    return cached.keep(response, row["_gh_versions"], row[1], labels.redacted_query)


async def _read_replica(request: HttpRequest, runtime: Runtime, app: App, database: str, policy: ReplicaPolicy,
                        sql: str, params: Sequence[object]) -> tuple[asyncpg.Record, dict[str, str]] | None:
    """The read's row from a replica the policy allows, with the headers saying which and how old its data may
    be; None when the primary must answer (none fresh enough, none with the caller's last write, or the replica
    failed: it is then left out for a moment). 503 instead for an app kept off the primary."""
    replicas = runtime.replicas
    after = consistency.after_write(request.headers.get(consistency.REQUEST_HEADER), database)  # 400
    own = replicas.own_write(app.name, database, policy.max_staleness_s)  # (callers that do not echo the token)
    if own is not None and (after is None or own > after):
        after = own
    chosen = replicas.choose(app, database, policy.max_staleness_s)
    if chosen is not None:
        replica, age = chosen
        row = await replicas.read_row(replica, app, sql, params, after)
        if row is not None:
            return row, {SOURCE_HEADER: replica.name, AGE_HEADER: f"{age:.3f}"}
    if policy.only:
        raise NoFreshReplica("No replica can answer this read now",
                             details="none is reachable, within the app's max_staleness and caught up with the "
                                     "caller's last write", hint="Retry shortly.", headers={"Retry-After": "1"})
    return None


async def write(request: HttpRequest, runtime: Runtime, contract_name: str, path_version: int | None) -> HttpResponse:
    identity, app = await identify(request, runtime, contract_name, WRITE_ACTIONS[request.method])  # 401 / 429
    plan = await writing.plan_write(request, runtime, identity, app, contract_name, path_version)  # 406/404/403/413/400
    outcome = None
    if plan.statement is not None:  # else nothing to write: answered without the database
        try:
            outcome = await writing.execute_write(runtime, app, plan, request.labels)  # 403/409/400/406: nothing kept
        finally:  # this instance's cached answers from its tables are not served again (read your own writes)
            runtime.cache.wrote(plan.version, plan.contract.name, plan.contract.database)
    response = writing.write_response(runtime.project, plan, outcome)
    database = plan.contract.database
    if outcome is not None and outcome.xid is not None and not plan.rollback and runtime.replicas.has(database):
        runtime.replicas.wrote(app.name, database, outcome.xid)  # read your writes, with or without the token
        response.headers[consistency.HEADER] = consistency.token(database, outcome.xid)
    return response


async def options(request: HttpRequest, runtime: Runtime, contract_name: str, path_version: int | None) -> HttpResponse:
    """``OPTIONS``: which methods this app may use on the contract (``Allow``), from its grant."""
    project = runtime.project
    _, app = await identify(request, runtime)
    version = choose_version(project, app, request.headers.get("accept-profile"), path_version)
    contract = project.versions.resolve(version, contract_name)
    grant = app.grant_for(contract_name)
    if contract is None or not grant:
        raise suggestions.unknown_contract(project, app, version, contract_name)
    schema = runtime.schemas[version]
    allowed = allowed_methods(schema.shapes[contract.name], contract.name in schema.keys, grant)
    return HttpResponse(200, {"Allow": ",".join(allowed)})
