"""The response cache, end to end against real PostgreSQL: hits and 304s without the database, an app's own
writes read at once, writes made in SQL noticed within the poll bound, tenants and apps never sharing an
entry, and a hypothesis run interleaving writes (HTTP and SQL) with cached reads that never sees an answer
older than the bound."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ProjectFactory, prepare
from gatehouse.db.targets import resolve_targets
from gatehouse.project import Project
from gatehouse.runtime import Runtime

SECRET = "a-test-secret-that-is-long-enough-for-hs256!!"
TOML = """
[project]
name = "cached"

[databases.main]

[auth.issuers.idp]
issuer = "https://idp.test/"
secret = "env:CACHED_JWT_SECRET"
algorithms = ["HS256"]
audience = "gatehouse"
app_claim = "azp"
apps = { "portal-web" = "portal" }

[apps.portal]
require_user = true
grants = [
    { contract = "items", actions = ["read", "insert", "update"], filter = "tenant=eq.{claims.tenant}" },
    { contract = "tenant_totals", actions = ["read"], filter = "tenant=eq.{claims.tenant}" },
]

[apps.admin]
grants = [
    { contract = "items", actions = ["read", "update"] },
    { contract = "tenant_totals", actions = ["read"] },
    { contract = "stock", actions = ["read"] },
]

[apps.partner]
grants = [{ contract = "items", actions = ["read"], filter = "tenant=eq.acme" }]

[contracts.items]
cache = "60s"

[contracts.tenant_totals]
cache = "60s"

[contracts.stock]
cache = "60s"
"""
MIGRATION = """
CREATE TABLE tenants (name text PRIMARY KEY, plan text NOT NULL);
CREATE TABLE items (id serial PRIMARY KEY, tenant text NOT NULL REFERENCES tenants (name), name text NOT NULL,
                    n int NOT NULL DEFAULT 0);
