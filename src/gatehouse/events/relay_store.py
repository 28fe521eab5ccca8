"""What the relay keeps in each database next to the outbox: each sink's position, the webhook delivery log, and
the deletion of events every sink has.

* ``gatehouse.outbox_positions``: one row per sink, the position ``(txid, seq)`` of the last event the sink's
  broker acknowledged. It is written only after the acknowledgement, so it never runs ahead of the broker.
  A sink without a row starts at the beginning of what the outbox still holds.
* ``gatehouse.event_deliveries``: each attempt to deliver an event to a webhook (sink, event id, attempt,
  status, time), the newest :data:`DELIVERY_LOG_KEEP` per sink.
* Deleting: an event is deleted once it is older than :data:`RETENTION_S` (so the HTTP feed and mirrors that
  read the outbox can still page through the last day) **and** every sink that takes its contract has a
  position past it. What the capture still needs of it (its aggregate's version and presence) is kept in
  ``gatehouse.aggregate_versions`` in the same statement. The head of the outbox is looked at in bounded
  batches (:data:`DELETE_BATCH` rows per statement), so a cleaning pass costs little however large the table:
  what a stuck sink still needs stays at the head and ends the pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from gatehouse.db import Connection
from gatehouse.events.outbox import START, Position

RETENTION_S = 24 * 3600.0
"""How long a delivered event stays in the outbox (for the HTTP feed's readers): 24 h, until it is a setting."""
DELETE_BATCH = 5000
DELETE_ROUNDS = 200
"""At most this many batches per cleaning pass (1 M events); the next pass goes on."""
DELIVERY_LOG_KEEP = 10_000

RELAY_DDL = """
CREATE TABLE IF NOT EXISTS gatehouse.outbox_positions (
    sink        text PRIMARY KEY,
    txid        xid8 NOT NULL,
    seq         bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS gatehouse.event_deliveries (
    n         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sink      text NOT NULL,
    event_id  uuid NOT NULL,
    attempt   integer NOT NULL,
    status    text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS event_deliveries_sink_idx ON gatehouse.event_deliveries (sink, n);
"""
"""The relay's own tables (``apply`` may create them; the relay does when they are missing)."""

_ENSURE = """
SELECT to_regclass('gatehouse.outbox_positions') IS NOT NULL AND to_regclass('gatehouse.event_deliveries') IS NOT NULL
"""
DDL_LOCK = "gatehouse.relay.ddl"


async def ensure_tables(conn: Connection) -> None:
    """Create the relay's tables when they are missing (serialized: two relays may start at once)."""
    if await conn.fetchval(_ENSURE):
        return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", DDL_LOCK)
        await conn.execute(RELAY_DDL)


TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('gatehouse.relay/' || $1, 0))"
"""The lock that makes one relay per (database, sink) publish: held by its session until it ends."""


async def try_lead(conn: Connection, sink: str) -> bool:
    return bool(await conn.fetchval(TRY_LOCK, sink))


async def load_position(conn: Connection, sink: str) -> Position:
    await conn.execute("INSERT INTO gatehouse.outbox_positions (sink, txid, seq) VALUES ($1, '0'::xid8, 0) "
                       "ON CONFLICT (sink) DO NOTHING", sink)
    row = await conn.fetchrow("SELECT txid::text AS txid, seq FROM gatehouse.outbox_positions WHERE sink = $1", sink)
    return START if row is None else Position(int(row["txid"]), row["seq"])


async def store_position(conn: Connection, sink: str, position: Position) -> None:
    await conn.execute("UPDATE gatehouse.outbox_positions SET txid = $2::text::xid8, seq = $3, updated_at = now() "
                       "WHERE sink = $1", sink, str(position.txid), position.seq)


async def log_deliveries(conn: Connection, sink: str, event_ids: Sequence[str], attempt: int, status: str) -> None:
    await conn.execute("INSERT INTO gatehouse.event_deliveries (sink, event_id, attempt, status) "
                       "SELECT $1, unnest($2::uuid[]), $3, $4", sink, list(event_ids), attempt, status[:200])


