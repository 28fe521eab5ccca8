"""Statement groups (``gatehouse.db.statement_groups``): requests of one statement waiting for a busy pool run
together in one round trip (inserts in one transaction), and each request still gets the answer it would have had
alone: its own row, its own refusal, a read run again after a lost connection, nothing kept of a lost insert group.

The first part drives :class:`StatementGroups` over a real pool on a scratch table (the pool's only connection held
by the test, so that the requests wait); the second runs gatehouse's own reads and inserts, with their audit
records, through an app whose pool has one connection."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import ProjectFactory, prepare, with_database
from gatehouse import operations, writing
from gatehouse.app import create_admin_app, create_app
from gatehouse.auth.identity import Identity
from gatehouse.db import Connection, statement_groups
from gatehouse.db.pools import AppPool
from gatehouse.db.statement_groups import FUNNEL_HOLD_S, Merge, StatementGroups
from gatehouse.errors import ApiError, ConnectionLost
from gatehouse.runtime import Runtime
from test_write_plans import request
from test_writes import CONTRACTS, MIGRATION, TOML

INSERT = ("WITH written AS (INSERT INTO things (sku) VALUES ($1) RETURNING id) "
          "SELECT count(*) AS written, txid_current() AS xid FROM written")
READ = "SELECT ($1::text)::int AS n"
SLOW_READ = "SELECT $1::text AS v, pg_sleep(0.3)"
SLOW_INSERT = ("WITH written AS (INSERT INTO things (sku) VALUES ($1) RETURNING id) "
               "SELECT count(*) AS written, txid_current() AS xid, pg_sleep(0.3) FROM written")


class Scratch:
    """A database of its own with one table, a pool over it, and a monitor connection to look at it."""

    def __init__(self, dsn: str, monitor: asyncpg.Connection[Any]) -> None:
        self.dsn, self.monitor = dsn, monitor
        self.pools: list[AppPool] = []
        self.tag = f"gh-group-{uuid.uuid4().hex[:10]}"

    def groups(self, size: int = 1, max_group: int = 32) -> tuple[AppPool, StatementGroups]:
        async def connect() -> Connection:
            conn: Connection = await asyncpg.connect(self.dsn, server_settings={"application_name": self.tag})
            return conn
        pool = AppPool(connect, size, acquire_timeout_s=5.0)
        self.pools.append(pool)
        return pool, StatementGroups(pool, max_group)

    async def skus(self) -> list[str]:
        return [r["sku"] for r in await self.monitor.fetch("SELECT sku FROM things ORDER BY id")]


@pytest.fixture
async def scratch(server_uri: str) -> AsyncIterator[Scratch]:
    name = f"gh_group_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_uri)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_database(server_uri, name)
    monitor = await asyncpg.connect(dsn)
    await monitor.execute("CREATE TABLE things (id serial PRIMARY KEY, sku text NOT NULL UNIQUE)")
    made = Scratch(dsn, monitor)
    try:
        yield made
    finally:
        for pool in made.pools:
            await pool.close()
        await monitor.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def waiting(groups: StatementGroups, skus: list[str]) -> list[asyncio.Task[Any]]:
    """One task per insert, each waiting for the pool (held by the caller) once this returns."""
    tasks = [asyncio.create_task(groups.write(INSERT, (sku,))) for sku in skus]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in tasks)
    return tasks


async def lost_under_a_group(scratch: Scratch, pool: AppPool,
                             start: Callable[[int], Awaitable[Any]]) -> list[asyncio.Task[Any]]:
    """Three requests (``start(n)``, statements of 0.3 s each) queued behind the pool's one connection, which the
    test holds and then lets go: their group runs on it, and is killed (``pg_terminate_backend``) while running."""
    async with pool.acquire() as held:
        tasks = [asyncio.create_task(start(n)) for n in range(3)]
        await asyncio.sleep(0.05)
        pid = held.get_server_pid()
    await asyncio.sleep(0.3)
    assert await scratch.monitor.fetchval("SELECT count(pg_terminate_backend($1))", pid) == 1
    return tasks


async def test_inserts_waiting_for_a_busy_pool_commit_together(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=1)
    async with pool.acquire():  # the pool's one connection is busy: the inserts queue
        tasks = await waiting(groups, [f"s{n}" for n in range(8)])
        assert await scratch.skus() == []
    rows = await asyncio.gather(*tasks)
    assert [row["written"] for row in rows] == [1] * 8
    assert len({row["xid"] for row in rows}) == 1  # one transaction, one commit
    assert await scratch.skus() == [f"s{n}" for n in range(8)]  # in the order they came
    assert (groups.groups, groups.grouped, groups.alone_again) == (1, 8, 0)
    assert groups.statements_waiting == 0  # nothing kept per statement once its requests have run


async def test_an_insert_that_finds_a_free_connection_runs_at_once_alone(scratch: Scratch) -> None:
    _, groups = scratch.groups(size=2)
    rows = [await groups.write(INSERT, (f"a{n}",)) for n in range(3)]
    assert len({row["xid"] for row in rows}) == 3
    assert groups.groups == 0 and await scratch.skus() == ["a0", "a1", "a2"]


async def test_one_refused_row_refuses_only_its_own_request(scratch: Scratch) -> None:
    await scratch.monitor.execute("INSERT INTO things (sku) VALUES ('taken')")
    pool, groups = scratch.groups(size=1)
    async with pool.acquire():
        tasks = await waiting(groups, ["r0", "r1", "taken", "r3", "r4"])
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(answers[2], asyncpg.UniqueViolationError)
    committed = [a for i, a in enumerate(answers) if i != 2]
    assert all(isinstance(a, asyncpg.Record) and a["written"] == 1 for a in committed)
    assert len({a["xid"] for a in committed}) == 4  # the refused group's requests each ran, and committed, alone
    assert await scratch.skus() == ["taken", "r0", "r1", "r3", "r4"]
    assert (groups.groups, groups.alone_again) == (0, 5)


async def test_a_caller_that_gives_up_while_waiting_is_left_out(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=1)
    async with pool.acquire():
        tasks = await waiting(groups, ["c0", "c1", "c2"])
        tasks[1].cancel()
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(answers[1], asyncio.CancelledError)
    assert await scratch.skus() == ["c0", "c2"]
    assert groups.grouped == 2


async def test_a_group_is_at_most_max_group_requests(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=1, max_group=3)
    async with pool.acquire():
        tasks = await waiting(groups, [f"m{n}" for n in range(7)])
    rows = await asyncio.gather(*tasks)
    assert sorted(len([r for r in rows if r["xid"] == xid]) for xid in {r["xid"] for r in rows}) == [1, 3, 3]
    assert await scratch.skus() == [f"m{n}" for n in range(7)]


async def test_a_connection_lost_under_a_group_fails_each_request_and_keeps_nothing(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=1)
    tasks = await lost_under_a_group(scratch, pool, lambda n: groups.write(SLOW_INSERT, (f"l{n}",)))
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(a, ConnectionLost) and a.status == 503 for a in answers), answers
    assert await scratch.skus() == []  # the group's transaction died with it
    assert pool.in_use == 0


async def test_reads_waiting_for_a_busy_pool_run_in_one_round_trip_each_with_its_answer(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=1)
    async with pool.acquire():
        tasks = [asyncio.create_task(groups.read(READ, (str(n),))) for n in range(6)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in tasks)
    rows = await asyncio.gather(*tasks)
    assert [row["n"] for row in rows] == list(range(6))
    assert (groups.groups, groups.grouped) == (1, 6)


@pytest.fixture
def roomy_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group budget of 50 ms: READ's pace fits it on a machine under load, where a pace measured on the wall
    clock can pass the 2 ms of :data:`GROUP_BUDGET_S` (a group split, or a read no longer cheap). What the tests
    that take it check is how cheap reads go, not whether READ is cheap on the machine of the day."""
    monkeypatch.setattr(statement_groups, "GROUP_BUDGET_S", 0.05)


