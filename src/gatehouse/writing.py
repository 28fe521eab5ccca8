"""A write's three steps, each called by ``pipeline.write``: :func:`plan_write` (everything decided before the
database: grant, preferences, body, the one statement, whether it needs a transaction), :func:`execute_write`
(the statement on the app's own pool, the checks after it, its audit record: all commit, or nothing does) and
:func:`write_response` (status and headers as PostgREST answers them).
"""

from __future__ import annotations

import asyncpg
import orjson

from gatehouse import suggestions
from gatehouse.access import (
    allowed_methods,
    choose_version,
    database_refusal,
    granted_contract,
    lifecycle_headers,
    readable_contracts,
    row_filters,
)
from gatehouse.auth.identity import Identity
from gatehouse.contracts.model import ContractVersion
from gatehouse.db import rollback_quietly
from gatehouse.db.statement_groups import Merge
from gatehouse.errors import (
    MaxAffectedExceeded,
    PutFilterNotKey,
    PutKeyMismatch,
    PutWithPaging,
    SingularResultRequired,
    UnfilteredWrite,
)
from gatehouse.http import render
from gatehouse.http.body import parse_payload
from gatehouse.http.exchange import HttpRequest, HttpResponse
from gatehouse.http.labels import RequestLabels
from gatehouse.http.negotiate import CONTENT_TYPES, Preferences, parse_prefer, response_format
from gatehouse.observe.audit import (
    AUDIT_CTE_PARAMS,
    audit_batch_cte,
    audit_cte,
    audit_in_transaction,
    planned_insert_audit,
)
from gatehouse.project import App, Project
from gatehouse.query.grammar import parse_query
from gatehouse.query.sql import CompiledQuery, ReadCompiler
from gatehouse.query.tree import Filter, Payload, ReadQuery
from gatehouse.query.writes import WRITTEN, InsertOptions, WriteCompiler, WriteOutcome
from gatehouse.runtime import Runtime
from gatehouse.write_plans import WriteKey, WritePlan, WriteTemplate

WRITE_ACTIONS = {"POST": ("insert",), "PATCH": ("update",), "DELETE": ("delete",), "PUT": ("insert", "update")}


# -- plan: everything decided before the database ---------------------------------------------------------


async def plan_write(request: HttpRequest, runtime: Runtime, identity: Identity, app: App, contract_name: str,
                      path_version: int | None) -> WritePlan:
    project, headers = runtime.project, request.headers
    key: WriteKey | None = None
    payload: Payload | None = None
    if request.method == "POST" and not app.row_filters:  # a plain insert may have a plan already: see write_plans
        key = (app.name, contract_name, path_version, headers.get("content-profile"), headers.get("accept"),
               headers.get("prefer"), headers.get("content-type"), request.query_string)
        template = runtime.writes.get(key)
        if template is not None:
            payload = await _write_body(request, project)  # 413 / 400
            planned = _from_template(template, request.labels, payload, project)
            if planned is not None:
                return planned
    plan, template = await _plan_in_full(request, runtime, identity, app, contract_name, path_version, payload)
    if key is not None and template is not None:
        runtime.writes.put(key, template)
    return plan


def _from_template(template: WriteTemplate, labels: RequestLabels, payload: Payload,
                   project: Project) -> WritePlan | None:
    """The template's plan with this request's rows and audit record, or None when the body does not fit it
    (other columns, no rows): then the request is planned in full, which also gives its errors."""
    columns = template.columns
    rows = payload.rows
    if not rows or payload.keys != columns:
        return None
    in_order = True
    for row in rows:
        if tuple(row) != columns:
            if set(row) != set(columns):
                return None
            in_order = False
    plan = template.plan
    labels.contract, labels.api_version = plan.contract.name, plan.version
    assert plan.statement is not None and plan.known_status is not None
    params = list(plan.statement.params)
    sent = rows if in_order else [{c: row[c] for c in columns} for row in rows]
    params[template.rows_slot] = rows_json = orjson.dumps(sent).decode()
    record = labels.audit_record(plan.known_status, keep_values=project.config.server.audit_query_values)
    merged = template.merged_sql
    values, part = planned_insert_audit(record, len(rows) if merged is not None else None)
    params[template.audit_slot:template.audit_slot + AUDIT_CTE_PARAMS] = values
    merge = Merge(merged, (rows_json, part), len(rows)) if merged is not None and part is not None else None
    return plan.with_statement(CompiledQuery(plan.statement.sql, params), merge)


