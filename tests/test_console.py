"""The web console on the admin port (``/console``): sign-in and its defences, apps and keys, the audit, the
overview; over HTTP through the admin ASGI app, and end to end in Debian's chromium driven by Playwright."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ProjectFactory, prepare, run_sync
from gatehouse import operations
from gatehouse.admin.sessions import SessionStore
from gatehouse.admin.settings import ConsoleConfig, console_enabled
from gatehouse.app import create_admin_app
from gatehouse.project import Project
from gatehouse.runtime import Runtime
from served import serving

SHOP_TOML = (Path(__file__).resolve().parents[1] / "examples" / "shop" / "gatehouse.toml").read_text()
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
READONLY_TOKEN = "readonly-token-for-tests-0123456789"
CONSOLE = """
[console]
admin_token = "env:GATEHOUSE_TEST_CONSOLE_ADMIN"
readonly_token = "env:GATEHOUSE_TEST_CONSOLE_READONLY"
"""
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
CHROMIUM = "/usr/bin/chromium"


def _console_project(make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch, extra: str = CONSOLE) -> Project:
    monkeypatch.setenv("GATEHOUSE_TEST_CONSOLE_ADMIN", ADMIN_TOKEN)
    monkeypatch.setenv("GATEHOUSE_TEST_CONSOLE_READONLY", READONLY_TOKEN)
    return make_project(from_shop=True, toml=SHOP_TOML + extra)


def _admin_client(runtime: Runtime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_admin_app(runtime)),
                             base_url="http://console.test")


async def _sign_in(admin: httpx.AsyncClient, token: str) -> httpx.Response:
    page = await admin.get("/console/signin")
    csrf = CSRF.search(page.text)
    assert page.status_code == 200 and csrf is not None
    return await admin.post("/console/signin", data={"csrf": csrf.group(1), "token": token, "next": ""})


async def _csrf(admin: httpx.AsyncClient, path: str) -> str:
    page = await admin.get(path)
    assert page.status_code == 200, page.text
    found = CSRF.search(page.text)
    assert found is not None
    return found.group(1)


async def _keys(project: Project, app: str) -> list[dict[str, Any]]:
    async with operations.owner_connection(project) as conn:
        return [dict(r) for r in await conn.fetch(
            "SELECT id, description, revoked_at FROM gatehouse.keys WHERE app = $1 ORDER BY created_at", app)]


async def _console_audit(project: Project, target: str = "console:keys") -> list[dict[str, Any]]:
    async with operations.owner_connection(project) as conn:
        return [dict(r) for r in await conn.fetch(
            "SELECT app, subject, method, target, query, status, client FROM gatehouse.audit_log "
            "WHERE target = $1 ORDER BY id", target)]


def test_the_console_is_off_on_a_network_address_unless_enabled() -> None:
    assert console_enabled(ConsoleConfig(), "127.0.0.1") and console_enabled(ConsoleConfig(), "::1")
    assert console_enabled(ConsoleConfig(), "localhost")
    assert not console_enabled(ConsoleConfig(), "0.0.0.0") and not console_enabled(ConsoleConfig(), "10.1.2.3")
    assert console_enabled(ConsoleConfig(enabled=True), "0.0.0.0")
    assert not console_enabled(ConsoleConfig(enabled=False), "127.0.0.1")


def test_tokens_are_references_never_literals() -> None:
    with pytest.raises(ValueError, match="env:VARIABLE"):
        ConsoleConfig(admin_token="hunter2")


def test_a_token_variable_that_is_not_set_signs_nobody_in(monkeypatch: pytest.MonkeyPatch) -> None:
    from gatehouse.admin.sessions import configured_tokens, role_of

    monkeypatch.delenv("GATEHOUSE_TEST_UNSET", raising=False)
    monkeypatch.setenv("GATEHOUSE_TEST_SET", "s3cret-token")
    tokens = configured_tokens(ConsoleConfig(admin_token="env:GATEHOUSE_TEST_UNSET",
                                             readonly_token="env:GATEHOUSE_TEST_SET"))
    assert tokens == {"readonly": "s3cret-token"}
    assert role_of("s3cret-token", tokens) == "readonly"
    assert role_of("", tokens) is None and role_of("s3cret-token ", tokens) is None


def test_a_session_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    store = SessionStore(minutes=1)
    session = store.open("admin")
    assert store.get(session.id) == session and session.identity == "console:admin"
    clock[0] += 61
    assert store.get(session.id) is None
    assert store.get("made-up") is None and store.get(None) is None


async def test_off_on_a_network_address(make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch,
                                        serve_project: Any) -> None:
    monkeypatch.setenv("GATEHOUSE_SERVER__ADMIN_HOST", "0.0.0.0")
    project = _console_project(make_project, monkeypatch)
    await prepare(project)
    _, runtime = await serve_project(project)
    async with _admin_client(runtime) as admin:
        off = await admin.get("/console/signin")
        assert off.status_code == 404 and "enabled = true" in off.text
        assert (await admin.get("/live")).status_code == 200  # the rest of the admin port is unchanged


async def test_sign_in_keys_and_audit_over_http(make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch,
                                                serve_project: Any) -> None:
    project = _console_project(make_project, monkeypatch)
    await prepare(project)
    data, runtime = await serve_project(project)
    before = await _keys(project, "mobile")
    async with _admin_client(runtime) as admin:
        # signed out: pages send to the sign-in, a POST is refused and changes nothing
        assert (await admin.get("/console/apps")).headers["location"] == "/console/signin?next=/console/apps"
        assert (await admin.post("/console/apps/mobile/keys", data={"csrf": "x"})).status_code == 401

        page = await admin.get("/console/signin")
        for name, value in (("content-security-policy", "script-src 'self'"), ("x-frame-options", "DENY"),
                            ("cache-control", "no-store")):
            assert value in page.headers[name]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert "'unsafe-inline'" not in page.headers["content-security-policy"]

        wrong = await _sign_in(admin, "not-the-token")
        assert wrong.status_code == 401 and "gh_console=" not in wrong.headers.get("set-cookie", "")
        no_csrf = await admin.post("/console/signin", data={"csrf": "forged", "token": ADMIN_TOKEN})
        assert no_csrf.status_code == 403 and "gh_console=" not in no_csrf.headers.get("set-cookie", "")

        signed = await _sign_in(admin, ADMIN_TOKEN)
        assert signed.status_code == 303 and signed.headers["location"] == "/console/overview"
        cookie = signed.headers["set-cookie"]
        for part in ("HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age=28800"):
            assert part in cookie
        overview = await admin.get("/console/overview")
        assert overview.status_code == 200 and "console:admin" in overview.text and "shop" in overview.text

        apps = await admin.get("/console/apps")
        assert all(f'href="/console/apps/{app}"' in apps.text for app in project.apps)
        app = await admin.get("/console/apps/analytics")
        for shown in ("order_total", "customer_summary", "10000 ms", "read"):
            assert shown in app.text
        assert (await admin.get("/console/apps/nobody")).status_code == 404

        # a change needs the session's CSRF token, from this console's origin
        token = await _csrf(admin, "/console/apps/mobile")
        assert (await admin.post("/console/apps/mobile/keys", data={"description": "x"})).status_code == 403
        assert (await admin.post("/console/apps/mobile/keys", data={"csrf": "wrong"})).status_code == 403
        evil = await admin.post("/console/apps/mobile/keys", data={"csrf": token},
                                headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403
        assert await _keys(project, "mobile") == before  # nothing was created by the refused posts

        created = await admin.post("/console/apps/mobile/keys", data={"csrf": token, "description": "from console",
                                                                      "expires_days": "30"})
        assert created.status_code == 201, created.text
        secret = re.search(r'id="new-key"[^>]*>(gh_[a-z0-9]{10}_[A-Za-z0-9_-]{43})<', created.text)
        assert secret is not None
        key, key_id = secret.group(1), secret.group(1)[3:13]
        rows = await _keys(project, "mobile")
        assert [(r["id"], r["description"], r["revoked_at"]) for r in rows if r["id"] == key_id] == \
            [(key_id, "from console", None)]
        assert key not in (await admin.get("/console/apps/mobile")).text  # shown once, never again
        assert (await data.get("/products?id=eq.1", headers={"apikey": key})).status_code == 200

        revoked = await admin.post(f"/console/apps/mobile/keys/{key_id}/revoke", data={"csrf": token})
        assert revoked.status_code == 303
        rows = await _keys(project, "mobile")
        assert next(r for r in rows if r["id"] == key_id)["revoked_at"] is not None
        for _ in range(100):
            refused = await data.get("/products?id=eq.1", headers={"apikey": key})
            if refused.status_code == 401:
                break
            await asyncio.sleep(0.05)
        assert refused.status_code == 401
        again = await admin.post(f"/console/apps/mobile/keys/{key_id}/revoke", data={"csrf": token})
        assert again.status_code == 404

        # every change is in the audit, with the admin who made it
        recorded = await _console_audit(project)
        assert [(r["app"], r["subject"], r["target"], r["status"]) for r in recorded] == \
            [("mobile", "console:admin", "console:keys", 201), ("mobile", "console:admin", "console:keys", 200)]
        assert [r["query"] for r in recorded] == [f"action=create&key_id={key_id}", f"action=revoke&key_id={key_id}"]

        audit = await admin.get("/console/audit", params={"user": "console:admin", "app": "mobile"})
        assert audit.status_code == 200 and audit.text.count('class="record"') == 2
        assert audit.text.count("console:keys") == 2
        assert (await admin.get("/console/audit", params={"user": "nobody"})).text.count('class="record"') == 0
        for status, count in (("201", 1), ("2xx", 2), ("5xx", 0)):
            found = await admin.get("/console/audit", params={"status": status, "user": "console:admin"})
            assert found.text.count('class="record"') == count, status
        bad = await admin.get("/console/audit", params={"status": "teapot"})
        assert bad.status_code == 400 and "status is a code" in bad.text
        soon = await admin.get("/console/audit", params={"since": "soon"})
        assert soon.status_code == 400 and "since must be a time" in soon.text
        csv = await admin.get("/console/audit.csv", params={"user": "console:admin", "app": "mobile"})
        assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
        lines = csv.text.strip().splitlines()
        assert lines[0].startswith("at,request_id,app") and len(lines) == 3
        request_id = re.search(r'href="/console/audit/(console-[0-9a-f]{16})"', audit.text)
        assert request_id is not None
        one = await admin.get(f"/console/audit/{request_id.group(1)}")
        assert one.status_code == 200 and "console:admin" in one.text and "Query (redacted)" in one.text
        assert (await admin.get("/console/audit/console-0000")).status_code == 404

        # the overview counts the data port's requests, and its numbers come as an htmx fragment
        numbers = await admin.get("/console/overview/numbers", headers={"HX-Request": "true"})
        assert re.search(r'data-app="mobile" data-what="requests">([0-9]+)<', numbers.text).group(1) != "0"  # type: ignore[union-attr]

        readings = await admin.get("/console/overview/readings", headers={"HX-Request": "true"})
        assert re.search(r'<td title="[^"]+">pool_connections</td><td>app=mobile, database=shop', readings.text)

        signed_out = await admin.post("/console/signout", data={"csrf": token})
        assert signed_out.status_code == 303 and "Max-Age=0" in signed_out.headers["set-cookie"]
        admin.cookies.set("gh_console", re.search(r"gh_console=([^;]+)", cookie).group(1))  # type: ignore[union-attr]
        assert (await admin.get("/console/apps")).status_code == 303  # the old session is gone for good
        polled = await admin.get("/console/overview/numbers", headers={"HX-Request": "true"})
        assert polled.status_code == 401 and polled.headers["hx-redirect"] == "/console/signin"
    sessions = await _console_audit(project, "console:session")  # sign-ins and sign-outs are audited too
    assert [(r["subject"], r["query"], r["client"]) for r in sessions] == [
        ("console:admin", "action=signin", "127.0.0.1"), ("console:admin", "action=signout", "127.0.0.1")]


async def test_pending_migrations_and_their_impact_on_the_versions_page(
        make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch, serve_project: Any) -> None:
    """A pending migration that drops products.price: the versions page lists it, an admin asks for its impact
    (migrate plan: rolled back) and sees products.v1 and v2 break for web and analytics; a read-only admin cannot
    ask. The database is unchanged afterwards."""
    project = _console_project(make_project, monkeypatch)
    await prepare(project)
    (project.root / "migrations" / "V003__drop_price.sql").write_text("ALTER TABLE products DROP COLUMN price;\n")
    _, runtime = await serve_project(project)
    async with _admin_client(runtime) as admin:
        await _sign_in(admin, ADMIN_TOKEN)
        page = await admin.get("/console/versions")
        assert page.status_code == 200 and "V003__drop_price.sql" in page.text and "Show their impact" in page.text
        shown = await admin.post("/console/versions/impact", data={"csrf": await _csrf(admin, "/console/versions")})
        assert shown.status_code == 200, shown.text
        rows = re.findall(r'<tr class="impact"><td><a [^>]+>([a-z_]+\.v\d)</a>.*?<td class="(bad|ok)">', shown.text,
                          re.S)
        assert ("products.v1", "bad") in rows and ("products.v2", "bad") in rows, rows
        assert "no longer compiles" in shown.text
        refused = await admin.post("/console/versions/impact", data={"csrf": "forged"})
        assert refused.status_code == 403
    async with _admin_client(runtime) as readonly:
        await _sign_in(readonly, READONLY_TOKEN)
        page = await readonly.get("/console/versions")
        assert "V003__drop_price.sql" in page.text and "Show their impact" not in page.text
        token = await _csrf(readonly, "/console/apps/web")
        assert (await readonly.post("/console/versions/impact", data={"csrf": token})).status_code == 403
    async with operations.owner_connection(project) as conn:  # the plan rolled back: price is still there
        assert await conn.fetchval("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' "
                                   "AND table_name = 'products' "
                                   "AND column_name = 'price'") == 1
        assert not await conn.fetchval("SELECT count(*) FROM gatehouse.migrations WHERE version = 3")


async def test_rotate_keys_and_see_versions_and_their_callers(
        make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch, serve_project: Any) -> None:
    project = _console_project(make_project, monkeypatch)
    keys = await prepare(project)
    data, runtime = await serve_project(project)
    old_id = keys["web"][3:13]
    async with _admin_client(runtime) as admin:
        await _sign_in(admin, ADMIN_TOKEN)
        token = await _csrf(admin, "/console/apps/web")
        assert (await admin.post("/console/apps/web/keys/rotate", data={"csrf": token, "overlap_hours": "0"})
                ).status_code == 400
        rotated = await admin.post("/console/apps/web/keys/rotate", data={"csrf": token, "overlap_hours": "2"})
        assert rotated.status_code == 201 and old_id in rotated.text and "2 hours" in rotated.text
        new = re.search(r'id="new-key"[^>]*>(gh_[a-z0-9]{10}_[A-Za-z0-9_-]{43})<', rotated.text)
        assert new is not None
        async with operations.owner_connection(project) as conn:
            left = await conn.fetchval("SELECT expires_at - now() FROM gatehouse.keys WHERE id = $1", old_id)
        assert 1.9 * 3600 < left.total_seconds() <= 2 * 3600  # the old key overlaps for two hours, then stops
        for key in (keys["web"], new.group(1)):  # both work during the overlap
            assert (await data.get("/products?id=eq.1", headers={"apikey": key})).status_code == 200
        assert [r["query"] for r in await _console_audit(project)] == [
            f"action=rotate&key_id={new.group(1)[3:13]}&expiring={old_id}&overlap_hours=2"]

        # web is pinned to v1: the versions page names it among v1's callers once its reads are audited
        for _ in range(100):
            versions = await admin.get("/console/versions")
            v1 = versions.text.split('data-version="1"')[1].split("</section>")[0]
            if 'class="caller"' in v1:
                break
            await asyncio.sleep(0.1)
        assert '<a href="/console/apps/web">web</a>' in v1 and "pinned" in v1
        for _ in range(100):  # the app's usage per contract and version: the two reads above, once audited
            usage = re.findall(r'<tr class="usage"><td>([^<]*)</td><td>([^<]*)</td>\s*<td class="num">([0-9]+)</td>',
                               (await admin.get("/console/apps/web")).text)
            if usage == [("products", "v1", "2")]:
                break
            await asyncio.sleep(0.1)
        assert usage == [("products", "v1", "2")]
        traffic = (await admin.get("/console/overview/traffic.json")).json()  # the overview's charts
        assert set(traffic["apps"]) == {"web"} and len(traffic["t"]) == 60  # the console's own records left out
        assert sum(n or 0 for n in traffic["apps"]["web"]["requests"]) == 2
        assert traffic["apps"]["web"]["errors"] == [0] * 60 and traffic["apps"]["web"]["p95"].count(None) >= 58
        assert (await admin.get("/console/versions", params={"days": "0"})).status_code == 400
        products = await admin.get("/console/contracts/products")
        assert products.status_code == 200 and "products.v1" in products.text and "products.v2" in products.text
        assert "<code>price</code>" in products.text and 'href="/console/apps/mobile"' in products.text
        assert (await admin.get("/console/contracts/nothing")).status_code == 404


async def test_sign_in_failures_are_throttled_and_tokens_may_come_from_overrides(
        make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch, serve_project: Any) -> None:
    monkeypatch.setenv("GATEHOUSE_CONSOLE__ADMIN_TOKEN", "the-overridden-admin-token")  # the variable holds it
    project = _console_project(make_project, monkeypatch, CONSOLE + "sign_in_failures_per_minute = 2\n")
    assert project.config.console.admin_token == "env:GATEHOUSE_CONSOLE__ADMIN_TOKEN"
    await prepare(project)
    _, runtime = await serve_project(project)
    async with _admin_client(runtime) as admin:
        assert (await _sign_in(admin, ADMIN_TOKEN)).status_code == 401  # the file's variable no longer counts
        assert (await _sign_in(admin, "wrong")).status_code == 401
        for token in ("wrong again", "the-overridden-admin-token"):  # over the limit, even the right one waits
            throttled = await _sign_in(admin, token)
            assert throttled.status_code == 429 and "gh_console=" not in throttled.headers.get("set-cookie", "")
        assert (await admin.get("/console/apps")).status_code == 303  # still signed out
    async with _admin_client(runtime) as other:  # a new console (a restart) forgets the failures
        assert (await _sign_in(other, "the-overridden-admin-token")).status_code == 303
        assert (await other.get("/console/apps")).status_code == 200


async def test_read_only_admins_look_but_do_not_change(make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch,
                                                       serve_project: Any) -> None:
    project = _console_project(make_project, monkeypatch)
    await prepare(project)
    _, runtime = await serve_project(project)
    before = await _keys(project, "web")
    async with _admin_client(runtime) as admin:
        assert (await _sign_in(admin, READONLY_TOKEN)).status_code == 303
        page = await admin.get("/console/apps/web")
        assert page.status_code == 200 and "(read-only)" in page.text
        assert "Create a key" not in page.text and "/revoke" not in page.text
        health = await admin.get("/console/health")  # doctor's checks, run now
        assert health.status_code == 200 and "gatehouse doctor" in health.text
        assert re.search(r'<tr class="check" data-check="[a-z_]+"><td class="ok">ok</td>', health.text)
        token = CSRF.search(page.text).group(1)  # type: ignore[union-attr]
        refused = await admin.post("/console/apps/web/keys", data={"csrf": token})
        assert refused.status_code == 403 and "read-only" in refused.text
        revoke = await admin.post(f"/console/apps/web/keys/{before[0]['id']}/revoke", data={"csrf": token})
        assert revoke.status_code == 403
    assert await _keys(project, "web") == before
    assert await _console_audit(project) == []
    assert [r["subject"] for r in await _console_audit(project, "console:session")] == ["console:readonly"]


async def test_pages_carry_no_inline_script_and_static_files_are_bundled(
        make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch, serve_project: Any) -> None:
    project = _console_project(make_project, monkeypatch)
    await prepare(project)
    _, runtime = await serve_project(project)
    async with _admin_client(runtime) as admin:
        await _sign_in(admin, ADMIN_TOKEN)
        for path in ("/console/overview", "/console/apps", "/console/apps/checkout", "/console/audit",
                     "/console/versions", "/console/contracts/orders", "/console/health", "/console/signin"):
            html = (await admin.get(path)).text
            assert all(" src=" in tag for tag in re.findall(r"<script[^>]*>", html)), path
            assert not re.search(r"\s(on[a-z]+|style)=", html), path
        htmx = await admin.get("/console/static/vendor/htmx.min.js")
        assert htmx.status_code == 200 and "javascript" in htmx.headers["content-type"] and b"htmx" in htmx.content
        assert (await admin.get("/console/static/console.js")).status_code == 200
        for bad in ("/console/static/../sessions.py", "/console/static/%2e%2e/sessions.py", "/console/static/",
                    "/console/static/vendor/../../settings.py"):
            assert (await admin.get(bad)).status_code == 404, bad


# --- in a real browser ------------------------------------------------------------------------------------


def _serious_violations(page: Any) -> list[str]:
    """axe-core's serious and critical findings on the page as shown now (run through the DevTools protocol,
    so the console's Content-Security-Policy stays as strict as in production)."""
    from axe_playwright_python.sync_playwright import Axe  # type: ignore[import-untyped]

    results = Axe().run(page)
    return [f"{page.url}: {v['id']} ({v['impact']}): {v['help']}" for v in results.response["violations"]
            if v["impact"] in ("serious", "critical")]


