"""The audit trail end to end: one record per request (allowed or denied), writes recorded in their own
transaction even while the audit store's connection is being killed, and the CLI reading it back."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.project import Project

TOML = """
[project]
name = "trail"

[databases.main]

[apps.clerk]
grants = [{ contract = "things", actions = ["read", "insert"] }]
"""
MIGRATION = "CREATE TABLE things (id serial PRIMARY KEY, label text NOT NULL);"


async def _audit(project: Project, sql: str) -> list[dict[str, object]]:
    async with operations.owner_connection(project) as conn:
        return [dict(r) for r in await conn.fetch(sql)]


async def test_one_record_per_request(shop: Project, serve_project: object) -> None:
    keys = await prepare(shop)
    client, runtime = await serve_project(shop)  # type: ignore[operator]
    calls = []
    for i in range(60):
        calls.append(("GET", f"/products?id=eq.{i}&select=id,name", {"apikey": keys["web"]}, 200))
        calls.append(("GET", "/orders", {"apikey": keys["mobile"]}, 404))
        if i < 10:  # below the failed-auth throttle, which would refuse this address as a whole
            calls.append(("GET", "/products", {"apikey": "gh_0000000000_" + "z" * 43}, 401))
        calls.append(("GET", "/products?id=eq.x", {"apikey": keys["analytics"]}, 400))
        calls.append(("POST", "/rpc/order_total", {"apikey": keys["analytics"]}, 200))
    responses = await asyncio.gather(*(client.request(m, u, headers=h, json={"order_id": 1} if m == "POST" else None)
                                       for m, u, h, _ in calls))
    await runtime.audit.stop()  # flush
    rows = await _audit(shop, "SELECT status, app, target, api_version, query, subject FROM gatehouse.audit_log")
    assert len(rows) == len(calls)
    assert sorted(r["status"] for r in rows) == sorted(r.status_code for r in responses)
    assert sorted(r.status_code for r in responses) == sorted(status for *_, status in calls)
    reads = [r for r in rows if r["app"] == "web"]
    assert len(reads) == 60 and all(r["target"] == "products" and r["api_version"] == 1 for r in reads)
    assert all(r["query"] == "id=eq.***&select=id,name" for r in reads)  # values redacted
    assert {r["target"] for r in rows if r["app"] == "analytics" and r["status"] == 200} == {"rpc:order_total"}
    usage = await _audit(shop, "SELECT sum(calls) AS calls FROM gatehouse.usage")
    assert usage[0]["calls"] == len(calls)


async def test_no_write_without_its_record(make_project: ProjectFactory, serve_project: object) -> None:
    project = make_project(toml=TOML, migrations={"V001__t.sql": MIGRATION},
                           contracts={"things.v1.sql": "SELECT id, label FROM things"})
    keys = await prepare(project)
    client, runtime = await serve_project(project)  # type: ignore[operator]

    async def kill_audit_connections() -> None:
        for _ in range(20):
            await _audit(project, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name = 'gatehouse/audit'")
            await asyncio.sleep(0.02)

    writes = [client.post("/things", json={"label": f"t{i}"}, headers={"apikey": keys["clerk"]}) for i in range(200)]
    *responses, _ = await asyncio.gather(*writes, kill_audit_connections())
    await runtime.audit.stop()
    committed = sum(1 for r in responses if r.status_code == 201)
    things = await _audit(project, "SELECT count(*) AS n FROM things")
    records = await _audit(project, "SELECT count(*) AS n FROM gatehouse.audit_log WHERE method = 'POST' AND status = 201")
    assert things[0]["n"] == committed == records[0]["n"] > 0


async def test_cli_reads_the_trail(shop: Project, serve_project: object) -> None:
    keys = await prepare(shop)
    client, runtime = await serve_project(shop)  # type: ignore[operator]
    await client.get("/products?limit=1", headers={"apikey": keys["web"]})
    await client.get("/orders", headers={"apikey": keys["mobile"]})
    await runtime.audit.stop()

    def gatehouse(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "gatehouse", "--project", str(shop.root), *args],
                                capture_output=True, text=True, timeout=120, check=True)
        return result.stdout

    records = json.loads(gatehouse("audit", "--format", "json", "--status", "4xx"))
    assert [(r["app"], r["status"]) for r in records] == [("mobile", 404)]
    assert "web" in gatehouse("audit", "--app", "web", "--since", "1h")
    versions = gatehouse("versions")
    assert "v1" in versions and "web" in versions and "(no calls)" not in versions.split("v1")[1].split("\n")[0]


async def test_an_app_built_before_its_runtime_starts_still_audits(shop: Project) -> None:
    import httpx

    from gatehouse.app import create_app
    from gatehouse.runtime import Runtime

    keys = await prepare(shop)
    runtime = Runtime(shop)
    app = create_app(runtime, manage_runtime=False)  # as under a lifespan: built first, started later
    await runtime.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/products?limit=1", headers={"apikey": keys["web"]})).status_code == 200
    finally:
        await runtime.stop()
    rows = await _audit(shop, "SELECT app, status FROM gatehouse.audit_log")
    assert rows == [{"app": "web", "status": 200}]


async def test_each_kind_of_write_is_recorded_once_with_its_status_and_rows(make_project: ProjectFactory,
                                                                            serve_project: object) -> None:
    """Writes whose status is known in advance carry their record in their own statement (one round trip);
    the others (an upsert, a check after the statement) insert it in their transaction. Either way: one
    record per request, with the status the client got and the rows written."""
    toml = TOML.replace('actions = ["read", "insert"]', 'actions = ["read", "insert", "update", "delete"]')
    project = make_project(toml=toml, migrations={"V001__t.sql": MIGRATION},
                           contracts={"things.v1.sql": "SELECT id, label FROM things"})
    keys = await prepare(project)
    client, runtime = await serve_project(project)  # type: ignore[operator]
    key = {"apikey": keys["clerk"]}
    steps = [  # (method, url, body, extra headers, expected status, expected rows in the record)
        ("POST", "/things", [{"label": "a"}, {"label": "b"}, {"label": "c"}], {}, 201, 3),  # in the statement
        ("PATCH", "/things?label=in.(a,b)", {"label": "ab"}, {}, 204, 2),
        ("POST", "/things", {"id": 1, "label": "one"}, {"Prefer": "resolution=merge-duplicates"}, 200, 1),
        ("POST", "/things", {"label": "d"},  # a check after the statement: in the transaction
         {"Prefer": "return=representation", "Accept": "application/vnd.pgrst.object+json"}, 201, 1),
        ("POST", "/things", {"label": "e"}, {"Prefer": "tx=rollback"}, 201, 1),  # recorded, not kept
        ("POST", "/things", {"label": None}, {}, 400, None),  # NOT NULL: nothing kept but the failure's record
        ("DELETE", "/things?label=eq.ab", None, {}, 204, 1),  # id 1 is "one" since the upsert
    ]
    for method, url, body, headers, status, _ in steps:
        response = await client.request(method, url, json=body, headers={**key, **headers})
        assert response.status_code == status, (method, url, response.text)
    await runtime.audit.stop()
    rows = await _audit(project, "SELECT method, status, \"rows\", duration_ms FROM gatehouse.audit_log ORDER BY at")
    assert [(r["method"], r["status"], r["rows"]) for r in rows] == [(m, s, n) for m, _, _, _, s, n in steps]
    assert all(r["duration_ms"] > 0 for r in rows)
    things = await _audit(project, "SELECT label FROM things ORDER BY id")
    assert [t["label"] for t in things] == ["one", "c", "d"]


async def test_a_server_refuses_to_start_on_a_database_applied_before_the_batches(shop: Project) -> None:
    """A database that an older gatehouse applied has no table for the audit's batches (or no grant on it): the
    server says to run `apply` instead of serving requests whose audit it could not store."""
    import pytest

    from gatehouse.errors import DatabaseUnavailable
    from gatehouse.runtime import Runtime

    await prepare(shop)
    async with operations.owner_connection(shop) as conn:
        await conn.execute(f'REVOKE INSERT ON gatehouse.audit_minute FROM "{shop.authenticator_role}"')
    runtime = Runtime(shop)
    try:
        with pytest.raises(DatabaseUnavailable, match=r"gatehouse\.audit_minute.*run `gatehouse apply` first"):
            await runtime.start()
    finally:
        await runtime.stop()
    await prepare(shop)  # apply grants it again
    runtime = Runtime(shop)
    await runtime.start()
    await runtime.stop()
