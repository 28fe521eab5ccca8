"""Migrations, deeper: repeatables, no-transaction files, failures, tampering, status, repair, squawk lint."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import asyncpg
import pytest

from conftest import ProjectFactory
from gatehouse import operations
from gatehouse.errors import ProjectError
from gatehouse.migrate import files, runner
from gatehouse.migrate.files import MigrationFailed
from gatehouse.migrate.lint import NOT_INSTALLED, lint_files, lint_migrations
from gatehouse.migrate.statements import split_statements
from gatehouse.project import Project

TOML = """
[project]
name = "mig"

[databases.main]
"""
NO_TX = "-- gatehouse: no-transaction\n"


def _folder(project: Project) -> Path:
    return project.migrations_dir("main")


async def _labels(project: Project) -> list[str]:
    return [m.label for m, _ in (await operations.migrate_all(project))["main"]]


async def _status(project: Project) -> dict[str, tuple[str, str]]:
    async with operations.owner_connection(project) as conn:
        return {row.label: (row.state, row.note) for row in await runner.status(conn, _folder(project))}


async def _repair(project: Project) -> list[str]:
    async with operations.owner_connection(project) as conn:
        return await runner.repair(conn, _folder(project))


async def _fetch(project: Project, sql: str) -> list[asyncpg.Record]:
    async with operations.owner_connection(project) as conn:
        return await conn.fetch(sql)


async def test_repeatables_run_after_versioned_and_again_only_when_changed(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "R__item_prices.sql": "CREATE OR REPLACE VIEW item_prices AS SELECT id, price FROM items;",  # needs V002
        "V001__items.sql": "CREATE TABLE items (id int);",
        "V002__price.sql": "ALTER TABLE items ADD COLUMN price int;",
    })
    assert await _labels(project) == ["V001 items", "V002 price", "R item prices"]
    assert await _labels(project) == []
    (_folder(project) / "R__item_prices.sql").write_text(
        "CREATE OR REPLACE VIEW item_prices AS SELECT id, price, price * 2 AS double FROM items;")
    assert (await _status(project))["R item prices"][0] == "changed"
    assert await _labels(project) == ["R item prices"]
    assert await _labels(project) == []
    rows = await _fetch(project, "SELECT version, description, kind, success, checksum_algorithm "
                                 "FROM gatehouse.migrations ORDER BY id")
    assert [tuple(r) for r in rows] == [
        (1, "items", "versioned", True, "sha256"), (2, "price", "versioned", True, "sha256"),
        (None, "item_prices", "repeatable", True, "sha256"), (None, "item_prices", "repeatable", True, "sha256"),
    ]
    assert [r["column_name"] for r in await _fetch(
        project, "SELECT column_name FROM information_schema.columns WHERE table_name = 'item_prices' "
                 "ORDER BY ordinal_position")] == ["id", "price", "double"]


async def test_no_transaction_file_creates_an_index_concurrently(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__items.sql": "CREATE TABLE items (id int, name text);",
        "V002__items_name.sql": NO_TX + "CREATE INDEX CONCURRENTLY IF NOT EXISTS items_name ON items (name);\n",
    })
    assert await _labels(project) == ["V001 items", "V002 items name"]
    [index] = await _fetch(project, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_name'::regclass")
    assert index["indisvalid"]
    rows = await _fetch(project, "SELECT version, in_transaction FROM gatehouse.migrations ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, True), (2, False)]


async def test_concurrently_without_the_marker_says_how_to_mark_it(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__items.sql": "CREATE TABLE items (id int);",
        "V002__index.sql": "CREATE INDEX CONCURRENTLY items_id ON items (id);",
    })
    with pytest.raises(MigrationFailed, match="cannot run inside a transaction block") as failed:
        await operations.migrate_all(project)
    assert "-- gatehouse: no-transaction" in str(failed.value)


async def test_failing_migration_changes_nothing_and_is_recorded(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__ok.sql": "CREATE TABLE ok (id int);",
        "V002__broken.sql": "CREATE TABLE half (id int);\nINSERT INTO ok VALUES (1);\nSELECT no_such_function();\n",
    })
    with pytest.raises(MigrationFailed) as failed:
        await operations.migrate_all(project)
    message = str(failed.value)
    assert "V002__broken.sql" in message and "line 3" in message
    assert "function no_such_function() does not exist" in message and "nothing of it was applied" in message
    assert [r["tablename"] for r in await _fetch(project, "SELECT tablename FROM pg_tables WHERE schemaname = "
                                                          "'public' ORDER BY 1")] == ["ok"]
    assert await _fetch(project, "SELECT * FROM ok") == []
    rows = await _fetch(project, "SELECT version, success, error FROM gatehouse.migrations ORDER BY id")
    assert [(r["version"], r["success"]) for r in rows] == [(1, True), (2, False)]
    assert rows[1]["error"] == "line 3: function no_such_function() does not exist"
    assert (await _status(project))["V002 broken"][0] == "failed"

    (_folder(project) / "V002__broken.sql").write_text("CREATE TABLE half (id int);\n")  # fixed: simply retried
    assert await _labels(project) == ["V002 broken"]
    assert (await _status(project))["V002 broken"][0] == "applied"
    report = await _repair(project)
    assert len(report) == 1 and report[0].startswith("removed the failed attempt of V002 broken")
    assert await _fetch(project, "SELECT * FROM gatehouse.migrations WHERE NOT success") == []


async def test_failed_no_transaction_file_blocks_until_repair(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__two_steps.sql": NO_TX + "CREATE TABLE first (id int);\n\nSELECT no_such_function();\n",
    })
    with pytest.raises(MigrationFailed) as failed:
        await operations.migrate_all(project)
    message = str(failed.value)
    assert "line 4" in message and "statement 2 of 2 failed" in message and "gatehouse migrate repair" in message
    assert len(await _fetch(project, "SELECT 1 FROM pg_tables WHERE tablename = 'first'")) == 1  # the partial change
    with pytest.raises(ProjectError, match="failed outside a transaction"):
        await operations.migrate_all(project)

    (_folder(project) / "V001__two_steps.sql").write_text(NO_TX + "CREATE TABLE IF NOT EXISTS first (id int);\n")
    assert len(await _repair(project)) == 1
    assert await _labels(project) == ["V001 two steps"]


async def test_tampered_migration_is_detected_and_repair_accepts_it(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={"V001__a.sql": "CREATE TABLE a (id int);"})
    await operations.migrate_all(project)
    assert await _repair(project) == []
    (_folder(project) / "V001__a.sql").write_text("CREATE TABLE a (id bigint);")
    state, note = (await _status(project))["V001 a"]
    assert state == "changed" and "repair" in note
    with pytest.raises(ProjectError, match="changed after it was applied"):
        await operations.migrate_all(project)
    [line] = await _repair(project)
    assert line.startswith("re-recorded V001 a from its current file")
    assert await _labels(project) == []  # accepted, not run: the column is still int
    assert (await _status(project))["V001 a"][0] == "applied"
    [column] = await _fetch(project, "SELECT data_type FROM information_schema.columns WHERE table_name = 'a'")
    assert column["data_type"] == "integer"


async def test_status_rows(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__a.sql": "CREATE TABLE a (id int);",
        "R__a_view.sql": "CREATE OR REPLACE VIEW a_view AS SELECT id FROM a;",
    })
    before = await _status(project)  # no history table yet: all pending, and nothing is created
    assert before == {"V001 a": ("pending", ""), "R a view": ("pending", "")}
    assert await _fetch(project, "SELECT 1 FROM pg_namespace WHERE nspname = 'gatehouse'") == []
    await operations.migrate_all(project)
    (_folder(project) / "V002__b.sql").write_text("CREATE TABLE b (id int);")
    (_folder(project) / "R__a_view.sql").unlink()
    async with operations.owner_connection(project) as conn:
        rows = await runner.status(conn, _folder(project))
    assert [(r.kind, r.version, r.script, r.state) for r in rows] == [
        ("versioned", 1, "V001__a.sql", "applied"),
        ("versioned", 2, "V002__b.sql", "pending"),
        ("repeatable", None, None, "missing"),
    ]
    assert rows[0].applied_by and rows[0].applied_at is not None and rows[0].duration_ms is not None
    (_folder(project) / "V001__a.sql").unlink()
    assert (await _status(project))["V001 a"][0] == "missing"


async def test_first_release_history_is_upgraded_in_place(make_project: ProjectFactory) -> None:
    sql = "CREATE TABLE a (id int);"
    project = make_project(toml=TOML, migrations={"V001__a.sql": sql, "R__v.sql": "CREATE VIEW v AS SELECT 1 AS one;"})
    async with operations.owner_connection(project) as conn:  # what the first release left behind
        await conn.execute(sql)
        await conn.execute("CREATE SCHEMA gatehouse; CREATE TABLE gatehouse.migrations (version integer PRIMARY KEY, "
                           "description text NOT NULL, checksum text NOT NULL, applied_by text NOT NULL DEFAULT "
                           "current_user, applied_at timestamptz NOT NULL DEFAULT now(), duration_ms integer NOT NULL)")
        await conn.execute("INSERT INTO gatehouse.migrations (version, description, checksum, duration_ms) "
                           "VALUES (1, 'a', $1, 5)", hashlib.sha256(sql.encode()).hexdigest())
        assert [r.state for r in await runner.status(conn, _folder(project))] == ["applied", "pending"]
    assert await _labels(project) == ["R v"]
    assert await _labels(project) == []
    rows = await _fetch(project, "SELECT id, version, kind, success FROM gatehouse.migrations ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, 1, "versioned", True), (2, None, "repeatable", True)]
    [key] = await _fetch(project, "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                                  "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'gatehouse.migrations'::regclass "
                                  "AND i.indisprimary")
    assert key["attname"] == "id"


async def test_concurrent_runs_with_a_concurrent_index_apply_each_once(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__a.sql": "CREATE TABLE a (id int); SELECT pg_sleep(0.2);",
        "V002__a_id.sql": NO_TX + "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_id ON a (id);",
        "R__a_view.sql": "CREATE OR REPLACE VIEW a_view AS SELECT id FROM a;",
    })
    results = await asyncio.gather(*(operations.migrate_all(project) for _ in range(3)))
    assert sorted(m.label for result in results for m, _ in result["main"]) == ["R a view", "V001 a", "V002 a id"]
    assert len(await _fetch(project, "SELECT 1 FROM gatehouse.migrations")) == 3


async def test_dry_run_inside_a_transaction(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__a.sql": "CREATE TABLE a (id int);",
        "V002__a_id.sql": NO_TX + "CREATE INDEX CONCURRENTLY a_id ON a (id);",
    })
    async with operations.owner_connection(project) as conn:
        transaction = conn.transaction()
        await transaction.start()
        with pytest.raises(ProjectError, match="runs outside a transaction"):
            await runner.migrate(conn, _folder(project))
        done = await runner.migrate(conn, _folder(project), skip_no_transaction=True)
        assert [m.label for m, _ in done] == ["V001 a"]
        await transaction.rollback()
        assert await conn.fetchval("SELECT to_regclass('a')") is None
    assert await _labels(project) == ["V001 a", "V002 a id"]


def test_marker_only_counts_on_the_first_line(tmp_path: Path) -> None:
    (tmp_path / "V001__a.sql").write_text("\n" + NO_TX + "SELECT 1;")
    assert not files.discover(tmp_path)[0].transactional
    (tmp_path / "V001__a.sql").write_text("SELECT 1;\n" + NO_TX)
    with pytest.raises(ProjectError, match="first line"):
        files.discover(tmp_path)


def test_badly_named_file_mentions_both_kinds(tmp_path: Path) -> None:
    (tmp_path / "R_views.sql").write_text("SELECT 1;")
    with pytest.raises(ProjectError, match=r"R__<description>\.sql"):
        files.discover(tmp_path)


def test_statements_split_on_top_level_semicolons_only() -> None:
    sql = ("-- a; comment\nSELECT 'a;b', E'it\\';s', \"x;y\";\n/* one; /* two; */ */\n;\n"
           "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; $body$;\nSELECT $$;$$")
    assert [(s.line, s.sql) for s in split_statements(sql)] == [
        (2, "SELECT 'a;b', E'it\\';s', \"x;y\""),
        (5, "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; $body$"),
        (6, "SELECT $$;$$"),
    ]


def test_squawk_flags_a_blocking_index_and_passes_a_clean_file(tmp_path: Path) -> None:
    tmp_path = tmp_path / "odd [name]*"  # squawk takes glob patterns; paths are escaped
    tmp_path.mkdir()
    (tmp_path / "V001__items.sql").write_text("CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, name text);\n")
    (tmp_path / "V002__items_name.sql").write_text("-- find items by name\nCREATE INDEX items_name ON items (name);\n")
    (tmp_path / "V003__items_name2.sql").write_text(NO_TX + "CREATE INDEX CONCURRENTLY items_name2 ON items (name);\n")
    first, second, third = files.discover(tmp_path)
    assert lint_migrations([first]).clean
    report = lint_migrations([third, second, first])
    assert report.notice is None
    assert ("require-concurrent-index-creation", 2) in {(f.rule, f.line) for f in report.for_file(second.path)}
    assert report.for_file(first.path) == []
    # run outside a transaction, an index without IF NOT EXISTS cannot simply be retried
    assert "prefer-robust-stmts" in {f.rule for f in report.for_file(third.path)}
    assert report.findings[0].file == third.path and report.findings[-1].file == second.path  # in the order given
    assert str(report.for_file(second.path)[0]).startswith("V002__items_name.sql:2: ")


def test_squawk_missing_is_a_notice_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "V001__a.sql").write_text("CREATE TABLE a (id bigint);")
    report = lint_files([tmp_path / "V001__a.sql"], binary=str(tmp_path / "no-squawk"))
    assert report.notice == NOT_INSTALLED and report.findings == [] and not report.clean