def _browser_or_skip() -> None:
    """Debian's chromium and the playwright package, or a skip saying which is missing (a failure under CI)."""
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    try:
        import axe_playwright_python  # type: ignore[import-untyped]  # noqa: F401
        import playwright  # noqa: F401
    except ImportError:
        missing.append("the playwright and axe-playwright-python packages (pip install -e '.[test]')")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def served_console(make_project: ProjectFactory,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Project, str, str, dict[str, str]]]:
    """A real ``gatehouse serve`` of the shop with the console configured: (project, data URL, admin URL, keys)."""
    project = _console_project(make_project, monkeypatch)
    keys = run_sync(prepare(project))
    with serving(project.root) as server:
        yield project, server.base, server.admin, keys


def test_in_chromium_sign_in_create_use_revoke_and_audit(
        served_console: tuple[Project, str, str, dict[str, str]], tmp_path: Path) -> None:
    _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    project, data_url, admin_url, keys = served_console
    shots = tmp_path / "screenshots"
    shots.mkdir()
    problems: list[str] = []

    def look(page: Any, name: str) -> None:
        """A screenshot for the person reviewing the console, and axe's verdict on the page."""
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        problems.extend(_serious_violations(page))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])  # launch() gives it a fresh profile of its own
        try:
            context = browser.new_context(base_url=admin_url)
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=admin_url)
            page = context.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
            page.on("response", lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
            page.on("dialog", lambda d: d.accept())

            page.goto("/console/apps")
            expect(page).to_have_url(re.compile(r"/console/signin\?next=/console/apps$"))
            look(page, "01-signin")
            page.get_by_label("Admin token").fill(ADMIN_TOKEN)
            page.get_by_role("button", name="Sign in").click()
            expect(page).to_have_url(re.compile(r"/console/apps$"))
            look(page, "02-apps")

            page.get_by_role("link", name="mobile", exact=True).click()
            expect(page.get_by_role("heading", name="App mobile")).to_be_visible()
            page.get_by_label("Description (optional)").fill("made in chromium")
            page.get_by_role("button", name="Create key").click()
            key = page.locator("#new-key").inner_text().strip()
            assert re.fullmatch(r"gh_[a-z0-9]{10}_[A-Za-z0-9_-]{43}", key)
            page.get_by_role("button", name="Copy key").click()
            expect(page.locator("#copy-state")).to_have_text("Copied.")
            assert page.evaluate("navigator.clipboard.readText()") == key
            look(page, "03-key-created")
            key_id = key[3:13]

            def curl_status(key: str) -> str:  # as a person would try the new key: with curl
                return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"apikey: {key}",
                                       f"{data_url}/products?id=eq.1"], capture_output=True, text=True,
                                      timeout=10).stdout

            assert curl_status(key) == "200"

            page.get_by_role("link", name="Back to mobile").click()
            page.get_by_role("button", name=f"Revoke key {key_id}").click()
            expect(page.locator(f'tr[data-key="{key_id}"] td.bad')).to_have_text("revoked")
            look(page, "04-app-revoked")
            deadline = time.monotonic() + 10
            while (status := curl_status(key)) != "401":
                assert time.monotonic() < deadline, status
                time.sleep(0.1)

            page.get_by_role("link", name="Audit", exact=True).click()
            page.get_by_label("User").fill("console:admin")
            page.get_by_label("App").fill("mobile")
            page.get_by_role("button", name="Filter").click()
            expect(page).to_have_url(re.compile(r"user=console%3Aadmin"))
            expect(page.locator("tr.record")).to_have_count(2)
            expect(page.locator("tr.record").first).to_contain_text("console:keys")
            look(page, "05-audit")
            page.locator("tr.record a").first.click()
            expect(page.locator("dl.record-full")).to_contain_text(f"action=revoke&key_id={key_id}")
            expect(page.locator("dl.record-full")).to_contain_text("console:admin")
            look(page, "06-audit-record")

            page.get_by_role("link", name="Versions", exact=True).click()
            v2 = page.locator('section[data-version="2"]')
            expect(v2.locator("tr.caller")).to_have_count(1)  # mobile's reads, with the key made above
            expect(v2.locator("tr.caller")).to_contain_text("mobile")
            look(page, "07-versions")
            page.get_by_role("link", name="products.v2").first.click()
            expect(page.get_by_role("heading", name="products.v2")).to_be_visible()
            look(page, "08-contract")

            page.get_by_role("link", name="Overview").click()
            expect(page.locator("[data-chart] canvas")).to_have_count(3)  # uPlot drew the last hour's lines
            web = page.locator('td[data-app="web"][data-what="requests"]')
            expect(web).to_have_text("0")
            assert httpx.get(f"{data_url}/products?id=eq.1", headers={"apikey": keys["web"]}).status_code == 200
            expect(web).to_have_text("1", timeout=12_000)  # htmx polls the numbers: no reload
            look(page, "09-overview")
            page.get_by_role("navigation", name="Console").get_by_role("link", name="Health").click()
            expect(page.locator("tr.check").first).to_be_visible()
            look(page, "10-health")
            page.get_by_role("button", name="Sign out").click()
            expect(page).to_have_url(re.compile(r"/console/signin$"))
        finally:
            browser.close()
    assert problems == []

    rows = run_sync(_keys(project, "mobile"))
    made = [r for r in rows if r["id"] == key_id]
    assert len(made) == 1 and made[0]["description"] == "made in chromium" and made[0]["revoked_at"] is not None
    recorded = run_sync(_console_audit(project))
    assert [(r["subject"], r["query"]) for r in recorded] == [
        ("console:admin", f"action=create&key_id={key_id}"), ("console:admin", f"action=revoke&key_id={key_id}")]
    keep = os.environ.get("GATEHOUSE_CONSOLE_SCREENSHOTS")
    if keep:  # a person looks at them before calling the console done
        shutil.copytree(shots, keep, dirs_exist_ok=True)


