"""The audit trail: one record per request under bursts, outages and killed connections; no write without
its record; redaction; reading it back."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import asyncpg
import orjson
import pytest

from conftest import ProjectFactory
from gatehouse import operations
from gatehouse.admin import traffic
from gatehouse.db.targets import DatabaseTarget, resolve_targets
from gatehouse.errors import ServiceUnavailable
from gatehouse.observe.audit import AUDIT_DDL, AuditRecord, AuditUnavailable, audit_in_transaction
from gatehouse.observe.audit_query import as_json, as_table_rows, search, version_table_rows, version_usage
from gatehouse.observe.audit_writer import AuditWriter
from gatehouse.observe.redact import MAX_QUERY_CHARS, redact_query
from gatehouse.project import Project

TOML = """
[project]
name = "audit"

[databases.main]

[apps.web]
grants = [{ contract = "things", actions = ["read", "insert"] }]
"""
WRITER_NAME = "gatehouse-audit-test"


@dataclass
class Audited:
    project: Project
    target: DatabaseTarget
    tmp: Path

    def connect(self) -> Callable[[], Awaitable[asyncpg.Connection]]:
        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(self.target.owner_dsn, server_settings={"application_name": WRITER_NAME})
        return connect

    async def owner(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.target.owner_dsn)

    async def scalar(self, sql: str) -> object:
        conn = await self.owner()
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()


@pytest.fixture
async def audited(make_project: ProjectFactory, tmp_path: Path) -> Audited:
    project = make_project(toml=TOML, migrations={"V001__t.sql": "CREATE TABLE things (id serial PRIMARY KEY, name text);"},
                           contracts={"things.v1.sql": "SELECT id, name FROM things"})
    await operations.migrate_all(project)
    await operations.apply_all(project)
    target = (await resolve_targets(project))["main"]
    conn = await target.connect_owner()
    try:
        await conn.execute(AUDIT_DDL)
        await conn.execute(AUDIT_DDL)  # idempotent
    finally:
        await conn.close()
    return Audited(project, target, tmp_path)


def record(n: int, *, app: str = "web", target: str = "things", version: int | None = 1, status: int = 200,
           subject: str | None = None, at: datetime | None = None, method: str = "GET") -> AuditRecord:
    return AuditRecord(at=at or datetime.now(UTC), request_id=f"req-{n}", app=app, key_id="k1", subject=subject,
                       method=method, target=target, api_version=version, query="id=eq.***", status=status,
                       rows=1, duration_ms=1.5)


async def counts(audited: Audited) -> tuple[int, int, int, int]:
    conn = await audited.owner()
    try:
        row = await conn.fetchrow("SELECT count(*), count(DISTINCT request_id) FROM gatehouse.audit_log")
        usage = await conn.fetchrow("SELECT coalesce(sum(calls), 0), coalesce(sum(errors), 0) FROM gatehouse.usage")
        assert row is not None and usage is not None
        return row[0], row[1], usage[0], usage[1]
    finally:
        await conn.close()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_records_are_stored_exactly_or_made_storable(audited: Audited) -> None:
    """A normal record goes in as it is; one with NUL, oversized texts and numbers, a naive time or a NaN
    duration is trimmed to fit instead of failing the batch it is in."""
    normal = record(1, subject="alice")
    hostile = AuditRecord(at=datetime(2026, 1, 2, 3, 4, 5), request_id="req-\x002", app="web", key_id="k1",
                          subject="bob\x00" + "b" * 900, method="GET", target="things", api_version=1,
                          query="id=eq.\x00" + "x" * 20_000, status=200, rows=2**40, duration_ms=float("nan"))
    conn = await audited.owner()
    try:
        async with conn.transaction():
            for r in (normal, hostile):
                await audit_in_transaction(conn, r)
        stored = {row["request_id"]: row for row in await conn.fetch("SELECT * FROM gatehouse.audit_log")}
    finally:
        await conn.close()
    kept = stored["req-1"]
    assert (kept["at"], kept["subject"], kept["query"], kept["rows"]) == (normal.at, "alice", "id=eq.***", 1)
    trimmed = stored["req-2"]
    assert trimmed["at"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert trimmed["subject"] == "bob" + "b" * 497 and len(trimmed["query"]) == MAX_QUERY_CHARS
    assert "\x00" not in trimmed["query"] and trimmed["rows"] == 2**31 - 1 and trimmed["duration_ms"] == 0.0


def hostile(request_id: str, *, at: datetime | None = None, subject: str | None = None, query: str = "q",
            rows: int = 1, duration_ms: float = 1.0) -> AuditRecord:
    return AuditRecord(at=at or datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), request_id=request_id, app="web",
                       key_id="k1", subject=subject, method="GET", target="things", api_version=1, query=query,
                       status=200, rows=rows, duration_ms=duration_ms)


async def test_batches_are_small_while_the_writer_keeps_up_and_large_once_behind(audited: Audited) -> None:
    """``flush_rows`` waiting records go out at once, without waiting for the flush interval (a small batch holds
    PostgreSQL briefly); records that queued while the writer was busy go out together, up to ``batch_size``, so
    that a burst costs few transactions. Each transaction is counted by the ``xmin`` of its rows."""
    writer = AuditWriter(audited.connect(), audited.tmp / "spool.jsonl", batch_size=100, flush_rows=4,
                         flush_interval_s=30)
    writer.start()
    try:
        for n in range(4):
            writer.submit(record(n))
        await until(lambda: writer.pending().total == 0, timeout=5)  # far sooner than the 30 s interval
        assert await counts(audited) == (4, 4, 4, 0)
        for n in range(4, 404):  # a burst: no await, so the writer is behind by all of it
            writer.submit(record(n))
        await until(lambda: writer.pending().total == 0, timeout=10)
    finally:
        await writer.stop()
    assert await counts(audited) == (404, 404, 404, 0)
    transactions = await audited.scalar("SELECT count(DISTINCT xmin::text) FROM gatehouse.audit_batch")
    assert isinstance(transactions, int) and transactions <= 1 + 4  # the first four, then the burst by 100s
    assert await audited.scalar("SELECT count(*) FROM gatehouse.audit") == 0  # rows are for writes only


@pytest.mark.parametrize(("bad", "expected"), [
    # (subject, length of query, rows, duration_ms) as stored
    (hostile("req-nul", subject="a\x00b", query="id=eq.\x00"), ("ab", 6, 1, 1.0)),
    (hostile("req-range", rows=2**40, duration_ms=float("nan")), (None, 1, 2**31 - 1, 0.0)),
    (hostile("req-huge", rows=2**70, duration_ms=1e300), (None, 1, 2**31 - 1, 0.0)),
    (hostile("req-long", subject="s" * 900, query="x" * 20_000), ("s" * 500, MAX_QUERY_CHARS, 1, 1.0)),
    (hostile("req-naive", at=datetime(2026, 1, 2, 3, 4, 5)), (None, 1, 1, 1.0)),
], ids=lambda value: value.request_id if isinstance(value, AuditRecord) else "")
async def test_a_batch_with_a_hostile_record_stores_every_record(audited: Audited, bad: AuditRecord,
                                                                 expected: tuple[object, ...]) -> None:
    """The writer checks a batch as a whole: long texts, numbers out of range and a NaN are bounded when the batch
    is read, naive times are UTC, and a NUL or an integer beyond 64 bits makes it store each record of the batch
    made storable. No record is lost or doubled, and the normal ones around it read back exactly."""
    async def connect() -> asyncpg.Connection:  # a session time zone far from UTC: naive times must not follow it
        return await asyncpg.connect(audited.target.owner_dsn, server_settings={"timezone": "Pacific/Auckland"})

    writer = AuditWriter(connect, audited.tmp / "spool.jsonl", batch_size=10, flush_interval_s=0.01)
    writer.start()
    normal = [record(n, subject="alice") for n in range(3)]
    for r in (normal[0], bad, *normal[1:]):
        writer.submit(r)
    await writer.stop()
    assert writer.pending().total == 0
    conn = await audited.owner()
    try:
        stored = {row["request_id"]: row for row in await conn.fetch("SELECT * FROM gatehouse.audit_log")}
    finally:
        await conn.close()
    assert sorted(stored) == sorted([bad.request_id, "req-0", "req-1", "req-2"])
    for r in normal:
        kept = stored[r.request_id]
        assert (kept["at"], kept["subject"], kept["query"], kept["rows"]) == (r.at, "alice", "id=eq.***", 1)
    trimmed = stored[bad.request_id]
    assert (trimmed["subject"], len(trimmed["query"]), trimmed["rows"], trimmed["duration_ms"]) == expected
    assert trimmed["at"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


async def test_a_burst_of_mixed_traffic_gives_exactly_one_record_per_request(audited: Audited) -> None:
    writer = AuditWriter(audited.connect(), audited.tmp / "spool.jsonl")
    writer.start()
    shapes = [("web", "things", 1), ("web", "things", 2), ("web", "rpc:ping", 2), ("mobile", "things", 1)]
    expected: Counter[tuple[str, str, int, bool]] = Counter()

    async def client(task: int) -> None:
        for i in range(100):
            n = task * 100 + i
            app, target, version = shapes[n % len(shapes)]
            status = (200, 201, 404, 500, 200, 204, 401)[n % 7]
            expected[(app, target, version, status >= 400)] += 1
            writer.submit(record(n, app=app, target=target, version=version, status=status))
            if i % 10 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(client(t) for t in range(30)))
    await writer.stop()
    assert writer.pending().total == 0
    assert await counts(audited) == (3000, 3000, 3000, sum(v for (*_, e), v in expected.items() if e))
    conn = await audited.owner()
    try:
        usage = {(r["app"], r["target"], r["api_version"]): (r["calls"], r["errors"]) for r in await conn.fetch(
            "SELECT app, target, api_version, sum(calls) AS calls, sum(errors) AS errors FROM gatehouse.usage "
            "GROUP BY app, target, api_version")}
    finally:
        await conn.close()
    assert usage == {(a, t, v): (expected[(a, t, v, False)] + expected[(a, t, v, True)], expected[(a, t, v, True)])
                     for a, t, v in shapes}


def failing_until_up(audited: Audited) -> tuple[Callable[[], Awaitable[asyncpg.Connection]], list[bool]]:
    up = [False]
    connect = audited.connect()

    async def maybe() -> asyncpg.Connection:
        if not up[0]:
            raise OSError("connection refused (audit store down)")
        return await connect()
    return maybe, up


async def test_an_audit_table_from_before_the_client_column_is_upgraded_and_old_spool_lines_replay(
        audited: Audited) -> None:
    conn = await audited.owner()
    try:
        await conn.execute("ALTER TABLE gatehouse.audit DROP COLUMN client")
        await conn.execute(AUDIT_DDL)
        assert await conn.fetchval("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'gatehouse' "
                                   "AND table_name = 'audit' AND column_name = 'client'") == 1
    finally:
        await conn.close()
    spool = audited.tmp / "old-spool.jsonl"
    old_line = orjson.dumps({k: v for k, v in record(7)._asdict().items() if k != "client"}) + b"\n"
    spool.write_bytes(old_line)  # written by a gatehouse that had no client column yet
    writer = AuditWriter(audited.connect(), spool, flush_interval_s=0.01)
    writer.start()
    writer.submit(record(8)._replace(client="198.51.100.4"))
    await writer.stop()
    assert await audited.scalar("SELECT string_agg(request_id || '=' || client, ',' ORDER BY request_id) "
                                "FROM gatehouse.audit_log") == "req-7=,req-8=198.51.100.4"


async def test_store_down_spools_within_bounds_and_replays_exactly_once(audited: Audited) -> None:
    connect, up = failing_until_up(audited)
    spool = audited.tmp / "spool.jsonl"
    writer = AuditWriter(connect, spool, max_queue=100, batch_size=50, flush_interval_s=0.01,
                         max_spool_bytes=1_000_000, max_backoff_s=0.05)
    writer.start()
    peak = 0
    for n in range(1000):
        writer.submit(record(n, status=500 if n % 10 == 0 else 200))
        peak = max(peak, writer.pending().queued)
        if n % 25 == 0:
            await asyncio.sleep(0.005)
    assert peak <= 100  # memory is bounded by max_queue; the rest is on disk
    await until(lambda: writer.pending().queued == 0)  # the writer spills the queue while the store is down
    assert writer.pending().spooled == 1000 == len(spool.read_bytes().splitlines())
    assert spool.stat().st_size <= 1_000_000 and spool.stat().st_mode & 0o077 == 0
    assert await counts(audited) == (0, 0, 0, 0)

    up[0] = True
    await until(lambda: writer.pending().total == 0)
    assert spool.stat().st_size == 0
    writer.submit(record(1000))
    await writer.stop()
    assert await counts(audited) == (1001, 1001, 1001, 100)


async def test_spool_full_refuses_and_what_was_taken_survives_a_restart(audited: Audited) -> None:
    connect, up = failing_until_up(audited)
    spool = audited.tmp / "spool.jsonl"
    writer = AuditWriter(connect, spool, max_queue=10, batch_size=5, max_spool_bytes=20_000, max_backoff_s=0.05)
    writer.start()
    assert writer.accepting()
    accepted = 0
    with pytest.raises(AuditUnavailable) as refused:
        for n in range(10_000):
            writer.submit(record(n))
            accepted += 1
            await asyncio.sleep(0)
    assert isinstance(refused.value, ServiceUnavailable) and refused.value.status == 503
    assert not writer.accepting()
    assert 20 < accepted < 200 and spool.stat().st_size <= 20_000
    assert writer.pending().total == accepted
    await writer.stop()  # still down: everything left is spooled (past the bound rather than lost)
    assert writer.pending() == (0, accepted)

    up[0] = True
    restarted = AuditWriter(connect, spool)
    restarted.start()
    assert restarted.pending().spooled == accepted
    await restarted.stop()
    assert await counts(audited) == (accepted, accepted, accepted, 0)
    assert spool.stat().st_size == 0


async def test_killing_the_writers_connection_mid_stream_loses_nothing(audited: Audited) -> None:
    writer = AuditWriter(audited.connect(), audited.tmp / "spool.jsonl", batch_size=50, flush_interval_s=0.01,
                         max_backoff_s=0.05)
    writer.start()
    kills = 0

    async def killer() -> None:
        nonlocal kills
        conn = await audited.owner()
        try:
            for _ in range(25):
                await asyncio.sleep(0.03)
                kills += await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                    WRITER_NAME)
        finally:
            await conn.close()

    async def stream() -> None:
        for n in range(3000):
            writer.submit(record(n))
            if n % 20 == 0:
                await asyncio.sleep(0.005)

    await asyncio.gather(stream(), killer())
    await writer.stop()  # a kill just before this makes it spool the rest instead of retrying: replayed below
    assert kills >= 3
    replay = AuditWriter(audited.connect(), audited.tmp / "spool.jsonl")
    replay.start()
    await replay.stop()
    assert replay.pending().total == 0
    assert await counts(audited) == (3000, 3000, 3000, 0)


class CommitThenDie(asyncpg.Connection):
    """A connection whose COMMIT succeeds on the server but whose answer is lost (the worst moment to die)."""

    armed: ClassVar[list[int]] = [0]

    async def execute(self, query: str, *args: object, timeout: float | None = None) -> str:
        result = await super().execute(query, *args, timeout=timeout)
        if query.strip().upper().startswith("COMMIT") and self.armed[0] > 0:
            self.armed[0] -= 1
            self.terminate()
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        return result


async def test_a_commit_whose_answer_is_lost_is_not_written_twice(audited: Audited) -> None:
    up = [False]

    async def connect() -> asyncpg.Connection:
        if not up[0]:
            raise OSError("down")
        return await asyncpg.connect(audited.target.owner_dsn, connection_class=CommitThenDie)

    spool = audited.tmp / "spool.jsonl"
    writer = AuditWriter(connect, spool, batch_size=20, flush_interval_s=0.01, max_backoff_s=0.05)
    writer.start()
    for n in range(100):
        writer.submit(record(n))
    await until(lambda: writer.pending() == (0, 100))  # down: all spooled
    CommitThenDie.armed[0] = 1
    up[0] = True
    await until(lambda: writer.pending().total == 0)  # the replay committed, unconfirmed; settled, not resent
    assert CommitThenDie.armed[0] == 0 and spool.stat().st_size == 0
    CommitThenDie.armed[0] = 2
    for n in range(100, 200):
        writer.submit(record(n))
        if n % 10 == 0:
            await asyncio.sleep(0.01)
    await writer.stop()
    assert CommitThenDie.armed[0] == 0
    assert await counts(audited) == (200, 200, 200, 0)


async def test_a_write_commits_with_its_record_or_not_at_all(audited: Audited) -> None:
    conn = await audited.owner()
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO things (name) VALUES ('kept')")
            await audit_in_transaction(conn, record(1, method="POST", status=201))
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute("INSERT INTO things (name) VALUES ('undone')")
                await audit_in_transaction(conn, record(2, method="POST", status=201))
                raise RuntimeError("the write failed after its audit insert")
        assert await conn.fetchval("SELECT array_agg(name) FROM things") == ["kept"]
        assert await conn.fetchval("SELECT array_agg(request_id) FROM gatehouse.audit_log") == ["req-1"]
        assert await conn.fetchval("SELECT sum(calls) FROM gatehouse.usage") == 1
    finally:
        await conn.close()


async def test_concurrent_writers_are_counted_exactly_in_the_usage(audited: Audited) -> None:
    """Eight connections each commit 25 single-record writes; the usage view counts every one, with no trigger or
    roll-up row on the writes' path."""
    conns = [await audited.owner() for _ in range(8)]
    try:
        async def writes(conn: asyncpg.Connection, first: int) -> None:
            for n in range(first, first + 25):
                async with conn.transaction():
                    await audit_in_transaction(conn, record(n, method="POST", status=201 if n % 5 else 409))
        await asyncio.gather(*(writes(conn, i * 100) for i, conn in enumerate(conns)))
        rows = await conns[0].fetch("SELECT app, target, api_version, calls, errors FROM gatehouse.usage")
        assert [tuple(r) for r in rows] == [("web", "things", 1, 200, 40)]
        assert await conns[0].fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'gatehouse.audit'::regclass "
                                       "AND NOT tgisinternal") == 0
        usage = await version_usage(conns[0])
        assert [(u["app"], u["calls"], u["errors"], u["targets"]) for u in usage] == [("web", 200, 40, ["things"])]
    finally:
        for conn in conns:
            await conn.close()


