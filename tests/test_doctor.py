"""`gatehouse doctor` finds each fault injected into a real PostgreSQL, and says nothing is wrong when nothing is.

Faults: a wrong authenticator password (a private server that checks passwords), a held lock with an app's
statement waiting behind it, a slow statement run as an app, a grant revoked by hand, more pools than the
server has connections, an unreachable and a silent server, a server that hangs after the login, and on a
real streaming replica (tests/replica_cluster.py) a stopped replica and paused replay.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner

from conftest import ProjectFactory, prepare, run_sync, with_database
from gatehouse import cli, operations
from gatehouse.db.targets import resolve_targets
from gatehouse.observe.doctor import Options, Report, Result, result_lines, statement_text
from gatehouse.observe.doctor_plan import diagnose
from gatehouse.project import Project, load_project
from replica_cluster import Cluster, ReplicaPair, free_port, postgres_bin, private_root
from replica_cluster import password_server as private_password_server

TOML = """
[project]
name = "doc"

[databases.main]
{database}

[apps.web]
quota = {{ pool_size = 3 }}
grants = [{{ contract = "items", actions = ["read", "insert"] }}]

[apps.mobile]
quota = {{ pool_size = 2 }}
grants = [{{ contract = "items", actions = ["read"] }}]
"""
MIGRATIONS = {"V001__items.sql": "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);\n"
                                 "INSERT INTO items (name) VALUES ('a'), ('b');\n"}
CONTRACTS = {"items.v1.sql": "SELECT id, name FROM items"}
ORDER = ["reach", "login", "tls", "authenticator", "database", "applied", "headroom", "disk", "transactions",
         "locks", "slow", "pools"]
PASSWORD = "d0ctor-Pw-4"


def _project(make_project: ProjectFactory, database: str = "") -> Project:
    project = make_project(toml=TOML.format(database=database), migrations=MIGRATIONS, contracts=CONTRACTS)
    run_sync(prepare(project))
    return project


def statuses(report: Report) -> dict[str, str]:
    return {r.check if "/" not in r.target else f"{r.check} {r.target}": r.status for r in report.results}


async def as_app(project: Project, app: str) -> asyncpg.Connection:
    """A session the way an app's pool opens one: the authenticator, the app's role and application_name."""
    target = (await resolve_targets(project))["main"]
    return await asyncpg.connect(**target.authenticator_kwargs(), server_settings={
        "role": project.apps[app].role, "application_name": f"gatehouse/{app}"})


async def owner(project: Project) -> asyncpg.Connection:
    return await (await resolve_targets(project))["main"].connect_owner()


async def until(conn: asyncpg.Connection, sql: str, *args: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not await conn.fetchval(sql, *args):
        assert time.monotonic() < deadline, f"never true: {sql}"
        await asyncio.sleep(0.05)


def gatehouse_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    monkeypatch.delenv("GATEHOUSE_PROJECT", raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(cli.app, list(args))


# --- a healthy project, the output, the exit codes ------------------------------------------------------


async def test_a_healthy_project_is_all_ok_in_the_order_a_person_checks(make_project: ProjectFactory) -> None:
    project = _project(make_project)
    seen: list[Result] = []
    report = await diagnose(project, Options(), on_result=seen.append)
    assert [r.check for r in report.results] == ORDER
    assert seen == list(report.results)  # each result is heard as it ends (a hang shows where)
    by_check = statuses(report)
    # other test runs share this server: their connections count in the headroom, never enough to fail it
    assert by_check.pop("headroom") in ("ok", "warn")
    assert set(by_check.values()) == {"ok"}, [(r.check, r.reason) for r in report.results if r.status != "ok"]
    assert report.exit_code == 0
    assert report.result("reach").reason.startswith("127.0.0.1:5432: resolved in ")
    assert "PostgreSQL answered" in report.result("reach").reason
    assert report.result("authenticator").reason.startswith(f"{project.authenticator_role} logged in in ")
    assert report.result("applied").reason == "roles, grants and views match the project (1 views, 2 apps with grants here)"
    headroom = report.result("headroom").data
    assert headroom["pools"] == 5 and headroom["instances"] == 1 and headroom["available"] > 0
    assert report.result("disk").data["database_bytes"] > 0
    assert "free" in report.result("disk").reason  # the server is on this machine: its disk is measured


def test_exit_codes_and_the_json_shape(make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    project = _project(make_project)
    gatehouse = gatehouse_cli(monkeypatch)
    healthy = gatehouse("--project", str(project.root), "doctor", "--format", "json")
    assert healthy.exit_code == 0, healthy.output
    body = json.loads(healthy.stdout)
    assert set(body) == {"project", "status", "exit_code", "counts", "options", "checks"}
    assert body["project"] == project.name and body["exit_code"] == 0 and body["counts"]["fail"] == 0
    assert body["options"]["instances"] == 1 and body["options"]["timeout_s"] == 5.0
    assert [c["check"] for c in body["checks"]] == ORDER
    for check in body["checks"]:
        assert set(check) == {"check", "title", "database", "target", "status", "reason", "hint", "details", "data",
                              "seconds"}
        assert check["database"] == "main" and check["status"] in ("ok", "warn", "fail", "skip")
        assert isinstance(check["reason"], str) and check["reason"] and check["seconds"] >= 0

    table = gatehouse("--project", str(project.root), "doctor")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0] == "main"
    assert any(line.startswith("ok    authenticator  ") for line in lines)
    assert "Traceback" not in table.output

    failing = gatehouse("--project", str(project.root), "doctor", "--instances", "1000")
    assert failing.exit_code == 1
    assert any(line.startswith("FAIL  headroom       ") for line in failing.stdout.splitlines())
    assert "1 failed" in failing.stdout

    wrong = gatehouse("--project", str(project.root), "doctor", "--format", "yaml")
    assert wrong.exit_code == 1 and "--format is table or json" in wrong.output
    wrong = gatehouse("--project", str(project.root), "doctor", "--max-lag", "20s", "--fail-lag", "5s")
    assert wrong.exit_code == 1 and "--fail-lag (5s) is shorter than --max-lag (20s)" in wrong.output
    missing = gatehouse("--project", str(project.root.parent / "nowhere"), "doctor", "--format", "json")
    assert missing.exit_code == 1
    (only,) = json.loads(missing.stdout)["checks"]
    assert only["check"] == "project" and only["status"] == "fail" and "no gatehouse.toml here" in only["reason"]


async def test_warnings_alone_exit_zero(make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    project = _project(make_project)
    gatehouse = gatehouse_cli(monkeypatch)
    held = await owner(project)
    try:
        await held.execute("BEGIN; SELECT count(*) FROM items")  # idle in transaction from now on
        await asyncio.sleep(1.2)
        result = await asyncio.to_thread(gatehouse, "--project", str(project.root), "doctor", "--long", "1s",
                                         "--format", "json")
        assert result.exit_code == 0, result.output
        body = json.loads(result.stdout)
        transactions = next(c for c in body["checks"] if c["check"] == "transactions")
        assert transactions["status"] == "warn" and body["status"] == "warn"
        assert "1 transaction open longer than 1 s; the oldest: pid" in transactions["reason"]
        assert "postgres: idle in transaction in a transaction open for" in transactions["reason"]
        assert "SELECT count(*) FROM items" in transactions["reason"]
        assert "pg_terminate_backend(" in transactions["hint"]
    finally:
        await held.close()


# --- the faults ---------------------------------------------------------------------------------------


async def test_a_held_lock_is_reported_with_the_waiting_app_and_the_holder(make_project: ProjectFactory) -> None:
    project = _project(make_project)
    holder = await owner(project)
    waiter = await as_app(project, "web")
    try:
        await holder.execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        holder_pid = await holder.fetchval("SELECT pg_backend_pid()")
        waiting = asyncio.create_task(waiter.fetchval("SELECT count(*) FROM api_v1.items"))
        await until(holder, "SELECT count(*) = 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND application_name = 'gatehouse/web'")
        report = await diagnose(project, Options(long_s=60))
        locks = report.result("locks")
        assert locks.status == "warn", locks
        assert locks.reason.startswith("1 statement waits for a lock: pid ")
        assert ", app web waits " in locks.reason and "for AccessShareLock on items" in locks.reason
        assert f"held by pid {holder_pid}, postgres (idle in transaction, its transaction open for " in locks.reason
        assert f"pg_terminate_backend({holder_pid})" in (locks.hint or "")
        assert locks.data["waits"][0]["app"] == "web" and locks.data["waits"][0]["blocked_by"] == [holder_pid]
        assert report.result("applied").status == "ok"  # the catalog checks do not wait behind the lock

        await asyncio.sleep(1.1)
        longer = await diagnose(project, Options(long_s=1))
        assert longer.result("locks").status == "fail"  # a wait longer than --long is a failure
        transactions = longer.result("transactions")
        assert transactions.status == "warn" and f"pid {holder_pid}, postgres: idle in transaction" in transactions.reason
        assert longer.exit_code == 1
        await holder.execute("ROLLBACK")
        assert await waiting == 2
    finally:
        await holder.close()
        await waiter.close()


async def test_a_slow_statement_is_named_with_its_app_and_a_full_pool_is_seen(make_project: ProjectFactory) -> None:
    project = _project(make_project)
    sessions = [await as_app(project, "mobile") for _ in range(2)]  # mobile's whole pool_size
    watcher = await owner(project)
    sleeping = [asyncio.create_task(s.execute("SELECT pg_sleep(30)")) for s in sessions]
    try:
        await until(watcher, "SELECT count(*) = 2 FROM pg_stat_activity WHERE application_name = 'gatehouse/mobile' "
                             "AND state = 'active' AND query_start < now() - interval '1.2 s'")
        report = await diagnose(project, Options(slow_s=1))
        slow = report.result("slow")
        assert slow.status == "warn", slow
        assert slow.reason.startswith("2 statements running longer than 1 s: app mobile: pid ")
        assert "SELECT pg_sleep(?)" in slow.reason  # the value a caller sent is masked
        assert {s["app"] for s in slow.data["statements"]} == {"mobile"}
        assert slow.data["source"] == "pg_stat_activity"
        assert "pg_stat_statements is not installed in this database" in slow.details[-1]
        pools = report.result("pools")
        assert pools.status == "warn" and pools.reason == "every connection of mobile is busy: requests wait for one"
        assert pools.data["apps"]["mobile"] == {"connections": 2, "active": 2, "pool_size": 2}
        assert pools.data["apps"]["web"]["connections"] == 0
        assert report.exit_code == 0  # warnings
        quiet = await diagnose(project, Options(slow_s=60))
        assert quiet.result("slow").status == "ok"
    finally:
        for task in sleeping:
            task.cancel()
        for session in sessions:
            session.terminate()
        await watcher.close()


async def test_a_grant_dropped_by_hand_is_named_and_apply_mends_it(make_project: ProjectFactory) -> None:
    project = _project(make_project)
    mobile, web = project.apps["mobile"].role, project.apps["web"].role
    conn = await owner(project)
    try:
        await conn.execute(f'REVOKE SELECT ON api_v1.items FROM "{mobile}"')
        await conn.execute(f'GRANT DELETE ON api_v1.items TO "{web}"')
    finally:
        await conn.close()
    report = await diagnose(project)
    applied = report.result("applied")
    assert applied.status == "fail" and report.exit_code == 1
    assert applied.reason == (f"2 differences from what `gatehouse apply` makes: app mobile (role {mobile}) lacks "
                              "SELECT on api_v1.items (and 1 more)")
    assert applied.details == (f"app mobile (role {mobile}) lacks SELECT on api_v1.items",
                               f"app web (role {web}) has DELETE on api_v1.items, which gatehouse.toml does not grant")
    assert "run `gatehouse apply`" in (applied.hint or "")
    assert statuses(report)["transactions"] == "ok"  # later checks still run

    await operations.apply_all(project)
    assert (await diagnose(project)).result("applied").status == "ok"


async def test_too_many_pools_fail_the_headroom(make_project: ProjectFactory) -> None:
    project = _project(make_project)
    report = await diagnose(project, Options(instances=1000))
    headroom = report.result("headroom")
    assert headroom.status == "fail" and report.exit_code == 1
    data = headroom.data
    assert data["instances"] == 1000 and data["pools"] == 5
    assert data["needed"] == (5 + data["own"]) * 1000 + data["others"] > data["available"]
    assert headroom.reason.startswith(f"{data['needed']} of {data['available']} connections (")
    assert "times 1000 instances" in headroom.reason
    assert "raise max_connections on the server" in (headroom.hint or "") and "web 3, mobile 2" in (headroom.hint or "")


TWO_DATABASES = """
[project]
name = "doc"