async def had_company(pool: AppPool, groups: StatementGroups) -> None:
    """READ run alone (on a connection then warm), then six of it while the pool's one open connection is busy,
    in one group, so that READ is cheap (its pace) and has had company lately."""
    for n in range(2):
        assert (await groups.read(READ, (str(n),)))["n"] == n
    before = groups.grouped
    async with pool.acquire():
        waiting = [asyncio.create_task(groups.read(READ, (str(n),))) for n in range(6)]
        await asyncio.sleep(0.05)
    assert [row["n"] for row in await asyncio.gather(*waiting)] == list(range(6))
    assert groups.grouped - before == 6


@pytest.mark.usefixtures("roomy_budget")
async def test_cheap_reads_of_one_loop_turn_go_together_while_connections_are_free(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=4)
    await had_company(pool, groups)
    assert (pool.idle, pool.in_use) == (2, 0)  # the one had_company held, and the one its group ran on
    grouped, before = groups.grouped, groups.groups
    rows = await asyncio.gather(*(groups.read(READ, (str(n),)) for n in range(1, 9)))
    assert [row["n"] for row in rows] == list(range(1, 9))
    assert groups.grouped - grouped == 8 and groups.groups - before == 1
    assert (pool.idle, pool.in_use) == (2, 0)  # the connections free were enough: none opened for the eight


