"""Direct SQL access for BI (``gatehouse access``): what the printed connection string can and cannot do, checked
with the real ``psql`` and in PostgreSQL's catalog; limits in effect; revocation ends live sessions; ``apply``
keeps the roles and makes them follow the project."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.db import direct_access, direct_access_plan, direct_access_report
from gatehouse.db.targets import resolve_targets
from gatehouse.project import Project, load_project
from replica_cluster import Cluster, ReplicaPair, free_port, postgres_bin, private_root

TOML = """
[project]
name = "acc"
default_version = 2

[databases.main]

[apps.bi]
description = "dashboards"
quota = { pool_size = 2, statement_timeout_ms = 800 }
grants = [{ contract = "things", actions = ["read"] }]

[apps.other]
grants = [{ contract = "others", actions = ["read"] }]

[apps.writer]
version = 1
grants = [{ contract = "things", actions = ["read", "insert", "update", "delete"] }]

[apps.tenant]
grants = [{ contract = "others", actions = ["read"] },
          { contract = "things", actions = ["read"], filter = "owner=eq.{claims.sub}" }]
"""
MIGRATIONS = {"V001__tables.sql": """
CREATE TABLE things (id serial PRIMARY KEY, owner text NOT NULL, val integer, secret text);
CREATE TABLE others (id integer PRIMARY KEY, note text);
INSERT INTO things (owner, val, secret) VALUES ('a', 1, 's1'), ('b', 2, 's2'), ('a', 3, 's3');
INSERT INTO others VALUES (1, 'x');
"""}
CONTRACTS = {"things.v1.sql": "SELECT id, owner FROM things", "things.v2.sql": "SELECT id, owner, val FROM things",
             "others.v1.sql": "SELECT id, note FROM others"}
GATEHOUSE = [sys.executable, "-m", "gatehouse"]


def cli(project: Project, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*GATEHOUSE, "--project", str(project.root), *args], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "COLUMNS": "250"})
    if check and result.returncode != 0:
        raise AssertionError(f"gatehouse {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    assert "Traceback" not in result.stderr
    return result


def connection_strings(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith("postgresql://")]


def psql(url: str, sql: str) -> subprocess.CompletedProcess[str]:
    """The real psql, as a BI user runs it, with the printed connection string."""
    return subprocess.run(["psql", url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
                          capture_output=True, text=True, timeout=60)


async def owner(project: Project) -> asyncpg.Connection:
    return await (await resolve_targets(project))["main"].connect_owner()


async def role_row(project: Project, role: str) -> asyncpg.Record | None:
    conn = await owner(project)
    try:
        return await conn.fetchrow(
            "SELECT r.rolcanlogin, r.rolinherit, r.rolconnlimit, r.rolsuper, r.rolcreaterole, r.rolcreatedb, "
            "r.rolreplication, r.rolbypassrls, shobj_description(r.oid, 'pg_authid') AS comment, "
            "(SELECT setconfig FROM pg_db_role_setting WHERE setrole = r.oid AND setdatabase = 0) AS settings, "
            "(SELECT array_agg(g.rolname::text) FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            " WHERE m.member = r.oid) AS member_of, "
            "(SELECT rolpassword FROM pg_authid WHERE oid = r.oid) AS password "
            "FROM pg_roles r WHERE r.rolname = $1", role)
    finally:
        await conn.close()


@pytest.fixture
async def acc(make_project: ProjectFactory) -> Project:
    project = make_project(toml=TOML, contracts=CONTRACTS, migrations=MIGRATIONS)
    await prepare(project)
    return project


def edit_toml(project: Project, old: str, new: str) -> Project:
    path = project.root / "gatehouse.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return load_project(project.root)


async def test_a_bi_role_reads_its_views_and_nothing_else(acc: Project) -> None:
    made = cli(acc, "access", "create", "bi")
    [url] = connection_strings(made.stdout)
    role = f"{acc.role_prefix}sql_bi"
    assert url.startswith(f"postgresql://{role}:") and "127.0.0.1" in url
    assert "cannot be shown again" in made.stdout and "api_v2.things" in made.stdout

    # its own views, through search_path = its API version (v2, the project's default)
    assert psql(url, "SELECT string_agg(val::text, ',' ORDER BY id) FROM things").stdout.strip() == "1,2,3"
    assert psql(url, "SHOW search_path").stdout.strip() == "api_v2"

    refused = {
        "a table": "SELECT * FROM public.things",
        "a column the contract hides": "SELECT secret FROM public.things",
        "another app's view": "SELECT * FROM api_v2.others",
        "another API version": "SELECT * FROM api_v1.things",
        "gatehouse's keys": "SELECT * FROM gatehouse.keys",
        "forging an audit record": "BEGIN READ WRITE; INSERT INTO gatehouse.audit (app) VALUES ('x'); COMMIT",
        "writing through its view": "BEGIN READ WRITE; INSERT INTO things (owner) VALUES ('z'); COMMIT",
        "creating a table": "BEGIN READ WRITE; CREATE TABLE public.mine (a integer); COMMIT",
        "creating a view in its schema": "BEGIN READ WRITE; CREATE VIEW api_v2.mine AS SELECT 1; COMMIT",
        "becoming the app role": f"SET ROLE {acc.apps['bi'].role}",
        "becoming the owner": "SET ROLE postgres",
        "becoming the authenticator": f"SET ROLE {acc.authenticator_role}",
        "a temporary table": "CREATE TEMP TABLE scratch (a integer)",
    }
    for what, sql in refused.items():
        result = psql(url, sql)
        assert result.returncode != 0, f"{what} was allowed: {result.stdout}"
        assert re.search(r"permission denied|read-only transaction", result.stderr), (what, result.stderr)

    row = await role_row(acc, role)
    assert row is not None
    assert row["rolcanlogin"] and not row["rolinherit"] and not row["member_of"]
    assert not any(row[k] for k in ("rolsuper", "rolcreaterole", "rolcreatedb", "rolreplication", "rolbypassrls"))
    assert row["comment"].startswith(f"gatehouse direct SQL access: project {acc.name}, app bi, database main, ")
    assert row["password"].startswith("SCRAM-SHA-256$4096:")
    password = url.split("@")[0].rsplit(":", 1)[1]
    assert password not in row["password"] and len(password) >= 40

    # PostgreSQL's own privilege checks: exactly its view, nowhere to create anything
    conn = await owner(acc)
    try:
        reach = await direct_access_report.exposure(conn, role)
    finally:
        await conn.close()
    assert reach["relations"] == ["api_v2.things"]
    assert reach["creatable"] == [] and reach["definers"] == []


async def test_an_app_that_writes_gets_reads_only(acc: Project) -> None:
    [url] = connection_strings(cli(acc, "access", "create", "writer").stdout)
    assert psql(url, "SELECT count(*) FROM things").stdout.strip() == "3"  # writer is pinned to v1
    assert psql(url, "SHOW search_path").stdout.strip() == "api_v1"
    for sql in ("BEGIN READ WRITE; INSERT INTO things (owner) VALUES ('z'); COMMIT",
                "BEGIN READ WRITE; DELETE FROM things; COMMIT", "BEGIN READ WRITE; UPDATE things SET owner = 'q'; COMMIT"):
        result = psql(url, sql)
        assert result.returncode != 0 and "permission denied for view things" in result.stderr
    conn = await owner(acc)
    try:
        assert await conn.fetchval("SELECT count(*) FROM things") == 3
        reach = await direct_access_report.exposure(conn, f"{acc.role_prefix}sql_writer")
    finally:
        await conn.close()
    assert reach["relations"] == ["api_v1.things"]  # not the sequence the app role may use to insert


async def test_statement_timeout_and_connection_limit_are_in_effect(acc: Project) -> None:
    [url] = connection_strings(cli(acc, "access", "create", "bi").stdout)
    row = await role_row(acc, f"{acc.role_prefix}sql_bi")
    assert row is not None and row["rolconnlimit"] == 2
    assert {"statement_timeout=800", "search_path=api_v2", "default_transaction_read_only=on",
            "idle_in_transaction_session_timeout=60000"} <= set(row["settings"])

    slow = psql(url, "SELECT pg_sleep(3)")
    assert slow.returncode != 0 and "canceling statement due to statement timeout" in slow.stderr
    assert psql(url, "SELECT pg_sleep(0.1)").returncode == 0

    held = [await asyncpg.connect(url) for _ in range(2)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError, match="too many connections for role"):
            await asyncpg.connect(url)
        third = psql(url, "SELECT 1")
        assert third.returncode != 0 and "too many connections for role" in third.stderr
    finally:
        for conn in held:
            await conn.close()


async def test_revoke_ends_a_live_session_and_the_login_fails_afterwards(acc: Project) -> None:
    [url] = connection_strings(cli(acc, "access", "create", "bi").stdout)
    role = f"{acc.role_prefix}sql_bi"
    live = await asyncpg.connect(url)
    assert await live.fetchval("SELECT count(*) FROM things") == 3
    sleeping = subprocess.Popen(["psql", url, "-X", "-c", "SELECT pg_sleep(0.5); SELECT pg_sleep(0.5)"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    revoked = cli(acc, "access", "revoke", "bi")
    assert f"dropped role {role}" in revoked.stdout

    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await live.fetchval("SELECT 1")
    await live.close()
    sleeping.wait(timeout=30)
    after = psql(url, "SELECT 1")
    assert after.returncode != 0 and f'role "{role}" does not exist' in after.stderr
    assert await role_row(acc, role) is None
    again = cli(acc, "access", "revoke", "bi", check=False)
    assert again.returncode == 1 and "has no direct SQL access" in again.stderr


async def test_an_app_with_row_filters_is_refused(acc: Project) -> None:
    result = cli(acc, "access", "create", "tenant", check=False)
    assert result.returncode == 1
    assert "row filters" in result.stderr and "apps.tenant.grants[1] on 'things'" in result.stderr
    assert "would read every row" in result.stderr and "hint:" in result.stderr
    assert connection_strings(result.stdout) == []
    assert await role_row(acc, f"{acc.role_prefix}sql_tenant") is None
    assert cli(acc, "access", "create", "ghost", check=False).stderr.count("no application named 'ghost'") == 1


async def test_apply_keeps_the_role(acc: Project) -> None:
    """``apply`` as it is (it drops stale ``gh_<project>_app_*`` roles only): the role and its grants stay."""
    [url] = connection_strings(cli(acc, "access", "create", "bi").stdout)
    await operations.apply_all(acc)
    cli(acc, "apply")
    assert psql(url, "SELECT count(*) FROM things").stdout.strip() == "3"
    assert await role_row(acc, f"{acc.role_prefix}sql_bi") is not None


async def test_apply_makes_the_role_follow_its_app_and_revokes_a_removed_app(acc: Project) -> None:
    [url] = connection_strings(cli(acc, "access", "create", "bi").stdout)
    role = f"{acc.role_prefix}sql_bi"

    # a changed contract's view is created again: the access role's grant comes back with it
    (acc.root / "contracts" / "things.v2.sql").write_text("SELECT id, owner, val, val * 2 AS twice FROM things")
    acc = load_project(acc.root)
    await operations.apply_all(acc)
    assert psql(url, "SELECT sum(twice) FROM things").stdout.strip() == "12"

    # its grants and quota change in gatehouse.toml: the role follows at the next apply
    acc = edit_toml(acc, 'quota = { pool_size = 2, statement_timeout_ms = 800 }\ngrants = [{ contract = "things"',
                    'quota = { pool_size = 3, statement_timeout_ms = 900 }\ngrants = [{ contract = "others"')
    [report] = await operations.apply_all(acc)
    assert f"revoked SELECT on api_v2.things from {role}" in report.changes
    assert f"granted SELECT on api_v2.others to {role}" in report.changes
    assert psql(url, "SELECT note FROM others").stdout.strip() == "x"
    assert "permission denied" in psql(url, "SELECT * FROM things").stderr
    row = await role_row(acc, role)
    assert row is not None and row["rolconnlimit"] == 3 and "statement_timeout=900" in row["settings"]
    [again] = await operations.apply_all(acc)
    assert not [line for line in again.changes if role in line]  # idempotent

    # the app is removed from the project: apply revokes its direct access, live sessions included
    live = await asyncpg.connect(url)
    text = (acc.root / "gatehouse.toml").read_text()
    start = text.index("[apps.bi]")
    acc = edit_toml(acc, text[start:text.index("[apps.other]")], "")
    [report] = await operations.apply_all(acc)
    assert any(line.startswith("REVOKED direct SQL access of bi") and "app removed from the project" in line
               for line in report.changes), report.changes
    assert await role_row(acc, role) is None
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await live.fetchval("SELECT 1")
    await live.close()
    assert "does not exist" in psql(url, "SELECT 1").stderr


async def test_apply_revokes_an_app_that_gains_a_row_filter(acc: Project) -> None:
    [url] = connection_strings(cli(acc, "access", "create", "bi").stdout)
    acc = edit_toml(acc, 'grants = [{ contract = "things", actions = ["read"] }]\n\n[apps.other]',
                    'grants = [{ contract = "things", actions = ["read"], filter = "owner=eq.a" }]\n\n[apps.other]')
    [report] = await operations.apply_all(acc)
    assert any(line.startswith("REVOKED direct SQL access of bi") and "row filters" in line for line in report.changes)
    assert psql(url, "SELECT 1").returncode != 0


async def test_apply_runs_the_direct_access_step(acc: Project) -> None:
    """`apply` (db/sync.py): an app removed from the project loses its direct access."""
    cli(acc, "access", "create", "other")
    text = (acc.root / "gatehouse.toml").read_text()
    acc = edit_toml(acc, text[text.index("[apps.other]"):text.index("[apps.writer]")], "")
    await operations.apply_all(acc)
    assert await role_row(acc, f"{acc.role_prefix}sql_other") is None


async def test_list_shows_each_role_with_its_use_and_versions_shows_it(acc: Project) -> None:
    assert "no direct SQL access" in cli(acc, "access", "list").stdout
    [url] = connection_strings(cli(acc, "access", "create", "bi").stdout)
    cli(acc, "access", "create", "other")
    live = await asyncpg.connect(url)
    try:
        await live.fetchval("SELECT count(*) FROM things")
        listed: list[dict[str, Any]] = json.loads(cli(acc, "access", "list", "--format", "json").stdout)
        by_app = {entry["app"]: entry for entry in listed}
        assert set(by_app) == {"bi", "other"}
        bi = by_app["bi"]
        assert bi["database"] == "main" and bi["role"] == f"{acc.role_prefix}sql_bi"
        assert bi["connection_limit"] == 2 and bi["connections"] == 1 and bi["last_activity"] is not None
        assert bi["created"] is not None and bi["statement_timeout_ms"] == 800 and bi["search_path"] == "api_v2"
        assert by_app["other"]["connections"] == 0 and by_app["other"]["connection_limit"] == 5
        assert by_app["other"]["last_activity"] is None
        table = cli(acc, "access", "list").stdout
        assert f"{acc.role_prefix}sql_bi" in table and "connections now" in table
        only = json.loads(cli(acc, "access", "list", "other", "--format", "json").stdout)
        assert [entry["app"] for entry in only] == ["other"]
        versions = cli(acc, "versions").stdout
        assert "direct SQL access" in versions and f"{acc.role_prefix}sql_bi" in versions
        assert bi["statements"] is None  # pg_stat_statements is not installed
        conn = await owner(acc)
        try:  # installed, but not in shared_preload_libraries here: reading it fails, and the count stays unknown
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            loaded = await conn.fetchval("SELECT 'pg_stat_statements' = ANY(string_to_array(current_setting("
                                         "'shared_preload_libraries'), ','))")
        finally:
            await conn.close()
        again = {e["app"]: e for e in json.loads(cli(acc, "access", "list", "--format", "json").stdout)}
        assert (again["bi"]["statements"] is None) is not loaded
        assert again["bi"]["statements"] is None or again["bi"]["statements"] >= 1
    finally:
        await live.close()


async def test_the_scram_verifier_is_the_one_postgresql_computes(server_uri: str) -> None:
    conn = await asyncpg.connect(server_uri)
    role = f"gh_scram_probe_{os.getpid()}"
    try:
        await conn.execute(f"CREATE ROLE {role} PASSWORD 'pencil-and-paper'")  # hashed by the server itself
        stored = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)
    finally:
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$.+", stored)
    assert match is not None
    salt = base64.b64decode(match[2])
    assert direct_access.scram_verifier("pencil-and-paper", salt=salt, iterations=int(match[1])) == stored
    assert direct_access.scram_verifier("pencil-and-paper", salt=salt) != direct_access.scram_verifier("other", salt=salt)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_connection_string_points_at_a_replica_when_the_app_reads_from_one(
        make_project: ProjectFactory) -> None:
    port = closed_port()
    toml = TOML.replace("[databases.main]\n", f'[databases.main]\nreplicas = ["postgresql://reader@127.0.0.1:{port}/main?sslmode=prefer"]\n')
    toml = toml.replace('description = "dashboards"', 'description = "dashboards"\nreads = { from = "replica" }')
    project = make_project(toml=toml, contracts=CONTRACTS, migrations=MIGRATIONS)
    await prepare(project)
    made = cli(project, "access", "create", "bi")
    [url] = connection_strings(made.stdout)
    assert re.fullmatch(rf"postgresql://{project.role_prefix}sql_bi:[A-Za-z0-9_-]{{43}}@127\.0\.0\.1:{port}/main\?sslmode=prefer", url)
    assert "connects to     r1" in made.stdout and "replica r1" in made.stdout
    [primary] = connection_strings(cli(project, "access", "create", "bi", "--rotate", "--primary").stdout)
    assert f"@127.0.0.1:{port}" not in primary and psql(primary, "SELECT count(*) FROM things").stdout.strip() == "3"
    wrong = cli(project, "access", "create", "bi", "--rotate", "--replica", "r7", check=False)
    assert wrong.returncode == 1 and "no replica 'r7'" in wrong.stderr
    listed = json.loads(cli(project, "access", "list", "--format", "json").stdout)
    assert listed[0]["unreachable_replicas"] == ["r1"]
    revoked = cli(project, "access", "revoke", "bi")
    assert "replica r1 did not answer" in revoked.stdout


async def test_on_a_streaming_replica_it_reads_views_only_and_revoke_ends_its_sessions_there(
        replica_cluster: ReplicaPair, make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = TOML.replace('description = "dashboards"', 'description = "dashboards"\nreads = { from = "replica" }')
    project = make_project(toml=toml, contracts=CONTRACTS, migrations=MIGRATIONS)
    database = f"{project.name}_main"
    await replica_cluster.create_database(database)
    primary_url, replica_url = replica_cluster.urls(database)
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", primary_url)
    monkeypatch.setenv("REPLICA_URL", replica_url)
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__REPLICAS", '["env:REPLICA_URL"]')
    project = load_project(project.root)
    await prepare(project)
    made = cli(project, "access", "create", "bi")
    [url] = connection_strings(made.stdout)
    assert f"@127.0.0.1:{replica_cluster.replica.port}/{database}" in url and "connects to     r1" in made.stdout
    await replica_cluster.caught_up(database)

    assert psql(url, "SELECT pg_is_in_recovery(), count(*) FROM things").stdout.strip() == "t|3"
    assert "permission denied for table things" in psql(url, "SELECT * FROM public.things").stderr
    assert "permission denied for view others" in psql(url, "SELECT * FROM api_v2.others").stderr
    slow = psql(url, "SELECT pg_sleep(3)")
    assert "canceling statement due to statement timeout" in slow.stderr  # its settings replicate with it

    live = await asyncpg.connect(url)
    [listed] = await direct_access_report.list_access(project)
    assert listed.connections == 1 and listed.unreachable == ()  # counted on the replica
    await replica_cluster.pause_replay()  # the replica cannot learn of the revocation yet
    try:
        [(role, notes)] = await direct_access.revoke_access(project, "bi")
        assert any("replica r1 has not replayed the revocation yet" in note for note in notes), notes
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await live.fetchval("SELECT 1")  # ended on the replica all the same
        await live.close()
    finally:
        await replica_cluster.resume_replay()
    await replica_cluster.caught_up(database)
    assert f'role "{role}" does not exist' in psql(url, "SELECT 1").stderr


@pytest.fixture
def password_server(make_project: ProjectFactory) -> Iterator[Cluster]:
    """A server of this test's own that checks passwords (scram-sha-256) for every role but the owner, unlike the
    machine's and the embedded one, which trust their clients."""
    binaries = postgres_bin()
    assert binaries is not None, "no PostgreSQL binaries to start a server with"
    root, run_as = private_root("gh-access-")
    server = Cluster(binaries, root, free_port(), run_as)
    try:
        server.init()
        (server.data / "pg_hba.conf").write_text("local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
                                                 "host all all 127.0.0.1/32 scram-sha-256\n")
        server.start_now()
        yield server
    finally:
        server.stop_now()
        shutil.rmtree(root, ignore_errors=True)


