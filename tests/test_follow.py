"""A running server follows ``apply`` and ``migrate`` without a restart, and a migration never leaves a
contract view missing: it is dropped and created again inside the migration's own transaction."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.app import create_admin_app
from gatehouse.migrate.views import ContractsWouldBreak
from gatehouse.project import load_project
from gatehouse.runtime import Runtime

TOML = """
[project]
name = "follow"

[databases.main]

[apps.web]
grants = [{ contract = "items", actions = ["read", "insert"] }]

[apps.mobile]
grants = [{ contract = "items", actions = ["read"] }]
"""
ITEMS_V1 = "-- not null: id\nSELECT id, label, price FROM items"
SCHEMA = """
CREATE TABLE items (id serial PRIMARY KEY, label text NOT NULL, price integer NOT NULL);
INSERT INTO items (label, price) SELECT 'item ' || n, n FROM generate_series(1, 50) AS n;
"""


async def _until(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "the server did not follow in time"
        await asyncio.sleep(0.05)


class Traffic:
    """Requests from every app, one after another, while a change happens; every answer is kept."""

    def __init__(self, client: httpx.AsyncClient, keys: dict[str, str]) -> None:
        self.client, self.keys = client, keys
        self.statuses: list[tuple[str, int, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for app, key in self.keys.items():
                response = await self.client.get("/items?select=id,price&id=lte.3", headers={"apikey": key})
                self.statuses.append((app, response.status_code, response.text[:200]))
            await asyncio.sleep(0.005)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self._task = asyncio.create_task(self._run())
        try:
            yield
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def failures(self) -> list[tuple[str, int, str]]:
        return [s for s in self.statuses if s[1] != 200]


async def _served(make_project: ProjectFactory, serve_project: Any) -> tuple[Any, httpx.AsyncClient, Runtime,
                                                                             dict[str, str]]:
    project = make_project(toml=TOML, contracts={"items.v1.sql": ITEMS_V1},
                           migrations={"V001__items.sql": SCHEMA})
    keys = await prepare(project)
    client, runtime = await serve_project(project)
    return project, client, runtime, keys


async def test_a_type_change_behind_a_view_migrates_and_the_server_follows(make_project: ProjectFactory,
                                                                          serve_project: Any) -> None:
    project, client, runtime, keys = await _served(make_project, serve_project)
    (project.root / "migrations" / "V002__bigger_prices.sql").write_text(
        "ALTER TABLE items ALTER COLUMN price TYPE bigint;\nUPDATE items SET price = 5000000000 WHERE id = 1;\n")
    traffic = Traffic(client, keys)
    async with traffic.running():
        await asyncio.sleep(0.1)
        done = await operations.migrate_all(project)
        await _until(lambda: _shows(runtime, "bigint"))
        await asyncio.sleep(0.1)
    assert [m.label for m, _ in done["main"]] == ["V002 bigger prices"]
    assert traffic.failures == [] and len(traffic.statuses) > 10
    response = await client.get("/items?price=gt.4294967296", headers={"apikey": keys["web"]})
    assert response.status_code == 200 and response.json() == [{"id": 1, "label": "item 1", "price": 5000000000}]
    async with operations.owner_connection(project) as conn:  # privileges came back with the view, no more
        grants = await conn.fetch(
            "SELECT grantee, privilege_type FROM information_schema.role_table_grants "
            "WHERE table_schema = 'api_v1' AND table_name = 'items' AND grantee LIKE $1 ORDER BY 1, 2",
            f"{project.role_prefix}%")
    assert [(r["grantee"].removeprefix(project.role_prefix), r["privilege_type"]) for r in grants] == [
        ("app_mobile", "SELECT"), ("app_web", "INSERT"), ("app_web", "SELECT")]
    assert runtime.follower is not None and runtime.follower.reloads >= 1
    assert b'gatehouse_reloads_total{outcome="schema"}' in runtime.metrics.render()


async def _shows(runtime: Runtime, type_: str) -> bool:
    return runtime.catalog[("api_v1", "items")].columns["price"] == type_


async def test_a_migration_that_breaks_a_contract_is_refused_whole(make_project: ProjectFactory,
                                                                  serve_project: Any) -> None:
    project, client, _, keys = await _served(make_project, serve_project)
    (project.root / "migrations" / "V002__drop_price.sql").write_text(
        "CREATE TABLE audit_note (id int);\nALTER TABLE items DROP COLUMN price;\n")
    with pytest.raises(ContractsWouldBreak) as refused:  # nobody called items yet: the apps granted it
        await operations.migrate_all(project)
    message = str(refused.value)
    assert "items.v1" in message and "granted it: mobile, web" in message and "price" in message
    assert (await client.get("/items?id=eq.1", headers={"apikey": keys["web"]})).status_code == 200
    async def audited() -> bool:  # reads are audited in batches, a moment after the answer
        async with operations.owner_connection(project) as conn:
            return bool(await conn.fetchval("SELECT count(*) FROM gatehouse.audit_log WHERE app = 'web'"))

    await _until(audited)
    with pytest.raises(ContractsWouldBreak) as refused:  # now web is pinned to v1; mobile never called it
        await operations.migrate_all(project)
    assert "pinned to it: web)" in str(refused.value) and "mobile" not in str(refused.value)
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT count(*) FROM information_schema.columns "
                                   "WHERE table_schema = 'public' AND table_name = 'items' AND column_name = 'price'") == 1
        assert await conn.fetchval("SELECT to_regclass('public.audit_note')") is None
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.migrations WHERE version = 2 AND success") == 0
    response = await client.get("/items?id=eq.1", headers={"apikey": keys["mobile"]})
    assert response.status_code == 200 and response.json()[0]["price"] == 1


async def test_a_view_dropped_by_the_migration_itself_comes_back(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, contracts={"items.v1.sql": ITEMS_V1}, migrations={"V001__items.sql": SCHEMA})
    await prepare(project)
    (project.root / "migrations" / "V002__old_style.sql").write_text(
        "DROP VIEW api_v1.items;\nALTER TABLE items ALTER COLUMN label TYPE varchar(200);\n")
    await operations.migrate_all(project)
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                   "WHERE attrelid = 'api_v1.items'::regclass AND attname = 'label'") == \
            "character varying(200)"
        assert await conn.fetchval("SELECT has_table_privilege($1, 'api_v1.items', 'SELECT')",
                                   f"{project.role_prefix}app_mobile")


async def test_apply_of_a_new_version_is_served_without_restart(make_project: ProjectFactory,
                                                                serve_project: Any) -> None:
    project, client, runtime, keys = await _served(make_project, serve_project)
    admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_admin_app(runtime)), base_url="http://a")
    (project.root / "contracts" / "items.v2.sql").write_text("-- not null: id\nSELECT id, label, price, "
                                                             "price * 2 AS double_price FROM items")
    traffic = Traffic(client, keys)
    async with traffic.running():
        await operations.apply_all(load_project(project.root))
        ready = await admin.get("/ready")
        assert ready.status_code == 200, ready.text  # the new views exist; the old still serve

        async def v2_served() -> bool:
            answer = await client.get("/items?id=eq.2", headers={"apikey": keys["web"], "Accept-Profile": "v2"})
            return answer.status_code == 200 and answer.json()[0].get("double_price") == 4

        await _until(v2_served)
    assert traffic.failures == []
    assert (await admin.get("/ready")).status_code == 200
    assert b'gatehouse_reloads_total{outcome="project"}' in runtime.metrics.render()
    await admin.aclose()


async def test_a_missed_notification_is_caught_up(make_project: ProjectFactory, serve_project: Any) -> None:
    project, _client, runtime, _keys = await _served(make_project, serve_project)
    async with operations.owner_connection(project) as conn:  # the listening connection is cut
        cut = await conn.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE application_name = 'gatehouse/follow' AND datname = current_database()")
    assert cut == 1
    (project.root / "contracts" / "items.v2.sql").write_text("SELECT id, label FROM items")
    await operations.apply_all(load_project(project.root))
    await _until(lambda: _serves_v2(runtime), timeout=8)


async def _serves_v2(runtime: Runtime) -> bool:
    return 2 in runtime.schemas


async def test_ready_turns_false_only_when_a_served_view_is_gone(make_project: ProjectFactory,
                                                                 serve_project: Any) -> None:
    project, _, runtime, _ = await _served(make_project, serve_project)
    assert await runtime.readiness() == {"main": "ok"}
    async with operations.owner_connection(project) as conn:
        await conn.execute("DROP VIEW api_v1.items")
    report = await runtime.readiness()
    assert "api_v1.items" in report["main"] and "gatehouse apply" in report["main"]
    await operations.apply_all(project)
    assert await runtime.readiness() == {"main": "ok"}


async def test_kill_9_in_the_middle_of_a_migration_leaves_every_view(make_project: ProjectFactory) -> None:
    """The views a migration drops exist again the moment it dies: its transaction never committed."""
    project = make_project(toml=TOML, contracts={"items.v1.sql": ITEMS_V1}, migrations={"V001__items.sql": SCHEMA})
    await prepare(project)
    (project.root / "migrations" / "V002__slow.sql").write_text(
        "ALTER TABLE items ALTER COLUMN price TYPE bigint;\nSELECT pg_sleep(30);\n")
    migrating = subprocess.Popen([sys.executable, "-m", "gatehouse", "--project", str(project.root), "migrate"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    async with operations.owner_connection(project) as conn:
        for _ in range(200):  # until the migration sleeps with the views dropped
            if await conn.fetchval(f"SELECT count(*) {SLEEPING}"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the migration never started")
        migrating.send_signal(signal.SIGKILL)
        migrating.wait(10)
        # its backend still sleeps: it notices the dead client only when the statement ends; end it now
        await conn.execute(f"SELECT pg_cancel_backend(pid) {SLEEPING}")
        await _until(lambda: _no_migration_running(conn))
        assert await conn.fetchval("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                   "WHERE attrelid = 'api_v1.items'::regclass AND attname = 'price'") == "integer"
        assert await conn.fetchval("SELECT has_table_privilege($1, 'api_v1.items', 'SELECT')",
                                   f"{project.role_prefix}app_mobile")
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.migrations WHERE version = 2 AND success") == 0
    (project.root / "migrations" / "V002__slow.sql").write_text(  # not yet applied: the file may still change
        "ALTER TABLE items ALTER COLUMN price TYPE bigint;\n")
    done = await operations.migrate_all(project)
    assert [m.label for m, _ in done["main"]] == ["V002 slow"]
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                   "WHERE attrelid = 'api_v1.items'::regclass AND attname = 'price'") == "bigint"


SLEEPING = ("FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid() "
            "AND datname = current_database()")
"""The migration's backend, asleep in the middle of it."""


