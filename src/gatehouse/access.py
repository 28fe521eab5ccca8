"""What an app may see and do in an API version: the version it asked for, its contracts, its rows.

Shared by the HTTP pipeline and by logic functions, which act as the calling app.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING

import asyncpg

from gatehouse import suggestions
from gatehouse.contracts.model import ContractVersion
from gatehouse.db.catalog import ViewShape
from gatehouse.db.sqlstate import api_error_from_postgres
from gatehouse.errors import ActionNotGranted, ApiError, UnknownProfile, VersionRetired
from gatehouse.project import App, Project
from gatehouse.query.row_filters import bind_claims, claim_refused_by_database
from gatehouse.query.tree import Condition

if TYPE_CHECKING:  # (only its type: the verifier behind it is the request path's, not a command's)
    from gatehouse.auth.identity import Identity

PROFILE = re.compile(r"^v([1-9][0-9]{0,3})$")


def choose_version(project: Project, app: App, profile: str | None, path_version: int | None) -> int:
    """API version from the path prefix, else the profile header; ``public`` means the app's default."""
    if path_version is None and (profile is None or profile.strip() in ("", "public")):
        return app.config.version or project.default_version
    requested = path_version
    if requested is None:
        match = PROFILE.match((profile or "").strip())
        requested = int(match.group(1)) if match else None
    if requested in project.versions.retired:
        raise VersionRetired(f"API v{requested} has been retired",
                             hint=f"Move to a newer version (newest: v{project.versions.newest}).")
    if requested is None or requested not in project.versions.served:
        shown = profile if path_version is None else f"v{path_version}"
        exposed = ", ".join(["public", *(f"v{n}" for n in project.versions.numbers)])
        raise UnknownProfile(f"Invalid schema: {shown}", hint=f"Only the following schemas are exposed: {exposed}")
    return requested


def row_filters(app: App, identity: Identity, contracts: Iterable[str]) -> dict[str, tuple[Condition, ...]]:
    """The app's row filters on these contracts, with the caller's claims bound in."""
    return {name: bind_claims(app.row_filters[name], identity.claims) for name in contracts if name in app.row_filters}


def lifecycle_headers(project: Project, version: int) -> dict[str, str]:
    """``Deprecation`` (and ``Sunset`` when a date is set) on every answer from a deprecated version."""
    if f"v{version}" not in project.config.versions:
        return {}
    settings = project.config.version_settings(version)
    if settings.status != "deprecated":
        return {}
    headers = {"Deprecation": "true"}
    if settings.sunset:
        sunset = datetime(settings.sunset.year, settings.sunset.month, settings.sunset.day, tzinfo=UTC)
        headers["Sunset"] = format_datetime(sunset, usegmt=True)
    return headers


def readable_contracts(project: Project, app: App, version: int) -> frozenset[str]:
    readable = app.readable.get(version)
    if readable is None:  # the project never changes while loaded: work it out once per app and version
        served = project.versions.served.get(version, {})
        readable = app.readable[version] = frozenset(name for name in served if "read" in app.grant_for(name))
    return readable


def granted_contract(project: Project, app: App, version: int, name: str, action: str) -> ContractVersion:
    """The contract, if the app may ``action`` it in this version; otherwise it does not exist for this app."""
    contract = project.versions.resolve(version, name)
    grant = app.grant_for(name)
    if contract is None or not grant:
        raise suggestions.unknown_contract(project, app, version, name)  # hint: among what the app may see
    if action not in grant:
        raise ActionNotGranted(f"The application may not {action} '{name}'",
                               hint=f"Its grant on '{name}' allows: {', '.join(sorted(grant))}.")
    return contract


def allowed_methods(shape: ViewShape, has_key: bool, grant: frozenset[str]) -> list[str]:
    """The methods an app may use on a contract, from its grant and what the view can take: ``OPTIONS``'s
    ``Allow``, and the ``Allow`` of a 405 on the contract. ``PUT`` needs a key to name its row by."""
    allowed = ["OPTIONS"]
    allowed += ["GET", "HEAD"] if "read" in grant else []
    allowed += ["POST"] if "insert" in grant and shape.insertable else []
    allowed += ["PUT"] if {"insert", "update"} <= grant and shape.insertable and shape.updatable and has_key else []
    allowed += ["PATCH"] if "update" in grant and shape.updatable else []
    allowed += ["DELETE"] if "delete" in grant and shape.deletable else []
    return allowed


def database_refusal(exc: asyncpg.PostgresError, project: Project, columns: Collection[str],
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
