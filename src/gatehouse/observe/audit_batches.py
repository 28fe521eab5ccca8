"""An audit batch as it is stored: one row of ``gatehouse.audit_batch`` holding its records as one JSON array, and
in the same statement its summaries, one row of ``gatehouse.audit_minute`` per minute, app, target and API version.

The writer (:mod:`gatehouse.observe.audit_writer`) decides when a batch is stored and what happens when it cannot
be; this module only says what is stored, and makes it cheaply on the event loop's thread.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from gatehouse.observe.audit import REAL_MAX, TEXT_LIMITS, AuditRecord, bounded_integer, storable_record

_MINUTE = timedelta(minutes=1)
INSERT_BATCH = f"""
WITH batch AS (
    INSERT INTO gatehouse.audit_batch (first_at, last_at, records) VALUES ($1, $2, $3) RETURNING id
), minutes AS (
    INSERT INTO gatehouse.audit_minute (batch_id, minute, app, target, api_version, requests, errors, server_errors,
                                        first_at, last_at, durations)
    SELECT batch.id, m.minute, left(m.app, {TEXT_LIMITS["app"]}), left(m.target, {TEXT_LIMITS["target"]}),
           {bounded_integer("m.api_version")},
           m.requests, m.errors, m.server_errors, m.first_at, m.last_at, m.durations
    FROM batch, jsonb_to_recordset($4::jsonb) AS m(minute timestamptz, app text, target text, api_version numeric,
        requests integer, errors integer, server_errors integer, first_at timestamptz, last_at timestamptz,
        durations real[])
)
SELECT pg_current_xact_id()::text
"""
"""One batch, stored whole (:func:`encode_batch`), with its per-minute summaries: what the console's traffic chart,
``gatehouse versions`` and ``migrate plan`` count without unpacking a record. Measured per record on the bench
machine: PostgreSQL 2.5-3.0 µs (the row of ``gatehouse.audit`` that each record was, parsed out of the same JSON
and indexed four times, cost it 9-10, and asyncpg's binary COPY 7 plus 4 of the event loop's thread), the event
loop's thread 0.8 µs to encode and count it; 39 bytes on disk, summaries included, against 197 for a row
(bench/README.md, twenty-third session)."""


def _minutes(batch: list[AuditRecord]) -> tuple[datetime, datetime, list[dict[str, Any]]]:
    """The batch's earliest and latest time and its summaries: requests, errors (status 400 and up), server errors
    (500 and up), first and last time and every duration per minute, app, target and API version. Naive times are
    UTC; a duration that is not a finite ``real`` counts as 0, as in a row.

    This runs on the event loop's thread for every record, so it does little per record: a record like the one
    before it (the same app, target, version and minute: most of them) only adds to its group."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    group: list[Any] = []
    app: str | None = None
    target: str | None = None
    version: int | None = None
    start = end = datetime.min.replace(tzinfo=UTC)  # no minute yet: the first record starts a group
    for record in batch:
        at = record.at if record.at.tzinfo is not None else record.at.replace(tzinfo=UTC)
        if record.app != app or record.target != target or record.api_version != version or not start <= at < end:
            app, target, version = record.app, record.target, record.api_version
            start = at.replace(second=0, microsecond=0)
            end = start + _MINUTE
            key = (start, app, target, version)
            found = groups.get(key)
            if found is None:
                groups[key] = group = [0, 0, 0, at, at, []]
            else:
                group = found
        group[0] += 1
        if record.status >= 400:
            group[1] += 1
            if record.status >= 500:
                group[2] += 1
        if at < group[3]:
            group[3] = at
        elif at > group[4]:
            group[4] = at
        duration = record.duration_ms
        group[5].append(duration if -REAL_MAX < duration < REAL_MAX else 0.0)  # NaN too
    summaries = [{"minute": minute, "app": app, "target": target, "api_version": version, "requests": group[0],
                  "errors": group[1], "server_errors": group[2], "first_at": group[3], "last_at": group[4],
                  "durations": group[5]} for (minute, app, target, version), group in groups.items()]
    return min(g[3] for g in groups.values()), max(g[4] for g in groups.values()), summaries


def encode_batch(batch: list[AuditRecord]) -> tuple[datetime, datetime, str, str]:
    """The parameters of :data:`INSERT_BATCH`: the batch's span, its records as one JSON array of arrays, as the
    request path made them, and its summaries (:func:`_minutes`).

    Checking each record (:func:`~gatehouse.observe.audit.storable_record`) cost the event loop's thread more than
    the rest of its audit, so the batch is checked as a whole: texts are cut to their limits and numbers bounded
    when it is read (``gatehouse.audit_unpack``), and only what cannot be stored at all rebuilds every record: a
    NUL (which PostgreSQL's JSON cannot read back) or an integer beyond 64 bits. Naive times are UTC."""
    try:
        data = orjson.dumps(batch, default=tuple, option=orjson.OPT_NAIVE_UTC)  # default: AuditRecord is a tuple
        if b"\\u0000" not in data:  # a NUL, which PostgreSQL's text cannot hold
            return _with_minutes(batch, data)
    except (orjson.JSONEncodeError, TypeError):  # an integer beyond 64 bits, a status that is not a number
        pass
    storable = [storable_record(record) for record in batch]
    return _with_minutes(storable, orjson.dumps(storable, default=tuple))


def _with_minutes(batch: list[AuditRecord], data: bytes) -> tuple[datetime, datetime, str, str]:
    first, last, summaries = _minutes(batch)
    return first, last, data.decode(), orjson.dumps(summaries).decode()
