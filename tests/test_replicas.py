"""Reads from streaming replicas: bounded staleness, read-your-writes, and no failed request when one goes.

Against a real primary and hot standby of this test session (``replica_cluster``: ``pg_basebackup -R``), made
lag on demand with ``pg_wal_replay_pause()`` or ``recovery_min_apply_delay``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from conftest import ProjectFactory, prepare
from gatehouse.app import create_admin_app
from gatehouse.db.replicas import should_retry_on_primary
from gatehouse.project import load_project
from gatehouse.runtime import Runtime
from replica_cluster import ReplicaPair

TOML = """
[project]
name = "replicated"

[databases.main]
replica_check_ms = 50

[apps.clerk]
quota = { pool_size = 4 }
reads = { from = "replica", max_staleness = "1s" }
grants = [{ contract = "items", actions = ["read", "insert", "update"] }]

[apps.ledger]
quota = { pool_size = 4 }
reads = { from = "replica", max_staleness = "10s" }
grants = [{ contract = "items", actions = ["read", "update"] }]

[apps.viewer]
quota = { pool_size = 2 }
reads = { from = "replica", max_staleness = "10s" }
grants = [{ contract = "items", actions = ["read"] }]

[apps.office]
quota = { pool_size = 2 }
grants = [{ contract = "items", actions = ["read"] }]

