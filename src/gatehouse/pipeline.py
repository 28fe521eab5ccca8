"""One request, top to bottom (DESIGN.md §4).

Each step is a call into its own package and no step reaches back. The order matters: authentication
comes before anything touches a database, and a contract the app may not read is answered exactly like
one that does not exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response

from gatehouse.auth.identity import Identity, authenticate
from gatehouse.contracts.model import ContractVersion
from gatehouse.db import Connection
from gatehouse.db.sqlstate import api_error_from_postgres
from gatehouse.errors import ApiError, UnknownContract, UnknownProfile
from gatehouse.http import render
from gatehouse.http.negotiate import parse_prefer, range_header, response_format
from gatehouse.project import App, Project
from gatehouse.query.grammar import parse_query
from gatehouse.query.sql import CompiledQuery, ReadCompiler
from gatehouse.query.tree import Level
from gatehouse.runtime import Runtime

PROFILE = re.compile(r"^v([1-9][0-9]{0,3})$")


@dataclass(slots=True)
class RequestLabels:
    """What the request turned out to be, for metrics and the request log (filled as steps succeed)."""

    app: str = ""
    key_id: str = ""
    contract: str = ""
    version: str = ""


def labels_of(request: Request) -> RequestLabels:
    labels: RequestLabels | None = getattr(request.state, "gatehouse", None)
    if labels is None:
        labels = RequestLabels()
        request.state.gatehouse = labels
    return labels


def identify(request: Request, runtime: Runtime) -> tuple[Identity, App]:
    """Authenticate (401 before any database work) and record who is calling."""
    assert runtime.keys is not None
    identity = authenticate(request.headers, runtime.keys)
    app = runtime.project.apps[identity.app]
    labels = labels_of(request)
    labels.app, labels.key_id = app.name, identity.key_id
    return identity, app


def choose_version(project: Project, app: App, profile: str | None, path_version: int | None) -> int:
    """API version from the path prefix, else the profile header; ``public`` means the app's default."""
    if path_version is None and (profile is None or profile.strip() in ("", "public")):
        return app.config.version or project.default_version
    requested = path_version
    if requested is None:
        match = PROFILE.match((profile or "").strip())
        requested = int(match.group(1)) if match else None
    if requested is None or requested not in project.versions.served:
        shown = profile if path_version is None else f"v{path_version}"
        exposed = ", ".join(["public", *(f"v{n}" for n in project.versions.numbers)])
        raise UnknownProfile(f"Invalid schema: {shown}", hint=f"Only the following schemas are exposed: {exposed}")
    return requested


def readable_contracts(project: Project, app: App, version: int) -> frozenset[str]:
    return frozenset(name for name in project.versions.served.get(version, {}) if "read" in app.grant_for(name))


def granted_contract(project: Project, app: App, version: int, name: str, action: str) -> ContractVersion:
    """The contract, if the app may ``action`` it in this version; otherwise it does not exist for this app."""
    contract = project.versions.resolve(version, name)
    grant = app.grant_for(name)
    if contract is None or not grant:
        raise UnknownContract(f"Could not find the contract '{name}' in API v{version}",
                              hint="Check the name and the API version (Accept-Profile or /vN/ prefix).")
    if action not in grant:
        raise ApiError(f"The application may not {action} '{name}'", code="42501", status=403,
                       hint=f"Its grant on '{name}' allows: {', '.join(sorted(grant))}.")
    return contract


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


async def read(request: Request, runtime: Runtime, contract_name: str, path_version: int | None) -> Response:
    assert runtime.pools is not None
    project = runtime.project
    labels = labels_of(request)

    _, app = identify(request, runtime)  # 401
    version = choose_version(project, app, request.headers.get("accept-profile"), path_version)  # 406
    contract = granted_contract(project, app, version, contract_name, "read")  # 404 / 403
    labels.contract, labels.version = contract.name, f"v{version}"
    fmt = response_format(request.headers.get("accept"))  # 406
    prefs = parse_prefer(request.headers)

    query = parse_query(request.scope["query_string"].decode("latin-1"))  # 400
    if request.method == "GET":
        _intersect_range(query.top, range_header(request.headers.get("range")))  # 416
    max_rows = app.config.quota.max_rows or project.config.server.max_rows
    readable = readable_contracts(project, app, version)
    compiler = ReadCompiler(runtime.schemas[version], readable, max_rows)
    count_mode = prefs.get("count")
    compiled = compiler.read(contract.name, query, exact_count=count_mode == "exact")  # 400

    async with runtime.pools.connection(app.name, contract.database) as conn:  # the app's role
        try:
            row = await conn.fetchrow(compiled.sql, *compiled.params)
            assert row is not None  # an aggregate always returns one row
            total: int | None = row[2] if count_mode == "exact" else None
            if count_mode in ("planned", "estimated"):
                rows = ReadCompiler(runtime.schemas[version], readable, max_rows).filtered(contract.name, query)
                total = await _estimated_count(conn, rows, exact_up_to=max_rows if count_mode == "estimated" else 0)
        except asyncpg.PostgresError as exc:
            raise api_error_from_postgres(exc) from None

    page = render.Page(body=row[0], count=row[1], offset=query.top.offset, total=total,
                       columns=compiler.output_names)
    headers = {"Content-Profile": f"v{version}"}
    applied = prefs.applied({"count"})
    if applied:
        headers["Preference-Applied"] = applied
    return render.read_response(page, fmt, headers, head=request.method == "HEAD")
