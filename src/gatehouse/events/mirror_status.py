"""``gatehouse mirrors status``: per mirror, its rows, the last event it applied, how far behind it is, its snapshot.

Two measures of lag, because they answer different questions:

* ``lag_s``: now - the source's ``created_at`` of the last event applied (the usual event-consumer lag; it also
  grows while nothing happens at the source, so read it with ``waiting``);
* ``behind_s``: how old the oldest event waiting is (0 when ``waiting`` is 0): how stale the copy can be now.

``waiting`` counts the source contract's committed events after the mirror's position (some may wait for a
transaction that began before them and is still running, see :mod:`gatehouse.events.outbox`).

For a mirror fed from a broker, ``waiting`` is what the broker holds for it (a JetStream consumer's pending and
unacknowledged messages; a Redis stream's entries after its position), ``behind_s`` is not known, ``position`` is
the broker's (a stream sequence, an entry id), and ``problem`` says when the copy may be incomplete because the
stream lost messages before the mirror read them (``gatehouse.mirror_feed_gaps``).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg

from gatehouse.db import Connection
from gatehouse.db.targets import resolve_targets
from gatehouse.errors import ProjectError
from gatehouse.events.mirror_feeds import open_feed
from gatehouse.events.mirror_plan import BrokerMirrorPlan, MirrorPlan, TablePlan, plan_broker_mirrors, plan_mirrors
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


async def _local_part(conn: Connection, plan: TablePlan) -> dict[str, Any] | None:
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


async def _broker_status(local: Connection, plan: BrokerMirrorPlan) -> MirrorStatus:
    base: dict[str, Any] = {"mirror": plan.name, "database": plan.database, "table": plan.table_label,
                            "source": plan.source_label, "source_database": plan.source_database}
    found = await _local_part(local, plan)
    if found is None:
        return MirrorStatus(**base, snapshot="not applied", problem="no table yet: run `gatehouse apply`")
    position = Position(found["txid"], found["seq"])
    feed = open_feed(plan)
    problems: list[str] = []
    try:
        state = await feed.state(position, count=True)
    except ProjectError as exc:
        state = None
        problems.append(str(exc))
    except Exception as exc:  # a status must show what it can: the broker's trouble is one line of it
        state = None
        problems.append(f"the broker did not answer ({type(exc).__name__})")
    finally:
        await feed.close()
    if await local.fetchval("SELECT to_regclass('gatehouse.mirror_feed_gaps') IS NOT NULL"):
        gaps = await local.fetch("SELECT lost FROM gatehouse.mirror_feed_gaps WHERE mirror = $1 ORDER BY noticed_at",
                                 plan.name)
        if gaps:
            problems.append("the copy may be incomplete: " + "; ".join(g["lost"] for g in gaps)
                            + " (copy it anew from a stream that holds every event: docs/mirrors.md)")
    now: datetime = await local.fetchval("SELECT now()")
    last_event_at = found["last_event_at"]
    return MirrorStatus(**base, snapshot="done" if found["snapshot_done"] else "pending",
                        snapshot_at=found["snapshot_at"], rows=found["rows"], tombstones=found["tombstones"],
                        applied=found["applied"], last_event_id=found["last_event_id"], last_event_at=last_event_at,
                        lag_s=(now - last_event_at).total_seconds() if last_event_at else None,
                        waiting=state.pending if state is not None else None,
                        position=feed.label(position), problem="; ".join(problems) or None)


async def mirror_status(project: Project) -> list[MirrorStatus]:
    plans = plan_mirrors(project)
    fed = plan_broker_mirrors(project)
    if not plans and not fed:
        return []
    targets = await resolve_targets(project)
    async with AsyncExitStack() as stack:
        conns: dict[str, asyncpg.Connection] = {}
        for name in sorted({p.database for p in plans} | {p.source_database for p in plans}
                           | {p.database for p in fed}):
            conns[name] = await targets[name].connect_owner()
            stack.push_async_callback(conns[name].close)
        found = [await _status(conns[p.database], conns[p.source_database], p) for p in plans]
        return found + [await _broker_status(conns[p.database], p) for p in fed]
