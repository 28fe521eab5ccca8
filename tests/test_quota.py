"""Per-app quotas hold in the database: connections, statement timeout; and /ready tells the truth."""

from __future__ import annotations

import asyncio

import httpx

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.app import create_admin_app
from gatehouse.project import load_project

TOML = """
[project]
name = "quota"

[databases.main]

[server]
pool_timeout_ms = 20000

[apps.slowpoke]
quota = { pool_size = 2, statement_timeout_ms = 300 }
grants = [{ contract = "sleepy", actions = ["read"] }]

[apps.patient]
quota = { pool_size = 3, statement_timeout_ms = 10000 }
grants = [{ contract = "sleepy", actions = ["read"] }]
"""
MIGRATION = "CREATE TABLE t AS SELECT g AS n FROM generate_series(1, 10) g;"
CONTRACT = "SELECT n, pg_sleep(n / 20.0) IS NOT NULL AS slept, current_user::text AS who FROM t"


def _project(make_project: ProjectFactory):  # type: ignore[no-untyped-def]
    return make_project(toml=TOML, migrations={"V001__t.sql": MIGRATION}, contracts={"sleepy.v1.sql": CONTRACT})


async def test_statement_timeout_is_the_apps_own(make_project: ProjectFactory, serve_project: object) -> None:
    project = _project(make_project)
    keys = await prepare(project)
    client, _ = await serve_project(project)  # type: ignore[operator]
    slow = await client.get("/sleepy?n=eq.10", headers={"apikey": keys["slowpoke"]})  # sleeps 0.5 s > 300 ms
    assert slow.status_code == 504
    assert slow.json()["code"] == "57014"
    assert "statement timeout" in slow.json()["message"]
    fine = await client.get("/sleepy?n=eq.10", headers={"apikey": keys["patient"]})
    assert fine.status_code == 200 and fine.json()[0]["slept"] is True


async def test_connections_never_exceed_the_pool_size(make_project: ProjectFactory, serve_project: object) -> None:
    project = _project(make_project)
    keys = await prepare(project)
    client, _ = await serve_project(project)  # type: ignore[operator]
    role = project.apps["patient"].role
    peak = 0

    async def watch() -> None:
        nonlocal peak
        async with operations.owner_connection(project) as conn:
            for _ in range(40):
                active = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active' "
                    "AND query LIKE '%sleepy%'", project.authenticator_role)
                peak = max(peak, active)
                await asyncio.sleep(0.025)

    calls = [client.get("/sleepy?n=eq.4", headers={"apikey": keys["patient"]}) for _ in range(12)]
    *responses, _ = await asyncio.gather(*calls, watch())
    assert all(r.status_code == 200 and r.json()[0]["who"] == role for r in responses)
    assert 1 <= peak <= 3


async def test_a_removed_app_is_followed_and_ready_stays_true(make_project: ProjectFactory,
                                                             serve_project: object) -> None:
    project = _project(make_project)
    keys = await prepare(project)
    client, runtime = await serve_project(project)  # type: ignore[operator]
    admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_admin_app(runtime)), base_url="http://a")
    async with admin:
        ready = await admin.get("/ready")
        assert ready.status_code == 200 and ready.json()["databases"] == {"main": "ok"}
        toml = project.root / "gatehouse.toml"
        text = toml.read_text()
        toml.write_text(text[: text.index("[apps.patient]")])  # the deploy removes an app
        await operations.apply_all(load_project(project.root))
        assert (await admin.get("/ready")).status_code == 200  # every view this server serves is still there
        for _ in range(100):  # the server follows: the removed app's key stops working, without a restart
            if "patient" not in runtime.project.apps:
                break
            await asyncio.sleep(0.05)
        refused = await client.get("/sleepy?n=eq.1", headers={"apikey": keys["patient"]})
        assert refused.status_code == 401 and "patient" not in runtime.project.apps
        assert (await admin.get("/ready")).status_code == 200


async def test_a_key_of_an_app_removed_a_moment_ago_is_refused_not_an_error(make_project: ProjectFactory,
                                                                          serve_project: object) -> None:
    # between a reload that drops an app and the key ring forgetting its keys, its key still authenticates:
    # the request must be refused as unknown (401), never fail (500)
    project = _project(make_project)
    keys = await prepare(project)
    client, runtime = await serve_project(project)  # type: ignore[operator]
    runtime.project.apps.pop("patient")  # the reloaded project, the key ring not yet told
    refused = await client.get("/sleepy?n=eq.1", headers={"apikey": keys["patient"]})
    assert refused.status_code == 401, refused.text
