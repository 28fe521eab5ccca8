"""One request, top to bottom (DESIGN.md §4).

Each step is a call into its own package and no step reaches back. The order matters: authentication
comes before anything touches a database, and a contract the app may not read is answered exactly like
one that does not exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from gatehouse.auth.identity import authenticate
from gatehouse.contracts.model import ContractVersion
from gatehouse.contracts.versions import schema_name
from gatehouse.db.sqlstate import api_error_from_postgres
from gatehouse.errors import UnknownContract, UnknownProfile
from gatehouse.project import App, Project
from gatehouse.query.grammar import parse_read
from gatehouse.query.sql import compile_read
from gatehouse.runtime import Runtime

PROFILE = re.compile(r"^v([1-9][0-9]{0,3})$")
JSON = "application/json; charset=utf-8"


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


def readable_contract(project: Project, app: App, version: int, name: str) -> ContractVersion:
    contract = project.versions.resolve(version, name)
    if contract is None or "read" not in app.grant_for(name):
        raise UnknownContract(f"Could not find the contract '{name}' in API v{version}",
                              hint="Check the name and the API version (Accept-Profile or /vN/ prefix).")
    return contract


async def read(request: Request, runtime: Runtime, contract_name: str, path_version: int | None) -> Response:
    assert runtime.keys is not None and runtime.pools is not None
    project = runtime.project
    labels = labels_of(request)

    identity = authenticate(request.headers, runtime.keys)  # 401, no database work
    app = project.apps[identity.app]
    labels.app, labels.key_id = app.name, identity.key_id

    version = choose_version(project, app, request.headers.get("accept-profile"), path_version)  # 406
    contract = readable_contract(project, app, version, contract_name)  # 404
    labels.contract, labels.version = contract.name, f"v{version}"

    query = parse_read(request.scope["query_string"].decode("latin-1"))  # 400
    shape = runtime.catalog[(schema_name(version), contract.name)]
    max_rows = app.config.quota.max_rows or project.config.server.max_rows
    compiled = compile_read(query, shape, contract.name, max_rows)  # 400 on unknown columns

    async with runtime.pools.connection(app.name, contract.database) as conn:  # the app's role
        try:
            row = await conn.fetchrow(compiled.sql, *compiled.params)
        except asyncpg.PostgresError as exc:
            raise api_error_from_postgres(exc) from None
    assert row is not None  # an aggregate always returns one row
    body, count = row[0], row[1]

    first = query.offset
    content_range = f"{first}-{first + count - 1}/*" if count else "*/*"
    headers = {"Content-Range": content_range, "Content-Profile": f"v{version}"}
    if request.method == "HEAD":
        return Response(status_code=200, headers=headers, media_type=JSON)
    return Response(body.encode(), status_code=200, headers=headers, media_type=JSON)