async def _plan_in_full(request: HttpRequest, runtime: Runtime, identity: Identity, app: App, contract_name: str,
                        path_version: int | None, payload: Payload | None) -> tuple[WritePlan, WriteTemplate | None]:
    """The plan of one write (``payload``: its body, when already read); with a template for the later requests
    of its shape when it is a plain insert."""
    project, method, headers, labels = runtime.project, request.method, request.headers, request.labels
    version = choose_version(project, app, headers.get("content-profile"), path_version)  # 406
    contract = _write_contract(project, app, version, contract_name, method)  # 404 / 403
    labels.contract, labels.api_version = contract.name, version
    fmt = response_format(headers.get("accept"))  # 406
    prefs = parse_prefer(headers.get("prefer"))  # 400 with handling=strict
    query = parse_query(request.query_string)  # 400
    _refuse_unfiltered(project, method, contract.name, query)  # 400
    if payload is None:
        payload = await _write_body(request, project)  # 413 / 400

    schema = runtime.schemas[version]
    key = schema.keys.get(contract.name, ())
    readable = readable_contracts(project, app, version)
    filters = row_filters(app, identity, readable | {contract.name})  # 403 when the token lacks a claim
    allow = tuple(allowed_methods(schema.shapes[contract.name], bool(key), app.grant_for(contract.name)))
    writer = WriteCompiler(ReadCompiler(schema, readable, project.max_rows(app, contract.name), filters,
                                        profile=suggestions.schema_label(project, app, version)), contract.name, allow)
    limit = prefs.get("max-affected") if prefs.strict and method in ("PATCH", "DELETE") else None
    max_affected = None if limit is None else int(limit)
    # The record goes into the write's own statement when its status is known before it runs; the write then
    # needs a transaction of its own only if a check after the statement may still refuse it.
    known_status = _known_status(method, prefs.get("return") == "representation", prefs)
    audit_slot = None
    if known_status is not None and prefs.get("tx") != "rollback":
        record = labels.audit_record(known_status, keep_values=project.config.server.audit_query_values)
        audit_slot = len(writer.reader.params)
        writer.also.append(audit_cte(record, writer.reader.bind, WRITTEN))
    checked_after = max_affected is not None or fmt in ("object", "object_stripped") or writer.filtered
    statement = _compile_write(method, writer, query, payload, prefs, key)  # 400 / 403 / 405
    plan = WritePlan(method, version, contract, key, fmt, prefs, _applied(method, query, key, prefs, max_affected),
                     statement, list(writer.reader.output_names), max_affected, known_status,
                     audit_slot is not None, needs_transaction=audit_slot is None or checked_after, filters=filters,
                     allow=allow)
    plain = (method == "POST" and statement is not None and audit_slot is not None and query.columns is None
             and not filters and not prefs.get("resolution") and prefs.get("missing") != "default")
    if not plain or audit_slot is None:
        return plan, None
    # Only the count of the written rows in the answer: a group of these may run as one statement.
    counted_only = not plan.needs_transaction and prefs.get("return") in (None, "minimal") and payload.keys
    merged = writer.merged_insert(payload.keys, audit_batch_cte("$2")) if counted_only else None
    return plan, _template(plan, payload, audit_slot, merged)


def _template(plan: WritePlan, payload: Payload, audit_slot: int, merged_sql: str | None) -> WriteTemplate | None:
    """The plan kept for later inserts of its shape, if its rows' parameter is found exactly once."""
    assert plan.statement is not None
    columns = payload.keys
    rows = orjson.dumps([{c: row.get(c) for c in columns} for row in payload.rows]).decode()
    slots = [i for i, param in enumerate(plan.statement.params) if param == rows]
    if len(slots) != 1 or audit_slot + AUDIT_CTE_PARAMS > len(plan.statement.params):
        return None
    return WriteTemplate(plan, columns, slots[0], audit_slot, merged_sql)


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
    """The write's one statement; None when the body holds nothing to write. Only a POST answered with its
    ``Location`` (``return=headers-only``: :func:`write_response`) has the statement return the first row's key."""
    representation = prefs.get("return") == "representation"
    if method == "POST":
        if not payload.rows:
            return None
        conflict = query.on_conflict or key
        options = InsertOptions(representation, prefs.get("resolution") if conflict else None,
                                prefs.get("missing") == "default", conflict)
        located = key if prefs.get("return") == "headers-only" else ()
        return writer.insert(query, payload, options, located)  # 400
    if method == "PUT":
        row = _put_row(query, payload, key, writer.allow)  # 405 / 400
        options = InsertOptions(representation, "merge-duplicates", False, key)
        return writer.insert(query, Payload([row], single=True), options)
    if method == "PATCH":
        return writer.patch(query, payload, representation, missing_default=prefs.get("missing") == "default")
    return writer.delete(query, representation)