async def _no_migration_running(conn: Any) -> bool:
    return not await conn.fetchval(f"SELECT count(*) {SLEEPING}")


async def test_a_migration_gives_way_to_readers_instead_of_queueing_them(make_project: ProjectFactory) -> None:
    """A long transaction holds the table: the migration waits at most the lock timeout each try, so the
    readers queued behind it wait no longer than that, and it goes through once the transaction ends."""
    project = make_project(toml=TOML, contracts={"items.v1.sql": ITEMS_V1}, migrations={"V001__items.sql": SCHEMA})
    await prepare(project)
    (project.root / "migrations" / "V002__bigger.sql").write_text("ALTER TABLE items ALTER COLUMN price TYPE bigint;")
    async with operations.owner_connection(project) as holder, operations.owner_connection(project) as reader:
        await reader.execute("SET statement_timeout = '1s'")
        holding = holder.transaction()
        await holding.start()
        await holder.execute("LOCK TABLE items IN ACCESS SHARE MODE")  # a long report, say
        migrating = asyncio.create_task(operations.migrate_all(project))
        slowest = 0.0
        deadline = asyncio.get_running_loop().time() + 1.5
        while asyncio.get_running_loop().time() < deadline:
            started = asyncio.get_running_loop().time()
            assert await reader.fetchval("SELECT count(*) FROM api_v1.items") == 50
            slowest = max(slowest, asyncio.get_running_loop().time() - started)
            await asyncio.sleep(0.01)
        assert not migrating.done()
        await holding.commit()
        done = await asyncio.wait_for(migrating, 30)
    assert [m.label for m, _ in done["main"]] == ["V002 bigger"]
    assert slowest < 0.9, slowest  # never the whole wait of the migration: at most one lock timeout


async def test_a_migration_that_never_gets_its_lock_fails_clearly(make_project: ProjectFactory,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from gatehouse.migrate import runner
    from gatehouse.migrate.files import MigrationFailed

    monkeypatch.setattr(runner, "LOCK_ATTEMPTS", 2)
    project = make_project(toml=TOML, contracts={"items.v1.sql": ITEMS_V1}, migrations={"V001__items.sql": SCHEMA})
    await prepare(project)
    (project.root / "migrations" / "V002__bigger.sql").write_text("ALTER TABLE items ALTER COLUMN price TYPE bigint;")
    async with operations.owner_connection(project) as holder, holder.transaction():
        await holder.execute("LOCK TABLE items IN ACCESS SHARE MODE")
        with pytest.raises(MigrationFailed) as failed:
            await operations.migrate_all(project)
    assert "gave way each time" in str(failed.value) and "pg_stat_activity" in str(failed.value)
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                   "WHERE attrelid = 'items'::regclass AND attname = 'price'") == "integer"