async def test_the_usage_table_and_its_trigger_of_before_are_replaced_by_the_view(audited: Audited) -> None:
    conn = await audited.owner()
    try:
        await conn.execute("""
            DROP VIEW gatehouse.usage;
            CREATE TABLE gatehouse.usage (app text NOT NULL, target text NOT NULL, api_version integer NOT NULL,
                stripe smallint NOT NULL DEFAULT 0, calls bigint NOT NULL DEFAULT 0, errors bigint NOT NULL DEFAULT 0,
                last_call timestamptz NOT NULL, PRIMARY KEY (app, target, api_version, stripe));
            CREATE FUNCTION gatehouse.audit_usage_rollup() RETURNS trigger LANGUAGE plpgsql AS
                $$ BEGIN UPDATE gatehouse.usage SET calls = calls + 1; RETURN NULL; END $$;
            CREATE TRIGGER audit_usage_rollup AFTER INSERT ON gatehouse.audit
                FOR EACH STATEMENT EXECUTE FUNCTION gatehouse.audit_usage_rollup();
        """)
        async with conn.transaction():
            await audit_in_transaction(conn, record(1))
        await conn.execute(AUDIT_DDL)
        await conn.execute(AUDIT_DDL)  # and again, as every apply does
        assert await conn.fetchval("SELECT relkind FROM pg_class WHERE oid = 'gatehouse.usage'::regclass") == b"v"
        assert await conn.fetchval("SELECT to_regprocedure('gatehouse.audit_usage_rollup()')") is None
        async with conn.transaction():
            await audit_in_transaction(conn, record(2, status=500))
        assert tuple(await conn.fetchrow("SELECT calls, errors FROM gatehouse.usage")) == (2, 1)
    finally:
        await conn.close()