[apps.bi]
quota = { pool_size = 2 }
reads = { from = "replica_only", max_staleness = "1s" }
grants = [{ contract = "items", actions = ["read"] }]
"""
MIGRATION = """
CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, n int NOT NULL DEFAULT 0);
INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 5) g;
"""
CONTRACTS = {"items.v1.sql": "SELECT id, name, n FROM items\n"}


@dataclass
class Served:
    runtime: Runtime
    clients: dict[str, httpx.AsyncClient]
    primary_url: str
    replica_url: str


@pytest.fixture
async def served(replica_cluster: ReplicaPair, make_project: ProjectFactory, serve_project: Callable[..., Awaitable],
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    project = make_project(toml=TOML, migrations={"V001__items.sql": MIGRATION}, contracts=CONTRACTS)
    database = f"{project.config.project.name}_main"
    await replica_cluster.create_database(database)
    primary_url, replica_url = replica_cluster.urls(database)
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", primary_url)
    monkeypatch.setenv("REPLICA_URL", replica_url)
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__REPLICAS", '["env:REPLICA_URL"]')
    project = load_project(project.root)
    keys = await prepare(project)
    await replica_cluster.caught_up(database)
    client, runtime = await serve_project(project)
    clients = {}
    for app, key in keys.items():
        clients[app] = httpx.AsyncClient(transport=client._transport, base_url="http://gatehouse.test",
                                         headers={"apikey": key})
    await _until(lambda: runtime.replicas.lags()[("main", "r1")] is not None)
    yield Served(runtime, clients, primary_url, replica_url)
    for c in clients.values():
        await c.aclose()


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.02)


async def _sql(url: str, sql: str, *args: object) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def test_reads_go_to_a_fresh_replica_and_never_beyond_the_bound(served: Served,
                                                                      replica_cluster: ReplicaPair) -> None:
    clerk, office = served.clients["clerk"], served.clients["office"]
    answer = await clerk.get("/items?order=id")
    assert answer.status_code == 200 and len(answer.json()) == 5
    assert answer.headers["gatehouse-source"] == "r1"
    assert 0 <= float(answer.headers["gatehouse-data-age"]) <= 1.0
    primary = await office.get("/items?order=id")  # an app without `reads` stays on the primary
    assert primary.headers["gatehouse-source"] == "primary" and primary.headers["gatehouse-data-age"] == "0"

    # Replay paused: the replica falls behind, and once its bound passes 1 s no read of clerk goes there.
    await replica_cluster.pause_replay()
    await _sql(served.primary_url, "INSERT INTO items (name) VALUES ('after the pause')")
    served_by: list[str] = []
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        read = await clerk.get("/items?select=id")
        assert read.status_code == 200
        age = float(read.headers["gatehouse-data-age"])
        assert age <= 1.0, "a read older than the app's max_staleness"
        served_by.append(read.headers["gatehouse-source"])
        if read.headers["gatehouse-source"] == "r1":
            assert len(read.json()) == 5  # the paused replica: the new row is not there
        else:
            assert len(read.json()) == 6
        await asyncio.sleep(0.02)
    assert served_by[0] == "r1" and served_by[-1] == "primary"
    assert "r1" not in served_by[served_by.index("primary"):], "back on the paused replica"
    assert (served.runtime.replicas.lags()[("main", "r1")] or 0) > 1.0
    assert served.runtime.replicas.fallbacks[("main", "none fresh")] >= 1

    await replica_cluster.resume_replay()  # caught up again: back on the replica
    await _until(lambda: (served.runtime.replicas.lags()[("main", "r1")] or 9) < 0.5)
    assert (await clerk.get("/items")).headers["gatehouse-source"] == "r1"


async def test_a_write_is_read_back_by_its_writer_with_the_replica_three_seconds_behind(
        served: Served, replica_cluster: ReplicaPair) -> None:
    """1,000 write-then-read pairs, half with the token sent back, half without it (the instance remembers the
    app's writes), on a replica whose commits replay 3 s late but that stays within the app's 10 s bound: only
    the guard keeps the reads off it."""
    ledger, office = served.clients["ledger"], served.clients["office"]
    await replica_cluster.set_apply_delay(3)
    stale, from_replica = 0, 0
    for i in range(1000):
        written = await ledger.patch(f"/items?id=eq.{i % 5 + 1}", json={"n": i})
        assert written.status_code == 204, written.text
        token = written.headers["gatehouse-consistency"]
        assert token.startswith("main:")
        headers = {"Gatehouse-Consistency": token} if i % 2 == 0 else {}
        read = await ledger.get(f"/items?id=eq.{i % 5 + 1}&select=n", headers=headers)
        assert read.status_code == 200
        stale += read.json() != [{"n": i}]
        from_replica += read.headers["gatehouse-source"] == "r1"
    assert stale == 0
    assert from_replica == 0  # every write is 3 s from the replica: all of them read on the primary
    assert served.runtime.replicas.fallbacks[("main", "lacks the write")] == 1000
    assert served.runtime.replicas.lags()[("main", "r1")] is not None  # the replica stayed usable throughout

    # The guard is what kept them right: another app, without the token or the memory of the writes (which is
    # per app), is answered by the same replica, with the rows of 3 s ago.
    behind = await served.clients["viewer"].get("/items?id=eq.1&select=n")
    assert behind.headers["gatehouse-source"] == "r1" and behind.json() != [{"n": 995}]
    assert (await office.get("/items?id=eq.1&select=n")).json() == [{"n": 995}]  # the primary has it


async def test_a_token_is_honoured_once_the_replica_has_the_write(served: Served,
                                                                  replica_cluster: ReplicaPair) -> None:
    clerk = served.clients["clerk"]
    written = await clerk.patch("/items?id=eq.1", json={"n": 42})
    token = written.headers["gatehouse-consistency"]
    await replica_cluster.caught_up()
    await asyncio.sleep(1.1)  # past clerk's max_staleness: its own-write memory no longer applies
    await _until(lambda: (served.runtime.replicas.lags()[("main", "r1")] or 9) < 0.5)
    read = await clerk.get("/items?id=eq.1&select=n", headers={"Gatehouse-Consistency": token})
    assert read.json() == [{"n": 42}] and read.headers["gatehouse-source"] == "r1"


async def test_the_replica_killed_under_load_costs_no_request(served: Served,
                                                              replica_cluster: ReplicaPair) -> None:
    clerk = served.clients["clerk"]
    statuses: list[int] = []
    sources: list[str] = []
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            read = await clerk.get("/items?select=id,name")
            statuses.append(read.status_code)
            sources.append(read.headers.get("gatehouse-source", "?"))

    readers = [asyncio.create_task(reader()) for _ in range(6)]
    await asyncio.sleep(0.5)
    await replica_cluster.stop_replica("immediate")
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*readers)
    assert statuses and set(statuses) == {200}, f"failed requests: {sorted(set(statuses))}"
    assert "r1" in sources and sources[-1] == "primary"
    assert served.runtime.replicas.readings()[0][0].failures >= 1 or served.runtime.replicas.lags()[
        ("main", "r1")] is None
    await replica_cluster.start_replica()
    await _until(lambda: served.runtime.replicas.lags()[("main", "r1")] is not None, timeout_s=20)
    assert (await clerk.get("/items")).headers["gatehouse-source"] == "r1"


async def test_replica_only_is_503_when_no_replica_is_fresh(served: Served, replica_cluster: ReplicaPair) -> None:
    bi = served.clients["bi"]
    assert (await bi.get("/items")).headers["gatehouse-source"] == "r1"
    await replica_cluster.pause_replay()
    await _until(lambda: (served.runtime.replicas.lags()[("main", "r1")] or 9) > 1.0)
    refused = await bi.get("/items")
    assert refused.status_code == 503 and refused.json()["code"] == "GH520"
    assert refused.headers["retry-after"] == "1"


async def test_preferences_and_a_bad_token(served: Served) -> None:
    clerk = served.clients["clerk"]
    forced = await clerk.get("/items", headers={"Prefer": "read-from=primary"})
    assert forced.headers["gatehouse-source"] == "primary"
    assert forced.headers["preference-applied"] == "read-from=primary"
    tight = await clerk.get("/items", headers={"Prefer": "max-staleness=0.001"})
    assert tight.headers["gatehouse-source"] == "primary"  # no replica is that fresh (the heartbeat is 50 ms)
    assert tight.headers["preference-applied"] == "max-staleness=0.001"
    for bad in ("main", "main:12x", "other:1; drop", "x" * 100):
        refused = await clerk.get("/items", headers={"Gatehouse-Consistency": bad})
        assert refused.status_code == 400 and refused.json()["code"] == "GH400", bad
    other_database = await clerk.get("/items", headers={"Gatehouse-Consistency": "elsewhere:99999999"})
    assert other_database.headers["gatehouse-source"] == "r1"  # a token of another database does not bind


async def test_ready_metrics_and_audit_show_the_replica(served: Served) -> None:
    clerk = served.clients["clerk"]
    assert (await clerk.get("/items?limit=1")).headers["gatehouse-source"] == "r1"
    transport = httpx.ASGITransport(app=create_admin_app(served.runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin.test") as admin:
        ready = (await admin.get("/ready")).json()
        assert ready["status"] == "ready" and ready["replicas"]["main/r1"].startswith("ok")
        metrics = (await admin.get("/metrics")).text
    assert 'gatehouse_replica_up{database="main",replica="r1"} 1.0' in metrics
    assert 'gatehouse_replica_lag_seconds{database="main",replica="r1"}' in metrics
    assert 'gatehouse_pool_connections{app="clerk",database="main",server="r1",state="in_use"}' in metrics
    assert "gatehouse_replica_fallbacks_total" in metrics
    assert served.runtime.audit is not None
    await served.runtime.audit.stop()  # (flushes what it holds)
    flags = await _sql(served.primary_url, "SELECT array_agg(DISTINCT replica) FROM gatehouse.audit_log "
                                           "WHERE app = 'clerk' AND target = 'items' AND method = 'GET'")
    assert flags == [True]


def test_which_replica_errors_send_the_read_to_the_primary() -> None:
    def error(sqlstate: str) -> asyncpg.PostgresError:
        return asyncpg.PostgresError.new({"C": sqlstate, "M": "x", "S": "ERROR"})

    assert should_retry_on_primary(error("40001"))  # canceling statement due to conflict with recovery
    assert should_retry_on_primary(error("57P04"))
    assert should_retry_on_primary(error("42P01"))  # a view the replica has not replayed yet
    assert should_retry_on_primary(ConnectionResetError())
    assert not should_retry_on_primary(error("57014"))  # the app's own statement timeout
    assert not should_retry_on_primary(error("22P02"))  # the read's own mistake: the primary would refuse too


async def test_pools_that_do_not_fit_max_connections_are_reported_at_start(
        make_project: ProjectFactory, serve_project: Callable[..., Awaitable], server_uri: str,
        caplog: pytest.LogCaptureFixture) -> None:
    limit = int(str(await _sql(server_uri, "SELECT current_setting('max_connections')")))
    toml = TOML.replace("replica_check_ms = 50\n", "").replace('reads = { from = "replica_only", '
                                                                'max_staleness = "1s" }\n', "")
    toml = re.sub(r"pool_size = [0-9]+", "pool_size = 200", toml)  # 1,000 in all: more than any test server takes
    project = make_project(toml=toml, migrations={"V001__items.sql": MIGRATION}, contracts=CONTRACTS)
    await prepare(project)
    with caplog.at_level("WARNING", logger="gatehouse.runtime"):
        await serve_project(project)
    warning = next(r.getMessage() for r in caplog.records if "max_connections" in r.getMessage())
    assert f"max_connections is {limit}" in warning and "instance(s) like this fit" in warning


async def test_replicas_before_apply_made_their_heartbeat_are_a_clear_error(served: Served) -> None:
    """A project that gained replicas without `apply` since: serve says what to run, not a traceback."""
    from gatehouse.errors import DatabaseUnavailable

    await _sql(served.primary_url, "ALTER TABLE gatehouse.heartbeat RENAME TO heartbeat_gone")
    try:
        runtime = Runtime(served.runtime.project)
        with pytest.raises(DatabaseUnavailable, match="run `gatehouse apply`"):
            await runtime.start()
    finally:
        await _sql(served.primary_url, "ALTER TABLE gatehouse.heartbeat_gone RENAME TO heartbeat")
