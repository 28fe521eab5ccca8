"""Running mirrors: in the background of ``serve`` (:class:`MirrorRunner`), or once (``gatehouse mirrors sync``:
:func:`sync_mirrors_once`).

Both log in as each database's owner: a mirror reads the outbox and the source contract's view of one database and
writes a table the owner owns in another, as ``apply`` does. Several servers may run the same mirrors: a step locks
its mirror's position row (``SKIP LOCKED``), so one of them moves a mirror at a time and the others wait their turn.

A mirror fed from a broker (:mod:`gatehouse.events.mirror_broker`) is run the same way: its sync has the same steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg

from gatehouse.background import stop_tasks
from gatehouse.db.targets import DatabaseTarget, resolve_targets
from gatehouse.errors import GatehouseError
from gatehouse.events.mirror_broker import BrokerMirrorSync
from gatehouse.events.mirror_plan import BrokerMirrorPlan, MirrorPlan, plan_broker_mirrors, plan_mirrors
from gatehouse.events.mirrors import Connect, MirrorSync, Step
from gatehouse.events.outbox import START, Position
from gatehouse.project import Project

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 10.0
HELD_BACK_WAIT_S = 10.0
HELD_BACK_POLL_S = 0.1


def owner_login(target: DatabaseTarget, name: str) -> Connect:
    async def connect() -> asyncpg.Connection:
        conn = await target.connect_owner()
        await conn.execute(f"SET application_name = 'gatehouse/mirror {name}'")  # names are [a-z0-9_]
        return conn
    return connect


class _Plan(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def poll_s(self) -> float: ...
    @property
    def batch(self) -> int: ...


class Syncing(Protocol):
    """A mirror's sync, of either kind: :class:`~.mirrors.MirrorSync` or :class:`~.mirror_broker.BrokerMirrorSync`."""

    @property
    def plan(self) -> _Plan: ...
    async def step(self) -> Step: ...
    async def waiting(self, position: Position) -> int: ...
    async def close(self) -> None: ...


def mirror_sync(plan: MirrorPlan, targets: Mapping[str, DatabaseTarget]) -> MirrorSync:
    return MirrorSync(plan, owner_login(targets[plan.database], plan.name),
                      owner_login(targets[plan.source_database], plan.name))


def broker_sync(plan: BrokerMirrorPlan, targets: Mapping[str, DatabaseTarget]) -> Syncing:
    return BrokerMirrorSync(plan, owner_login(targets[plan.database], plan.name))


def all_syncs(project: Project, targets: Mapping[str, DatabaseTarget], only: str | None = None) -> list[Syncing]:
    """A sync per mirror of either kind (``only`` that one); a ProjectError when one is misconfigured."""
    syncs: list[Syncing] = [mirror_sync(p, targets) for p in plan_mirrors(project) if only in (None, p.name)]
    return syncs + [broker_sync(p, targets) for p in plan_broker_mirrors(project) if only in (None, p.name)]


def describe(exc: BaseException) -> str:
    """A failure for the log: gatehouse's own message, or the kind of database error (never SQL)."""
    if isinstance(exc, GatehouseError):
        return str(exc)
    if isinstance(exc, asyncpg.PostgresError):
        return f"the database refused ({exc.sqlstate} {type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else type(exc).__name__


@dataclass(slots=True)
class MirrorCounts:
    """What one server did for one mirror since it started (for metrics and the log)."""

    events: int = 0
    snapshots: int = 0
    failures: int = 0
    last_error: str | None = None


@dataclass
class MirrorRunner:
    """One task per mirror: a step, again at once while there is more, else after the mirror's ``poll_ms``; a
    failure is logged and retried with a growing pause (up to :data:`MAX_BACKOFF_S`)."""

    syncs: list[Syncing]
    counts: dict[str, MirrorCounts] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def for_project(cls, project: Project, targets: Mapping[str, DatabaseTarget]) -> MirrorRunner | None:
        """None when the project has no mirrors; a ProjectError when one is misconfigured."""
        syncs = all_syncs(project, targets)
        return cls(syncs) if syncs else None

    async def start(self) -> None:
        for sync in self.syncs:
            self.counts[sync.plan.name] = MirrorCounts()
            self._tasks.append(asyncio.create_task(self._run(sync), name=f"gatehouse-mirror-{sync.plan.name}"))

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks.clear()
        for sync in self.syncs:
            await sync.close()

    async def _run(self, sync: Syncing) -> None:
        counts = self.counts[sync.plan.name]
        backoff = sync.plan.poll_s
        while True:
            try:
                step = await sync.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                counts.failures += 1
                counts.last_error = describe(exc)
                log.warning("mirror %s: %s; trying again in %.1f s", sync.plan.name, counts.last_error, backoff)
                with contextlib.suppress(Exception):
                    await sync.close()
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            backoff = sync.plan.poll_s
            counts.last_error = None
            counts.events += step.count if step.kind == "events" else 0
            counts.snapshots += step.kind == "snapshot"
            more = step.kind == "snapshot" or (step.kind == "events" and step.count >= sync.plan.batch)
            if not more:
                await asyncio.sleep(sync.plan.poll_s)


@dataclass(frozen=True, slots=True)
class SyncReport:
    mirror: str
    snapshot_rows: int | None
    """Rows copied by a snapshot taken in this run (None: none was needed)."""
    events: int
    position: Position
    busy: bool = False
    """Another process held the mirror (a running server moves it: nothing to do here)."""
    held_back: int = 0
    """Committed events not applied because a transaction older than them was still running after ``wait_s``."""


async def sync_mirrors_once(project: Project, only: str | None = None, *,
                            wait_s: float = HELD_BACK_WAIT_S) -> list[SyncReport]:
    """Bring every mirror (or ``only`` that one) up to date: the snapshot if it is due, then events until none is
    left. Committed events that cannot be read yet, because a transaction that began before them is still running
    (:mod:`gatehouse.events.outbox`), are waited for up to ``wait_s``; what is still held back then is reported."""
    targets = await resolve_targets(project)
    reports = []
    for sync in all_syncs(project, targets, only):
        plan = sync.plan
        snapshot_rows: int | None = None
        events, position, busy, held_back = 0, START, False, 0
        deadline = asyncio.get_running_loop().time() + wait_s
        try:
            while True:
                step: Step = await sync.step()
                position = step.position
                if step.kind == "snapshot":
                    snapshot_rows = step.count
                elif step.kind == "events":
                    events += step.count
                elif step.kind == "busy":
                    busy = True
                    break
                else:
                    held_back = await sync.waiting(position)
                    if not held_back or asyncio.get_running_loop().time() >= deadline:
                        break
                    await asyncio.sleep(HELD_BACK_POLL_S)
        finally:
            await sync.close()
        reports.append(SyncReport(plan.name, snapshot_rows, events, position, busy, held_back))
    return reports