BACKLOG_CAP = 100_000
_BACKLOG = f"""
SELECT count(*) AS backlog, extract(epoch FROM now() - min(created_at))::float8 AS lag
FROM (SELECT created_at FROM gatehouse.outbox
      WHERE (txid, seq) > ($1::text::xid8, $2) AND aggregatetype = ANY($3::text[])
      ORDER BY txid, seq LIMIT {BACKLOG_CAP}) AS waiting
"""


async def backlog(conn: Connection, after: Position, contracts: Sequence[str]) -> tuple[int, float]:
    """Events of ``contracts`` after ``after`` (committed or not yet readable; counted up to
    :data:`BACKLOG_CAP`), and the age in seconds of the oldest of them (0 when there is none)."""
    row = await conn.fetchrow(_BACKLOG, str(after.txid), after.seq, list(contracts))
    assert row is not None
    return int(row["backlog"]), float(row["lag"] or 0.0)


CLEAN_LOCK = "SELECT pg_try_advisory_xact_lock(hashtextextended('gatehouse.relay.clean', 0))"

_DELETE = f"""
WITH head AS (
    SELECT seq, txid, aggregatetype, created_at FROM gatehouse.outbox ORDER BY txid, seq LIMIT {DELETE_BATCH}
), routes AS (
    SELECT * FROM unnest($1::text[], $2::text[]) AS r(sink, contract)
), gone AS (
    DELETE FROM gatehouse.outbox o USING head
    WHERE o.seq = head.seq AND head.created_at < now() - make_interval(secs => $3)
      AND NOT EXISTS (SELECT 1 FROM routes r LEFT JOIN gatehouse.outbox_positions p ON p.sink = r.sink
                      WHERE r.contract = head.aggregatetype
                        AND (p.sink IS NULL OR (head.txid, head.seq) > (p.txid, p.seq)))
    RETURNING o.aggregatetype, o.aggregateid, o.aggregate_version, o.type
)
"""
_KEEP_VERSIONS = """, kept AS (
    INSERT INTO gatehouse.aggregate_versions AS a (aggregatetype, aggregateid, version, present)
    SELECT DISTINCT ON (aggregatetype, aggregateid) aggregatetype, aggregateid, aggregate_version, type <> 'deleted'
    FROM gone WHERE aggregate_version > 0 ORDER BY aggregatetype, aggregateid, aggregate_version DESC
    ON CONFLICT (aggregatetype, aggregateid) DO UPDATE SET version = excluded.version, present = excluded.present
    WHERE a.version < excluded.version
)
"""
"""What the capture needs of deleted events: each aggregate's newest version and whether it showed the row
(``gatehouse.aggregate_versions``, where the outbox has no event of it any more: :mod:`.capture_sql`)."""
_COUNT = "SELECT count(*) FROM gone"

_TRIM = """
DELETE FROM gatehouse.event_deliveries
WHERE sink = $1 AND n <= (SELECT n FROM gatehouse.event_deliveries WHERE sink = $1 ORDER BY n DESC OFFSET $2 LIMIT 1)
"""


async def clean(conn: Connection, routes: Sequence[tuple[str, str]], log_sinks: Sequence[str],
                retention_s: float = RETENTION_S) -> int | None:
    """One cleaning pass of a database: delete what every sink has (``routes``: every (sink, contract) of the
    project in this database) and is older than ``retention_s``, and trim the delivery log of ``log_sinks``.
    Returns the events deleted, or None when another instance is cleaning this database now."""
    if not await conn.fetchval("SELECT to_regclass('gatehouse.outbox') IS NOT NULL"):
        return 0
    sinks, contracts = [s for s, _ in routes], [c for _, c in routes]
    versions = await conn.fetchval("SELECT to_regclass('gatehouse.aggregate_versions') IS NOT NULL")
    statement = _DELETE + (_KEEP_VERSIONS if versions else "") + _COUNT
    deleted = 0
    for _ in range(DELETE_ROUNDS):
        async with conn.transaction():
            if not await conn.fetchval(CLEAN_LOCK):
                return None if deleted == 0 else deleted
            count = int(await conn.fetchval(statement, sinks, contracts, retention_s))
        deleted += count
        if count == 0:
            break
    for sink in log_sinks:
        try:
            await conn.execute(_TRIM, sink, DELIVERY_LOG_KEEP)
        except asyncpg.UndefinedTableError:
            break
    return deleted
