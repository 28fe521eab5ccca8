"""The audit trail: one record per request, allowed or denied, and where it is stored.

Two stores, one trail. A write commits with its record or not at all: the record is a row of ``gatehouse.audit``,
inserted in the write's own statement (:func:`audit_cte`) when its status is known beforehand, else in the write's
transaction (:func:`audit_in_transaction`). Every other record (reads, refusals, /rpc without a write) is queued
and written off the request path by :class:`gatehouse.observe.audit_writer.AuditWriter`, a batch at a time, as one
row of ``gatehouse.audit_batch`` (the batch's records as one JSON array, with the span of their times) and, in the
same statement, its summaries in ``gatehouse.audit_minute`` (counts and durations per minute, app, target and API
version).

Why a batch is stored whole: each audit row cost PostgreSQL about 10 µs to insert (parsing, four indexes), which on
two cores was a quarter of a point lookup's database time, and the reads served 13-17 % fewer requests a second
than with the batch stored as it came (bench/README.md, twenty-third session). A packed record, its share of the
summaries included, costs PostgreSQL about 3 µs and takes a fifth of a row's room. Records are read back through
``gatehouse.audit_window(since, until[, containing])`` (rows and unpacked batches in a window, each value bounded
as :func:`storable_record` bounds a row) or the view ``gatehouse.audit_log`` (all of it); counts per minute through
``gatehouse.audit_minutes(since, until)``, exact for any window. Nothing reads ``gatehouse.audit`` alone any more.

``gatehouse.usage`` (calls, errors and last call per app, target and API version) is a view over the counts, so it
is exact and costs the writes nothing. It was a table kept by a statement-level trigger on ``gatehouse.audit``;
nothing of gatehouse read it (``gatehouse versions``, the console and ``migrate plan`` read windows of the trail:
:mod:`.usage`), and the trigger cost every insert through gatehouse 12-30 % of its throughput in PostgreSQL.
``apply`` replaces the old table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from gatehouse.db import Connection
from gatehouse.errors import AuditUnavailable as AuditUnavailable  # re-exported: it lives in the error tree
from gatehouse.observe.redact import MAX_QUERY_CHARS

COLUMNS = ("at", "request_id", "app", "key_id", "subject", "method", "target", "api_version", "query",
           "status", "rows", "duration_ms", "cached", "replica", "client")
_QUOTED = ", ".join('"' + c + '"' for c in COLUMNS)
_INSERT = f"INSERT INTO gatehouse.audit ({_QUOTED}) VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))})"
INT32_MAX = 2**31 - 1
REAL_MAX = 1e38
"""Below the largest ``real`` (about 3.4e38)."""
TEXT_LIMITS = {"request_id": 200, "app": 200, "key_id": 200, "subject": 500, "method": 16, "target": 300,
                "query": MAX_QUERY_CHARS, "client": 100}


class AuditRecord(NamedTuple):
    """One audit row, its fields in the table's column order (:data:`COLUMNS`)."""

    at: datetime
    request_id: str
    app: str
    key_id: str
    subject: str | None
    method: str
    target: str
    """The contract, or ``rpc:<name>``; empty when the request never named one that exists for the app."""
    api_version: int | None
    query: str
    """The query string, redacted with :func:`redact_query` unless the project asks for values."""
    status: int
    rows: int | None
    """Rows returned (reads) or affected (writes); None when nothing ran."""
    duration_ms: float
    cached: bool = False
    replica: bool = False
    client: str = ""
    """The caller's address (behind trusted proxies, the one they forwarded: ``[server] trusted_proxies``)."""


_TEXT_FIELDS = tuple((COLUMNS.index(name), limit) for name, limit in TEXT_LIMITS.items())


def _storable(record: AuditRecord) -> bool:
    """Whether the record can go to the table as it is: aware time, no NUL, texts and integers in bounds."""
    if record.at.tzinfo is None or not (math.isfinite(record.duration_ms) and abs(record.duration_ms) < REAL_MAX):
        return False
    value: Any
    for index, limit in _TEXT_FIELDS:
        value = record[index]
        if value is not None and (len(value) > limit or "\x00" in value):
            return False
    for value in (record.api_version, record.status, record.rows):
        if value is not None and not -INT32_MAX <= value <= INT32_MAX:
            return False
    return True