def _applied(method: str, query: ReadQuery, key: tuple[str, ...], prefs: Preferences,
             max_affected: int | None) -> set[str]:
    applied = {"return", "count", "tx"}
    if method == "POST":
        if prefs.get("resolution") and (query.on_conflict or key):
            applied.add("resolution")
        if prefs.get("missing"):
            applied.add("missing")
    if method == "PATCH":  # (a column of ?columns the body lacks is set as missing= says; without ?columns,
        applied.add("missing")  # a PATCH sets only the keys it sends, whatever missing= says, as PostgREST's)
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
                              allow=[m for m in allow if m != "PUT"])  # not on this URL: on one naming a row by key
    row = payload.rows[0] if payload.rows else {}
    url_values = {f.field.column: f.value for f in filters if isinstance(f, Filter)}
    if any(str(row.get(k)) != url_values[k] for k in key):
        raise PutKeyMismatch("Payload values do not match URL in primary key column(s)")
    return row


def _known_status(method: str, representation: bool, prefs: Preferences) -> int | None:
    """A successful write's status, as PostgREST answers it, when it does not depend on what the statement
    finds: 201 for inserts, 204 without a body, 200 with one. None for an upsert that merges (PUT with a
    body, POST with ``resolution=merge-duplicates``): see ``WritePlan.status``."""
    if method == "PUT":
        return None if representation else 204
    if method == "POST":
        return None if prefs.get("resolution") == "merge-duplicates" else 201
    return 200 if representation else 204


# -- execute: one statement, the checks after it, its audit record ----------------------------------------


async def execute_write(runtime: Runtime, app: App, plan: WritePlan, labels: RequestLabels) -> WriteOutcome:
    """Run the statement on the app's own pool. In a transaction of its own when a check after it may still
    refuse the write, or when its audit record must follow it: the write and its record commit, or neither."""
    assert runtime.pools is not None and plan.statement is not None
    server = runtime.project.config.server
    if plan.method == "POST" and not plan.needs_transaction:  # one statement: may commit with inserts waiting too
        try:
            row = await runtime.pools.write_row(app.name, plan.contract.database, plan.statement.sql,
                                                plan.statement.params, plan.merge)
        except asyncpg.PostgresError as exc:
            raise database_refusal(exc, runtime.project, plan.contract.columns, plan.filters, plan.allow) from None
        outcome = WriteOutcome.from_row(row)
        _check_written(plan, outcome)  # (nothing it checks applies to such a plan: see ``checked_after``)
        labels.rows, labels.audited = outcome.written, True  # its record is in the statement: both committed
        return outcome
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
                await rollback_quietly(transaction)
            raise database_refusal(exc, runtime.project, plan.contract.columns, plan.filters, plan.allow) from None
        except BaseException:
            if transaction is not None:
                await rollback_quietly(transaction)
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


# -- respond ----------------------------------------------------------------------------------------------------


def write_response(project: Project, plan: WritePlan, outcome: WriteOutcome | None) -> HttpResponse:
    """The answer, as PostgREST gives it; ``outcome`` None when there was nothing to write (no statement ran)."""
    if outcome is None:
        if plan.fmt in ("object", "object_stripped"):  # no row is not one row, whatever return= says
            raise SingularResultRequired("Cannot coerce the result to a single JSON object",
                                         details="The result contains 0 rows")
        status = 201 if plan.method == "POST" else 200 if plan.representation else 204
        nothing = HttpResponse(status, {"Content-Range": "*/*"})
        if plan.representation:  # the representation of no rows, as PostgREST answers it
            page = render.Page(body="[]", count=0, offset=0, columns=plan.output_names)
            nothing.body, nothing.media_type = render.encode(page, plan.fmt), CONTENT_TYPES[plan.fmt]
        return _written(nothing, plan.prefs, {"return", "count", "tx"})
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