[databases.shop]

[databases.billing]

[apps.web]
quota = { pool_size = 3 }
grants = [{ contract = "items", actions = ["read"] }, { contract = "invoices", actions = ["read"] }]

[apps.clerk]
quota = { pool_size = 4 }
grants = [{ contract = "invoices", actions = ["read"] }]
"""


async def test_the_headroom_counts_every_database_of_the_project_on_one_server(
        make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(toml=TWO_DATABASES, contracts={"shop/items.v1.sql": "SELECT id, name FROM items",
                                                          "billing/invoices.v1.sql": "SELECT id FROM invoices"},
                           migrations={"shop/V001__items.sql": "CREATE TABLE items (id int PRIMARY KEY, name text);",
                                       "billing/V001__invoices.sql": "CREATE TABLE invoices (id int PRIMARY KEY);"})
    await prepare(project)
    report = await diagnose(project)
    assert [r.target for r in report.results if r.check == "reach"] == ["shop", "billing"]
    for database in ("shop", "billing"):
        headroom = report.result("headroom", database)
        # web has a pool on each database (3 + 3), clerk on billing (4); own: 3 each, 2 more in shop (home)
        assert headroom.data["pools"] == 10 and headroom.data["own"] == 8, headroom
        assert headroom.reason.endswith("(databases shop, billing)")
        assert report.result("applied", database).status == "ok"
    pools = report.result("pools", "billing").data["apps"]
    assert set(pools) == {"web", "clerk"} and set(report.result("pools", "shop").data["apps"]) == {"web"}

    only = await diagnose(project, Options(databases=("billing",)))
    assert {r.target for r in only.results} == {"billing"}
    gatehouse = gatehouse_cli(monkeypatch)
    unknown = await asyncio.to_thread(gatehouse, "--project", str(project.root), "doctor", "-d", "nope")
    assert unknown.exit_code == 1 and "no database named 'nope' in gatehouse.toml" in unknown.output
    assert "declared databases: shop, billing" in unknown.output


async def test_an_unreachable_database_skips_what_needs_it(make_project: ProjectFactory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    project = _project(make_project)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", f"postgresql://postgres@127.0.0.1:{port}/nowhere")
    report = await diagnose(project)
    reach = report.result("reach")
    assert reach.status == "fail"
    assert reach.reason == f"127.0.0.1:{port}: 127.0.0.1: refused the connection (nothing listens there)"
    assert f"listens on 127.0.0.1:{port}" in (reach.hint or "")
    assert "$GATEHOUSE_DATABASES__MAIN__URL" in (reach.hint or "")
    skipped = {r.check: r.reason for r in report.results if r.status == "skip"}
    assert set(skipped) == set(ORDER) - {"reach"}
    assert skipped["login"] == skipped["authenticator"] == "skipped: the DNS and TCP check failed"
    assert set(skipped.values()) == {"skipped: the DNS and TCP check failed"}  # the first cause, passed down


async def test_a_missing_database_is_named_and_the_server_wide_checks_go_on(make_project: ProjectFactory,
                                                                           server_uri: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    project = _project(make_project)
    missing = f"gh_missing_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", with_database(server_uri, missing))
    report = await diagnose(project)
    by_check = statuses(report)
    assert by_check["login"] == "ok" and "database 'gh_missing_" in report.result("login").reason
    assert by_check["authenticator"] == "ok"  # it logs in to the server's maintenance database instead
    database = report.result("database")
    assert database.status == "fail" and database.reason == f"the server has no database named {missing!r}"
    assert f"createdb {missing}" in (database.hint or "") and "$GATEHOUSE_DATABASES__MAIN__URL" in (database.hint or "")
    assert by_check["headroom"] in ("ok", "warn") and by_check["disk"] == "ok"
    assert {by_check[c] for c in ("applied", "transactions", "locks", "slow", "pools")} == {"skip"}
    assert report.result("applied").reason == "skipped: the database exists check failed"


async def test_a_silent_server_and_an_unknown_host_fail_within_the_timeout(make_project: ProjectFactory,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    project = _project(make_project)
    with socket.socket() as silent:  # accepts TCP connections (backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", f"postgresql://postgres@127.0.0.1:{port}/x")
        started = time.monotonic()
        report = await diagnose(project, Options(timeout_s=1))
        assert time.monotonic() - started < 5
    reach = report.result("reach")
    assert reach.status == "fail"
    assert "accepted the connection but did not answer PostgreSQL's greeting within 1 s" in reach.reason
    assert "is the PostgreSQL server's port" in (reach.hint or "")
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", "postgresql://postgres@no-such-host.invalid:5432/x")
    unknown = (await diagnose(project, Options(timeout_s=2))).result("reach")
    assert unknown.status == "fail" and unknown.reason.endswith("the host name 'no-such-host.invalid' cannot be resolved")
    assert "getent hosts no-such-host.invalid" in (unknown.hint or "")


class Proxy:
    """A TCP proxy in front of the test server that can freeze: then it passes nothing on, like a hung server."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.frozen = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        finally:
            writer.close()
            up_writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self.frozen.is_set():
                await asyncio.Event().wait()  # never again
            writer.write(data)
            await writer.drain()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)