async def test_killed_write_connections_never_leave_a_write_without_its_record(audited: Audited) -> None:
    """As the app's role, through the contract view, with only the grants recommended for the audit."""
    project, target = audited.project, audited.target
    role = project.apps["web"].role
    conn = await audited.owner()
    await conn.execute(f'GRANT USAGE ON SCHEMA gatehouse TO "{role}"; GRANT INSERT ON gatehouse.audit TO "{role}"')
    await conn.close()
    pool = await asyncpg.create_pool(**target.authenticator_kwargs(), min_size=4, max_size=4,
                                     server_settings={"role": role, "application_name": "gatehouse/web"})
    assert pool is not None
    committed = failed = 0

    async def write(n: int) -> None:
        nonlocal committed, failed
        try:
            async with pool.acquire() as c:
                async with c.transaction():
                    await c.fetchval("INSERT INTO api_v1.things (name) VALUES ($1) RETURNING id", f"req-{n}")
                    await asyncio.sleep(random.random() / 100)
                    await audit_in_transaction(c, record(n, method="POST", status=201))
                committed += 1
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError):
            failed += 1

    async def killer() -> None:
        owner = await audited.owner()
        try:
            for _ in range(15):
                await asyncio.sleep(0.02)
                await owner.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE application_name = 'gatehouse/web' ORDER BY random() LIMIT 1")
        finally:
            await owner.close()

    try:
        await asyncio.gather(killer(), *(write(n) for n in range(300)))
    finally:
        pool.terminate()
    owner = await audited.owner()
    try:
        things = {r[0] for r in await owner.fetch("SELECT name FROM things")}
        audits = {r[0] for r in await owner.fetch("SELECT request_id FROM gatehouse.audit_log WHERE method = 'POST'")}
    finally:
        await owner.close()
    assert committed > 0 and failed > 0
    assert things == audits  # every write that committed has its record, and no record lacks its write
    assert committed <= len(things) <= 300  # (a commit whose answer the kill cut off may still have committed)


