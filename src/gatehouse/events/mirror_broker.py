"""Mirrors fed from a broker: a local table kept from the contract events another project's relay publishes.

Same table, same version-guarded upsert (:func:`~.mirror_sql.apply_states`, :func:`~.mirror_sql.newest_per_key`)
and same ``gatehouse.mirror_positions`` row as a mirror of this project's outbox (:mod:`.mirrors`); what differs is
where events come from (a :class:`~.mirror_feeds.Feed`) and how the copy starts.

**Exactly-once effect over at-least-once delivery.** One step is one transaction on the consuming database: lock
the mirror's row (``SKIP LOCKED``: of several servers, one moves a mirror at a time), put the broker's consumer
right after the stored position (:meth:`Feed.align`), read a batch, apply it, store the position of its last
message; commit; only then acknowledge to the broker. A crash before the commit leaves the old position and rows;
one between the commit and the ack leaves the broker behind the database, which the next step's ``align`` sees
and corrects. Messages at or before the stored position are never applied again, and the version guard makes
duplicates in the stream (a relay that republished after a crash), redeliveries and reordering harmless anyway:
each row ends at the newest state whatever arrives how often in whichever order.

**The start, and copying anew.** A broker has no view to snapshot: the copy is made by replaying the stream from
its first message, in one transaction (``DELETE``, then every message up to the stream's last one when the replay
began, then the position), so readers see the old copy, or an empty table, until the new one is complete. The same
happens when ``apply`` marks the copy to be made anew (a new shape). It is complete only if the stream still holds
every event of the contract: when messages the mirror has not read are gone (the stream's first message is after
its position: retention limits, a purge, a trim), the step records it in ``gatehouse.mirror_feed_gaps``, logs a
warning, and ``gatehouse mirrors status`` reports the copy as possibly incomplete until it is made anew from a
stream that holds everything (docs/mirrors.md says how).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from gatehouse.errors import ProjectError
from gatehouse.events.mirror_feeds import Delivery, Feed, open_feed
from gatehouse.events.mirror_plan import BrokerMirrorPlan
from gatehouse.events.mirror_sql import CAPTURED, Table, apply_states, newest_per_key
from gatehouse.events.mirrors import Connect, Step
from gatehouse.events.outbox import START, Position

log = logging.getLogger(__name__)
Hook = Callable[[], Awaitable[None]]

FEED_GAPS_DDL = """
CREATE TABLE IF NOT EXISTS gatehouse.mirror_feed_gaps (
    mirror      text NOT NULL,
    after       text NOT NULL,
    lost        text NOT NULL,
    noticed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mirror, after)
);
"""
"""Messages a mirror fed from a broker never saw: ``after`` its position then (as the broker names it), ``lost``
what the broker said was gone. Emptied for the mirror when its copy is made anew."""
RECORD_GAP = """
INSERT INTO gatehouse.mirror_feed_gaps (mirror, after, lost) VALUES ($1, $2, $3)
ON CONFLICT (mirror, after) DO NOTHING RETURNING true
"""


class BrokerMirrorSync:
    """Moves one broker-fed mirror forward, one transaction per :meth:`step`; the same interface as
    :class:`~.mirrors.MirrorSync` (:class:`~.mirror_runner.MirrorRunner` runs both)."""

    def __init__(self, plan: BrokerMirrorPlan, connect_local: Connect, feed: Feed | None = None, *,
                 on_applied: Hook | None = None, on_committed: Hook | None = None) -> None:
        self.plan = plan
        self.feed = feed if feed is not None else open_feed(plan)
        self._connect_local = connect_local
        self._local: asyncpg.Connection | None = None
        self._on_applied = on_applied
        """Called after a batch is written and before its position is: where tests crash before the commit."""
        self._on_committed = on_committed
        """Called after the commit and before the ack: where tests crash between the two."""

    async def close(self) -> None:
        conn, self._local = self._local, None
        if conn is not None and not conn.is_closed():
            if conn.is_in_transaction():
                conn.terminate()  # a failure mid-step: the server rolls back
            else:
                try:
                    await conn.close(timeout=2)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                    conn.terminate()
        await self.feed.close()

    async def _connection(self) -> asyncpg.Connection:
        if self._local is None or self._local.is_closed():
            self._local = await self._connect_local()
            if not await self._local.fetchval("SELECT to_regclass('gatehouse.mirror_feed_gaps') IS NOT NULL"):
                raise ProjectError(f"{self.plan.key}: database {self.plan.database} has no mirror tables yet",
                                   hint="run `gatehouse apply`")
        return self._local

    async def waiting(self, position: Position) -> int:
        """Messages after ``position`` that the broker holds for this mirror (0 when it cannot say)."""
        return (await self.feed.state(position, count=True)).pending or 0

    async def step(self) -> Step:
        local = await self._connection()
        settle: Delivery | None = None
        async with local.transaction():
            row = await local.fetchrow(
                "SELECT table_name, key_columns, columns::text AS columns, txid, seq, snapshot_done "
                "FROM gatehouse.mirror_positions WHERE mirror = $1 FOR UPDATE SKIP LOCKED", self.plan.name)
            if row is None:
                if await local.fetchval("SELECT true FROM gatehouse.mirror_positions WHERE mirror = $1",
                                        self.plan.name):
                    return Step("busy")
                raise ProjectError(f"{self.plan.key}: database {self.plan.database} has no table for it yet",
                                   hint="run `gatehouse apply`")
            if row["table_name"] != self.plan.table_label:
                raise ProjectError(f"{self.plan.key}: its table is not the one apply made for it",
                                   hint="run `gatehouse apply`")
            table = Table(self.plan.local_table, tuple(c for c, _ in json.loads(row["columns"])),
                          tuple(row["key_columns"]))
            if not row["snapshot_done"]:
                step, settle = await self._replay(local, table)
            else:
                step, settle = await self._events(local, table, Position(row["txid"], row["seq"]))
        if settle is not None:
            if self._on_committed is not None:
                await self._on_committed()
            await self.feed.settle(settle)
        return step

    async def _gap(self, local: asyncpg.Connection, after: Position, lost: str | None) -> None:
        if lost is not None and await local.fetchval(RECORD_GAP, self.plan.name, self.feed.label(after), lost):
            log.warning("mirror %s: %s; if they held events of %s, the copy may lack them (docs/mirrors.md: "
                        "copying anew)", self.plan.name, lost, self.plan.contract)

    async def _apply(self, local: asyncpg.Connection, table: Table, deliveries: list[Delivery]) -> int:
        """Apply the events of the plan's contract and version among ``deliveries``; how many were applied."""
        events = [d.event for d in deliveries if d.event is not None and d.event.contract == self.plan.contract]
        wanted = [e for e in events if e.version == self.plan.version]
        if len(wanted) < len(events):
            log.warning("mirror %s: skipped %d event(s) of another version of %s than v%d", self.plan.name,
                        len(events) - len(wanted), self.plan.contract, self.plan.version)
        unversioned = sum(1 for e in wanted if e.aggregate_version <= 0)
        if unversioned:
            log.warning("mirror %s: skipped %d event(s) without an aggregate_version (not written by gatehouse's "
                        "capture: they cannot be ordered)", self.plan.name, unversioned)
        await apply_states(local, table, newest_per_key(wanted, table, CAPTURED))
        return len(wanted) - unversioned

    async def _record(self, local: asyncpg.Connection, position: Position, applied: int,
                      deliveries: list[Delivery]) -> None:
        last = next((d.event for d in reversed(deliveries)
                     if d.event is not None and d.event.contract == self.plan.contract), None)
        await local.execute(
            "UPDATE gatehouse.mirror_positions SET txid = $2, seq = $3, applied = applied + $4, "
            "last_event_id = coalesce($5, last_event_id), last_event_at = coalesce($6, last_event_at), "
            "updated_at = now() WHERE mirror = $1",
            self.plan.name, position.txid, position.seq, applied, last.id if last else None,
            last.created_at if last else None)

    async def _events(self, local: asyncpg.Connection, table: Table,
                      position: Position) -> tuple[Step, Delivery | None]:
        state = await self.feed.state(position)
        if state.tip < position:
            raise ProjectError(f"{self.plan.key}: the stream's last message ({self.feed.label(state.tip)}) is before "
                               f"the mirror's position ({self.feed.label(position)}): it was deleted and made anew",
                               hint="copy the mirror anew: UPDATE gatehouse.mirror_positions SET snapshot_done = "
                                    f"false WHERE mirror = '{self.plan.name}'")
        await self._gap(local, position, state.lost)
        await self.feed.align(position)
        deliveries = await self.feed.read(self.plan.batch)
        if not deliveries:
            return Step("idle", 0, position), None
        fresh = [d for d in deliveries if d.position > position]  # (older ones: a consumer that lost an ack)
        applied = await self._apply(local, table, fresh)
        if self._on_applied is not None:
            await self._on_applied()
        newest = max(position, deliveries[-1].position)
        await self._record(local, newest, applied, fresh)
        return Step("events", len(deliveries), newest), deliveries[-1]

    async def _replay(self, local: asyncpg.Connection, table: Table) -> tuple[Step, Delivery | None]:
        state = await self.feed.state(START)
        await self.feed.align(START, again=True)
        await local.execute(f"DELETE FROM {table.name}")
        await local.execute("DELETE FROM gatehouse.mirror_feed_gaps WHERE mirror = $1", self.plan.name)
        await local.execute("UPDATE gatehouse.mirror_positions SET last_event_id = NULL, last_event_at = NULL "
                            "WHERE mirror = $1", self.plan.name)
        await self._gap(local, START, state.lost)
        position, applied, read, last = START, 0, 0, None
        while position < state.tip:
            deliveries = await self.feed.read(self.plan.batch)
            if not deliveries:
                break
            applied += await self._apply(local, table, deliveries)
            read += len(deliveries)
            position, last = deliveries[-1].position, deliveries[-1]
            await self._record(local, position, 0, deliveries)
        if self._on_applied is not None:
            await self._on_applied()
        rows = await local.fetchval(f"SELECT count(*) FROM {table.name} WHERE NOT _gh_deleted")
        await local.execute(
            "UPDATE gatehouse.mirror_positions SET txid = $2, seq = $3, snapshot_done = true, snapshot_at = now(), "
            "snapshot_rows = $4, version_source = 'broker', applied = 0, updated_at = now() WHERE mirror = $1",
            self.plan.name, position.txid, position.seq, rows)
        log.info("mirror %s: copied %s from %s: %d message(s) replayed, %d event(s) applied, %d row(s), up to %s",
                 self.plan.name, self.plan.source_label, self.plan.source_database, read, applied, rows,
                 self.feed.label(position))
        return Step("snapshot", rows, position), last