def storable_record(record: AuditRecord) -> AuditRecord:
    """The record as a row to insert, made storable whatever the caller put in it (no NUL, bounded).

    Nearly every record is storable as it is (checked in one pass); only the others are rebuilt. The batches of
    :class:`~gatehouse.observe.audit_writer.AuditWriter` skip this check (see its ``_encode``)."""
    if _storable(record):
        return record

    def text(name: str, value: str | None) -> str | None:
        return None if value is None else str(value).replace("\x00", "")[:TEXT_LIMITS[name]]

    def integer(value: int | None) -> int | None:
        return None if value is None else max(-INT32_MAX, min(INT32_MAX, int(value)))

    at = record.at if record.at.tzinfo is not None else record.at.replace(tzinfo=UTC)
    duration = float(record.duration_ms)
    return AuditRecord(
        at, text("request_id", record.request_id) or "", text("app", record.app) or "",
        text("key_id", record.key_id) or "", text("subject", record.subject), text("method", record.method) or "",
        text("target", record.target) or "", integer(record.api_version), text("query", record.query) or "",
        integer(record.status) or 0, integer(record.rows),
        duration if math.isfinite(duration) and abs(duration) < REAL_MAX else 0.0,
        bool(record.cached), bool(record.replica), text("client", record.client) or "")


async def audit_in_transaction(conn: Connection, record: AuditRecord) -> None:
    """Insert one record on ``conn``, inside the caller's (write's) transaction: both commit or neither.

    The roll-up in ``gatehouse.usage`` follows by trigger. Call it after the write's statement and before
    COMMIT; the role running it needs INSERT on ``gatehouse.audit`` and USAGE on schema ``gatehouse``.
    """
    await conn.execute(_INSERT, *storable_record(record))


_TYPES = ("timestamptz", "text", "text", "text", "text", "text", "text", "integer", "text", "integer", "integer",
          "real", "boolean", "boolean", "text")
"""The SQL type of each of :data:`COLUMNS`."""


async def audit_if_written(conn: Connection, statement: str, args: Sequence[Any], record: AuditRecord) -> bool:
    """Run ``statement`` (an ``INSERT ... RETURNING`` that may write nothing, e.g. ``ON CONFLICT DO NOTHING``) and,
    only when it wrote a row, insert ``record``: one statement, one round trip, in the caller's transaction.
    True when it wrote. (A saga step's record and its audit row: :mod:`gatehouse.sagas.steps`.)"""
    values = ", ".join(f"${len(args) + i}::{sql_type}" for i, sql_type in enumerate(_TYPES, start=1))
    sql = (f"WITH _gh_written AS ({statement}) INSERT INTO gatehouse.audit ({_QUOTED}) SELECT {values} "
           "WHERE EXISTS (SELECT FROM _gh_written) RETURNING true")
    return bool(await conn.fetchval(sql, *args, *storable_record(record)))


_CTE_TYPES = _TYPES[:10]
"""The columns ``at`` to ``status``: the values an audit CTE binds as they are."""


def _batch_value(index: int, name: str, sql_type: str) -> str:
    value = f"r->>{index}"
    if name in TEXT_LIMITS:
        value = f"left({value}, {TEXT_LIMITS[name]})"
    return f"({value})::{sql_type}"


_BATCH_VALUES = [_batch_value(i, name, t) for i, (name, t) in enumerate(zip(COLUMNS, _TYPES, strict=True))]
_DEFAULTS = {"request_id": "''", "app": "''", "key_id": "''", "method": "''", "target": "''", "query": "''",
             "status": "0", "duration_ms": "0", "cached": "false", "replica": "false", "client": "''"}
"""What a packed record's missing or null value reads as, for the columns that are ``NOT NULL`` in a row."""


def bounded_integer(number: str) -> str:
    """SQL for the ``numeric`` expression ``number`` as an ``integer``, clamped to its range as
    :func:`storable_record` clamps it; NULL stays NULL (``greatest`` would skip it, hence the ``CASE``)."""
    return f"(CASE WHEN {number} IS NOT NULL THEN least(greatest({number}, -{INT32_MAX}), {INT32_MAX}) END)::integer"


def _unpacked_value(index: int, name: str, sql_type: str) -> str:
    """One column of a packed record ``r`` (a JSON array) as :func:`storable_record` would have stored it: texts
    cut to their limits, integers clamped to ``integer``, a duration that is not a finite ``real`` 0. A batch is
    stored as the request path made its records, so these bounds are applied here, when it is read."""
    value = f"r->>{index}"
    if name in TEXT_LIMITS:
        value = f"left({value}, {TEXT_LIMITS[name]})"
    elif sql_type == "integer":
        value = bounded_integer(f"({value})::numeric")
    elif sql_type == "real":
        value = f"CASE WHEN abs(({value})::float8) < {REAL_MAX:.0e} THEN ({value})::float8::real END"
    else:
        value = f"({value})::{sql_type}"
    return f"coalesce({value}, {_DEFAULTS[name]})" if name in _DEFAULTS else value


_UNPACKED = ", ".join(f"{_unpacked_value(i, name, t)} AS \"{name}\""
                      for i, (name, t) in enumerate(zip(COLUMNS, _TYPES, strict=True)))
_RETURNS = ", ".join(f"\"{name}\" {sql_type}" for name, sql_type in zip(COLUMNS, _TYPES, strict=True))