@pytest.mark.usefixtures("roomy_budget")
async def test_a_cheap_read_that_has_had_no_company_lately_does_not_wait_a_turn_for_it(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=4)
    for n in range(6):  # one at a time: cheap, but alone every time (one app among many, each with its own pool)
        assert (await groups.read(READ, (str(n),)))["n"] == n
    read = asyncio.create_task(groups.read(READ, ("7",)))
    await asyncio.sleep(0)
    assert not groups._tasks and groups.statements_waiting == 0  # on the free connection at once, no queue
    assert (await read)["n"] == 7
    await had_company(pool, groups)  # then it waits a turn again
    read = asyncio.create_task(groups.read(READ, ("8",)))
    await asyncio.sleep(0)
    assert groups._tasks and groups.statements_waiting == 1
    assert (await read)["n"] == 8


async def test_slow_reads_run_side_by_side_on_free_connections_and_alone_under_load(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=3)
    await groups.read(SLOW_READ, ("first",))  # 0.3 s: far more than GROUP_BUDGET_S
    started = asyncio.get_running_loop().time()
    rows = await asyncio.gather(*(groups.read(SLOW_READ, (f"f{n}",)) for n in range(3)))
    assert [row["v"] for row in rows] == ["f0", "f1", "f2"] and groups.groups == 0
    assert asyncio.get_running_loop().time() - started < 0.55  # side by side, not one after the other (0.9 s)
    async with pool.acquire():  # now they wait for the two other connections: each still goes alone
        rows = await asyncio.gather(*(groups.read(SLOW_READ, (f"b{n}",)) for n in range(4)))
    assert [row["v"] for row in rows] == ["b0", "b1", "b2", "b3"] and groups.groups == 0


async def test_a_read_with_a_bad_value_refuses_only_itself(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=1)
    async with pool.acquire():
        tasks = [asyncio.create_task(groups.read(READ, (value,))) for value in ("1", "two", "3")]
        await asyncio.sleep(0.05)
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(answers[1], asyncpg.InvalidTextRepresentationError)
    assert [a["n"] for a in (answers[0], answers[2]) if isinstance(a, asyncpg.Record)] == [1, 3]
    assert groups.alone_again == 3


async def test_reads_whose_connection_is_lost_under_their_group_run_again_and_answer(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=1)
    tasks = await lost_under_a_group(scratch, pool, lambda n: groups.read(SLOW_READ, (f"v{n}",)))
    rows = await asyncio.gather(*tasks)
    assert [row["v"] for row in rows] == ["v0", "v1", "v2"]
    assert groups.groups == 0  # the group never finished: each read ran again, alone, on a fresh connection


async def test_a_value_asyncpg_cannot_encode_sends_the_others_of_its_group_alone(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=1)
    async with pool.acquire():
        tasks = [asyncio.create_task(groups.write(INSERT, (value,))) for value in ("e0", 17, "e2")]
        await asyncio.sleep(0.05)
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(answers[1], asyncpg.DataError)  # as alone: asyncpg refused the value, the group rolled back
    assert all(isinstance(a, asyncpg.Record) and a["written"] == 1 for a in (answers[0], answers[2]))
    assert await scratch.skus() == ["e0", "e2"]
    assert groups.alone_again == 3


MERGED = ("WITH w AS (INSERT INTO things (sku) SELECT sku FROM json_populate_recordset(NULL::things, $1::json) "
          "RETURNING 1) SELECT CASE WHEN count(*) = $2::bigint THEN count(*) "
          "ELSE ('wrote ' || count(*))::bigint END AS written, txid_current() AS xid FROM w")
"""A :class:`Merge` statement for the scratch table, shaped as gatehouse's (``WriteCompiler.merged_insert``)."""


def merged_insert(groups: StatementGroups, skus: list[str]) -> asyncio.Task[Any]:
    """One request inserting ``skus``: alone with INSERT (one row per request there), or merged with others."""
    parts = ("[" + ",".join(f'{{"sku":"{sku}"}}' for sku in skus) + "]",)
    return asyncio.create_task(groups.write(INSERT, (skus[0],), Merge(MERGED, parts, len(skus))))


