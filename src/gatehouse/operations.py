"""What the CLI commands do, as plain async functions (the CLI only parses arguments and prints).

Kept apart from :mod:`gatehouse.cli` so tests and the demo call the same code the commands run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from gatehouse.auth import keys
from gatehouse.contracts.lockfile import read_lock
from gatehouse.db.sync import ApplyReport, apply_database, bootstrap
from gatehouse.db.targets import DatabaseTarget, resolve_targets
from gatehouse.errors import ProjectError
from gatehouse.migrate.batch import Progress
from gatehouse.migrate.files import Migration
from gatehouse.migrate.lint import LintReport, backfill_tables, lint_migrations, row_estimates
from gatehouse.migrate.plan import Plan, plan_database
from gatehouse.migrate.runner import StatusRow, migrate, pending_migrations, repair, status
from gatehouse.migrate.views import ViewKeeper
from gatehouse.observe import audit_query
from gatehouse.project import Project

T = TypeVar("T")


@asynccontextmanager
async def owner_connection(project: Project, database: str | None = None) -> AsyncIterator[asyncpg.Connection]:
    targets = await resolve_targets(project)
    target = targets[database or project.home_database]
    conn = await target.connect_owner()
    try:
        yield conn
    finally:
        await conn.close()


async def migrate_all(project: Project, *, progress: Progress | None = None,
                      on_restored: Callable[[str, str, list[str]], None] | None = None,
                      on_applied: Callable[[str, Migration, float], None] | None = None,
                      ) -> dict[str, list[tuple[Migration, float]]]:
    """Apply pending migrations of every database, in declaration order, the contract views kept standing
    through each one (:class:`~gatehouse.migrate.views.ViewKeeper`). A migration after which a contract
    view cannot be created again is refused, forced or not (``force`` is the plan's business: the CLI's).

    ``progress`` hears about each batch of a batched backfill; ``on_restored(database, migration, views)``
    about the views a migration needed dropped and created again; ``on_applied(database, migration,
    seconds)`` about each migration as it commits (a later one may still fail)."""

    def keeper(name: str) -> ViewKeeper:
        told = None if on_restored is None else lambda label, views: on_restored(name, label, views)
        return ViewKeeper(project, name, on_restored=told)

    def applied(name: str) -> Callable[[Migration, float], None] | None:
        return None if on_applied is None else lambda migration, seconds: on_applied(name, migration, seconds)

    return await each_database(project, lambda name, conn: migrate(
        conn, project.migrations_dir(name), keeper=keeper(name), progress=progress, on_applied=applied(name)))


async def apply_all(project: Project) -> list[ApplyReport]:
    targets: dict[str, DatabaseTarget] = await resolve_targets(project)
    return [await apply_database(project, target) for target in targets.values()]


def _known_app(project: Project, app: str) -> None:
    if app not in project.apps:
        raise ProjectError(f"no application named {app!r}",
                           hint=f"applications in gatehouse.toml: {', '.join(project.apps) or 'none'}")


async def create_key(project: Project, app: str, *, expires_at: datetime | None = None,
                     description: str = "") -> keys.NewKey:
    _known_app(project, app)
    async with owner_connection(project) as conn:
        await bootstrap(conn)
        return await keys.create_key(conn, app, expires_at=expires_at, description=description)


async def list_keys(project: Project, app: str | None) -> list[keys.KeyInfo]:
    if app is not None:
        _known_app(project, app)
    async with owner_connection(project) as conn:
        await bootstrap(conn)
        return await keys.list_keys(conn, app)


async def rotate_keys(project: Project, app: str, *, overlap: timedelta,
                      expires_at: datetime | None = None) -> tuple[keys.NewKey, list[str]]:
    _known_app(project, app)
    async with owner_connection(project) as conn:
        await bootstrap(conn)
        return await keys.rotate_keys(conn, app, overlap=overlap, expires_at=expires_at)


async def revoke_keys(project: Project, app: str, key_id: str | None) -> list[str]:
    _known_app(project, app)
    async with owner_connection(project) as conn:
        await bootstrap(conn)
        return await keys.revoke_key(conn, app, key_id)


async def audit_records(project: Project, **filters: Any) -> list[dict[str, Any]]:
    """Audit records from every database of the project (a write is recorded where it happened), newest first."""
    targets = await resolve_targets(project)
    records: list[dict[str, Any]] = []
    for target in targets.values():
        conn = await target.connect_owner()
        try:
            await bootstrap(conn)
            records += await audit_query.search(conn, **filters)
        finally:
            await conn.close()
    records.sort(key=lambda r: r["at"], reverse=True)
    return records[: filters.get("limit", 100)]


async def version_usage(project: Project, days: int = 30, since: datetime | None = None) -> list[dict[str, Any]]:
    async with owner_connection(project) as conn:
        await bootstrap(conn)
        return await audit_query.version_usage(conn, days=days, since=since)


async def each_database(project: Project,
                        work: Callable[[str, asyncpg.Connection], Awaitable[T]]) -> dict[str, T]:
    """Run ``work(database, owner connection)`` for every database of the project, in declaration order."""
    results: dict[str, T] = {}
    for name, target in (await resolve_targets(project)).items():
        conn = await target.connect_owner()
        try:
            results[name] = await work(name, conn)
        finally:
            await conn.close()
    return results


async def lint_pending(project: Project) -> dict[str, LintReport]:
    """squawk's and gatehouse's findings on every pending migration, per database (shown, not blocking). The
    live tables' row estimates are read first: the lint itself runs in a thread, away from the connection."""

    async def lint(name: str, conn: asyncpg.Connection) -> LintReport:
        pending = await pending_migrations(conn, project.migrations_dir(name))
        version = conn.get_server_version()
        estimates = await row_estimates(conn, backfill_tables(pending))
        return await asyncio.to_thread(lint_migrations, pending, pg_version=f"{version.major}.{version.minor}",
                                       cwd=project.root, row_estimates=estimates)

    return await each_database(project, lint)


async def migration_status(project: Project) -> dict[str, list[StatusRow]]:
    return await each_database(project, lambda name, conn: status(conn, project.migrations_dir(name)))


async def repair_all(project: Project) -> dict[str, list[str]]:
    return await each_database(project, lambda name, conn: repair(conn, project.migrations_dir(name)))


async def plan_all(project: Project) -> list[Plan]:
    """What the pending migrations would do to every released contract version, per database; nothing changes."""
    lock = read_lock(project.root)
    return [await plan_database(project, target, lock) for target in (await resolve_targets(project)).values()]