AUDIT_DDL = f"""
CREATE SCHEMA IF NOT EXISTS gatehouse;
CREATE TABLE IF NOT EXISTS gatehouse.audit (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL,
    request_id   text NOT NULL,
    app          text NOT NULL DEFAULT '',
    key_id       text NOT NULL DEFAULT '',
    subject      text,
    method       text NOT NULL,
    target       text NOT NULL DEFAULT '',
    api_version  integer,
    query        text NOT NULL DEFAULT '',
    status       integer NOT NULL,
    "rows"       integer,
    duration_ms  real NOT NULL,
    cached       boolean NOT NULL DEFAULT false,
    replica      boolean NOT NULL DEFAULT false,
    client       text NOT NULL DEFAULT ''
);
ALTER TABLE gatehouse.audit ADD COLUMN IF NOT EXISTS client text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS audit_at_idx ON gatehouse.audit (at);
CREATE INDEX IF NOT EXISTS audit_app_at_idx ON gatehouse.audit (app, at);
CREATE INDEX IF NOT EXISTS audit_target_at_idx ON gatehouse.audit (target, at);
CREATE TABLE IF NOT EXISTS gatehouse.audit_batch (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first_at  timestamptz NOT NULL,
    last_at   timestamptz NOT NULL,
    records   text NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_batch_last_at_idx ON gatehouse.audit_batch (last_at);
CREATE TABLE IF NOT EXISTS gatehouse.audit_minute (
    batch_id       bigint NOT NULL,
    minute         timestamptz NOT NULL,
    app            text NOT NULL,
    target         text NOT NULL,
    api_version    integer,
    requests       integer NOT NULL,
    errors         integer NOT NULL,
    server_errors  integer NOT NULL,
    first_at       timestamptz NOT NULL,
    last_at        timestamptz NOT NULL,
    durations      real[] NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_minute_batch_idx ON gatehouse.audit_minute (batch_id);
DO $do$
BEGIN  -- until 2026-12: a table kept by a trigger on every audited insert (see the module's docstring)
    IF EXISTS (SELECT FROM pg_trigger
               WHERE tgrelid = 'gatehouse.audit'::regclass AND tgname = 'audit_usage_rollup') THEN
        DROP TRIGGER audit_usage_rollup ON gatehouse.audit;
    END IF;
    DROP FUNCTION IF EXISTS gatehouse.audit_usage_rollup();
    IF EXISTS (SELECT FROM pg_class WHERE oid = to_regclass('gatehouse.usage') AND relkind = 'r') THEN
        DROP TABLE gatehouse.usage;
    END IF;
END
$do$;
CREATE OR REPLACE FUNCTION gatehouse.audit_unpack(records text) RETURNS TABLE ({_RETURNS})
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT {_UNPACKED} FROM jsonb_array_elements(records::jsonb) AS r
$fn$;
CREATE OR REPLACE FUNCTION gatehouse.audit_window(since timestamptz, until timestamptz, containing text DEFAULT NULL)
RETURNS TABLE (id bigint, {_RETURNS})
LANGUAGE sql STABLE AS $fn$
    SELECT a.id, {", ".join(f'a."{name}"' for name in COLUMNS)}
    FROM gatehouse.audit AS a WHERE a.at >= $1 AND a.at < $2
    UNION ALL
    SELECT NULL::bigint, u.*
    FROM gatehouse.audit_batch AS b, gatehouse.audit_unpack(b.records) AS u
    WHERE b.last_at >= $1 AND b.first_at < $2 AND ($3 IS NULL OR strpos(b.records, $3) > 0)
      AND u.at >= $1 AND u.at < $2
$fn$;
COMMENT ON FUNCTION gatehouse.audit_window(timestamptz, timestamptz, text) IS
    'The audit records of [since, until): rows, and packed batches unpacked; containing: only batches whose JSON '
    'holds this text (a prefilter: rows are not filtered by it)';
CREATE OR REPLACE FUNCTION gatehouse.audit_minutes(since timestamptz, until timestamptz)
RETURNS TABLE (minute timestamptz, app text, target text, api_version integer, requests bigint, errors bigint,
               server_errors bigint, first_at timestamptz, last_at timestamptz, durations real[])
LANGUAGE sql STABLE AS $fn$
    SELECT m.minute, m.app, m.target, m.api_version, m.requests::bigint, m.errors::bigint, m.server_errors::bigint,
           m.first_at, m.last_at, m.durations
    FROM gatehouse.audit_batch AS b JOIN gatehouse.audit_minute AS m ON m.batch_id = b.id
    WHERE b.last_at >= $1 AND b.last_at < $2 AND b.first_at >= $1
    UNION ALL
    SELECT date_trunc('minute', r.at), r.app, r.target, r.api_version, count(*),
           count(*) FILTER (WHERE r.status >= 400), count(*) FILTER (WHERE r.status >= 500), min(r.at), max(r.at),
           array_agg(r.duration_ms)
    FROM (
        SELECT a.at, a.app, a.target, a.api_version, a.status, a.duration_ms
        FROM gatehouse.audit AS a WHERE a.at >= $1 AND a.at < $2
        UNION ALL
        SELECT u.at, u.app, u.target, u.api_version, u.status, u.duration_ms
        FROM gatehouse.audit_batch AS b, gatehouse.audit_unpack(b.records) AS u
        WHERE b.last_at >= $1 AND b.first_at < $2 AND (b.first_at < $1 OR b.last_at >= $2)
          AND u.at >= $1 AND u.at < $2
    ) AS r
    GROUP BY 1, 2, 3, 4
$fn$;
COMMENT ON FUNCTION gatehouse.audit_minutes(timestamptz, timestamptz) IS
    'The audit records of [since, until) counted per minute, app, target and API version (several lines may share '
    'a key: add them up): the summaries of the batches inside the window, the rest counted from the records';
CREATE OR REPLACE VIEW gatehouse.audit_log AS
    SELECT * FROM gatehouse.audit_window('-infinity', 'infinity');
CREATE OR REPLACE VIEW gatehouse.usage AS
    SELECT app, target, coalesce(api_version, 0) AS api_version, sum(requests)::bigint AS calls,
           sum(errors)::bigint AS errors, max(last_at) AS last_call
    FROM gatehouse.audit_minutes('-infinity', 'infinity')
    GROUP BY 1, 2, 3;
"""
"""gatehouse's audit tables, the reading function and the views over them (idempotent: run by every bootstrap)."""


