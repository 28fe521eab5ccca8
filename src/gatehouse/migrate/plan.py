"""``gatehouse migrate plan``: the exact impact of the pending migrations, before they run.

The pending migrations are run inside a transaction, every live contract version is compiled again against
the result, its signature is compared with ``contracts.lock``, and the transaction is rolled back. So the
answer is PostgreSQL's own, not a guess from parsing the migration: a dropped or retyped column shows up as
exactly the contract versions that read it, with the apps that called those versions recently: those pinned to
them (they would break) apart from those that have moved on (:mod:`gatehouse.observe.usage`). ``migrate apply``
refuses a plan with breaking changes unless forced.

An embed that becomes ambiguous is judged per API version on the migrated keys
(:mod:`gatehouse.contracts.ambiguity`): it breaks only the released API versions where it is ambiguous, so
only the apps pinned to those are named, and one that only unreleased versions see is no impact at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gatehouse.contracts.ambiguity import Ambiguity, find_ambiguities
from gatehouse.contracts.compat import RELATION_BECAME_AMBIGUOUS, Change, compare, is_breaking
from gatehouse.contracts.lockfile import Lock
from gatehouse.contracts.shape import CompileError
from gatehouse.contracts.signature import live_signatures
from gatehouse.db.catalog import load_constraints
from gatehouse.db.targets import DatabaseTarget
from gatehouse.migrate.files import MigrationFailed
from gatehouse.migrate.runner import migrate, pending_migrations
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
    """What the plan did not run: files marked no-transaction (they cannot run inside its transaction), and
    from the first batched backfill on, everything (see :attr:`stopped_at`)."""
    no_transaction: list[str] = field(default_factory=list)
    stopped_at: str | None = None
    """The batched backfill the plan stopped at: it checks that one on 0 rows, and what follows may need its
    rows. ``migrate`` still checks every contract view inside each migration's own transaction."""
    failure: str | None = None
    impacts: list[Impact] = field(default_factory=list)

    @property
    def breaking(self) -> list[Impact]:
        return [i for i in self.impacts if i.breaking]


def _serving(project: Project, label: str) -> tuple[int, ...]:
    return tuple(n for n, c in project.versions.views() if c.label == label)


def _ambiguity_change(ambiguity: Ambiguity) -> Change:
    target, released = ambiguity.target, ", ".join(f"v{n}" for n in ambiguity.broken_versions)
    return Change(RELATION_BECAME_AMBIGUOUS, ",".join(ambiguity.released.columns) if ambiguity.released else None,
                  f"embedding {target} is ambiguous in released API {released}: {len(ambiguity.relations)} "
                  f"relations lead to it ({ambiguity.described}), so select=*,{target}(*) answers 300 there; "
                  f"clients would have to name one: {ambiguity.choices}", True)


def _add_ambiguities(plan: Plan, ambiguities: list[Ambiguity]) -> None:
    """Each breaking ambiguity joins its contract version's impact. An impact that breaks only by ambiguity
    looks for callers in the released API versions where it is ambiguous, not every version serving it: an
    app pinned to another one sees no change."""
    impacts = {impact.label: impact for impact in plan.impacts}
    broken: dict[str, set[int]] = {}
    for ambiguity in (a for a in ambiguities if a.breaking):
        impact = impacts.get(ambiguity.label)
        if impact is None:
            impact = impacts[ambiguity.label] = Impact(ambiguity.label, ())
            plan.impacts.append(impact)
        if not impact.breaking or ambiguity.label in broken:  # breaking by ambiguity alone (so far)
            broken.setdefault(ambiguity.label, set()).update(ambiguity.broken_versions)
            impact.api_versions = tuple(sorted(broken[ambiguity.label]))
        impact.changes.append(_ambiguity_change(ambiguity))
    plan.impacts.sort(key=lambda impact: impact.label)


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
            backfills = [m.label for m in pending if m.batch_size is not None and m.label not in done]
            plan.stopped_at = backfills[0] if backfills else None
            plan.no_transaction = [m.label for m in pending if not m.transactional and m.batch_size is None]
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
            _add_ambiguities(plan, find_ambiguities(project, target.name, await load_constraints(conn), lock))
        finally:
            await transaction.rollback()
        for impact in plan.impacts:  # after the rollback: reading the audit trail holds no migration lock
            impact.callers = await affected_apps(conn, impact.contract, impact.api_versions, days=RECENT_DAYS)
    finally:
        await conn.close()
    return plan
