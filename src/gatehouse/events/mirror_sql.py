"""The SQL a mirror runs: the version-guarded upsert of full states, the snapshot query, the versions they carry.

**Versions.** The capture (:mod:`gatehouse.events.capture_sql`) numbers each event of an aggregate while holding
the aggregate's key row, so an aggregate's versions follow the commits of its writers; every event carries its
number as ``aggregate_version``. The version of the state a snapshot sees is the newest of the aggregate's events
in the same snapshot: in the outbox, or, for events the relay has deleted, in ``gatehouse.aggregate_versions``.
Where that table is missing (an outbox written by something other than gatehouse's capture), the stand-in is
the event's ``seq``: correct for a contract over one table when the writer takes ``seq`` after locking the row
(an ``AFTER`` row trigger), and the snapshot then takes an aggregate's version from its newest visible outbox row
(``version_source`` records which was used: a change means a new snapshot).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from gatehouse.db import Connection, quote_ident
from gatehouse.events.outbox import COMPLETE_BELOW, Event

CAPTURED = "aggregate_version"
STAND_IN = "seq"

TIP = COMPLETE_BELOW + """
SELECT txid::text AS txid, seq FROM gatehouse.outbox
WHERE txid < (SELECT below FROM bound) ORDER BY txid DESC, seq DESC LIMIT 1
"""
"""The last position complete in this transaction's snapshot, by the bound of
:data:`~gatehouse.events.outbox.READ_AFTER` (the first transaction still running in the snapshot that may be this
database's): every outbox row up to it was committed (or rolled back) before the snapshot was taken, and no row
can be added at or before it any more."""

SOURCE_TABLES = """
SELECT to_regclass('gatehouse.outbox') IS NOT NULL AS outbox,
       to_regclass('gatehouse.aggregate_versions') IS NOT NULL AS versions,
       EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('gatehouse.outbox')
               AND attname = 'aggregate_version' AND NOT attisdropped) AS versioned_events
"""
WAITING = """
SELECT count(*) AS waiting, min(created_at) AS oldest, now() AS now FROM gatehouse.outbox
WHERE aggregatetype = $1 AND (txid, seq) > ($2::text::xid8, $3)
"""
"""The contract's events after a position that this statement sees: committed ones, and they include events that
``read_after`` does not return yet because a transaction that began before them is still running."""
CAPTURE_SETTINGS = "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'"
"""The capture writes keys (``aggregateid``) in these settings: the snapshot reads the view's keys in them too."""

State = tuple[str, int, bool, datetime | None]
"""(payload as JSON text, version, deleted, the event's created_at): one row's state to upsert."""


def version_source(versions_table: bool, versioned_events: bool) -> str:
    return CAPTURED if versions_table and versioned_events else STAND_IN


def event_version(event: Event, source: str) -> int:
    return event.aggregate_version if source == CAPTURED else event.seq


@dataclass(frozen=True, slots=True)
class Table:
    """The mirror table as apply made it (``gatehouse.mirror_positions``): what a step writes."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]

    def upsert(self) -> str:
        """Version-guarded upsert of full states: ``$1`` payloads (JSON text), ``$2`` versions, ``$3`` deleted,
        ``$4`` event times; one row per key in each call. A delete keeps the key and the version (a tombstone)."""
        q = quote_ident
        values = ", ".join(f"r.{q(c)}" if c in self.key else f"CASE WHEN e.deleted THEN NULL ELSE r.{q(c)} END"
                           for c in self.columns)
        updates = "".join(f"{q(c)} = excluded.{q(c)}, " for c in self.columns if c not in self.key)
        return (f"INSERT INTO {self.name} AS m ({', '.join(q(c) for c in self.columns)}, _gh_version, _gh_deleted, "
                f"_gh_event_at)\nSELECT {values}, e.version, e.deleted, e.at\n"
                "FROM unnest($1::text[], $2::bigint[], $3::boolean[], $4::timestamptz[]) AS e(payload, version, "
                f"deleted, at)\nCROSS JOIN LATERAL jsonb_populate_record(NULL::{self.name}, e.payload::jsonb) AS r\n"
                f"ON CONFLICT ({', '.join(q(k) for k in self.key)}) DO UPDATE SET {updates}"
                "_gh_version = excluded._gh_version, _gh_deleted = excluded._gh_deleted, "
                "_gh_event_at = excluded._gh_event_at\nWHERE m._gh_version < excluded._gh_version")

    def _key_text(self, row: str) -> str:
        """The key of a view row as the capture writes ``aggregateid``."""
        if len(self.key) == 1:
            return f"({row}.{quote_ident(self.key[0])})::text"
        return "jsonb_build_array(" + ", ".join(f"{row}.{quote_ident(k)}" for k in self.key) + ")::text"

    def snapshot(self, view: str, source: str) -> str:
        """Every view row with the version of its aggregate's state, then a tombstone for every aggregate that had
        events and has no row; ``$1`` is the contract. Columns: payload (NULL for a tombstone from the versions
        table: its key is in ``key``), version, deleted, at, key."""
        if source == CAPTURED:
            return f"""