INSERT INTO tenants VALUES ('acme', 'gold'), ('globex', 'free');
INSERT INTO items (tenant, name, n) VALUES ('acme', 'anvil', 0), ('acme', 'rocket', 0), ('globex', 'magnet', 0);
CREATE VIEW item_totals AS SELECT tenant, sum(n)::int8 AS total, count(*)::int8 AS items FROM items GROUP BY tenant;
CREATE MATERIALIZED VIEW stock_snapshot AS SELECT id, n FROM items;
"""
CONTRACTS = {
    "items.v1.sql": "SELECT id, tenant, name, n FROM items",
    # through a plain view and a join: its lineage is items and tenants, found by PostgreSQL's dependencies
    "tenant_totals.v1.sql": "SELECT t.name AS tenant, t.plan, x.total, x.items "
                            "FROM tenants t JOIN item_totals x ON x.tenant = t.name",
    "stock.v1.sql": "SELECT id, n FROM stock_snapshot",  # a materialized view: never cached
}
BOUND_S = 0.25
"""The documented bound for writes made elsewhere: twice ``[cache] poll_ms`` (100) plus 50 ms."""
SLACK_S = 0.15
"""Scheduling slack of a loaded 2-core machine on top of the bound."""


def token(tenant: str) -> str:
    now = int(time.time())
    return jwt.encode({"iss": "https://idp.test/", "aud": "gatehouse", "sub": f"user-{tenant}", "tenant": tenant,
                       "azp": "portal-web", "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


@dataclass
class Cached:
    client: httpx.AsyncClient
    runtime: Runtime
    project: Project
    keys: dict[str, str]
    owner: asyncpg.Connection

    def as_tenant(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(tenant)}"}

    def as_app(self, app: str) -> dict[str, str]:
        return {"apikey": self.keys[app]}

    async def items(self, headers: dict[str, str], query: str = "select=id,tenant,name,n&order=id") -> httpx.Response:
        return await self.client.get(f"/items?{query}", headers=headers)


@pytest.fixture
async def cached(make_project: ProjectFactory, serve_project: object,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cached]:
    monkeypatch.setenv("CACHED_JWT_SECRET", SECRET)
    project = make_project(toml=TOML, contracts=CONTRACTS, migrations={"V001__items.sql": MIGRATION})
    keys = await prepare(project)
    client, runtime = await serve_project(project)  # type: ignore[operator]
    owner = await (await resolve_targets(project))["main"].connect_owner()
    await _until(lambda: runtime.cache.versions.polls > 0)
    try:
        yield Cached(client, runtime, project, keys, owner)
    finally:
        await owner.close()


async def _until(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_second_read_is_a_hit_with_the_same_answer_and_tag(cached: Cached) -> None:
    admin = cached.as_app("admin")
    first = await cached.items(admin)
    assert first.status_code == 200, first.text
    assert first.headers["cache-status"] == "gatehouse; fwd=miss; stored"
    assert first.headers["cache-control"] == "private, no-cache"
    assert first.headers["etag"].startswith('W/"')
    assert "Authorization" in first.headers["vary"]
    second = await cached.items(admin)
    assert second.headers["cache-status"].startswith("gatehouse; hit; ttl=")
    assert second.content == first.content and second.headers["etag"] == first.headers["etag"]
    assert second.headers["content-range"] == first.headers["content-range"]
    # the parameters' order does not make another entry
    swapped = await cached.items(admin, "order=id&select=id,tenant,name,n")
    assert swapped.headers["cache-status"].startswith("gatehouse; hit") and swapped.content == first.content
    counts = cached.runtime.cache.counts
    assert counts[("admin", "items.v1", "hit")] == 2 and counts[("admin", "items.v1", "miss")] == 1
    scraped = cached.runtime.metrics.render().decode()
    assert 'gatehouse_cache_reads_total{app="admin",contract="items.v1",result="hit"} 2.0' in scraped

    async def audited() -> list[asyncpg.Record]:
        return await cached.owner.fetch("SELECT cached, rows, query FROM gatehouse.audit_log WHERE app = 'admin' "
                                        "AND target = 'items' ORDER BY at")

    deadline = time.monotonic() + 5
    while len(rows := await audited()) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [(r["cached"], r["rows"]) for r in rows] == [(False, 3), (True, 3), (True, 3)]
    assert {r["query"] for r in rows} == {"select=id,tenant,name,n&order=id"}  # a hit is audited like its fill


async def test_hits_and_not_modified_never_touch_the_database(cached: Cached) -> None:
    """With the table locked by another transaction, a read that reaches PostgreSQL waits; a hit and a 304
    answer at once."""
    admin = cached.as_app("admin")
    etag = (await cached.items(admin)).headers["etag"]
    async with cached.owner.transaction():
        await cached.owner.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        hit = await asyncio.wait_for(cached.items(admin), 1)
        assert hit.status_code == 200 and hit.headers["cache-status"].startswith("gatehouse; hit")
        revalidated = await asyncio.wait_for(cached.client.get(
            "/items?select=id,tenant,name,n&order=id", headers={**admin, "If-None-Match": etag}), 1)
        assert revalidated.status_code == 304 and revalidated.content == b""
        assert revalidated.headers["etag"] == etag
        miss = asyncio.ensure_future(cached.items(admin, "select=id"))
        await asyncio.sleep(0.3)
        assert not miss.done()  # this one needs the table
    assert (await miss).status_code == 200


async def test_a_tag_is_answered_304_even_when_the_entry_is_gone(cached: Cached) -> None:
    admin = cached.as_app("admin")
    etag = (await cached.items(admin)).headers["etag"]
    cached.runtime.cache.store.clear()
    again = await cached.client.get("/items?select=id,tenant,name,n&order=id",
                                    headers={**admin, "If-None-Match": f'"other", {etag}'})
    assert again.status_code == 304
    await cached.owner.execute("UPDATE items SET n = n + 1 WHERE id = 1")
    await asyncio.sleep(BOUND_S + SLACK_S)
    changed = await cached.client.get("/items?select=id,tenant,name,n&order=id",
                                      headers={**admin, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag


async def test_an_app_reads_its_own_writes_at_once(cached: Cached) -> None:
    acme = cached.as_tenant("acme")
    for round_ in range(1, 6):
        before = await cached.items(acme)
        assert before.status_code == 200, before.text
        await cached.items(acme)  # now cached
        written = await cached.client.patch("/items?id=eq.1", json={"n": round_}, headers=acme)
        assert written.status_code == 204, written.text
        after = await cached.items(acme)
        assert not after.headers["cache-status"].startswith("gatehouse; hit")
        assert {row["id"]: row["n"] for row in after.json()}[1] == round_
        created = await cached.client.post("/items", json={"tenant": "acme", "name": f"widget{round_}"},
                                           headers=acme)
        assert created.status_code == 201, created.text
        assert f"widget{round_}" in [row["name"] for row in (await cached.items(acme)).json()]
    # a join through a plain view: the write to items ends the cached totals too
    totals = (await cached.client.get("/tenant_totals", headers=acme)).json()
    await cached.client.patch("/items?id=eq.2", json={"n": 100}, headers=acme)
    assert (await cached.client.get("/tenant_totals", headers=acme)).json()[0]["total"] == totals[0]["total"] + 100


async def test_a_write_in_sql_is_seen_within_the_bound(cached: Cached) -> None:
    admin = cached.as_app("admin")
    for value in (7, 8, 9):
        await cached.items(admin)
        await cached.items(admin)
        await cached.owner.execute("UPDATE items SET n = $1 WHERE id = 3", value)
        written = time.monotonic()
        while (await cached.items(admin)).json()[2]["n"] != value:
            assert time.monotonic() - written < BOUND_S + SLACK_S, "a write in SQL outlived the bound"
            await asyncio.sleep(0.005)
    # another table of a join: the plan changes, the totals follow
    await cached.client.get("/tenant_totals", headers=admin)
    await cached.owner.execute("UPDATE tenants SET plan = 'platinum' WHERE name = 'acme'")
    await asyncio.sleep(BOUND_S + SLACK_S)
    plans = {row["tenant"]: row["plan"] for row in (await cached.client.get("/tenant_totals", headers=admin)).json()}
    assert plans["acme"] == "platinum"


async def test_tenants_and_apps_never_share_an_entry(cached: Cached) -> None:
    """The same path and query, one after another, from two tenants of one app and from three apps: each gets
    its own rows, and a tag of one is never a 304 for another."""
    callers = {"acme": cached.as_tenant("acme"), "globex": cached.as_tenant("globex"),
               "admin": cached.as_app("admin"), "partner": cached.as_app("partner")}
    expected = {"acme": {"acme"}, "globex": {"globex"}, "admin": {"acme", "globex"}, "partner": {"acme"}}
    tags: dict[str, str] = {}
    for _ in range(3):
        for name, headers in callers.items():
            answer = await cached.items(headers)
            assert {row["tenant"] for row in answer.json()} == expected[name], name
            tags[name] = answer.headers["etag"]
    assert len(set(tags.values())) == 4
    for name, headers in callers.items():
        for other, tag in tags.items():
            if other != name:
                answer = await cached.client.get("/items?select=id,tenant,name,n&order=id",
                                                 headers={**headers, "If-None-Match": tag})
                assert answer.status_code == 200 and {r["tenant"] for r in answer.json()} == expected[name]


async def test_a_contract_that_cannot_be_proven_fresh_is_not_cached(cached: Cached) -> None:
    admin = cached.as_app("admin")
    for _ in range(2):
        answer = await cached.client.get("/stock", headers=admin)
        assert answer.status_code == 200 and "cache-status" not in answer.headers and "etag" not in answer.headers


async def test_without_fresh_versions_the_cache_steps_aside(cached: Cached) -> None:
    """When the data versions cannot be read (here: the authenticator lost its privilege), reads go to the
    database (``fwd=bypass``) and nothing is stored; once they can, hits resume."""
    admin = cached.as_app("admin")
    await cached.items(admin)
    role = cached.project.authenticator_role
    await cached.owner.execute(f'REVOKE SELECT ON gatehouse_versions.data_versions FROM "{role}"')
    try:
        await asyncio.sleep(BOUND_S + SLACK_S)
        for _ in range(2):
            answer = await cached.items(admin)
            assert answer.status_code == 200 and answer.headers["cache-status"] == "gatehouse; fwd=bypass"
    finally:
        await cached.owner.execute(f'GRANT SELECT ON gatehouse_versions.data_versions TO "{role}"')
    await asyncio.sleep(BOUND_S + SLACK_S)
    await cached.items(admin)
    assert (await cached.items(admin)).headers["cache-status"].startswith("gatehouse; hit")


async def test_apply_puts_the_trigger_on_exactly_the_tables_cached_contracts_read(cached: Cached) -> None:
    rows = await cached.owner.fetch("SELECT tgrelid::regclass::text AS t FROM pg_trigger "
                                    "WHERE tgname = 'gatehouse_data_version' ORDER BY 1")
    assert [r["t"] for r in rows] == ["items", "tenants"]


# --- hypothesis: writes and cached reads interleaved, answers never older than the bound -------------------

Step = tuple[str, str]


@settings(max_examples=int(os.environ.get("CACHE_EXAMPLES", "12")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(["read", "read", "read", "http", "sql", "pause"]),
                                st.sampled_from(["acme", "globex", "admin", "partner"])), min_size=5, max_size=30))
async def test_interleaved_writes_never_leave_an_answer_older_than_the_bound(cached: Cached,
                                                                           steps: list[Step]) -> None:
    await _interleave(cached, steps)


async def _interleave(cached: Cached, steps: list[Step]) -> None:
    """``n`` of item 1 (acme's) counts writes. A read that starts at ``t`` must show at least every write this
    instance finished before ``t`` (its own), at least every SQL write finished before ``t - bound``, and
    nothing not yet started when it ended."""
    start = await cached.owner.fetchval("SELECT n FROM items WHERE id = 1")
    own_done: list[tuple[float, int]] = []
    any_done: list[tuple[float, int]] = [(time.monotonic(), start)]  # the last example's may be that recent
    started = start
    callers = {"acme": cached.as_tenant("acme"), "globex": cached.as_tenant("globex"),
               "admin": cached.as_app("admin"), "partner": cached.as_app("partner")}
    for action, who in steps:
        if action == "pause":
            await asyncio.sleep(0.05)
        elif action in ("http", "sql"):
            started += 1
            if action == "http":
                headers = callers["acme"] if who in ("acme", "partner") else callers["admin"]
                answer = await cached.client.patch("/items?id=eq.1", json={"n": started}, headers=headers)
                assert answer.status_code == 204, answer.text
                own_done.append((time.monotonic(), started))
            else:
                await cached.owner.execute("UPDATE items SET n = $1 WHERE id = 1", started)
            any_done.append((time.monotonic(), started))
        else:
            if who == "globex":  # never sees item 1 at all, cached or not
                answer = await cached.items(callers[who])
                assert all(row["tenant"] == "globex" for row in answer.json())
                continue
            began = time.monotonic()
            answer = await cached.items(callers[who])
            seen = {row["id"]: row["n"] for row in answer.json()}[1]
            floor = max([n for at, n in own_done if at <= began]
                        + [n for at, n in any_done if at <= began - BOUND_S - SLACK_S], default=0)
            assert floor <= seen <= started, (who, seen, floor, started, answer.headers.get("cache-status"))


# --- the Redis tier: what one instance read, another serves -----------------------------------------------

async def test_a_second_instance_serves_what_the_first_read_from_redis(
        make_project: ProjectFactory, serve_project: object, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHED_JWT_SECRET", SECRET)
    monkeypatch.setenv("GATEHOUSE_REDIS__URL", redis_url)
    monkeypatch.setenv("GATEHOUSE_REDIS__KEY_PREFIX", f"test:{uuid.uuid4().hex}:")
    project = make_project(toml=TOML, contracts=CONTRACTS, migrations={"V001__items.sql": MIGRATION})
    keys = await prepare(project)
    (one, first), (two, second) = await serve_project(project), await serve_project(project)  # type: ignore[operator]
    await _until(lambda: first.cache.versions.polls > 0 and second.cache.versions.polls > 0)
    admin = {"apikey": keys["admin"]}
    filled = await one.get("/items?order=id", headers=admin)
    assert filled.headers["cache-status"] == "gatehouse; fwd=miss; stored"
    assert first.cache.shared is not None
    await _until(lambda: not first.cache.shared._pending)  # stored in the background
    owner = await (await resolve_targets(project))["main"].connect_owner()
    try:
        async with owner.transaction():  # the second instance never reaches the table for it
            await owner.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
            shared = await asyncio.wait_for(two.get("/items?order=id", headers=admin), 1)
        assert shared.headers["cache-status"].startswith("gatehouse; hit; detail=shared")
        assert shared.content == filled.content and shared.headers["etag"] == filled.headers["etag"]
        assert (await two.get("/items?order=id", headers=admin)).headers["cache-status"].startswith("gatehouse; hit")
        # a write on the first instance: the second's tier entry is of older versions, never looked up again
        await one.patch("/items?id=eq.3", json={"n": 42}, headers=admin)
        await asyncio.sleep(BOUND_S + SLACK_S)
        after = await two.get("/items?order=id", headers=admin)
        assert after.json()[2]["n"] == 42
    finally:
        await owner.close()


async def test_a_redis_that_is_down_turns_the_tier_into_misses(
        make_project: ProjectFactory, serve_project: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from redis_server import free_port

    monkeypatch.setenv("CACHED_JWT_SECRET", SECRET)
    monkeypatch.setenv("GATEHOUSE_REDIS__URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    project = make_project(toml=TOML, contracts=CONTRACTS, migrations={"V001__items.sql": MIGRATION})
    keys = await prepare(project)
    client, runtime = await serve_project(project)  # type: ignore[operator]
    await _until(lambda: runtime.cache.versions.polls > 0)
    admin = {"apikey": keys["admin"]}
    for _ in range(5):
        answer = await client.get("/items?order=id", headers=admin)
        assert answer.status_code == 200 and len(answer.json()) == 3
    assert answer.headers["cache-status"].startswith("gatehouse; hit")  # memory still serves
    assert runtime.cache.shared is not None and runtime.cache.shared.errors >= 1
