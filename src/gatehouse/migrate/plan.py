"""``gatehouse migrate plan``: the exact impact of the pending migrations, before they run.

The pending migrations are run inside a transaction, every live contract version is compiled again against
the result, its signature is compared with ``contracts.lock``, and the transaction is rolled back. So the
answer is PostgreSQL's own, not a guess from parsing the migration: a dropped or retyped column shows up as
exactly the contract versions that read it, with the apps that called those versions recently (from the
usage roll-ups). ``migrate apply`` refuses a plan with breaking changes unless forced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from gatehouse.contracts.compat import Change, compare, is_breaking
from gatehouse.contracts.lockfile import Lock
from gatehouse.contracts.shape import CompileError
from gatehouse.contracts.signature import live_signatures
from gatehouse.db.targets import DatabaseTarget
from gatehouse.migrate.runner import MigrationFailed, migrate, pending_migrations
from gatehouse.project import Project

RECENT_DAYS = 30


@dataclass(slots=True)
class Impact:
    label: str
    api_versions: tuple[int, ...]
    changes: list[Change] = field(default_factory=list)
    error: str | None = None
    """Set when the contract no longer compiles against the migrated schema."""
    callers: list[tuple[str, str]] = field(default_factory=list)
    """(app, last call) of the apps that called it in the last 30 days."""

    @property
    def breaking(self) -> bool:
        return self.error is not None or is_breaking(self.changes)


@dataclass(slots=True)
class Plan:
    database: str
    pending: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Files marked no-transaction: they cannot be tried inside the plan's transaction."""
    failure: str | None = None
    impacts: list[Impact] = field(default_factory=list)

    @property
    def breaking(self) -> list[Impact]:
        return [i for i in self.impacts if i.breaking]


def _serving(project: Project, label: str) -> tuple[int, ...]:
    return tuple(n for n, c in project.versions.views() if c.label == label)


async def _callers(conn: asyncpg.Connection, contract: str, versions: tuple[int, ...]) -> list[tuple[str, str]]:
    exists = await conn.fetchval("SELECT to_regclass('gatehouse.usage') IS NOT NULL")
    if not exists or not versions:
        return []
    rows = await conn.fetch(
        "SELECT app, max(last_call) AS last FROM gatehouse.usage WHERE target = $1 AND api_version = ANY($2) "
        "AND last_call > now() - make_interval(days => $3) GROUP BY app ORDER BY app",
        contract, list(versions), RECENT_DAYS,
    )
    return [(r["app"], r["last"].isoformat(timespec="minutes")) for r in rows]


async def plan_database(project: Project, target: DatabaseTarget, lock: Lock | None) -> Plan:
    plan = Plan(target.name)
    folder = project.migrations_dir(target.name)
    conn = await target.connect_owner()
    try:
        pending = await pending_migrations(conn, folder)
        plan.pending = [m.label for m in pending]
        transaction = conn.transaction()
        await transaction.start()
        try:
            try:
                ran = await migrate(conn, folder, skip_no_transaction=True)
            except MigrationFailed as exc:
                plan.failure = str(exc)
                return plan
            done = {m.label for m, _ in ran}
            plan.skipped = [label for label in plan.pending if label not in done]
            signatures = await live_signatures(conn, project, target.name)
            for label, live in sorted(signatures.items()):
                contract = label.split(".v")[0]
                impact = Impact(label, _serving(project, label))
                if isinstance(live, CompileError):
                    impact.error = live.message
                else:
                    locked = lock.get(label) if lock else None
                    if locked is None:
                        continue  # not released yet: nothing to break
                    impact.changes = compare(locked.signature, live)
                if impact.changes or impact.error:
                    impact.callers = await _callers(conn, contract, impact.api_versions)
                    plan.impacts.append(impact)
        finally:
            await transaction.rollback()
    finally:
        await conn.close()
    return plan