WITH rows AS (SELECT to_jsonb(v) AS row, {self._key_text('v')} AS k FROM {view} v),
known AS (
    SELECT k, max(version) AS version FROM (
        SELECT o.aggregateid AS k, o.aggregate_version AS version FROM gatehouse.outbox o
        WHERE o.aggregatetype = $1 AND o.aggregate_version > 0
        UNION ALL
        SELECT a.aggregateid, a.version FROM gatehouse.aggregate_versions a WHERE a.aggregatetype = $1
    ) AS events GROUP BY k
)
SELECT r.row::text AS payload, coalesce(kn.version, 0) AS version, false AS deleted, NULL::timestamptz AS at,
       NULL::text AS key
FROM rows r LEFT JOIN known kn ON kn.k = r.k
UNION ALL
SELECT NULL, kn.version, true, NULL, kn.k FROM known kn WHERE NOT EXISTS (SELECT 1 FROM rows r WHERE r.k = kn.k)
"""
        in_json = "jsonb_build_array(" + ", ".join("{row} -> '" + k.replace("'", "''") + "'" for k in self.key) + ")"
        return f"""
WITH latest AS (
    SELECT DISTINCT ON (k) k, version, payload, created_at
    FROM (SELECT {in_json.format(row='payload')} AS k, seq AS version, payload, created_at
          FROM gatehouse.outbox WHERE aggregatetype = $1 AND payload IS NOT NULL) o
    ORDER BY k, version DESC
), rows AS (SELECT to_jsonb(v) AS row FROM {view} v)
SELECT r.row::text AS payload, coalesce(l.version, 0) AS version, false AS deleted, l.created_at AS at,
       NULL::text AS key
FROM rows r LEFT JOIN latest l ON l.k = {in_json.format(row='r.row')}
UNION ALL
SELECT l.payload::text, l.version, true, l.created_at, NULL FROM latest l
WHERE NOT EXISTS (SELECT 1 FROM rows r WHERE {in_json.format(row='r.row')} = l.k)
"""

    def key_payload(self, key: str) -> str:
        """A payload holding only the key, from an ``aggregateid`` (the value as text, or a JSON array of them)."""
        if len(self.key) == 1:
            return json.dumps({self.key[0]: key})
        return json.dumps(dict(zip(self.key, json.loads(key), strict=True)))


def newest_per_key(events: Sequence[Event], table: Table, source: str) -> list[State]:
    """The newest state of each aggregate among ``events``: one statement may not touch a row twice, and applying
    only the newest is what applying them all in turn under the guard leaves."""
    newest: dict[str, tuple[int, Event]] = {}
    for event in events:
        version = event_version(event, source)
        if version <= 0:  # not written by the capture: it cannot be ordered, so it cannot be applied
            continue
        held = newest.get(event.key)
        if held is None or held[0] < version:
            newest[event.key] = (version, event)
    return [(e.payload if e.payload is not None else table.key_payload(e.key), v, e.type == "deleted", e.created_at)
            for v, e in newest.values()]


async def apply_states(conn: Connection, table: Table, states: Sequence[State]) -> None:
    if states:
        payloads, versions, deleted, at = (list(column) for column in zip(*states, strict=True))
        await conn.execute(table.upsert(), payloads, versions, deleted, at)