async def test_inserts_with_a_merge_run_as_one_statement_each_answered_with_its_own_rows(scratch: Scratch) -> None:
    pool, groups = scratch.groups(size=3)
    async with pool.acquire():  # two connections stay free: the first waits one loop turn for the others
        tasks = [merged_insert(groups, skus) for skus in (["m0"], ["m1", "m2"], ["m3"], ["m4", "m5", "m6"])]
        await asyncio.sleep(0.05)
    answers = await asyncio.gather(*tasks)
    assert [a["written"] for a in answers] == [1, 2, 1, 3]  # each its own, where the merged statement wrote 7
    assert len({a["xid"] for a in answers}) == 1  # one statement, one commit
    assert await scratch.skus() == [f"m{n}" for n in range(7)]  # in the order they came
    assert (groups.groups, groups.grouped, groups.merged, groups.alone_again) == (1, 4, 1, 0)
    assert groups.statements_waiting == 0


async def test_a_merged_group_that_writes_fewer_rows_than_sent_runs_each_request_alone(scratch: Scratch) -> None:
    await scratch.monitor.execute("""
        CREATE FUNCTION skip_some() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RETURN CASE WHEN NEW.sku LIKE 'skip%' THEN NULL ELSE NEW END; END $$;
        CREATE TRIGGER skip_some BEFORE INSERT ON things FOR EACH ROW EXECUTE FUNCTION skip_some()""")
    pool, groups = scratch.groups(size=1)
    async with pool.acquire():
        tasks = [merged_insert(groups, [sku]) for sku in ("k0", "skip1", "k2")]
        await asyncio.sleep(0.05)
    answers = await asyncio.gather(*tasks)
    assert [a["written"] for a in answers] == [1, 0, 1]  # as each would have been answered alone
    assert await scratch.skus() == ["k0", "k2"]
    assert (groups.merged, groups.alone_again) == (0, 3)  # merged, refused, then each alone


async def test_a_slow_insert_holds_the_next_ones_of_its_shape_back_only_briefly(scratch: Scratch) -> None:
    await scratch.monitor.execute("""
        CREATE FUNCTION slow_one() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN IF NEW.sku = 'slow' THEN PERFORM pg_sleep(0.6); END IF; RETURN NEW; END $$;
        CREATE TRIGGER slow_one BEFORE INSERT ON things FOR EACH ROW EXECUTE FUNCTION slow_one()""")
    _, groups = scratch.groups(size=2)
    slow = merged_insert(groups, ["slow"])
    await asyncio.sleep(0.02)
    others = [merged_insert(groups, [f"q{n}"]) for n in range(3)]  # they wait for it, but not for 0.6 s
    answers = await asyncio.wait_for(asyncio.gather(*others), FUNNEL_HOLD_S + 0.3)
    assert not slow.done() and [a["written"] for a in answers] == [1, 1, 1] and groups.merged == 1
    assert (await slow)["written"] == 1 and sorted(await scratch.skus()) == ["q0", "q1", "q2", "slow"]


# -- gatehouse's own inserts, with their audit records --------------------------------------------------------

ONE_CONNECTION = TOML.replace("[apps.clerk]\n", "[apps.clerk]\nquota = { pool_size = 1 }\n") + \
    "\n[server]\nmax_active = 64\n"


@pytest.fixture
async def runtime(make_project: ProjectFactory) -> AsyncIterator[Runtime]:
    project = make_project(toml=ONE_CONNECTION, migrations={"V001__items.sql": MIGRATION}, contracts=CONTRACTS)
    keys = await prepare(project)
    started = Runtime(project)
    await started.start()
    started.test_key = keys["clerk"]  # type: ignore[attr-defined]
    yield started
    await started.stop()


