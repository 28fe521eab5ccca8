"""Who uses an API version now: apps pinned to it apart from apps that moved on, their last call and calls per
day over a window, from audit rows written by the real paths (served requests, the audit writer)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.db.targets import resolve_targets
from gatehouse.observe.audit import AuditRecord
from gatehouse.observe.audit_query import version_table_rows, version_usage
from gatehouse.observe.audit_writer import AuditWriter
from gatehouse.observe.usage import AppUse, affected_apps, describe, rate_text, when_text
from gatehouse.project import Project

TOML = """
[project]
name = "usage"
default_version = 2

[databases.main]

[apps.legacy]
version = 1
grants = [{ contract = "things", actions = ["read"] }]
"""
MIGRATIONS = {"V001__things.sql": "CREATE TABLE things (id serial PRIMARY KEY, val integer, label text);"}
CONTRACTS = {"things.v1.sql": "SELECT id, val FROM things", "things.v2.sql": "SELECT id, label FROM things"}


def call(app: str, version: int | None, ago: timedelta, *, target: str = "things", status: int = 200,
         n: int = 0) -> AuditRecord:
    return AuditRecord(at=datetime.now(UTC) - ago, request_id=f"{app}-{version}-{ago}-{n}", app=app, key_id="k",
                       subject=None, method="GET", target=target, api_version=version, query="", status=status,
                       rows=1, duration_ms=1.0)


async def write(project: Project, records: list[AuditRecord], spool: Path) -> None:
    """Through the audit writer, as a server writes them: batched, the usage roll-up kept by its trigger."""
    async def connect() -> asyncpg.Connection:
        return await (await resolve_targets(project))[project.home_database].connect_owner()

    writer = AuditWriter(connect, spool)
    writer.start()
    for record in records:
        writer.submit(record)
    await writer.stop()
    assert writer.pending().total == 0


async def test_served_requests_tell_pinned_apps_from_apps_that_moved_on(shop: Project,
                                                                        serve_project: object) -> None:
    keys = await prepare(shop)
    client, runtime = await serve_project(shop)  # type: ignore[operator]
    requests = [("web", "/products?limit=1")] * 3 + [("mobile", "/v1/products?limit=1")] * 2 + [
        ("mobile", "/products?limit=1"), ("analytics", "/products?limit=1")]  # web: v1 by config; others: v2
    for app, path in requests:
        assert (await client.get(path, headers={"apikey": keys[app]})).status_code == 200
    await runtime.audit.stop()

    async with operations.owner_connection(shop) as conn:
        stored = await conn.fetch("SELECT app, api_version, count(*) AS n FROM gatehouse.audit_log "
                                  "WHERE target = 'products' GROUP BY 1, 2 ORDER BY 1, 2")
        assert [tuple(r) for r in stored] == [("analytics", 2, 1), ("mobile", 1, 2), ("mobile", 2, 1), ("web", 1, 3)]
        v1 = await affected_apps(conn, "products", (1,))
        v2 = await affected_apps(conn, "products", (2,))
        nothing = await affected_apps(conn, "orders", (1, 2))
    assert [(u.app, u.pinned, u.latest, u.versions, u.calls) for u in v1] == [
        ("web", True, 1, (1,), 3), ("mobile", False, 2, (1,), 2)]
    # calls a moment ago: a rate is taken over at least an hour (3 calls → 72 a day), never over the window
    assert v1[0].per_day == pytest.approx(3 * 24) and v1[1].per_day == pytest.approx(2 * 24)
    assert [(u.app, u.pinned, u.latest) for u in v2] == [("analytics", True, 2), ("mobile", True, 2)]
    assert nothing == []
    assert describe(v1[1]).startswith("mobile moved to v2 · last call to v1 ")


@pytest.fixture
async def things(make_project: ProjectFactory) -> Project:
    project = make_project(toml=TOML, migrations=MIGRATIONS, contracts=CONTRACTS)
    await operations.migrate_all(project)
    await operations.apply_all(project)
    return project


async def test_the_window_and_the_rate(things: Project, tmp_path: Path) -> None:
    day = timedelta(days=1)
    records = [call("steady", 1, timedelta(hours=12 * i, minutes=1), n=i) for i in range(60)]  # 2 a day
    records += [
        call("old", 1, 40 * day),  # only before a 30-day window
        call("returning", 1, 45 * day), call("returning", 2, day),  # moved on, but its v1 call is old
        call("both", 1, 3 * day), call("both", 2, day, status=500),  # on v2 now, its latest call an error
        call("other", 1, day, target="rpc:ping"),  # another target
        call("", 1, day), call("anon", None, day), call("nowhere", 1, day, target=""),  # never reached one
    ]
    await write(things, records, tmp_path / "spool.jsonl")

    def rows(uses: list[AppUse]) -> list[tuple[object, ...]]:
        return [(u.app, u.pinned, u.latest, u.versions, u.calls, pytest.approx(u.per_day, rel=1e-3)) for u in uses]

    half_days = 29.5 + 1 / 1440  # steady's oldest call in 30 days: 59 half days and a minute ago

    async with operations.owner_connection(things) as conn:
        month = await affected_apps(conn, "things", (1,))
        week = await affected_apps(conn, "things", (1,), days=7)
        two_months = await affected_apps(conn, "things", (1,), days=60)
        both_versions = await affected_apps(conn, "things", (1, 2))
        assert await affected_apps(conn, "things", ()) == []
    # a rate runs from an app's first call in the window: the same app has about the same rate in any window
    assert rows(month) == [("steady", True, 1, (1,), 60, 60 / half_days), ("both", False, 2, (1,), 1, 1 / 3)]
    assert rows(week) == [("steady", True, 1, (1,), 14, 14 / (6.5 + 1 / 1440)), ("both", False, 2, (1,), 1, 1 / 3)]
    assert rows(two_months) == [
        ("steady", True, 1, (1,), 60, 60 / half_days), ("old", True, 1, (1,), 1, 1 / 40),
        ("both", False, 2, (1,), 1, 1 / 3), ("returning", False, 2, (1,), 1, 1 / 45)]
    assert rows(both_versions) == [("steady", True, 1, (1,), 60, 60 / half_days), ("both", True, 2, (1, 2), 2, 2 / 3),
                                   ("returning", True, 2, (2,), 1, 1.0)]
    steady = month[0]
    newest = max(r.at for r in records if r.app == "steady")
    assert abs(steady.last_call - newest) < timedelta(milliseconds=1)


async def test_versions_in_a_window(things: Project, tmp_path: Path) -> None:
    day = timedelta(days=1)
    await write(things, [
        call("legacy", 1, 2 * day), call("legacy", 1, day, status=404), call("legacy", 1, 20 * day),
        call("mobile", 1, 5 * day), call("mobile", 2, day), call("mobile", 2, day, target="rpc:ping"),
        call("batch", 1, 3 * day, target="rpc:ping"), call("batch", 1, 2 * day),  # pinned through rpc:ping
    ], tmp_path / "spool.jsonl")
    async with operations.owner_connection(things) as conn:
        now: datetime = await conn.fetchval("SELECT now()")
        week = await version_usage(conn, since=now - 10 * day)
        month = await version_usage(conn)
    assert [(u["api_version"], u["app"], u["pinned"], u["moved_to"], u["calls"], u["errors"], u["targets"])
            for u in week] == [
        (1, "legacy", True, None, 2, 1, ["things"]),
        (1, "batch", True, None, 2, 0, ["rpc:ping", "things"]),
        (1, "mobile", False, 2, 1, 0, ["things"]),
        (2, "mobile", True, None, 2, 0, ["rpc:ping", "things"]),
    ]
    assert week[0]["per_day"] == pytest.approx(1.0, rel=1e-3)  # 2 calls since its first, 2 days ago
    assert [(u["app"], u["calls"], pytest.approx(u["per_day"], rel=1e-3)) for u in month if u["api_version"] == 1] == [
        ("legacy", 3, 3 / 20), ("batch", 2, 2 / 3), ("mobile", 1, 1 / 5)]
    table = version_table_rows(week, served=[1, 2, 3])
    assert table[0] == ("v1", "legacy", "2", "1.0", "1", table[0][5], "pinned", "things")
    assert [row[6] for row in table] == ["pinned", "pinned", "moved to v2", "pinned", ""]
    assert table[-1][:3] == ("v3", "(no calls)", "0")


async def test_a_database_without_an_audit_trail_has_no_callers(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations=MIGRATIONS, contracts=CONTRACTS)  # never migrated nor applied
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT to_regclass('gatehouse.audit')") is None
        assert await affected_apps(conn, "things", (1,)) == []


@pytest.mark.parametrize(("per_day", "text"), [
    (1204.4, "1,204"), (10, "10"), (9.96, "10"), (3.5, "3.5"), (1, "1.0"), (0.1, "0.1"), (1 / 30, "0.033"),
    (0, "0"),
])
def test_rate_text(per_day: float, text: str) -> None:
    assert rate_text(per_day) == text


@pytest.mark.parametrize(("use", "line"), [
    (AppUse("mobile", True, 1, (1,), datetime(2026, 12, 2, 14, 3, tzinfo=UTC), 36_132, 1204.4),
     "mobile pinned to v1 · last call {when} · 1,204 calls/day"),
    (AppUse("web", False, 3, (1, 2), datetime(2026, 12, 2, 14, 3, tzinfo=UTC), 105, 3.5),
     "web moved to v3 · last call to v1, v2 {when} · 3.5 calls/day"),
])
def test_describe(use: AppUse, line: str) -> None:
    assert describe(use) == line.format(when=when_text(use.last_call))
    assert when_text(use.last_call) == use.last_call.astimezone().strftime("%Y-%m-%d %H:%M")
