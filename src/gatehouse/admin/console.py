"""``/console`` on the admin port: routes, sign-in and out, and the checks every request passes.

Each request: the console must be on (:func:`~gatehouse.admin.settings.console_enabled`), a page needs a live
session (else the sign-in page), and a POST needs a same-origin browser, the session's CSRF token in the form,
and, for a change, an admin who may change things (read-only admins get 403). Pages are plain HTML forms and
links, so they work without script; htmx only refreshes the overview's numbers.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import asyncpg
import orjson

from gatehouse.admin import apps_view, audit_view, health_view, traffic, versions_view
from gatehouse.admin.changes import audited, record_change
from gatehouse.admin.overview import per_app, server_readings
from gatehouse.admin.pages import (
    PREFIX,
    SECURITY_HEADERS,
    cookies,
    error_page,
    form,
    query_url,
    redirect,
    render,
    same_origin,
    set_cookie,
    static_file,
)
from gatehouse.admin.sessions import (
    COOKIE,
    PRE_COOKIE,
    Session,
    SessionStore,
    SignInThrottle,
    configured_tokens,
    role_of,
    same_token,
)
from gatehouse.admin.settings import console_enabled
from gatehouse.errors import GatehouseError, ProjectError
from gatehouse.http.exchange import HttpRequest, HttpResponse
from gatehouse.project import Project
from gatehouse.runtime import Runtime

APP = re.compile(r"^/apps/([a-z][a-z0-9_]{0,39})$")
KEYS = re.compile(r"^/apps/([a-z][a-z0-9_]{0,39})/keys$")
ROTATE = re.compile(r"^/apps/([a-z][a-z0-9_]{0,39})/keys/rotate$")
REVOKE = re.compile(r"^/apps/([a-z][a-z0-9_]{0,39})/keys/([a-z0-9]{10})/revoke$")
CONTRACT = re.compile(r"^/contracts/([a-z][a-z0-9_]{0,39})$")
AUDIT_RECORD = re.compile(r"^/audit/([A-Za-z0-9._:-]{1,200})$")
PRE_SIGN_IN_S = 600
log = logging.getLogger(__name__)

Page = Callable[[Project, Session, dict[str, str]], Awaitable[HttpResponse]]


class Console:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        config = runtime.project.config.console
        self.sessions = SessionStore(config.session_minutes)
        self.throttle = SignInThrottle(config.sign_in_failures_per_minute)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        project = self.runtime.project
        if not console_enabled(project.config.console, project.config.server.admin_host):
            return error_page(404, "The console is off",
                              "The admin port listens on a non-loopback address, so the console is off unless "
                              "[console] enabled = true is set in gatehouse.toml.")
        path = request.path[len(PREFIX):] or "/"
        if path.startswith("/static/"):
            found = static_file(path[len("/static/"):]) if request.method in ("GET", "HEAD") else None
            return found or error_page(404, "Not found", "There is no such file.")
        session = None if path == "/signin" else self.sessions.get(cookies(request).get(COOKIE))
        try:
            return await self._route(request, project, session, path)
        except ProjectError as exc:  # e.g. the project's database variable is unset: what to do, no trace
            return error_page(503, "Not available now", str(exc.args[0]), session)
        except (GatehouseError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            log.warning("a console page could not be answered", exc_info=True)
            return error_page(503, "Not available now", "A database the console needs could not be reached; "
                                                        "try again in a moment.", session)

    async def _route(self, request: HttpRequest, project: Project, session: Session | None,
                     path: str) -> HttpResponse:
        if path == "/signin":
            return await (self._sign_in(request) if request.method == "POST" else self._sign_in_page(request))
        if session is None:
            if request.headers.get("hx-request"):  # a poll after the session ended: htmx goes to the sign-in
                return HttpResponse(401, {**SECURITY_HEADERS, "HX-Redirect": f"{PREFIX}/signin"})
            if request.method in ("GET", "HEAD"):
                return redirect(f"{PREFIX}/signin?next={quote(request.path, safe='/')}")
            return error_page(401, "Signed out", "Your session has ended: sign in again.")
        if request.method == "POST":
            return await self._post(request, project, session, path)
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, {**SECURITY_HEADERS, "Allow": "GET, HEAD, POST"})
        return await self._get(request, project, session, path)

    async def _get(self, request: HttpRequest, project: Project, session: Session, path: str) -> HttpResponse:
        try:
            params = request.query_params
        except GatehouseError:
            return error_page(400, "Bad address", "The query string is not valid UTF-8.", session)
        if path in ("/", "/overview"):
            report = await self.runtime.readiness()
            return render("overview.html", session=session, numbers=per_app(self.runtime.metrics, sorted(project.apps)),
                          readings=server_readings(self.runtime.metrics), ready=report)
        if path == "/overview/numbers":
            return render("numbers.html", session=session, numbers=per_app(self.runtime.metrics, sorted(project.apps)))
        if path == "/overview/traffic.json":
            body = orjson.dumps(await traffic.per_minute(project))
            return HttpResponse(200, dict(SECURITY_HEADERS), body, "application/json")
        if path == "/overview/readings":
            return render("readings.html", session=session, readings=server_readings(self.runtime.metrics))
        if path == "/apps":
            return await apps_view.apps_list(project, session, params)
        if (app := APP.match(path)) is not None:
            revoked = params.get("revoked", "")
            return await apps_view.app_page(project, session, app.group(1), params,
                                            message=f"Key {revoked} revoked." if re.fullmatch("[a-z0-9]{10}", revoked)
                                            else "")
        if path == "/health":
            return await health_view.health_page(project, session)
        if path == "/versions":
            return await versions_view.versions_page(project, session, params)
        if (contract := CONTRACT.match(path)) is not None:
            return await versions_view.contract_page(project, session, contract.group(1))
        if path in ("/audit", "/audit.csv"):
            return await self._audit(project, session, params, csv=path == "/audit.csv")
        if (record := AUDIT_RECORD.match(path)) is not None:
            records = await audit_view.records_of_request(project, record.group(1))
            if not records:
                return error_page(404, "No such record", "No audit record has this request id.", session)
            return render("audit_record.html", session=session, request_id=record.group(1), records=records)
        return error_page(404, "Not found", "There is no such page in the console.", session)

    async def _audit(self, project: Project, session: Session, params: dict[str, str], *, csv: bool) -> HttpResponse:
        try:
            filters = audit_view.AuditFilters.parse(params)
        except audit_view.FilterError as exc:
            return render("audit.html", 400, session=session, filters=params, records=[], error=str(exc),
                          previous=None, next=None, csv_url=None, page=1)
        if csv:
            body = await audit_view.csv_of_records(project, filters)
            return HttpResponse(200, {"Content-Disposition": 'attachment; filename="audit.csv"',
                                      "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
                                body, "text/csv; charset=utf-8")
        records, more = await audit_view.page_of_records(project, filters)
        here = f"{PREFIX}/audit"
        return render("audit.html", session=session, filters=filters.values, records=records, error="",
                      page=filters.page, csv_url=query_url(f"{PREFIX}/audit.csv", filters.values),
                      previous=query_url(here, filters.values, page=filters.page - 1) if filters.page > 1 else None,
                      next=query_url(here, filters.values, page=filters.page + 1) if more else None)

    async def _post(self, request: HttpRequest, project: Project, session: Session, path: str) -> HttpResponse:
        fields = await form(request)
        if fields is None or not same_origin(request) or not same_token(session.csrf, fields.get("csrf")):
            return error_page(403, "Refused", "This form was not sent from a console page of this session "
                                              "(missing or wrong CSRF token): reload the page and try again.", session)
        if path == "/signout":
            self.sessions.close(session.id)
            async with audited(project) as conn:
                await record_change(conn, session, client=request.client, app="", what="session",
                                    action="signout", status=303, started=time.perf_counter())
            return redirect(f"{PREFIX}/signin", {"Set-Cookie": set_cookie(request, COOKIE, "", 0)})
        if not session.may_change:
            return error_page(403, "Read-only", "You are signed in read-only: you can look, not change.", session)
        if path == "/versions/impact":  # (an admin's: it runs the migrations, rolled back, with their locks)
            return await versions_view.impact_page(project, session, fields)
        if (keys := KEYS.match(path)) is not None:
            return await apps_view.create_key(project, session, request, keys.group(1), fields)
        if (rotate := ROTATE.match(path)) is not None:
            return await apps_view.rotate_keys(project, session, request, rotate.group(1), fields)
        if (revoke := REVOKE.match(path)) is not None:
            return await apps_view.revoke_key(project, session, request, revoke.group(1), revoke.group(2))
        return error_page(404, "Not found", "There is no such action in the console.", session)

    async def _sign_in_page(self, request: HttpRequest, *, status: int = 200, message: str = "") -> HttpResponse:
        token = secrets.token_urlsafe(24)
        configured = bool(configured_tokens(self.runtime.project.config.console))
        try:
            next_path = _safe_next(request.query_params.get("next", "") if request.method == "GET" else "")
        except GatehouseError:  # a query string that is not UTF-8: sign in to the overview
            next_path = ""
        return render("signin.html", status, {"Set-Cookie": set_cookie(request, PRE_COOKIE, token, PRE_SIGN_IN_S)},
                      session=None, csrf=token, configured=configured, message=message, next=next_path)

    async def _sign_in(self, request: HttpRequest) -> HttpResponse:
        fields = await form(request)
        if fields is None or not same_origin(request) \
                or not same_token(cookies(request).get(PRE_COOKIE, ""), fields.get("csrf") or None):
            return await self._sign_in_page(request, status=403,
                                            message="The sign-in form had expired: please sign in again.")
        wait = self.throttle.wait_s(request.client)
        if wait:
            return error_page(429, "Too many attempts", f"Too many failed sign-ins from your address: wait {wait} s "
                              "and check the token before trying again.")
        role = role_of(fields.get("token", ""), configured_tokens(self.runtime.project.config.console))
        if role is None:
            self.throttle.failed(request.client)
            return await self._sign_in_page(request, status=401, message="That token signs nobody in.")
        session = self.sessions.open(role)
        async with audited(self.runtime.project) as conn:
            await record_change(conn, session, client=request.client, app="", what="session", action="signin",
                                status=303, started=time.perf_counter())
        max_age = int(self.sessions.seconds)
        return redirect(_safe_next(fields.get("next", "")) or f"{PREFIX}/overview",
                        {"Set-Cookie": set_cookie(request, COOKIE, session.id, max_age)})


def _safe_next(path: str) -> str:
    """Where to go after signing in: a console page only (never another site, ``//host`` included)."""
    return path if re.fullmatch(r"/console(/[A-Za-z0-9_./-]*)?", path) and "//" not in path else ""
