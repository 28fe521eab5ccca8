"""The apps pages: every app of the project, one app's grants, quota, API version, functions and sagas, and its
keys (created, shown once, rotated, revoked, each with its audit record in one transaction: admin/changes.py), on
owner connections of their own and async, so the data port's loop never waits on the console."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from gatehouse import operations
from gatehouse.admin.changes import audited, record_change
from gatehouse.admin.pages import PREFIX, error_page, query_url, redirect, render
from gatehouse.admin.sessions import Session
from gatehouse.auth import keys as api_keys
from gatehouse.db.sync import bootstrap
from gatehouse.http.exchange import HttpRequest, HttpResponse
from gatehouse.observe import usage
from gatehouse.project import Project

PAGE = 50
USAGE_DAYS = 30
MAX_DESCRIPTION = 200
MAX_EXPIRY_DAYS = 3650
MAX_OVERLAP_HOURS = 24 * 90


def _page(params: dict[str, str]) -> int:
    try:
        return max(1, int(params.get("page", "1") or "1"))
    except ValueError:
        return 1


async def apps_list(project: Project, session: Session, params: dict[str, str]) -> HttpResponse:
    names = sorted(project.apps)
    page = _page(params)
    shown = names[(page - 1) * PAGE: page * PAGE]
    now = datetime.now(UTC)
    live: dict[str, int] = {}
    for key in await operations.list_keys(project, None):
        if key.status(now) == "active":
            live[key.app] = live.get(key.app, 0) + 1
    rows = [(name, project.config.apps[name], live.get(name, 0)) for name in shown]
    return render("apps.html", session=session, rows=rows, page=page,
                  previous=query_url(f"{PREFIX}/apps", {}, page=page - 1) if page > 1 else None,
                  next=query_url(f"{PREFIX}/apps", {}, page=page + 1) if page * PAGE < len(names) else None)


async def app_page(project: Project, session: Session, name: str, params: dict[str, str],
                   *, message: str = "", status: int = 200) -> HttpResponse:
    if name not in project.apps:
        return error_page(404, "No such app", f"There is no app named {name!r} in this project.", session)
    config = project.config.apps[name]
    keys = await operations.list_keys(project, name)
    keys.sort(key=lambda k: k.created_at, reverse=True)
    page = _page(params)
    now = datetime.now(UTC)
    shown = [(key, key.status(now)) for key in keys[(page - 1) * PAGE: page * PAGE]]
    async with operations.owner_connection(project) as conn:  # the audit's window, as `gatehouse versions`
        await bootstrap(conn)
        window = await usage.window(conn, days=USAGE_DAYS)
    calls = sorted((c for c in window.calls if c.app == name), key=lambda c: (c.target, c.api_version))
    here = f"{PREFIX}/apps/{name}"
    return render("app.html", status, session=session, name=name, app=config, keys=shown, message=message, page=page,
                  version=config.version or project.config.project.default_version, calls=calls,
                  usage_days=USAGE_DAYS,
                  previous=query_url(here, {}, page=page - 1) if page > 1 else None,
                  next=query_url(here, {}, page=page + 1) if page * PAGE < len(keys) else None)


async def create_key(project: Project, session: Session, request: HttpRequest, name: str,
                     fields: dict[str, str]) -> HttpResponse:
    """Create a key and show it once (never stored, never shown again, not cacheable)."""
    if name not in project.apps:
        return error_page(404, "No such app", f"There is no app named {name!r} in this project.", session)
    description = fields.get("description", "").strip()
    days_text = fields.get("expires_days", "").strip()
    if len(description) > MAX_DESCRIPTION:
        return await app_page(project, session, name, {}, status=400,
                              message=f"The description may be at most {MAX_DESCRIPTION} characters.")
    expires_at = None
    if days_text:
        if not days_text.isdigit() or not 1 <= int(days_text) <= MAX_EXPIRY_DAYS:
            return await app_page(project, session, name, {}, status=400,
                                  message=f"Expires in: a number of days from 1 to {MAX_EXPIRY_DAYS}, or empty.")
        expires_at = datetime.now(UTC) + timedelta(days=int(days_text))
    started = time.perf_counter()
    async with audited(project) as conn:  # the key and its audit record commit together
        new = await api_keys.create_key(conn, name, expires_at=expires_at, description=description)
        audit_id = await record_change(conn, session, client=request.client, app=name, what="keys",
                                       action="create", status=201, started=started, key_id=new.id)
    return render("key_created.html", 201, session=session, name=name, key=new, audit_id=audit_id, expiring=[],
                  overlap_hours=0)


async def rotate_keys(project: Project, session: Session, request: HttpRequest, name: str,
                      fields: dict[str, str]) -> HttpResponse:
    """A new key; the app's other live keys expire after the overlap, so callers switch without an outage."""
    if name not in project.apps:
        return error_page(404, "No such app", f"There is no app named {name!r} in this project.", session)
    hours = fields.get("overlap_hours", "").strip()
    if not hours.isdigit() or not 1 <= int(hours) <= MAX_OVERLAP_HOURS:
        return await app_page(project, session, name, {}, status=400,
                              message=f"Overlap: a number of hours from 1 to {MAX_OVERLAP_HOURS}.")
    started = time.perf_counter()
    async with audited(project) as conn:
        new, expiring = await api_keys.rotate_keys(conn, name, overlap=timedelta(hours=int(hours)))
        audit_id = await record_change(conn, session, client=request.client, app=name, what="keys",
                                       action="rotate", status=201, started=started, key_id=new.id,
                                       expiring=",".join(expiring), overlap_hours=hours)
    return render("key_created.html", 201, session=session, name=name, key=new, audit_id=audit_id,
                  expiring=expiring, overlap_hours=int(hours))


async def revoke_key(project: Project, session: Session, request: HttpRequest, name: str,
                     key_id: str) -> HttpResponse:
    if name not in project.apps:
        return error_page(404, "No such app", f"There is no app named {name!r} in this project.", session)
    started = time.perf_counter()
    async with audited(project) as conn:
        revoked = await api_keys.revoke_key(conn, name, key_id)
        if revoked:
            await record_change(conn, session, client=request.client, app=name, what="keys", action="revoke",
                                status=200, started=started, key_id=key_id)
    if not revoked:
        return await app_page(project, session, name, {}, status=404,
                              message=f"No live key {key_id} for {name}: it was revoked already, or never existed.")
    return redirect(f"{PREFIX}/apps/{name}?revoked={key_id}")