async def test_the_authenticator_needs_only_insert_on_the_audit_tables(audited: Audited) -> None:
    auth = audited.project.authenticator_role
    conn = await audited.owner()
    await conn.execute(f'GRANT INSERT ON gatehouse.audit, gatehouse.audit_batch, gatehouse.audit_minute TO "{auth}"; '
                       f'GRANT SELECT (id) ON gatehouse.audit_batch TO "{auth}"')
    await conn.close()

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(**audited.target.authenticator_kwargs())

    writer = AuditWriter(connect, audited.tmp / "spool.jsonl")
    writer.start()
    for n in range(200):
        writer.submit(record(n, status=404 if n % 4 == 0 else 200))
    await writer.stop()
    assert writer.pending().total == 0
    assert await counts(audited) == (200, 200, 200, 50)
    reader = await connect()
    try:
        for readable in ("gatehouse.audit", "gatehouse.audit_batch", "gatehouse.audit_minute", "gatehouse.audit_log",
                         "gatehouse.usage"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.fetch(f"SELECT * FROM {readable}")
    finally:
        await reader.close()


@pytest.mark.parametrize(("query", "redacted"), [
    ("id=eq.5&name=in.(a,b)&select=id,name&order=id.desc&limit=10",
     "id=eq.***&name=in.***&select=id,name&order=id.desc&limit=10"),
    ("", ""),
    ("select=id,customer_summary(name)&offset=20&columns=a,b&on_conflict=id", "select=id,customer_summary(name)&offset=20&columns=a,b&on_conflict=id"),
    ("name=not.ilike.*secret*&price=lt.20", "name=not.ilike.***&price=lt.***"),
    ("deleted=is.null&flag=not.is.true&x=is.surprise", "deleted=is.null&flag=not.is.true&x=is.***"),
    ("name=like(any).{a*,b*}&doc=fts(english).cat", "name=like(any).***&doc=fts(english).***"),
    ("or=(id.eq.1,name.ilike.*mug*)", "or=(id.eq.***,name.ilike.***)"),
    ("and=(a.gte.1,or(b.eq.x,not.and(c.in.(1,2),d.is.null)))", "and=(a.gte.***,or(b.eq.***,not.and(c.in.***,d.is.null)))"),
    ("not.or=(id.eq.1,name.eq.\"a,b)\")", "not.or=(id.eq.***,name.eq.***)"),
    ("order_items.quantity=gt.2&order_items.limit=1&order_items.order=id", "order_items.quantity=gt.***&order_items.limit=1&order_items.order=id"),
    ("data->>email=eq.bob@example.com", "data->>email=eq.***"),
    ("select=id%2Cname&name=eq.J%C3%BCrgen&note=eq.a%26b", "select=id,name&name=eq.***&note=eq.***"),
    ("apikey=gh_abc.secret", "apikey=***"),
    ("name=secret", "name=***"),
    ("or=(id.eq.1", "or=***"),
    ("or=(id.eq.1)trailing", "or=***"),
    ("or=(" * 50 + ")" * 50, "or=***"),
    ("flag&id=eq.1", "***&id=eq.***"),
    ("gh_abcdefghij_SECRETSECRET&select=gh_abcdefghij_x&x=eq.1", "***&select=***&x=eq.***"),
    ("a%20b=eq.1&select=a b", "a%20b=eq.***&select=a%20b"),
])
def test_redact_query(query: str, redacted: str) -> None:
    assert redact_query(query) == redacted


def test_redact_query_is_bounded_and_never_raises() -> None:
    long = "&".join(f"c{i}=eq.{'x' * 50}" for i in range(500))
    assert len(redact_query(long)) <= MAX_QUERY_CHARS and "x" not in redact_query(long)
    assert len(redact_query("select=" + "a," * 5000)) == MAX_QUERY_CHARS
    for junk in ("%", "=&=&", "%ff%fe=eq.%00", "or=((((", "&&&", "a=b=c", "\x00=\x00"):
        assert isinstance(redact_query(junk), str)
    assert "secret" not in redact_query("x=eq.%ZZsecret&or=(a.eq.secret")


async def test_search_and_version_usage(audited: Audited) -> None:
    now = datetime.now(UTC)
    records = [
        record(1, app="web", subject="alice", status=200, at=now - timedelta(minutes=5)),
        record(2, app="web", subject="bob", status=404, at=now - timedelta(minutes=4)),
        record(3, app="mobile", subject="alice", target="orders", version=2, status=503, at=now - timedelta(minutes=3)),
        record(4, app="mobile", target="rpc:ping", version=2, status=200, at=now - timedelta(minutes=2)),
        record(5, app="legacy", target="things", version=1, status=200, at=now - timedelta(days=90)),
        record(6, app="", target="", version=None, status=401, at=now - timedelta(minutes=1)),
    ]
    conn = await audited.owner()
    try:
        async with conn.transaction():
            for r in records:
                await audit_in_transaction(conn, r)

        async def ids(**filters: object) -> list[str]:
            return [r["request_id"] for r in await search(conn, **filters)]  # type: ignore[arg-type]

        assert await ids() == ["req-6", "req-4", "req-3", "req-2", "req-1", "req-5"]
        assert await ids(app="web") == ["req-2", "req-1"]
        assert await ids(subject="alice") == ["req-3", "req-1"]
        assert await ids(target="rpc:ping") == ["req-4"]
        assert await ids(status=404) == ["req-2"]
        assert await ids(status="4xx") == ["req-6", "req-2"]
        assert await ids(status="5xx", app="mobile") == ["req-3"]
        assert await ids(since=now - timedelta(days=1), until=now - timedelta(minutes=3, seconds=30)) == ["req-2", "req-1"]
        assert await ids(limit=2) == ["req-6", "req-4"]
        assert len(await ids(limit=10**9)) == 6
        with pytest.raises(ValueError):
            await search(conn, status="teapot")
        found = await search(conn, app="web", limit=1)
        assert as_table_rows(found)[0][1:10] == ("req-2", "-", "web", "k1", "bob", "GET", "things", "v1", "404")
        assert as_json(found)[0]["at"].startswith(str(now.year))

        usage = await version_usage(conn)
        assert [(u["api_version"], u["app"], u["calls"], u["errors"], u["targets"]) for u in usage] == [
            (1, "web", 2, 1, ["things"]),
            (2, "mobile", 2, 1, ["orders", "rpc:ping"]),
        ]
        assert [(u["api_version"], u["app"]) for u in await version_usage(conn, days=365)] == [
            (1, "web"), (1, "legacy"), (2, "mobile")]
        table = version_table_rows(usage, served=[1, 2, 3])
        assert [row[:3] for row in table] == [("v1", "web", "2"), ("v2", "mobile", "2"), ("v3", "(no calls)", "0")]
    finally:
        await conn.close()


def _trail_records(now: datetime) -> list[AuditRecord]:
    """Three hours of records over apps, targets, versions and statuses, hostile durations among them: the first
    half in random order (every batch spans hours: counted from its records), the second in time order (narrow
    batches: counted from their summaries)."""
    chance = random.Random(21)
    records = []
    for n in range(600):
        at = now - timedelta(seconds=chance.uniform(1, 3 * 3600))
        duration = chance.choice([chance.uniform(0.1, 50.0), float("nan"), 1e300]) if n % 50 == 0 else \
            chance.uniform(0.1, 50.0)
        records.append(record(n, app=chance.choice(["web", "mobile", ""]), at=at, status=chance.choice([200, 404, 503]),
                              target=chance.choice(["things", "rpc:ping", "console:keys"]),
                              version=chance.choice([1, 2, None]))._replace(duration_ms=duration))
    return records[:300] + sorted(records[300:], key=lambda r: r.at)


async def test_summaries_count_exactly_what_the_records_say_in_any_window(audited: Audited) -> None:
    """``gatehouse.audit_minutes`` (the summaries of the batches inside a window, the records of those that cross
    its edges, the rows of writes) agrees with the records themselves (``gatehouse.audit_window``) for windows that
    cut batches anywhere: calls, errors, first and last call, and every duration (so the chart's p95 is exact)."""
    now = datetime.now(UTC).replace(microsecond=0)
    writer = AuditWriter(audited.connect(), audited.tmp / "spool.jsonl", batch_size=25, flush_interval_s=0.01)
    writer.start()
    for r in _trail_records(now):
        writer.submit(r)
    await writer.stop()
    conn = await audited.owner()
    try:
        async with conn.transaction():  # and a few writes' rows
            for n in range(5):
                await audit_in_transaction(conn, record(1000 + n, method="POST", status=201,
                                                        at=now - timedelta(minutes=7 * n)))
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.audit_batch") >= 600 / 25
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.audit_log") == 605
        from_summaries = """
            SELECT app, target, api_version, sum(requests), sum(errors), sum(server_errors), min(first_at),
                   max(last_at), (SELECT array_agg(d ORDER BY d) FROM gatehouse.audit_minutes($1, $2) AS mm,
                                  unnest(mm.durations) AS d
                                  WHERE (mm.app, mm.target, mm.api_version) IS NOT DISTINCT FROM (m.app, m.target,
                                                                                                   m.api_version))
            FROM gatehouse.audit_minutes($1, $2) AS m GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""
        from_records = """
            SELECT app, target, api_version, count(*), count(*) FILTER (WHERE status >= 400),
                   count(*) FILTER (WHERE status >= 500), min(at), max(at), array_agg(duration_ms ORDER BY duration_ms)
            FROM gatehouse.audit_window($1, $2) GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"""
        edges = [now - timedelta(seconds=s) for s in (3 * 3600 + 10, 9000, 5400 - 0.5, 3600, 1234.567, 60, 0)]
        for since, until in [(edges[0], edges[-1]), (edges[1], edges[4]), (edges[2], edges[3]), (edges[5], now),
                             (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))]:
            summed = [tuple(r) for r in await conn.fetch(from_summaries, since, until)]
            counted = [tuple(r) for r in await conn.fetch(from_records, since, until)]
            assert summed == counted and summed, (since, until)
        durations = await conn.fetchval("SELECT array_agg(duration_ms) FROM gatehouse.audit_log")
        assert 0.0 in durations and all(d < 1e38 for d in durations)  # NaN and 1e300 read as 0, as in a row
        newest = "SELECT request_id FROM gatehouse.audit_log WHERE {} ORDER BY at DESC, id DESC NULLS LAST LIMIT {}"
        for filters, condition in [({"app": "mobile"}, "app = 'mobile'"), ({"status": "5xx"}, "status >= 500"),
                                   ({"app": "web", "target": "rpc:ping", "since": now - timedelta(minutes=100)},
                                    f"app = 'web' AND target = 'rpc:ping' AND at >= '{now - timedelta(minutes=100)}'"),
                                   ({"method": None}, "true")]:
            for limit in (1, 7, 500):
                found = [r["request_id"] for r in await search(
                    conn, limit=limit, **{k: v for k, v in filters.items() if k != "method"})]  # type: ignore[arg-type]
                assert found == [r[0] for r in await conn.fetch(newest.format(condition, limit))], (filters, limit)
    finally:
        await conn.close()
    per_minute = await traffic.per_minute(audited.project)
    shown = sum(n for app in per_minute["apps"].values() for n in app["requests"])
    assert shown == await audited.scalar(
        "SELECT count(*) FROM gatehouse.audit_window(date_trunc('minute', now()) - interval '59 minutes', 'infinity') "
        "WHERE app <> '' AND target NOT LIKE 'console:%'")
