"""The outbox: one row per change of a row behind an evented contract, written in the changing transaction.

The table (``gatehouse.outbox`` in each database with events) keeps Debezium's outbox column names (``id``,
``aggregatetype``, ``aggregateid``, ``type``, ``payload``) so that a team can point Debezium or Sequin at it
later without changing anything that produces events, plus gatehouse's own: ``seq`` (insertion order),
``contract_version`` and ``txid`` (the writing transaction).

**Reading it in order without losing anything.** ``seq`` is handed out when a row is inserted, not when its
transaction commits, so "everything after seq N" would skip a row whose transaction took a lower number and
committed later. Readers therefore go by ``(txid, seq)`` and only read rows below the first transaction that
is still running in their snapshot and may write this database (:data:`READ_AFTER`): nothing after it is read
before it is either committed (then read in order) or rolled back (then its rows never existed). The position
``(txid, seq)`` only grows, which makes it a cursor for the HTTP feed, for each sink's relay, and for mirrors.
A long transaction in this database holds readers back until it ends: they wait, they never skip.

Transaction ids follow the order transactions *started writing*, not the order they committed. For two writes
of one row that is the same order (the second writer waits for the first's commit), except when the second
transaction had already written something else before: then its event of that row comes first. Consumers
that keep state (mirrors) therefore guard on the per-aggregate version an event carries, never on arrival
order alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from gatehouse.db import Connection

OUTBOX_DDL = """
CREATE TABLE IF NOT EXISTS gatehouse.outbox (
    seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                uuid NOT NULL DEFAULT gen_random_uuid(),
    aggregatetype     text NOT NULL,
    aggregateid       text NOT NULL,
    type              text NOT NULL,
    payload           jsonb,
    contract_version  integer NOT NULL,
    txid              xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at        timestamptz NOT NULL DEFAULT now(),
    aggregate_version bigint NOT NULL DEFAULT 0
)
"""
"""``aggregatetype`` is the contract's name; ``aggregateid`` its key (the value as text, a JSON array for a
key of several columns); ``type`` is ``created``, ``updated`` or ``deleted``; ``payload`` the row as the
contract version shows it (for ``deleted``, as it was); ``aggregate_version`` grows with each event of the
aggregate in the order their transactions committed (the capture's events carry their own ``seq``, see
:mod:`gatehouse.events.capture_sql`; events of earlier releases counted 1, 2, 3..., always below any ``seq``
taken since; 0: a row not written by gatehouse's capture)."""
OUTBOX_INDEXES = {
    "outbox_position_idx": "CREATE INDEX IF NOT EXISTS outbox_position_idx ON gatehouse.outbox (txid, seq)",
    "outbox_aggregate_idx": "CREATE INDEX IF NOT EXISTS outbox_aggregate_idx "
                            "ON gatehouse.outbox (aggregatetype, aggregateid, aggregate_version)",
}
"""Readers go by position; an aggregate's newest event (the capture's ``ev_present``, mirror snapshots) by the
aggregate."""

EVENT_TYPES = ("created", "updated", "deleted")


async def ensure_outbox(conn: Connection) -> bool:
    """Create the outbox and its indexes where missing; True when the outbox was created. (Its DDL is not run on
    an outbox that has it all: ``CREATE INDEX IF NOT EXISTS`` locks the table before it looks, so it waits for
    every open transaction that wrote an event, and every writer waits behind it until the caller commits.)"""
    missing = [name for name in OUTBOX_INDEXES
               if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"gatehouse.{name}")]
    if not missing:
        return False
    created = bool(await conn.fetchval("SELECT to_regclass('gatehouse.outbox') IS NULL"))
    await conn.execute(OUTBOX_DDL)
    for name in missing:
        await conn.execute(OUTBOX_INDEXES[name])
    return created


COMPLETE_BELOW = """
WITH snapshot AS (SELECT pg_current_snapshot() AS s),
elsewhere AS (  -- transactions of other databases: they cannot write this outbox
    SELECT backend_xid FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND datname <> current_database()
),
bound AS (
    SELECT coalesce((SELECT min(x) FROM snapshot, pg_snapshot_xip(s) AS x
                     WHERE xid(x) NOT IN (SELECT backend_xid FROM elsewhere)),
                    (SELECT pg_snapshot_xmax(s) FROM snapshot)) AS below
)
"""
"""The ``WITH`` that gives ``(SELECT below FROM bound)``: the first transaction still running in this snapshot that
may be this database's. Outbox rows below it are final: committed (or rolled back) before the snapshot."""

READ_AFTER = COMPLETE_BELOW + """
SELECT seq, id::text AS id, aggregatetype, aggregateid, type, payload::text AS payload, contract_version,
       txid::text AS txid, created_at, aggregate_version
FROM gatehouse.outbox
WHERE (txid, seq) > ($1::text::xid8, $2) AND txid < (SELECT below FROM bound)
  AND ($4::text[] IS NULL OR aggregatetype = ANY($4))
ORDER BY txid, seq
LIMIT $3
"""
"""Rows after the position, up to the first transaction still running in this snapshot that may be this
database's: a transaction of another database (known by ``pg_stat_activity``, which shows other roles'
``backend_xid`` only to ``pg_read_all_stats``; without it every running transaction counts) never holds the
outbox back. One that ends between the snapshot and the look at ``pg_stat_activity`` is not found there and so
counts: the bound errs only towards waiting."""


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """Where a reader of the outbox is: after the event at ``(txid, seq)`` (``START``: before all)."""

    txid: int
    seq: int

    def text(self) -> str:
        """As a cursor token: ``<txid>-<seq>``."""
        return f"{self.txid}-{self.seq}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """Raises ValueError for anything that :meth:`text` did not make."""
        txid, sep, seq = text.partition("-")
        if not sep or not txid.isdigit() or not seq.isdigit() or len(txid) > 20 or len(seq) > 20:
            raise ValueError(f"not an event position: {text[:40]!r}")
        return cls(int(txid), int(seq))


START = Position(0, 0)


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    id: str
    """Unique per event, the same on every delivery of it: what consumers dedupe on."""
    contract: str
    key: str
    type: str
    payload: str | None
    """The row as JSON text (None only if the row could not be shaped)."""
    version: int
    position: Position
    created_at: datetime
    aggregate_version: int = 0
    """Grows with this aggregate's events in commit order (not by one): what a consumer keeping state guards on."""

    def as_json(self) -> dict[str, Any]:
        """The event as sinks and the HTTP feed deliver it (Debezium's names next to gatehouse's)."""
        return {"id": self.id, "aggregatetype": self.contract, "aggregateid": self.key, "type": self.type,
                "contract": self.contract, "version": self.version, "position": self.position.text(),
                "created_at": self.created_at.isoformat(), "aggregate_version": self.aggregate_version,
                "payload": orjson.Fragment(self.payload) if self.payload is not None else None}


async def read_after(conn: Connection, after: Position, limit: int,
                     contracts: list[str] | None = None) -> list[Event]:
    """The next ``limit`` events after ``after`` (of ``contracts`` only, when given), in order; only of
    transactions complete in this statement's snapshot."""
    rows = await conn.fetch(READ_AFTER, str(after.txid), after.seq, limit, contracts)
    return [Event(r["seq"], r["id"], r["aggregatetype"], r["aggregateid"], r["type"], r["payload"],
                  r["contract_version"], Position(int(r["txid"]), r["seq"]), r["created_at"], r["aggregate_version"])
            for r in rows]
