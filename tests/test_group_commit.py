"""Group commit (``gatehouse.db.group_commit``): inserts waiting for a busy pool commit together, and each request
still gets the answer it would have had alone: its own row, its own refusal, nothing kept of a lost group.

The first part drives :class:`CommitGroups` over a real pool on a scratch table (the pool's only connection held
by the test, so that the inserts wait); the second runs gatehouse's own inserts, with their audit records,
through an app whose pool has one connection."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from conftest import ProjectFactory, prepare, with_database
from gatehouse import operations, writing
from gatehouse.auth.identity import Identity
from gatehouse.db import Connection
from gatehouse.db.group_commit import CommitGroups
from gatehouse.db.pools import AppPool
from gatehouse.errors import ApiError, ConnectionLost
from gatehouse.runtime import Runtime
from test_write_plans import request
from test_writes import CONTRACTS, MIGRATION, TOML

INSERT = ("WITH written AS (INSERT INTO things (sku) VALUES ($1) RETURNING id) "
          "SELECT count(*) AS written, txid_current() AS xid FROM written")
SLOW_INSERT = ("WITH written AS (INSERT INTO things (sku) VALUES ($1) RETURNING id) "
               "SELECT count(*) AS written, txid_current() AS xid, pg_sleep(0.3) FROM written")


class Scratch:
    """A database of its own with one table, a pool over it, and a monitor connection to look at it."""

    def __init__(self, dsn: str, monitor: asyncpg.Connection[Any]) -> None:
        self.dsn, self.monitor = dsn, monitor
        self.pools: list[AppPool] = []
        self.tag = f"gh-group-{uuid.uuid4().hex[:10]}"

    def groups(self, size: int = 1, max_group: int = 32) -> tuple[AppPool, CommitGroups]:
        async def connect() -> Connection:
            conn: Connection = await asyncpg.connect(self.dsn, server_settings={"application_name": self.tag})
            return conn
        pool = AppPool(connect, size, acquire_timeout_s=5.0)
        self.pools.append(pool)
        return pool, CommitGroups(pool, max_group)

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


async def waiting(groups: CommitGroups, skus: list[str]) -> list[asyncio.Task[Any]]:
    """One task per insert, each waiting for the pool (held by the caller) once this returns."""
    tasks = [asyncio.create_task(groups.fetchrow(INSERT, (sku,))) for sku in skus]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in tasks)
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


async def test_an_insert_that_finds_a_free_connection_runs_at_once_alone(scratch: Scratch) -> None:
    _, groups = scratch.groups(size=2)
    rows = [await groups.fetchrow(INSERT, (f"a{n}",)) for n in range(3)]
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
    async with pool.acquire() as held:
        tasks = [asyncio.create_task(groups.fetchrow(SLOW_INSERT, (f"l{n}",))) for n in range(3)]
        await asyncio.sleep(0.05)
        pid = held.get_server_pid()
    await asyncio.sleep(0.3)  # the group is running (three statements of 0.3 s): end its connection
    ended = await scratch.monitor.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1 AND pid = $2",
        scratch.tag, pid)
    assert ended == 1
    answers = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(a, ConnectionLost) and a.status == 503 for a in answers), answers
    assert await scratch.skus() == []  # the group's transaction died with it
    assert pool.in_use == 0


# -- gatehouse's own inserts, with their audit records --------------------------------------------------------

ONE_CONNECTION = TOML.replace("[apps.clerk]\n", "[apps.clerk]\nquota = { pool_size = 1 }\n")


@pytest.fixture
async def runtime(make_project: ProjectFactory) -> AsyncIterator[Runtime]:
    project = make_project(toml=ONE_CONNECTION, migrations={"V001__items.sql": MIGRATION}, contracts=CONTRACTS)
    await prepare(project)
    started = Runtime(project)
    await started.start()
    yield started
    await started.stop()


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
    groups = runtime.pools.commit_groups("clerk", "main")
    assert groups.alone_again > 0
    async with operations.owner_connection(project) as conn:
        skus = [r["sku"] for r in await conn.fetch("SELECT sku FROM items WHERE sku LIKE 'g%' ORDER BY id")]
        audited = await conn.fetch("SELECT request_id, status, rows FROM gatehouse.audit "
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
        assert outcome.written == 1 and made.labels.audited

    await insert(0)
    await asyncio.gather(*(insert(n) for n in range(1, 11)))
    groups = runtime.pools.commit_groups("clerk", "main")
    assert groups.groups >= 1 and groups.grouped >= 2 and groups.alone_again == 0
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT count(*) FROM items WHERE sku LIKE 't%'") == 11
