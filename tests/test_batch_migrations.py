"""Batched data migrations (``-- gatehouse: batch``): readers never wait, a crash loses nothing, no endless loop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from conftest import ProjectFactory
from gatehouse import operations
from gatehouse.errors import ProjectError
from gatehouse.migrate import batch, runner
from gatehouse.migrate.batch import BatchProgress, EndlessBatches
from gatehouse.migrate.files import MigrationFailed
from gatehouse.project import Project

TOML = """
[project]
name = "batch"

[databases.main]
"""
ROWS = 50_000
CREATE = (f"CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL);\n"
          f"INSERT INTO products SELECT n, 'product ' || n FROM generate_series(1, {ROWS}) n;\n")
ADD_TITLE = "ALTER TABLE products ADD COLUMN title text;\n"
BODY = ("UPDATE products SET title = name\n"
        "WHERE id IN (SELECT id FROM products WHERE title IS NULL LIMIT :batch_size FOR UPDATE SKIP LOCKED);\n")


def _backfill(size: int | None = 1000) -> str:
    return f"-- gatehouse: batch{'' if size is None else f' {size}'}\n{BODY}"


async def _fetchval(project: Project, sql: str) -> Any:
    async with operations.owner_connection(project) as conn:
        return await conn.fetchval(sql)


async def _history(project: Project, version: int) -> list[tuple[bool, bool]]:
    async with operations.owner_connection(project) as conn:
        rows = await conn.fetch("SELECT success, in_transaction FROM gatehouse.migrations WHERE version = $1 "
                                "ORDER BY id", version)
    return [(r["success"], r["in_transaction"]) for r in rows]


async def _products(make_project: ProjectFactory, rows: int = ROWS) -> Project:
    """products with ``rows`` rows and an empty title column, migrated; the backfill is V003, to be written."""
    project = make_project(toml=TOML, migrations={"V001__products.sql": CREATE.replace(str(ROWS), str(rows)),
                                                  "V002__title.sql": ADD_TITLE})
    await operations.migrate_all(project)
    return project


async def _migrate(project: Project, progress: batch.Progress | None = None) -> list[str]:
    async with operations.owner_connection(project) as conn:
        done = await runner.migrate(conn, project.migrations_dir("main"), progress=progress)
    return [m.label for m, _ in done]


class Traffic:
    """An app reading (and writing) products with a 1 s statement timeout, until stopped; keeps the worst latency."""

    def __init__(self, project: Project, sql: str) -> None:
        self.project, self.sql = project, sql
        self.latencies: list[float] = []
        self.timeouts = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with operations.owner_connection(self.project) as conn:
            await conn.execute("SET statement_timeout = '1s'")
            n = 0
            while not self.stop.is_set():
                n += 1
                started = time.perf_counter()
                try:
                    await conn.execute(self.sql, n * 7919 % ROWS + 1)
                except asyncpg.QueryCanceledError:
                    self.timeouts += 1
                self.latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.005)


async def _under_traffic(project: Project, work: Awaitable[object]) -> tuple[Traffic, Traffic]:
    reader = Traffic(project, "SELECT count(*) FROM products WHERE id BETWEEN $1 AND $1 + 500 AND title IS NULL")
    writer = Traffic(project, "UPDATE products SET name = name WHERE id = $1")
    tasks = [asyncio.create_task(reader.run()), asyncio.create_task(writer.run())]
    await asyncio.sleep(0.2)
    try:
        await work
    finally:
        reader.stop.set()
        writer.stop.set()
        await asyncio.gather(*tasks)
    return reader, writer


async def test_backfill_in_batches_never_blocks_readers_and_is_recorded_once(make_project: ProjectFactory) -> None:
    project = await _products(make_project)
    (project.migrations_dir("main") / "V003__backfill_title.sql").write_text(_backfill())
    reports: list[BatchProgress] = []
    started = time.perf_counter()
    reader, writer = await _under_traffic(project, _migrate(project, progress=reports.append))
    took = time.perf_counter() - started

    assert await _fetchval(project, "SELECT count(*) FROM products WHERE title IS DISTINCT FROM name") == 0
    assert await _history(project, 3) == [(True, False)]
    assert await _migrate(project) == []
    assert len(reports) >= ROWS // 1000 and reports[-1].rows == ROWS and reports[-1].table_rows == ROWS
    assert [r.batches for r in reports] == list(range(1, len(reports) + 1))
    assert {r.migration.label for r in reports} == {"V003 backfill title"}
    # the app kept reading and writing all along, and never came near its 1 s timeout
    assert reader.timeouts == writer.timeouts == 0
    assert len(reader.latencies) >= 10 and len(writer.latencies) >= 10, took
    assert max(reader.latencies) < 0.5, max(reader.latencies)
    assert max(writer.latencies) < 0.5, max(writer.latencies)


async def test_the_same_backfill_in_one_transaction_with_its_alter_blocks_readers(
        make_project: ProjectFactory) -> None:
    """The measurement above can fail: what the issue saw, with a pause standing in for a slower machine."""
    project = await _products(make_project)
    (project.migrations_dir("main") / "V003__subtitle.sql").write_text(
        "ALTER TABLE products ADD COLUMN subtitle text;\nUPDATE products SET subtitle = name;\n"
        "SELECT pg_sleep(1.2);\n")
    reader, _ = await _under_traffic(project, _migrate(project))
    assert reader.timeouts >= 1 or max(reader.latencies) >= 1.0


CRASHING_RUN = ("import asyncio, pathlib, sys\nfrom gatehouse import operations\nfrom gatehouse.project import "
                "load_project\nasyncio.run(operations.migrate_all(load_project(pathlib.Path(sys.argv[1]))))\n")


async def test_killed_midway_then_run_again_finishes_and_records_once(make_project: ProjectFactory) -> None:
    project = await _products(make_project)
    (project.migrations_dir("main") / "V003__backfill_title.sql").write_text(_backfill(100))
    process = subprocess.Popen([sys.executable, "-c", CRASHING_RUN, str(project.root)], env=dict(os.environ),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    done = 0
    async with operations.owner_connection(project) as conn:
        while done < 3000 and process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            done = await conn.fetchval("SELECT count(*) FROM products WHERE title IS NOT NULL")
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read() if process.stderr else ""
    kept = await _fetchval(project, "SELECT count(*) FROM products WHERE title IS NOT NULL")
    assert 3000 <= kept < ROWS  # the committed batches stayed; the run was cut short
    assert await _history(project, 3) == []

    assert await _labels(project) == ["V003 backfill title"]
    assert await _fetchval(project, "SELECT count(*) FROM products WHERE title IS DISTINCT FROM name") == 0
    assert await _history(project, 3) == [(True, False)]


async def _labels(project: Project) -> list[str]:
    return [m.label for m, _ in (await operations.migrate_all(project))["main"]]


async def test_a_where_that_never_leaves_out_done_rows_is_stopped(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__counters.sql": "CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);\n"
                              "INSERT INTO counters (id) SELECT generate_series(1, 1000);\n",
        "V002__count.sql": "-- gatehouse: batch 100\n"
                           "UPDATE counters SET n = n + 1 WHERE id IN (SELECT id FROM counters LIMIT :batch_size);\n",
    })
    with pytest.raises(EndlessBatches) as stopped:
        await operations.migrate_all(project)
    message = str(stopped.value)
    assert "V002__count.sql" in message and "does not leave out the rows already done" in message
    assert "twice the 1,000 rows counters had" in message and "changed more than once" in message
    changed = await _fetchval(project, "SELECT sum(n) FROM counters")
    assert 2 * 1000 + 10 * 100 < changed <= 2 * 1000 + 11 * 100  # stopped at the first batch past the bound
    assert await _history(project, 2) == [(False, True)]  # failed, and retried (continued) by the next run
    async with operations.owner_connection(project) as conn:
        [row] = [r for r in await runner.status(conn, project.migrations_dir("main")) if r.version == 2]
    assert row.state == "failed" and "retried by the next `gatehouse migrate`" in row.note


async def test_a_batch_waits_for_a_lock_briefly_then_tries_again(make_project: ProjectFactory,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "LOCK_TIMEOUT_MS", 200)
    monkeypatch.setattr(batch, "FIRST_PAUSE", 0.05)
    project = await _products(make_project, rows=3000)
    (project.migrations_dir("main") / "V003__backfill_title.sql").write_text(_backfill())
    reports: list[BatchProgress] = []
    async with operations.owner_connection(project) as holder, holder.transaction():
        await holder.execute("LOCK TABLE products IN SHARE MODE")  # conflicts with an UPDATE's lock
        run = asyncio.create_task(_migrate(project, progress=reports.append))
        await asyncio.sleep(1.0)
        assert not run.done()
    assert await run == ["V003 backfill title"]
    assert reports[0].retries >= 2 and reports[-1].rows == 3000

    monkeypatch.setattr(batch, "ATTEMPTS", 2)
    (project.migrations_dir("main") / "V004__again.sql").write_text(
        "-- gatehouse: batch\nUPDATE products SET title = NULL WHERE id IN "
        "(SELECT id FROM products WHERE title IS NOT NULL LIMIT :batch_size);\n")
    async with operations.owner_connection(project) as holder, holder.transaction():
        await holder.execute("LOCK TABLE products IN SHARE MODE")
        with pytest.raises(MigrationFailed, match="lock timeout") as failed:
            await _migrate(project)
    assert "waited more than 200 ms for a lock on products" in str(failed.value)
    assert "no row was changed" in str(failed.value)
    assert await _history(project, 4) == [(False, True)]
    assert await _migrate(project) == ["V004 again"]  # the lock is gone: the next run simply continues
    assert await _fetchval(project, "SELECT count(title) FROM products") == 0


async def test_rows_an_app_keeps_locked_are_not_left_behind_by_skip_locked(make_project: ProjectFactory,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "LOCK_TIMEOUT_MS", 300)
    monkeypatch.setattr(batch, "FIRST_PAUSE", 0.05)
    project = await _products(make_project, rows=2000)
    (project.migrations_dir("main") / "V003__backfill_title.sql").write_text(_backfill(500))
    async with operations.owner_connection(project) as app, app.transaction():
        await app.execute("SELECT * FROM products WHERE id IN (5, 1999) FOR UPDATE")
        run = asyncio.create_task(_migrate(project))
        deadline = time.monotonic() + 20
        while await _fetchval(project, "SELECT count(title) FROM products") < 1998:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert not run.done()  # the batches skipped rows 5 and 1999; the last sweep waits for them
    assert await run == ["V003 backfill title"]
    assert await _fetchval(project, "SELECT count(*) FROM products WHERE title IS NULL") == 0


async def test_plan_tries_a_batch_with_no_rows_and_catches_a_typo(make_project: ProjectFactory,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    project = await _products(make_project, rows=100)
    folder = project.migrations_dir("main")
    (folder / "V003__backfill_title.sql").write_text(_backfill())
    async with operations.owner_connection(project) as conn:
        transaction = conn.transaction()
        await transaction.start()
        with pytest.raises(ProjectError, match="runs outside a transaction"):
            await runner.migrate(conn, folder)
        assert await runner.migrate(conn, folder, skip_no_transaction=True) == []  # tried, not run: not done
        assert await conn.fetchval("SELECT count(title) FROM products") == 0
        assert await conn.fetchval("SHOW lock_timeout") == "0"  # the plan's own setting is back
        await transaction.rollback()
        (folder / "V003__backfill_title.sql").write_text(_backfill().replace("SET title = name", "SET titel = name"))
        transaction = conn.transaction()
        await transaction.start()
        with pytest.raises(MigrationFailed, match='column "titel" of relation "products" does not exist') as failed:
            await runner.migrate(conn, folder, skip_no_transaction=True)
        assert "line 2" in str(failed.value)
        await transaction.rollback()
    plans = await operations.plan_all(project)
    assert plans[0].failure is not None and "titel" in plans[0].failure

    monkeypatch.setattr(batch, "LOCK_TIMEOUT_MS", 200)  # a plan does not wait long for the table: it skips the try
    async with operations.owner_connection(project) as holder, holder.transaction():
        await holder.execute("LOCK TABLE products IN SHARE MODE")
        started = time.perf_counter()
        plans = await operations.plan_all(project)
        assert time.perf_counter() - started < 5
    assert plans[0].failure is None and plans[0].skipped == ["V003 backfill title"]


VALID = [
    ("-- gatehouse: batch\n" + BODY, 1000),
    ("-- gatehouse: batch 5000\n" + BODY, 5000),
    ("  --   GateHouse: BATCH 20  \n\n" + BODY, 20),
    ("-- gatehouse: batch\nDELETE FROM products WHERE id IN (SELECT id FROM products WHERE name = '' "
     "FETCH FIRST :batch_size ROWS ONLY);", 1000),
    ("-- gatehouse: batch 10\nWITH todo AS (SELECT id FROM products WHERE title IS NULL LIMIT :batch_size)\n"
     "UPDATE products p SET title = p.name FROM todo WHERE p.id = todo.id", 10),
]


@pytest.mark.parametrize(("text", "size"), VALID)
def test_batch_files_are_read_at_discovery(tmp_path: Path, text: str, size: int) -> None:
    (tmp_path / "V001__backfill.sql").write_text(text)
    [migration] = runner.discover(tmp_path)
    assert (migration.batch_size, migration.transactional) == (size, False)


INVALID = [
    ("-- gatehouse: batch 0\n" + BODY, "cannot read the batch size", "a whole number from 1"),
    ("-- gatehouse: batch lots\n" + BODY, "cannot read the batch size", "-- gatehouse: batch 5000"),
    ("-- gatehouse: batch=500\n" + BODY, "cannot read the batch size", "-- gatehouse: batch 5000"),
    ("-- gatehouse: batch\n" + ADD_TITLE + BODY, "this file has 2 statements", "migrations of their own"),
    ("-- gatehouse: batch\nINSERT INTO archive SELECT * FROM products LIMIT :batch_size;",
     "this statement is INSERT", "one UPDATE or DELETE"),
    ("-- gatehouse: batch\nUPDATE products SET title = name WHERE id IN (SELECT id FROM products LIMIT 1000);",
     "none is in this one", "LIMIT :batch_size"),
    ("-- gatehouse: batch\nUPDATE products SET title = ':batch_size' -- LIMIT :batch_size\nWHERE title IS NULL;",
     "none is in this one", "LIMIT :batch_size"),
    ("SELECT 1;\n-- gatehouse: batch\n", "is on line 2; it counts only as the first line", "move it to the top"),
    (BODY, "uses `:batch_size` but is not a batch migration", "-- gatehouse: batch"),
    ("-- gatehouse: batches 500\n" + BODY, "unknown directive", "-- gatehouse: batch [size]"),
]


@pytest.mark.parametrize(("text", "message", "hint"), INVALID)
def test_bad_batch_files_are_refused_at_discovery(tmp_path: Path, text: str, message: str, hint: str) -> None:
    (tmp_path / "V001__backfill.sql").write_text(text)
    with pytest.raises(ProjectError) as refused:
        runner.discover(tmp_path)
    assert message in str(refused.value.args[0])
    assert refused.value.where == str(tmp_path / "V001__backfill.sql")
    assert refused.value.hint is not None and hint in refused.value.hint
