"""``gatehouse migrate plan``: the exact impact of the pending migrations, before they run.

The pending migrations are run inside a transaction, every live contract version is compiled again against
the result, its signature is compared with ``contracts.lock``, and the transaction is rolled back. So the
answer is PostgreSQL's own, not a guess from parsing the migration: a dropped or retyped column shows up as
exactly the contract versions that read it, with the apps that called those versions recently: those pinned to
them (they would break) apart from those that have moved on (:mod:`gatehouse.observe.usage`). ``migrate apply``
refuses a plan with breaking changes unless forced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gatehouse.contracts.compat import Change, compare, is_breaking
from gatehouse.contracts.lockfile import Lock
from gatehouse.contracts.shape import CompileError
from gatehouse.contracts.signature import live_signatures
from gatehouse.db.targets import DatabaseTarget
from gatehouse.migrate.runner import MigrationFailed, migrate, pending_migrations
from gatehouse.migrate.views import ViewKeeper
from gatehouse.observe.usage import AppUse, affected_apps
from gatehouse.project import Project

RECENT_DAYS = 30


@dataclass(slots=True)
class Impact:
    label: str
    api_versions: tuple[int, ...]
    changes: list[Change] = field(default_factory=list)
    error: str | None = None
    """Set when the contract no longer compiles against the migrated schema."""
    callers: list[AppUse] = field(default_factory=list)
    """The apps that called it in its API versions in the last :data:`RECENT_DAYS` days, pinned ones first."""

    @property
    def contract(self) -> str:
        return self.label.rpartition(".v")[0]

    @property
    def breaking(self) -> bool:
        return self.error is not None or is_breaking(self.changes)

    @property
    def would_break(self) -> list[str]:
        """The apps pinned to it, if the change breaks it: the ones that would notice."""
        return [use.app for use in self.callers if use.pinned] if self.breaking else []


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
                ran = await migrate(conn, folder, skip_no_transaction=True,
                                    keeper=ViewKeeper(project, target.name, strict=False))
            except MigrationFailed as exc:
                plan.failure = str(exc)
                return plan
            done = {m.label for m, _ in ran}
            plan.skipped = [label for label in plan.pending if label not in done]
            signatures = await live_signatures(conn, project, target.name)
            for label, live in sorted(signatures.items()):
                impact = Impact(label, _serving(project, label))
                if isinstance(live, CompileError):
                    impact.error = live.message
                else:
                    locked = lock.get(label) if lock else None
                    if locked is None:
                        continue  # not released yet: nothing to break
                    impact.changes = compare(locked.signature, live)
                if impact.changes or impact.error:
                    plan.impacts.append(impact)
        finally:
            await transaction.rollback()
        for impact in plan.impacts:  # after the rollback: reading the audit trail holds no migration lock
            impact.callers = await affected_apps(conn, impact.contract, impact.api_versions, days=RECENT_DAYS)
    finally:
        await conn.close()
    return plan