def test_the_overview_counts_each_apps_requests_errors_and_limits_hit() -> None:
    from gatehouse.admin.overview import per_app
    from gatehouse.observe.metrics import Metrics

    metrics = Metrics()
    for status in (200, 200, 429, 429, 404, 503):
        metrics.observe("mobile", "products", 2, "GET", status, 0.01)
    metrics.observe("", "", None, "OTHER", 414, 0.0)
    rows = {row.app: row for row in per_app(metrics, ["mobile", "web"])}
    mobile = rows["mobile"]
    assert (mobile.requests, mobile.client_errors, mobile.limited, mobile.server_errors) == (6, 3, 2, 1)
    assert rows["web"].requests == 0 and rows["(none)"].client_errors == 1 and rows["(none)"].limited == 0


async def test_a_key_whose_audit_record_cannot_be_written_is_not_created(
        make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch, serve_project: Any) -> None:
    """The change and its record commit together: with the audit refusing console records (a trigger here), the
    key is not created (nor revoked), and the page says the console could not do it."""
    project = _console_project(make_project, monkeypatch)
    keys = await prepare(project)
    _, runtime = await serve_project(project)
    async with operations.owner_connection(project) as conn:
        before = await conn.fetchval("SELECT count(*) FROM gatehouse.keys")
        await conn.execute("""
            CREATE FUNCTION refuse_console() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN IF NEW.target = 'console:keys' THEN RAISE EXCEPTION 'no audit today'; END IF; RETURN NEW; END $$;
            CREATE TRIGGER refuse_console BEFORE INSERT ON gatehouse.audit FOR EACH ROW EXECUTE FUNCTION refuse_console();
        """)
    async with _admin_client(runtime) as admin:
        await _sign_in(admin, ADMIN_TOKEN)
        token = await _csrf(admin, "/console/apps/web")
        created = await admin.post("/console/apps/web/keys", data={"csrf": token, "description": "x"})
        assert created.status_code == 503 and "gh_" not in created.text, created.text
        web_key = keys["web"][3:13]
        revoked = await admin.post(f"/console/apps/web/keys/{web_key}/revoke", data={"csrf": token})
        assert revoked.status_code == 503
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.keys") == before
        assert await conn.fetchval("SELECT revoked_at FROM gatehouse.keys WHERE id = $1", web_key) is None
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.audit_log WHERE target = 'console:keys'") == 0