def audit_cte(record: AuditRecord, bind: Callable[[object], str], written: str) -> str:
    """A CTE that inserts ``record`` as part of a write's own statement (``WITH ..., <this> SELECT ...``).

    Its ``rows`` is the number of rows in the ``written`` CTE, and its duration the record's (time until the
    statement was sent) plus the statement's own run time on the server's clock. A write that needs no
    checks after its statement then commits with its record in one round trip, instead of four (BEGIN,
    statement, audit insert, COMMIT); if the statement fails, neither is kept."""
    values = _cte_values(storable_record(record))
    head = [f"{bind(value)}::{sql_type}" for value, sql_type in zip(values, _CTE_TYPES, strict=False)]
    run_ms = "(extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::real"
    return (f"_gh_audit AS (INSERT INTO gatehouse.audit ({_QUOTED}) VALUES ({', '.join(head)}, "
            f"(SELECT least(count(*), {INT32_MAX})::integer FROM {written}), {bind(values[10])}::real + {run_ms}, "
            f"{bind(values[11])}::boolean, {bind(values[12])}::boolean, {bind(values[13])}::text))")


def audit_batch_cte(param: str) -> str:
    """A CTE that inserts the records of a JSON array (``param``, a placeholder: the members' shares from
    :func:`planned_insert_audit`, joined) as part of a write's statement: the audit of a group of inserts run as one
    statement (:class:`gatehouse.db.statement_groups.Merge`). Each record's duration gains the statement's run time."""
    values = list(_BATCH_VALUES)
    run_ms = "(extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::real"
    values[COLUMNS.index("duration_ms")] += f" + {run_ms}"
    return (f"_gh_audit AS (INSERT INTO gatehouse.audit ({_QUOTED}) SELECT {', '.join(values)} "
            f"FROM jsonb_array_elements({param}::jsonb) AS r)")


def planned_insert_audit(record: AuditRecord, rows: int | None) -> tuple[list[object], str | None]:
    """The record of an insert planned from its template, made storable once: the parameters :func:`audit_cte`
    binds, for its own statement, and with ``rows`` (None: it will not be merged) its share of a merged group's
    :func:`audit_batch_cte`, a JSON array of it alone with ``rows`` written (a count of rows sent, in bounds)."""
    row = storable_record(record)
    values = _cte_values(row)
    if rows is None:
        return values, None
    shared = (*row[:_ROWS], rows, *row[_ROWS + 1:])  # (a plain tuple: orjson writes it as it is, and _replace is slow)
    return values, orjson.dumps((shared,), option=orjson.OPT_NAIVE_UTC).decode()


AUDIT_CTE_PARAMS = 14
"""How many parameters :func:`audit_cte` binds, one after the other."""


_ROWS = COLUMNS.index("rows")


def _cte_values(row: AuditRecord) -> list[object]:
    """The parameters :func:`audit_cte` binds for a storable record (:func:`storable_record`), in its order: every
    column but ``rows``, which the statement counts. A write statement compiled once takes each later request's
    record in their place (:func:`planned_insert_audit`)."""
    return [*row[:_ROWS], *row[_ROWS + 1:]]