async def test_a_server_that_hangs_after_login_costs_one_timeout_not_a_hang(make_project: ProjectFactory,
                                                                            server_uri: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    project = _project(make_project)
    url = os.environ["GATEHOUSE_DATABASES__MAIN__URL"]
    port = int(url.split("@")[1].split("/")[0].split(":")[1])
    proxy = Proxy(port)
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", url.replace(f":{port}/", f":{await proxy.start()}/"))

    def freeze_after_login(result: Result) -> None:
        if result.check == "login":
            proxy.frozen.set()

    try:
        started = time.monotonic()
        report = await diagnose(project, Options(timeout_s=1), on_result=freeze_after_login)
        elapsed = time.monotonic() - started
    finally:
        await proxy.stop()
    assert report.result("login").status == "ok"
    tls = report.result("tls")
    assert tls.status == "fail" and tls.reason == "no answer within 1 s"
    assert "overloaded or hung" in (tls.hint or "")
    authenticator = report.result("authenticator")  # a new login through the frozen proxy: its own timeout
    assert authenticator.status == "fail" and "no answer from" in authenticator.reason
    later = [r for r in report.results if r.check in ("database", "headroom", "disk", "transactions", "locks")]
    assert {r.status for r in later} == {"skip"}
    assert all(r.reason == "skipped: the server stopped answering during an earlier check" for r in later), later
    assert elapsed < 8, elapsed  # two timeouts of 1 s (+ grace), not one per check


# --- replicas: a real streaming replica of a private primary ------------------------------------------------


async def _on_replica_pair(replica_cluster: ReplicaPair, make_project: ProjectFactory,
                           monkeypatch: pytest.MonkeyPatch) -> tuple[Project, str]:
    project = make_project(toml=TOML.format(database='replicas = ["env:DOC_REPLICA_URL"]'), migrations=MIGRATIONS,
                           contracts=CONTRACTS)
    database = f"{project.name}_main"
    await replica_cluster.create_database(database)
    primary_url, replica_url = replica_cluster.urls(database)
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", primary_url)
    monkeypatch.setenv("DOC_REPLICA_URL", replica_url)
    await prepare(project)
    await replica_cluster.caught_up(database)
    return project, primary_url


async def _write(primary_url: str) -> None:
    conn = await asyncpg.connect(primary_url)
    try:
        await conn.execute("INSERT INTO items (name) SELECT 'n' || i FROM generate_series(1, 100) i")
    finally:
        await conn.close()


async def test_a_healthy_replica_is_streaming_with_no_lag(replica_cluster: ReplicaPair, make_project: ProjectFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    project, _ = await _on_replica_pair(replica_cluster, make_project, monkeypatch)
    report = await diagnose(project)
    assert [(r.check, r.target) for r in report.results][:2] == [("reach", "main"), ("reach", "main/r1")]
    assert [r.check for r in report.results if r.target == "main/r1"] == ["reach", "replica"]
    replica = report.result("replica", "main/r1")
    assert replica.status == "ok", replica
    assert replica.reason == "r1 is streaming, 0 B behind, no lag"
    assert replica.data["bytes_behind"] == 0 and replica.data["streaming"] and not replica.data["paused"]
    assert replica.details[1].startswith("the primary sees it: state streaming, async, replayed up to ")
    assert report.result("reach", "main/r1").reason.startswith(f"127.0.0.1:{replica_cluster.replica.port}: resolved")
    shown = "\n".join(line for result in report.results for _, line in result_lines(result))
    assert "ok    replica r1     r1 is streaming, 0 B behind, no lag" in shown


async def test_paused_replay_fails_and_a_delayed_replica_warns_over_max_lag(
        replica_cluster: ReplicaPair, make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    project, primary_url = await _on_replica_pair(replica_cluster, make_project, monkeypatch)
    await replica_cluster.pause_replay()
    await _write(primary_url)
    report = await diagnose(project)
    replica = report.result("replica", "main/r1")
    assert replica.status == "fail" and report.exit_code == 1
    assert replica.reason.startswith("replay is paused on r1: ") and " behind" in replica.reason
    assert replica.data["paused"] and replica.data["bytes_behind"] > 0
    assert "SELECT pg_wal_replay_resume(); on r1" in (replica.hint or "")
    assert report.result("applied").status == "ok"  # the primary's own checks are not held up

    await replica_cluster.resume_replay()
    await replica_cluster.caught_up()
    await replica_cluster.set_apply_delay(4)
    await asyncio.sleep(0.3)
    await _write(primary_url)
    await asyncio.sleep(1.5)
    delayed = (await diagnose(project, Options(max_lag_s=1))).result("replica", "main/r1")
    assert delayed.status == "warn", delayed
    assert delayed.reason.startswith("r1 is ") and "over --max-lag 1 s" in delayed.reason
    assert delayed.data["lag_s"] > 1 and delayed.data["bytes_behind"] > 0
    assert "max_staleness" in (delayed.hint or "")
    await replica_cluster.set_apply_delay(0)


async def test_a_stopped_replica_fails_its_reach_and_skips_its_replication_check(
        replica_cluster: ReplicaPair, make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    project, _ = await _on_replica_pair(replica_cluster, make_project, monkeypatch)
    await replica_cluster.stop_replica()
    try:
        report = await diagnose(project)
    finally:
        await replica_cluster.start_replica()
    port = replica_cluster.replica.port
    reach = report.result("reach", "main/r1")
    assert reach.status == "fail" and report.exit_code == 1
    assert reach.reason == f"127.0.0.1:{port}: 127.0.0.1: refused the connection (nothing listens there)"
    assert "$DOC_REPLICA_URL" in (reach.hint or "")
    replica = report.result("replica", "main/r1")
    assert replica.status == "skip" and replica.reason == "skipped: the DNS and TCP check failed"
    assert {r.status for r in report.results if r.target == "main"} <= {"ok", "warn"}  # the primary is fine


async def test_a_replica_variable_that_is_not_set_is_named(make_project: ProjectFactory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(toml=TOML.format(database='replicas = ["env:DOC_NO_SUCH_REPLICA"]'),
                           migrations=MIGRATIONS, contracts=CONTRACTS)
    monkeypatch.delenv("DOC_NO_SUCH_REPLICA", raising=False)
    report = await diagnose(project)
    reach = report.result("reach", "main/r1")
    assert reach.status == "fail"
    assert reach.reason == ("[databases.main] replicas[0] names the environment variable DOC_NO_SUCH_REPLICA, which "
                            "is not set")
    assert reach.hint == "export DOC_NO_SUCH_REPLICA=... before running gatehouse"
    assert report.result("replica", "main/r1").status == "skip"


# --- slow statements from pg_stat_statements, on a private server that loads it ---------------------------------


@pytest.fixture(scope="module")
def statements_server() -> Iterator[Cluster]:
    """A private PostgreSQL with pg_stat_statements in shared_preload_libraries (the machine's has not)."""
    binaries = postgres_bin()
    if binaries is None or not (binaries.parent / "lib" / "pg_stat_statements.so").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must test doctor's pg_stat_statements path: no PostgreSQL with pg_stat_statements.so")
        pytest.skip("no PostgreSQL binaries with pg_stat_statements.so")
    root, run_as = private_root("gh-doctor-pgss-")
    cluster = Cluster(binaries, root, free_port(), run_as, "data", "-c shared_preload_libraries=pg_stat_statements")
    try:
        cluster.init()
        cluster.start_now()
        yield cluster
    finally:
        cluster.stop_now()
        shutil.rmtree(root, ignore_errors=True)


async def test_slow_statements_per_app_come_from_pg_stat_statements_when_it_is_loaded(
        statements_server: Cluster, make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(toml=TOML.format(database=""), migrations=MIGRATIONS, contracts=CONTRACTS)
    database = f"{project.name}_main"
    await statements_server.create_database(database)
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", statements_server.url(database))
    await prepare(project)
    conn = await owner(project)
    try:
        await conn.execute("CREATE EXTENSION pg_stat_statements")
    finally:
        await conn.close()
    web, mobile = await as_app(project, "web"), await as_app(project, "mobile")
    try:
        for _ in range(3):
            await mobile.execute("SELECT pg_sleep(0.25)")
            await web.fetch("SELECT id, name FROM api_v1.items WHERE id = 1")
    finally:
        await web.close()
        await mobile.close()
    report = await diagnose(project, Options(slow_s=0.2))
    slow = report.result("slow")
    assert slow.status == "warn", slow
    assert slow.data["source"] == "pg_stat_statements"
    assert slow.reason.startswith("app mobile's slowest statement takes ") and "(pg_stat_statements)" in slow.reason
    (statement,) = [s for s in slow.data["apps"]["mobile"] if "pg_sleep" in s["statement"]]
    assert statement["calls"] == 3 and statement["mean_s"] >= 0.25 and statement["statement"] == "SELECT pg_sleep($1)"
    assert any("FROM api_v1.items WHERE id = $1" in s["statement"] for s in slow.data["apps"]["web"])
    assert any(line.startswith("app mobile: ") and "over 3 calls" in line for line in slow.details)
    calm = (await diagnose(project, Options(slow_s=5))).result("slow")
    assert calm.status == "ok" and calm.reason == "no app's statements take longer than 5 s on average (pg_stat_statements)"


async def test_pg_stat_statements_installed_but_not_loaded_falls_back_to_samples(make_project: ProjectFactory) -> None:
    project = _project(make_project)
    conn = await owner(project)
    try:
        await conn.execute("CREATE EXTENSION pg_stat_statements")
    finally:
        await conn.close()
    slow = (await diagnose(project)).result("slow")
    assert slow.status == "ok" and slow.data["source"] == "pg_stat_activity"
    assert "pg_stat_statements is installed but not in shared_preload_libraries" in slow.reason


# --- the authenticator's password, on a server that checks passwords -----------------------------------------


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """A private PostgreSQL on 127.0.0.1 that checks passwords."""
    yield from private_password_server(PASSWORD, "gatehouse-doctor-pw-")


def test_a_wrong_authenticator_password_fails_naming_the_role_and_the_variable(
        tmp_path: Path, password_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "p"
    name = f"t{uuid.uuid4().hex[:10]}"
    database = 'url = "env:DOC_DATABASE_URL"\nauthenticator_password = "env:DOC_AUTH_PASSWORD"'
    (root / "contracts").mkdir(parents=True)
    (root / "migrations").mkdir()
    (root / "gatehouse.toml").write_text(TOML.format(database=database).replace('name = "doc"', f'name = "{name}"'))
    (root / "contracts" / "items.v1.sql").write_text(CONTRACTS["items.v1.sql"])
    (root / "migrations" / "V001__items.sql").write_text(MIGRATIONS["V001__items.sql"])
    for variable in [k for k in os.environ if k.startswith("GATEHOUSE_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("DOC_DATABASE_URL", f"postgresql://postgres:{PASSWORD}@{password_server}/postgres")
    monkeypatch.setenv("DOC_AUTH_PASSWORD", "the-right-one")
    project = load_project(root)
    run_sync(prepare(project))
    assert statuses(run_sync(diagnose(project)))["authenticator"] == "ok"

    monkeypatch.setenv("DOC_AUTH_PASSWORD", "a-wrong-one")
    report = run_sync(diagnose(project))
    authenticator = report.result("authenticator")
    assert authenticator.status == "fail" and report.exit_code == 1
    role = project.authenticator_role
    assert authenticator.reason == f"authentication failed for the authenticator role '{role}'"
    assert authenticator.hint == (f"the password in $DOC_AUTH_PASSWORD ([databases.main] authenticator_password) is not "
                                  f"{role}'s: correct $DOC_AUTH_PASSWORD, or run `gatehouse apply` to give the role "
                                  "the password it holds")
    assert statuses(report)["applied"] == "ok"  # the owner's checks go on

    shown = gatehouse_cli(monkeypatch)("--project", str(root), "doctor")
    assert shown.exit_code == 1
    assert f"FAIL  authenticator  authentication failed for the authenticator role '{role}'" in shown.stdout
    assert "a-wrong-one" not in shown.output and PASSWORD not in shown.output


# --- embedded, and the words ---------------------------------------------------------------------------------


def test_an_embedded_database_is_checked_through_its_socket(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    (root / "contracts").mkdir(parents=True)
    (root / "migrations").mkdir()
    (root / "gatehouse.toml").write_text(TOML.format(database="").replace('name = "doc"',
                                                                          f'name = "t{uuid.uuid4().hex[:10]}"'))
    (root / "contracts" / "items.v1.sql").write_text(CONTRACTS["items.v1.sql"])
    (root / "migrations" / "V001__items.sql").write_text(MIGRATIONS["V001__items.sql"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}

    def gatehouse(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gatehouse", "--project", str(root), *args], env=env,
                              capture_output=True, text=True, timeout=180)

    fresh = gatehouse("doctor", "--format", "json")
    assert fresh.returncode == 1, fresh.stderr
    checks = {c["check"]: c for c in json.loads(fresh.stdout)["checks"]}
    assert checks["reach"]["status"] == "ok" and checks["reach"]["reason"].startswith("socket ")
    assert checks["tls"]["reason"] == "not encrypted: the server is on a Unix socket, so nothing crosses a network"
    assert checks["applied"]["reason"] == "the project was never applied to this database (it has no gatehouse schema)"
    assert checks["applied"]["hint"] == "run `gatehouse migrate` and `gatehouse apply`"
    assert checks["authenticator"]["status"] == "fail"
    assert "free" in checks["disk"]["reason"]
    assert gatehouse("migrate").returncode == 0 and gatehouse("apply").returncode == 0
    applied = gatehouse("doctor")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "12 ok" in applied.stdout or "warning" in applied.stdout


@pytest.mark.parametrize(("query", "shown"), [
    ("SELECT pg_sleep(30)", "SELECT pg_sleep(?)"),
    ("select *\n  from t where name = 'O''Brien' and id = 42", "select * from t where name = '?' and id = ?"),
    ("SELECT $1::int, api_v1.x, 3.5 FROM t1", "SELECT $1::int, api_v1.x, ? FROM t1"),
    ("<insufficient privilege>", "<insufficient privilege>"),
    (None, "(statement not visible to this user)"),
    ("SELECT " + "x, " * 100, "SELECT " + "x, " * 37 + "x…"),
])
def test_statements_are_shown_on_one_line_with_values_masked(query: str | None, shown: str) -> None:
    assert statement_text(query) == shown

