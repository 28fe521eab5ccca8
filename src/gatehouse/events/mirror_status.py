"""``gatehouse mirrors status``: per mirror, its rows, the last event it applied, how far behind it is, its snapshot.

Two measures of lag, because they answer different questions:

* ``lag_s``: now - the source's ``created_at`` of the last event applied (the usual event-consumer lag; it also
  grows while nothing happens at the source, so read it with ``waiting``);
* ``behind_s``: how old the oldest event waiting is (0 when ``waiting`` is 0): how stale the copy can be now.

``waiting`` counts the source contract's committed events after the mirror's position (some may wait for a
transaction that began before them and is still running, see :mod:`gatehouse.events.outbox`).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg

from gatehouse.db import Connection
from gatehouse.db.targets import resolve_targets
from gatehouse.events.mirror_plan import MirrorPlan, plan_mirrors
from gatehouse.events.mirror_sql import WAITING
from gatehouse.events.outbox import Position
from gatehouse.project import Project


@dataclass(frozen=True, slots=True)
class MirrorStatus:
    mirror: str
    database: str
    table: str
    source: str
    source_database: str
    snapshot: str
    """``done``, ``pending`` (the next sync takes it) or ``not applied`` (run ``gatehouse apply``)."""
    snapshot_at: datetime | None = None
    rows: int | None = None
    tombstones: int | None = None
    applied: int = 0
    """Events applied since the last snapshot was taken."""
    last_event_id: str | None = None
    last_event_at: datetime | None = None
    lag_s: float | None = None
    waiting: int | None = None
    behind_s: float | None = None
    position: str | None = None
    problem: str | None = None
    """Why a part of this could not be read (e.g. the source database has no outbox yet)."""

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("snapshot_at", "last_event_at"):
            data[key] = data[key].isoformat() if data[key] is not None else None
        return data


async def _local_part(conn: Connection, plan: MirrorPlan) -> dict[str, Any] | None:
    if not await conn.fetchval("SELECT to_regclass('gatehouse.mirror_positions') IS NOT NULL"):
        return None
    row = await conn.fetchrow("SELECT * FROM gatehouse.mirror_positions WHERE mirror = $1 AND table_name = $2",
                              plan.name, plan.table_label)
    if row is None:
        return None
    counts = await conn.fetchrow(f"SELECT count(*) FILTER (WHERE NOT _gh_deleted) AS rows, "
                                 f"count(*) FILTER (WHERE _gh_deleted) AS tombstones FROM {plan.local_table}")
    assert counts is not None  # an aggregate answers one row
    return {**dict(row), "rows": counts["rows"], "tombstones": counts["tombstones"]}


async def _status(local: Connection, source: Connection, plan: MirrorPlan) -> MirrorStatus:
    base: dict[str, Any] = {"mirror": plan.name, "database": plan.database, "table": plan.table_label,
                            "source": plan.source.label, "source_database": plan.source_database}
    found = await _local_part(local, plan)
    if found is None:
        return MirrorStatus(**base, snapshot="not applied", problem="no table yet: run `gatehouse apply`")
    position = Position(found["txid"], found["seq"])
    shown = MirrorStatus(**base, snapshot="done" if found["snapshot_done"] else "pending",
                         snapshot_at=found["snapshot_at"], rows=found["rows"], tombstones=found["tombstones"],
                         applied=found["applied"], last_event_id=found["last_event_id"],
                         last_event_at=found["last_event_at"], position=position.text())
    try:
        waiting = await source.fetchrow(WAITING, plan.source.name, str(position.txid), position.seq)
    except asyncpg.UndefinedTableError:
        return replace(shown, problem=f"database {plan.source_database} has no outbox yet: run `gatehouse apply`")
    assert waiting is not None  # an aggregate answers one row
    now: datetime = waiting["now"]
    lag = (now - shown.last_event_at).total_seconds() if shown.last_event_at else None
    behind = (now - waiting["oldest"]).total_seconds() if waiting["oldest"] else 0.0
    return replace(shown, waiting=waiting["waiting"], lag_s=lag, behind_s=max(0.0, behind))


async def mirror_status(project: Project) -> list[MirrorStatus]:
    plans = plan_mirrors(project)
    if not plans:
        return []
    targets = await resolve_targets(project)
    async with AsyncExitStack() as stack:
        conns: dict[str, asyncpg.Connection] = {}
        for name in sorted({p.database for p in plans} | {p.source_database for p in plans}):
            conns[name] = await targets[name].connect_owner()
            stack.push_async_callback(conns[name].close)
        return [await _status(conns[p.database], conns[p.source_database], p) for p in plans]
