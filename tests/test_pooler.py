"""The apps' pools through PgBouncer in transaction mode (``[databases.<name>] pooler_url``), against a real
PgBouncer (Debian's ``pgbouncer`` package) in front of the machine's PostgreSQL.

A transaction pooler refuses the ``role`` startup parameter; ``gatehouse pooler`` writes one pooler database
per app that sets the role on each server connection. These tests check, in the database, that every
statement runs as the app's role, that writes commit with their audit record, that a pooler database without
the role is refused rather than served as the authenticator, and that the pooler bounds an app's server
connections across several gatehouse instances."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest
from typer.testing import CliRunner

from conftest import _create_database, drop_project, run_sync, with_database
from gatehouse import operations
from gatehouse.app import create_app
from gatehouse.cli import app as cli_app
from gatehouse.db.pooler import pgbouncer_databases
from gatehouse.errors import PoolerMisconfigured, ProjectError
from gatehouse.project import Project, load_project
from gatehouse.runtime import Runtime
from pgbouncer import PgBouncer

TOML = """
[project]
name = "{name}"

[databases.main]

[apps.web]
quota = {{ pool_size = 2 }}
grants = [{{ contract = "items", actions = ["read", "insert"] }}, {{ contract = "whoami", actions = ["read"] }}]

[apps.reports]
quota = {{ pool_size = 1 }}
grants = [{{ contract = "whoami", actions = ["read"] }}]
"""
FILES = {
    "migrations/V001__items.sql": "CREATE TABLE items (id serial PRIMARY KEY, note text NOT NULL);\n"
                                  "INSERT INTO items (note) SELECT 'item ' || n FROM generate_series(1, 5) AS n;\n",
    "contracts/items.v1.sql": "SELECT id, note FROM items",
    # current_user inside a view is the role the statement runs as: what the database itself checks privileges of
    "contracts/whoami.v1.sql": "SELECT id, current_user::text AS who FROM items",
}
@pytest.fixture
def project_folder(server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """The project migrated and applied on a database of its own (directly, as migrations always are)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    root = tmp_path / "project"
    for relative, text in {"gatehouse.toml": TOML.format(name=name), **FILES}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    run_sync(_create_database(server_uri, f"{name}_main"))
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", with_database(server_uri, f"{name}_main"))
    project = load_project(root)

    async def prepare() -> None:
        await operations.migrate_all(project)
        await operations.apply_all(project)

    run_sync(prepare())
    yield project
    run_sync(drop_project(server_uri, [f"{name}_main"], project.role_prefix))


@pytest.fixture
def pooled(project_folder: Project, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Project, PgBouncer]]:
    """A PgBouncer set up as ``gatehouse pooler`` says, and the project loaded with ``pooler_url`` on it."""
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__POOLER_URL", "postgresql://127.0.0.1:1/main")
    lines = pgbouncer_databases(load_project(project_folder.root))
    bouncer = PgBouncer([line for line in lines if not line.startswith(";")], project_folder.authenticator_role)
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__POOLER_URL", bouncer.url())
    try:
        yield load_project(project_folder.root), bouncer
    finally:
        bouncer.stop()