async def test_the_password_shown_once_is_the_one_that_logs_in(password_server: Cluster,
                                                               make_project: ProjectFactory,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(toml=TOML, contracts=CONTRACTS, migrations=MIGRATIONS)
    database = f"{project.name}_main"
    await password_server.create_database(database)
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", password_server.url(database))
    project = load_project(project.root)
    await prepare(project)
    [url] = connection_strings(cli(project, "access", "create", "bi").stdout)
    assert psql(url, "SELECT count(*) FROM things").stdout.strip() == "3"
    user, _, rest = url.partition("@")
    wrong = psql(f"{user[:-4]}xxxx@{rest}", "SELECT 1")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr

    [rotated] = connection_strings(cli(project, "access", "create", "bi", "--rotate").stdout)
    assert rotated != url and psql(rotated, "SELECT count(*) FROM things").stdout.strip() == "3"
    assert "password authentication failed" in psql(url, "SELECT 1").stderr  # the old one stops working
    cli(project, "access", "revoke", "bi")
    assert psql(rotated, "SELECT 1").returncode != 0


async def test_an_app_on_two_databases_gets_a_role_in_each(make_project: ProjectFactory) -> None:
    toml = """
[project]
name = "two"

[databases.sales]
[databases.stock]

[apps.bi]
grants = [{ contract = "orders", actions = ["read"] }, { contract = "items", actions = ["read"] }]
"""
    project = make_project(toml=toml, contracts={"sales/orders.v1.sql": "SELECT id FROM orders",
                                                 "stock/items.v1.sql": "SELECT id FROM items"},
                           migrations={"sales/V001__o.sql": "CREATE TABLE orders (id integer); INSERT INTO orders VALUES (1);",
                                       "stock/V001__i.sql": "CREATE TABLE items (id integer); INSERT INTO items VALUES (2), (3);"})
    await prepare(project)
    made = cli(project, "access", "create", "bi")
    urls = connection_strings(made.stdout)
    assert len(urls) == 2
    sales, stock = sorted(urls, key=lambda u: "stock" in u.split("@")[0])
    assert f"{project.role_prefix}sql_bi__sales:" in sales and f"{project.role_prefix}sql_bi__stock:" in stock
    assert psql(sales, "SELECT count(*) FROM orders").stdout.strip() == "1"
    assert psql(stock, "SELECT count(*) FROM items").stdout.strip() == "2"
    assert psql(sales, "SELECT count(*) FROM items").returncode != 0
    cli(project, "access", "revoke", "bi", "--database", "stock")
    assert {e["database"] for e in json.loads(cli(project, "access", "list", "--format", "json").stdout)} == {"sales"}


@pytest.fixture
def embedded_project(make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """The project on its embedded server (no url), held up by this test for psql to reach it."""
    from gatehouse.db.embedded import start_embedded

    project = make_project(toml=TOML, contracts=CONTRACTS, migrations=MIGRATIONS)
    monkeypatch.delenv("GATEHOUSE_DATABASES__MAIN__URL")
    project = load_project(project.root)
    server = start_embedded(project.state_dir)
    yield project
    server.stop()


async def test_embedded_databases_get_a_socket_connection_string(embedded_project: Project) -> None:
    await prepare(embedded_project)
    [made] = await direct_access.create_access(embedded_project, "bi")
    assert made.embedded and "?host=/" in made.url and any("embedded server" in note for note in made.notes)
    assert psql(made.url, "SELECT count(*) FROM things").stdout.strip() == "3"
    assert "permission denied" in psql(made.url, "SELECT * FROM public.things").stderr
    [(role, _)] = await direct_access.revoke_access(embedded_project, "bi")
    assert "does not exist" in psql(made.url, "SELECT 1").stderr and role.endswith("sql_bi")


def test_urls_keep_the_server_and_drop_the_owner() -> None:
    url = direct_access_plan.login_url("postgresql://owner:pw@db.internal:6432/shop?sslmode=require&passfile=/x&sslkey=/k"
                                  "&options=-c%20statement_timeout%3D0",
                                  "gh_p_sql_bi", "abc-_9")
    assert url == "postgresql://gh_p_sql_bi:abc-_9@db.internal:6432/shop?sslmode=require"
    socket_url = direct_access_plan.login_url("postgresql://postgres:@/shop?host=/tmp/pg.sock", "r", "p")
    assert socket_url == "postgresql://r:p@/shop?host=/tmp/pg.sock"


def test_help_names_the_commands() -> None:
    result = subprocess.run([*GATEHOUSE, "access", "--help"], capture_output=True, text=True, timeout=60)
    assert all(word in result.stdout for word in ("create", "list", "revoke", "BI"))
    create = subprocess.run([*GATEHOUSE, "access", "create", "--help"], capture_output=True, text=True, timeout=60)
    assert "--replica" in create.stdout and "--rotate" in create.stdout and "row filters" in create.stdout


def test_role_names_stay_clear_of_app_roles(tmp_path: Path) -> None:
    (tmp_path / "gatehouse.toml").write_text(TOML)
    (tmp_path / "contracts").mkdir()
    for name, sql in CONTRACTS.items():
        (tmp_path / "contracts" / name).write_text(sql)
    project = load_project(tmp_path)
    name = direct_access_plan.role_name(project, "app_x", "main")
    assert not name.startswith(f"{project.role_prefix}app_")  # apply drops stale roles with that prefix
    plan = direct_access_plan.plan_access(project, "bi", "main")
    assert (plan.role, plan.schema, plan.views, plan.connection_limit) == ("gh_acc_sql_bi", "api_v2", ("things",), 2)
