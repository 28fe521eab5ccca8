"""Migrations: each applied once, in order, in a transaction; history is checked, never rewritten."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from conftest import ProjectFactory
from gatehouse import operations
from gatehouse.errors import ProjectError
from gatehouse.migrate.files import MigrationFailed

TOML = """
[project]
name = "mig"

[databases.main]
"""


async def _tables(project: object) -> set[str]:
    async with operations.owner_connection(project) as conn:  # type: ignore[arg-type]
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def test_applied_once_in_order(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__a.sql": "CREATE TABLE a (id int);",
        "V002__b.sql": "CREATE TABLE b (id int); INSERT INTO a VALUES (1);",
    })
    first = await operations.migrate_all(project)
    assert [m.version for m, _ in first["main"]] == [1, 2]
    assert (await operations.migrate_all(project))["main"] == []
    assert {"a", "b"} <= await _tables(project)
    async with operations.owner_connection(project) as conn:
        history = await conn.fetch("SELECT version, description FROM gatehouse.migrations ORDER BY version")
    assert [(r["version"], r["description"]) for r in history] == [(1, "a"), (2, "b")]


async def test_failing_migration_leaves_nothing(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__ok.sql": "CREATE TABLE ok (id int);",
        "V002__broken.sql": "CREATE TABLE half (id int); SELECT no_such_function();",
    })
    with pytest.raises(MigrationFailed, match=r"V002__broken\.sql") as failed:
        await operations.migrate_all(project)
    assert isinstance(failed.value.__cause__, asyncpg.UndefinedFunctionError)
    tables = await _tables(project)
    assert "ok" in tables and "half" not in tables
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT max(version) FROM gatehouse.migrations WHERE success") == 1


async def test_edited_applied_migration_is_detected(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={"V001__a.sql": "CREATE TABLE a (id int);"})
    await operations.migrate_all(project)
    (project.root / "migrations" / "V001__a.sql").write_text("CREATE TABLE a (id bigint);")
    with pytest.raises(ProjectError, match="changed after it was applied"):
        await operations.migrate_all(project)


async def test_concurrent_runs_apply_each_migration_once(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={
        "V001__a.sql": "CREATE TABLE a (id int); SELECT pg_sleep(0.2);",
        "V002__b.sql": "CREATE TABLE b (id int);",
    })
    results = await asyncio.gather(*(operations.migrate_all(project) for _ in range(3)))
    applied = sorted(m.version for result in results for m, _ in result["main"])
    assert applied == [1, 2]


def test_badly_named_migration(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML, migrations={"001_a.sql": "SELECT 1;"})
    with pytest.raises(ProjectError, match=r"V<number>__<description>\.sql"):
        asyncio.run(operations.migrate_all(project))