@asynccontextmanager
async def instance(project: Project) -> AsyncIterator[httpx.AsyncClient]:
    runtime = Runtime(project)
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=create_app(runtime, manage_runtime=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://gatehouse.test") as client:
            yield client
    finally:
        await runtime.stop()


async def owner(project: Project) -> asyncpg.Connection:
    return await asyncpg.connect(os.environ["GATEHOUSE_DATABASES__MAIN__URL"])


async def test_every_statement_runs_as_the_apps_role_and_writes_commit_with_their_audit(
        pooled: tuple[Project, PgBouncer]) -> None:
    project, _ = pooled
    keys = {app: (await operations.create_key(project, app)).secret_key for app in ("web", "reports")}
    async with instance(project) as client:
        for app in ("web", "reports"):
            answer = await client.get("/whoami?select=who&limit=1", headers={"apikey": keys[app]})
            assert answer.status_code == 200, answer.text
            assert answer.json() == [{"who": project.apps[app].role}]
        written = await client.post("/items", json={"note": "through the pooler"},
                                    headers={"apikey": keys["web"], "Prefer": "return=representation",
                                             "x-request-id": "pooled-write-1"})
        assert written.status_code == 201, written.text
        new_id = written.json()[0]["id"]
        refused = await client.post("/items", json={"note": "no"}, headers={"apikey": keys["reports"]})
        assert refused.status_code in (403, 404)
    conn = await owner(project)
    try:
        assert await conn.fetchval("SELECT note FROM items WHERE id = $1", new_id) == "through the pooler"
        assert await conn.fetchval("SELECT count(*) FROM items WHERE note = 'no'") == 0
        audited = await conn.fetchrow("SELECT app, status FROM gatehouse.audit_log WHERE request_id = 'pooled-write-1'")
        assert audited is not None and (audited["app"], audited["status"]) == ("web", 201)
    finally:
        await conn.close()


async def test_inserts_committed_together_through_the_pooler_keep_each_row_and_record(
        pooled: tuple[Project, PgBouncer]) -> None:
    """Group commit (one ``Sync`` for several inserts, statements parsed each time) through a transaction pooler."""
    project, _ = pooled
    key = (await operations.create_key(project, "web")).secret_key
    runtime = Runtime(project)
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=create_app(runtime, manage_runtime=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://gatehouse.test") as client:
            async def insert(n: int) -> int:
                answer = await client.post("/items", json={"note": f"grouped {n}"},
                                           headers={"apikey": key, "x-request-id": f"pooled-group-{n}"})
                return answer.status_code
            statuses = await asyncio.gather(*(insert(n) for n in range(24)))
        grouped = runtime.pools.statement_groups("web", "main").grouped
    finally:
        await runtime.stop()
    assert statuses == [201] * 24
    assert grouped >= 2
    conn = await owner(project)
    try:
        assert await conn.fetchval("SELECT count(*) FROM items WHERE note LIKE 'grouped %'") == 24
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.audit_log WHERE request_id LIKE 'pooled-group-%' "
                                   "AND status = 201") == 24
    finally:
        await conn.close()


async def test_a_pooler_database_that_does_not_set_the_role_is_refused(project_folder: Project,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__POOLER_URL", "postgresql://127.0.0.1:1/main")
    lines = [line for line in pgbouncer_databases(load_project(project_folder.root)) if not line.startswith(";")]
    broken = [line.split(" connect_query=")[0] if line.startswith("main__web") else line for line in lines]
    bouncer = PgBouncer(broken, project_folder.authenticator_role)
    try:
        monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__POOLER_URL", bouncer.url())
        runtime = Runtime(load_project(project_folder.root))
        with pytest.raises(PoolerMisconfigured) as refused:
            await runtime.start()
        await runtime.stop()
        message = str(refused.value)
        assert "main__web" in message and "connect_query" in message and "gatehouse pooler" in message
        assert project_folder.authenticator_role in message  # what it would have run as
    finally:
        bouncer.stop()


async def test_the_pooler_bounds_an_apps_server_connections_across_instances(
        pooled: tuple[Project, PgBouncer]) -> None:
    project, _ = pooled
    key = (await operations.create_key(project, "web")).secret_key
    conn = await owner(project)
    seen: set[int] = set()
    try:
        async with instance(project) as first, instance(project) as second:
            async def load(client: httpx.AsyncClient) -> None:
                for _ in range(30):
                    answer = await client.get("/items?select=id,note&order=id", headers={"apikey": key})
                    assert answer.status_code == 200

            async def watch() -> None:
                for _ in range(40):
                    rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE usename = $1 AND "
                                            "application_name = 'gatehouse/web'", project.authenticator_role)
                    seen.update(row["pid"] for row in rows)
                    await asyncio.sleep(0.01)

            await asyncio.gather(watch(), *(load(client) for client in (first, second) for _ in range(4)))
    finally:
        await conn.close()
    # two instances of four clients' worth of load each, and the app's pool_size is 2: the pooler's limit
    assert 1 <= len(seen) <= project.apps["web"].config.quota.pool_size


def test_gatehouse_pooler_prints_a_database_per_app(project_folder: Project,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__POOLER_URL", "postgresql://pooler.internal:6432/main")
    result = CliRunner().invoke(cli_app, ["--project", str(project_folder.root), "pooler"])
    assert result.exit_code == 0, result.output
    web = next(line for line in result.output.splitlines() if line.startswith("main__web = "))
    assert f'SET ROLE "{project_folder.apps["web"].role}"' in web and "pool_size=2" in web
    assert f"user={project_folder.authenticator_role}" in web
    assert "pool_mode = transaction" in result.output
    monkeypatch.delenv("GATEHOUSE_DATABASES__MAIN__POOLER_URL")
    none = CliRunner().invoke(cli_app, ["--project", str(project_folder.root), "pooler"])
    assert none.exit_code == 1 and "no database has a pooler_url" in none.output


def test_a_pooler_url_needs_the_databases_own_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (root / "gatehouse.toml").write_text(TOML.format(name="pooled") + '\n')
    monkeypatch.delenv("GATEHOUSE_DATABASES__MAIN__URL", raising=False)
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__POOLER_URL", "postgresql://127.0.0.1:6432/main")
    with pytest.raises(ProjectError) as refused:
        load_project(root)
    assert "pooler_url needs url" in str(refused.value)
