"""Mirrors: a local table kept up to date from another service's contract events (event-carried state transfer).

One step of a mirror is one transaction on the consuming database. It locks the mirror's row of
``gatehouse.mirror_positions`` (``SKIP LOCKED``: of several servers, one works on a mirror at a time), then either
takes the snapshot or applies the next batch of events, and stores the new position in that same transaction: a
crash anywhere in between leaves the old position and the old rows, and the batch is applied again, harmlessly.

**The version guard.** Every row holds the version of the state it shows (``_gh_version``); an event is applied only
if its version is higher (``ON CONFLICT ... DO UPDATE ... WHERE m._gh_version < excluded._gh_version``), and a
delete is applied the same way, as a tombstone (``_gh_deleted``, the key and the version; the other columns are
emptied) which is kept, so an older update arriving late cannot bring the row back. Replays, duplicates and
events read out of commit order (the outbox's ``(txid, seq)`` order is not commit order, see
:mod:`gatehouse.events.outbox`) are therefore all harmless: each row ends at the newest state whatever the order.

The version is the event's ``aggregate_version``: the capture numbers each aggregate's events in commit order
(:mod:`gatehouse.events.mirror_sql` says how, and what stands in for it on an outbox gatehouse did not write).
An event with version 0 (an outbox row the capture did not write) can never be applied.

**The snapshot.** In one REPEATABLE READ transaction on the source database: the contract's view rows, the version
of every aggregate's state (its newest event's, in the outbox or kept in ``gatehouse.aggregate_versions``), and
the position ``P`` = the largest ``(txid, seq)`` among outbox rows with ``txid`` below ``B``, the first
transaction of this database still running in the snapshot: the bound ``read_after`` reads by
(:data:`~.mirror_sql.TIP`). Why nothing is lost or regressed:

* an event at or before ``P`` belongs to a transaction with ``txid < B``, which is complete in the snapshot, so
  the view rows already show its effect (or it rolled back and the event never existed); a transaction of this
  database with ``txid < B`` cannot add a row later (those of other databases never write here), so every event
  written afterwards comes after ``P`` and is read;
* an event after ``P`` may also be in the snapshot already (a transaction with ``txid > B`` that committed
  before it): it is read again, and the guard skips it, because the row's version is the version of the state
  the snapshot shows, which is that event's or a later one's;
* an event not in the snapshot was committed after it, so its version is higher than every version of its
  aggregate visible in it, and it is applied;
* an aggregate with a version and no view row is written as a tombstone with that version, so that an event
  after ``P`` that the snapshot already contains (say, the creation of a row that a transaction with a lower
  ``txid`` deleted later) cannot bring it back; a row with no event at all gets version 0, below any event's.

The copy is replaced in the snapshot's transaction (``DELETE`` then fill), so readers see the old copy, or the
empty table before the first snapshot, until the new one is complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import asyncpg

from gatehouse.errors import ProjectError
from gatehouse.events.mirror_plan import MirrorPlan
from gatehouse.events.mirror_sql import (
    CAPTURE_SETTINGS,
    SOURCE_TABLES,
    TIP,
    WAITING,
    State,
    Table,
    apply_states,
    newest_per_key,
    version_source,
)
from gatehouse.events.outbox import START, Position, read_after
from gatehouse.events.relay_store import ensure_tables

log = logging.getLogger(__name__)
Connect = Callable[[], Awaitable[asyncpg.Connection]]
SNAPSHOT_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class Step:
    kind: Literal["busy", "idle", "events", "snapshot"]
    """busy: another server holds the mirror; idle: nothing new; events: a batch applied; snapshot: one taken."""
    count: int = 0
    """Events read (``events``) or source rows copied (``snapshot``)."""
    position: Position = START


class MirrorSync:
    """Moves one mirror forward, one transaction per :meth:`step`. Connections are opened on first use and kept;
    :meth:`close` after a failure (the next step opens new ones)."""

    def __init__(self, plan: MirrorPlan, connect_local: Connect, connect_source: Connect, *,
                 on_applied: Callable[[], Awaitable[None]] | None = None) -> None:
        self.plan = plan
        self._connect_local, self._connect_source = connect_local, connect_source
        self._local: asyncpg.Connection | None = None
        self._source: asyncpg.Connection | None = None
        self._applied = False
        self._version_column: str | None = None
        self._published: Position | None = None
        self._on_applied = on_applied
        """Called after a batch is written and before its position is: where the tests crash a step."""

    async def close(self) -> None:
        for conn in (self._local, self._source):
            if conn is None or conn.is_closed():
                continue
            if conn.is_in_transaction():
                conn.terminate()  # a failure mid-step: the server rolls back
                continue
            try:
                await conn.close(timeout=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()
        self._local = self._source = None
        self._version_column = None

    async def _connections(self) -> tuple[asyncpg.Connection, asyncpg.Connection]:
        if self._local is None or self._local.is_closed():
            self._local = await self._connect_local()
        if self._source is None or self._source.is_closed():
            self._source = await self._connect_source()
        return self._local, self._source

    async def step(self) -> Step:
        """One transaction: the snapshot, or the next batch of events; then the position is told to the source's
        outbox cleaner (:func:`publish_position`)."""
        step = await self._step()
        if step.kind != "busy" and step.position != self._published:
            try:
                await publish_position(self._source_connection(), self.plan.name, step.position)
                self._published = step.position
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:  # the copy is right anyway
                log.debug("mirror %s: could not tell the source its position: %s", self.plan.name,
                          type(exc).__name__)
        return step

    def _source_connection(self) -> asyncpg.Connection:
        assert self._source is not None  # a step opened it
        return self._source

    async def _step(self) -> Step:
        local, source = await self._connections()
        if not self._applied:  # once: apply made the positions table (else the error says what to do)
            if not await local.fetchval("SELECT to_regclass('gatehouse.mirror_positions') IS NOT NULL"):
                raise ProjectError(f"{self.plan.key}: database {self.plan.database} has no mirror tables yet",
                                   hint="run `gatehouse apply`")
            self._applied = True
        async with local.transaction():
            row = await local.fetchrow(
                "SELECT table_name, key_columns, columns::text AS columns, txid, seq, snapshot_done, version_source "
                "FROM gatehouse.mirror_positions WHERE mirror = $1 FOR UPDATE SKIP LOCKED", self.plan.name)
            if row is None:
                return await self._missing(local)
            if row["table_name"] != self.plan.table_label:
                raise ProjectError(f"{self.plan.key}: its table is not the one apply made for it",
                                   hint="run `gatehouse apply`")
            table = Table(self.plan.local_table, tuple(c for c, _ in json.loads(row["columns"])),
                          tuple(row["key_columns"]))
            source_column = self._version_column or await self._version_source(source)
            self._version_column = source_column  # (until a new connection: apply may add the capture meanwhile)
            if not row["snapshot_done"] or row["version_source"] != source_column:
                return await self._snapshot(local, source, table, source_column)
            return await self._events(local, source, table, source_column, Position(row["txid"], row["seq"]))

    async def waiting(self, position: Position) -> int:
        """The source contract's committed events after ``position`` (see :data:`~.mirror_sql.WAITING`)."""
        _, source = await self._connections()
        return int(await source.fetchval(WAITING, self.plan.source.name, str(position.txid), position.seq))

    async def _version_source(self, source: asyncpg.Connection) -> str:
        found = await source.fetchrow(SOURCE_TABLES)
        if found is None or not found["outbox"]:
            raise ProjectError(f"{self.plan.key}: database {self.plan.source_database} has no outbox, so "
                               f"{self.plan.source.name}'s changes are not captured yet", hint="run `gatehouse apply`")
        return version_source(found["versions"], found["versioned_events"])

    async def _missing(self, local: asyncpg.Connection) -> Step:
        if await local.fetchval("SELECT true FROM gatehouse.mirror_positions WHERE mirror = $1", self.plan.name):
            return Step("busy")
        raise ProjectError(f"{self.plan.key}: database {self.plan.database} has no table for it yet",
                           hint="run `gatehouse apply`")

    async def _snapshot(self, local: asyncpg.Connection, source: asyncpg.Connection, table: Table,
                        source_column: str) -> Step:
        copied = 0
        async with source.transaction(isolation="repeatable_read", readonly=True):
            await source.execute(CAPTURE_SETTINGS)  # (SET takes no snapshot)
            taken_at = await source.fetchval("SELECT now()")  # the first query fixes the snapshot
            tip = await source.fetchrow(TIP)
            position = Position(int(tip["txid"]), tip["seq"]) if tip else START
            await local.execute(f"DELETE FROM {table.name}")
            chunk: list[State] = []
            sql = table.snapshot(self.plan.source_view, source_column)
            async for record in source.cursor(sql, self.plan.source.name, prefetch=SNAPSHOT_CHUNK):
                payload = record["payload"] if record["payload"] is not None else table.key_payload(record["key"])
                chunk.append((payload, record["version"], record["deleted"], record["at"]))
                copied += not record["deleted"]
                if len(chunk) >= SNAPSHOT_CHUNK:
                    await apply_states(local, table, chunk)
                    chunk = []
            await apply_states(local, table, chunk)
        await local.execute(
            "UPDATE gatehouse.mirror_positions SET txid = $2, seq = $3, snapshot_done = true, snapshot_at = $4, "
            "snapshot_rows = $5, version_source = $6, applied = 0, last_event_id = NULL, last_event_at = NULL, "
            "updated_at = now() WHERE mirror = $1",
            self.plan.name, position.txid, position.seq, taken_at, copied, source_column)
        log.info("mirror %s: snapshot of %d rows of %s at position %s", self.plan.name, copied,
                 self.plan.source.label, position.text())
        return Step("snapshot", copied, position)

    async def _events(self, local: asyncpg.Connection, source: asyncpg.Connection, table: Table,
                      source_column: str, position: Position) -> Step:
        async with source.transaction(isolation="repeatable_read", readonly=True):
            events = await read_after(source, position, self.plan.batch, [self.plan.source.name])
            tip = await source.fetchrow(TIP) if len(events) < self.plan.batch else None
        newest = events[-1].position if events else position
        if tip is not None:  # nothing of this contract up to the tip: skip others' events for good
            newest = max(newest, Position(int(tip["txid"]), tip["seq"]))
        if newest == position:
            return Step("idle", 0, position)
        wanted = [e for e in events if e.version == self.plan.source.version]
        if len(wanted) < len(events):
            log.warning("mirror %s: skipped %d event(s) of another version of %s than v%d", self.plan.name,
                        len(events) - len(wanted), self.plan.source.name, self.plan.source.version)
        await apply_states(local, table, newest_per_key(wanted, table, source_column))
        if self._on_applied is not None:
            await self._on_applied()
        last = events[-1] if events else None
        await local.execute(
            "UPDATE gatehouse.mirror_positions SET txid = $2, seq = $3, applied = applied + $4, "
            "last_event_id = coalesce($5, last_event_id), last_event_at = coalesce($6, last_event_at), "
            "updated_at = now() WHERE mirror = $1",
            self.plan.name, newest.txid, newest.seq, len(wanted), last.id if last else None,
            last.created_at if last else None)
        return Step("events" if events else "idle", len(events), newest)


MIRROR_SINK = "mirror:"
"""How a mirror is named among the source database's outbox readers (``gatehouse.outbox_positions``)."""
PUBLISH = """
INSERT INTO gatehouse.outbox_positions AS p (sink, txid, seq) VALUES ($1, $2::text::xid8, $3)
ON CONFLICT (sink) DO UPDATE SET txid = excluded.txid, seq = excluded.seq, updated_at = now()
WHERE (p.txid, p.seq) < (excluded.txid, excluded.seq)
"""


async def publish_position(source: asyncpg.Connection, mirror: str, position: Position) -> None:
    """Record, in the source database, how far the mirror has applied its events (``mirror:<name>`` in the relay's
    ``gatehouse.outbox_positions``, only ever forward), so that the outbox cleaner can keep the events it still
    needs (when the cleaner counts mirrors among the readers of their contract). Written after the step
    committed: a crash in between leaves it behind, which only keeps more."""
    await ensure_tables(source)
    await source.execute(PUBLISH, f"{MIRROR_SINK}{mirror}", str(position.txid), position.seq)