async def test_concurrent_reads_through_gatehouse_each_answer_their_own_query(runtime: Runtime) -> None:
    async with operations.owner_connection(runtime.project) as conn:
        await conn.execute("INSERT INTO items (sku, name, qty) SELECT 'q' || n, 'item ' || n, n "
                           "FROM generate_series(1, 20) AS n")
        ids = {r["sku"]: r["id"] for r in await conn.fetch("SELECT id, sku FROM items WHERE sku LIKE 'q%'")}
    transport = httpx.ASGITransport(app=create_app(runtime, manage_runtime=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://gatehouse.test",
                                 headers={"apikey": runtime.test_key}) as client:  # type: ignore[attr-defined]
        async def get(query: str) -> httpx.Response:
            return await client.get(f"/items?select=sku,qty&{query}")
        queries = [f"id=eq.{ids[f'q{n}']}" for n in range(1, 21)]
        answers = await asyncio.gather(*(get(query) for query in queries))
        groups = runtime.pools.statement_groups("clerk", "main")
        assert groups.groups >= 1 and groups.alone_again == 0
        queries[7] = "id=eq.not-a-number"  # refused by PostgreSQL: only this request
        again = await asyncio.gather(*(get(query) for query in queries))
    assert again[7].status_code == 400 and groups.alone_again >= 2
    for n, (answer, other) in enumerate(zip(answers, again, strict=True), start=1):
        assert answer.status_code == 200 and answer.json() == [{"sku": f"q{n}", "qty": n}], (n, answer.text)
        assert n == 8 or other.json() == answer.json()


@pytest.fixture
def no_log_noise(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_concurrent_inserts_commit_in_groups_each_with_its_record_and_a_bad_one_alone(
        runtime: Runtime, no_log_noise: None) -> None:
    project, app = runtime.project, runtime.project.apps["clerk"]
    bodies: list[dict[str, object]] = [{"sku": f"g{n}", "name": f"item {n}", "qty": n} for n in range(12)]
    bodies[5]["qty"] = -1  # the table's CHECK refuses it

    async def insert(body: dict[str, object]) -> str:
        made = request(body)
        plan = await writing.plan_write(made, runtime, Identity(app="clerk", key_id="k1"), app, "items", None)
        await writing.execute_write(runtime, app, plan, made.labels)
        return made.labels.request_id

    first = [await insert({"sku": "warm", "name": "w"})]  # the shape's plan exists: the others use it
    answers = await asyncio.gather(*(insert(body) for body in bodies), return_exceptions=True)
    refused = answers[5]
    assert isinstance(refused, ApiError) and refused.status == 400
    request_ids = first + [a for a in answers if isinstance(a, str)]
    assert len(request_ids) == 12
    groups = runtime.pools.statement_groups("clerk", "main")
    assert groups.alone_again > 0
    async with operations.owner_connection(project) as conn:
        skus = [r["sku"] for r in await conn.fetch("SELECT sku FROM items WHERE sku LIKE 'g%' ORDER BY id")]
        audited = await conn.fetch("SELECT request_id, status, rows FROM gatehouse.audit_log "
                                   "WHERE request_id = ANY($1::text[])", request_ids)
    assert sorted(skus) == sorted(f"g{n}" for n in range(12) if n != 5)  # nothing of the refused one
    assert sorted((r["request_id"], r["status"], r["rows"]) for r in audited) == \
        sorted((rid, 201, 1) for rid in request_ids)


async def test_inserts_commit_together_when_nothing_is_refused(runtime: Runtime) -> None:
    project, app = runtime.project, runtime.project.apps["clerk"]

    async def insert(n: int) -> None:
        made = request({"sku": f"t{n}", "name": "t"})
        plan = await writing.plan_write(made, runtime, Identity(app="clerk", key_id="k1"), app, "items", None)
        outcome = await writing.execute_write(runtime, app, plan, made.labels)
        assert outcome.written == 1 and outcome.xid is not None and made.labels.audited  # (xid: read-your-writes)

    await insert(0)
    await asyncio.gather(*(insert(n) for n in range(1, 11)))
    groups = runtime.pools.statement_groups("clerk", "main")
    assert groups.groups >= 1 and groups.grouped >= 2 and groups.merged >= 1 and groups.alone_again == 0
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT count(*) FROM items WHERE sku LIKE 't%'") == 11
        audited = await conn.fetch("SELECT status, rows, duration_ms, query FROM gatehouse.audit_log "
                                   "WHERE target = 'items' AND method = 'POST'")
    assert len(audited) == 11 and all((r["status"], r["rows"]) == (201, 1) for r in audited)
    assert all(r["duration_ms"] > 0 for r in audited)
    transport = httpx.ASGITransport(app=create_admin_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin.test") as admin:
        metrics = (await admin.get("/metrics")).text
    where = 'app="clerk",database="main",server="primary"'
    assert f"gatehouse_statement_groups_total{{{where}}} {float(groups.groups)}" in metrics
    assert f"gatehouse_statement_grouped_total{{{where}}} {float(groups.grouped)}" in metrics
    assert f"gatehouse_statement_group_retries_total{{{where}}} 0.0" in metrics
    assert f"gatehouse_statement_groups_merged_total{{{where}}} {float(groups.merged)}" in metrics
