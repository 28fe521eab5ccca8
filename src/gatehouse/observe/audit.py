"""The audit trail: one record per request, allowed or denied.

Reads are audited off the request path: :meth:`AuditWriter.submit` puts the record on a bounded in-memory
queue and one background task writes the queue in batches (one ``INSERT`` of a JSON array). When the audit
store is down, records go to a bounded local *spool* (JSON lines) and are replayed, oldest first and in a
single transaction, once it is back; when the spool is full too, ``submit`` raises :class:`AuditUnavailable`
and the caller refuses the request. A write commits with its record or not at all: the record rides in the
write's own statement (:func:`audit_cte`) when its status is known beforehand, else it is inserted in the
write's transaction (:func:`audit_in_transaction`).

``gatehouse.usage`` (calls, errors and last call per app, target and API version) is a view over the audit rows,
so it is exact and costs the writes nothing. It was a table kept by a statement-level trigger on
``gatehouse.audit``, in every write's transaction; nothing of gatehouse read it (``gatehouse versions``, the
console and ``migrate plan`` read windows of the audit rows: :mod:`.usage`), and the trigger cost every insert
through gatehouse 12-30 % of its throughput in PostgreSQL (bench/README.md). ``apply`` replaces the old table.

A batch whose COMMIT was cut off (the connection died while committing) is *in doubt*: its transaction id
is kept, and after reconnecting ``pg_xact_status`` says whether to send it again. Records are therefore
written exactly once, even when the writer's backend is killed mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import asyncpg
import orjson

from gatehouse.background import stop_tasks
from gatehouse.db import Connection
from gatehouse.errors import AuditUnavailable as AuditUnavailable  # re-exported: it lives in the error tree
from gatehouse.observe.redact import MAX_QUERY_CHARS

log = logging.getLogger(__name__)

AUDIT_DDL = """
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
CREATE OR REPLACE VIEW gatehouse.usage AS
    SELECT app, target, coalesce(api_version, 0) AS api_version, count(*) AS calls,
           count(*) FILTER (WHERE status >= 400) AS errors, max(at) AS last_call
    FROM gatehouse.audit
    GROUP BY 1, 2, 3;
"""

COLUMNS = ("at", "request_id", "app", "key_id", "subject", "method", "target", "api_version", "query",
           "status", "rows", "duration_ms", "cached", "replica", "client")
_QUOTED = ", ".join('"' + c + '"' for c in COLUMNS)
_INSERT = f"INSERT INTO gatehouse.audit ({_QUOTED}) VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))})"
_INT32 = 2**31 - 1
_REAL_MAX = 1e38
"""Below the largest ``real`` (about 3.4e38)."""
_TEXT_LIMITS = {"request_id": 200, "app": 200, "key_id": 200, "subject": 500, "method": 16, "target": 300,
                "query": MAX_QUERY_CHARS, "client": 100}
CONNECT_TIMEOUT_S = 10.0
BATCH_TIMEOUT_S = 30.0


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


_TEXT_FIELDS = tuple((COLUMNS.index(name), limit) for name, limit in _TEXT_LIMITS.items())


def _storable(record: AuditRecord) -> bool:
    """Whether the record can go to the table as it is: aware time, no NUL, texts and integers in bounds."""
    if record.at.tzinfo is None or not (math.isfinite(record.duration_ms) and abs(record.duration_ms) < _REAL_MAX):
        return False
    value: Any
    for index, limit in _TEXT_FIELDS:
        value = record[index]
        if value is not None and (len(value) > limit or "\x00" in value):
            return False
    for value in (record.api_version, record.status, record.rows):
        if value is not None and not -_INT32 <= value <= _INT32:
            return False
    return True


def _row(record: AuditRecord) -> AuditRecord:
    """The record as a row to insert, made storable whatever the caller put in it (no NUL, bounded).

    Nearly every record is storable as it is (checked in one pass); only the others are rebuilt. The batches of
    :class:`AuditWriter` skip this check (see :func:`_batch_json`)."""
    if _storable(record):
        return record

    def text(name: str, value: str | None) -> str | None:
        return None if value is None else str(value).replace("\x00", "")[:_TEXT_LIMITS[name]]

    def integer(value: int | None) -> int | None:
        return None if value is None else max(-_INT32, min(_INT32, int(value)))

    at = record.at if record.at.tzinfo is not None else record.at.replace(tzinfo=UTC)
    duration = float(record.duration_ms)
    return AuditRecord(
        at, text("request_id", record.request_id) or "", text("app", record.app) or "",
        text("key_id", record.key_id) or "", text("subject", record.subject), text("method", record.method) or "",
        text("target", record.target) or "", integer(record.api_version), text("query", record.query) or "",
        integer(record.status) or 0, integer(record.rows),
        duration if math.isfinite(duration) and abs(duration) < _REAL_MAX else 0.0,
        bool(record.cached), bool(record.replica), text("client", record.client) or "")


def _to_line(record: AuditRecord) -> bytes:
    """One spool line: the record made storable first, so that a replay never stalls on it."""
    return orjson.dumps(dict(zip(COLUMNS, _row(record), strict=True))) + b"\n"


def _from_line(line: bytes) -> AuditRecord:
    data = orjson.loads(line)  # a line spooled before a column existed takes that column's default
    return AuditRecord(datetime.fromisoformat(data["at"]), **{c: data[c] for c in COLUMNS[1:] if c in data})


async def audit_in_transaction(conn: Connection, record: AuditRecord) -> None:
    """Insert one record on ``conn``, inside the caller's (write's) transaction: both commit or neither.

    The roll-up in ``gatehouse.usage`` follows by trigger. Call it after the write's statement and before
    COMMIT; the role running it needs INSERT on ``gatehouse.audit`` and USAGE on schema ``gatehouse``.
    """
    await conn.execute(_INSERT, *_row(record))


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
    return bool(await conn.fetchval(sql, *args, *_row(record)))
_CTE_TYPES = _TYPES[:10]
"""The columns ``at`` to ``status``: the values an audit CTE binds as they are."""


def _batch_value(index: int, name: str, sql_type: str) -> str:
    value = f"r->>{index}"
    if name in _TEXT_LIMITS:
        value = f"left({value}, {_TEXT_LIMITS[name]})"
    return f"({value})::{sql_type}"


_BATCH_VALUES = [_batch_value(i, name, t) for i, (name, t) in enumerate(zip(COLUMNS, _TYPES, strict=True))]
_INSERT_BATCH = (f"WITH _gh_batch AS (INSERT INTO gatehouse.audit ({_QUOTED}) SELECT {', '.join(_BATCH_VALUES)} "
                 "FROM jsonb_array_elements($1::jsonb) AS r) SELECT pg_current_xact_id()::text")
"""A batch of rows as one JSON array of arrays (:func:`_batch_json`); texts are cut to their limits here. Measured
per row: orjson's encoding costs the event loop's thread (which also serves the requests) about 1.6 µs, asyncpg's
binary COPY about 3.5 µs; PostgreSQL's side is 8 µs against 6 for COPY on the bench machine (10-20 on slower
ones), nearly half of it the indexes on (app, at) and (target, at)."""
_REFUSED_VALUE = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
"""What PostgreSQL answers a batch holding a number out of range or a NaN duration (NULL in JSON)."""


def _batch_json(batch: list[AuditRecord]) -> str:
    """The batch as one JSON array for :data:`_INSERT_BATCH`, records as the request path made them.

    Checking each record on the request path (:func:`_row`) cost the event loop's thread more than the rest of
    its audit, so the batch is checked as a whole instead: PostgreSQL cuts the texts to their limits, a NUL (which
    its text type cannot hold) is found in the encoded batch, and a number it refuses fails the statement, which
    :meth:`AuditWriter._step` then sends again with every record made storable. Naive times are taken as UTC,
    as :func:`_row` does."""
    try:
        data = orjson.dumps(batch, default=tuple, option=orjson.OPT_NAIVE_UTC)  # default: AuditRecord is a tuple
        storable = b"\\u0000" not in data  # a NUL, which PostgreSQL's text cannot hold
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        storable = False
    if not storable:
        data = orjson.dumps([_row(record) for record in batch], default=tuple)
    return data.decode()


def audit_cte(record: AuditRecord, bind: Callable[[object], str], written: str) -> str:
    """A CTE that inserts ``record`` as part of a write's own statement (``WITH ..., <this> SELECT ...``).

    Its ``rows`` is the number of rows in the ``written`` CTE, and its duration the record's (time until the
    statement was sent) plus the statement's own run time on the server's clock. A write that needs no
    checks after its statement then commits with its record in one round trip, instead of four (BEGIN,
    statement, audit insert, COMMIT); if the statement fails, neither is kept."""
    values = _cte_values(_row(record))
    head = [f"{bind(value)}::{sql_type}" for value, sql_type in zip(values, _CTE_TYPES, strict=False)]
    run_ms = "(extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::real"
    return (f"_gh_audit AS (INSERT INTO gatehouse.audit ({_QUOTED}) VALUES ({', '.join(head)}, "
            f"(SELECT least(count(*), {_INT32})::integer FROM {written}), {bind(values[10])}::real + {run_ms}, "
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
    row = _row(record)
    values = _cte_values(row)
    if rows is None:
        return values, None
    return values, orjson.dumps((row._replace(rows=rows),), default=tuple, option=orjson.OPT_NAIVE_UTC).decode()


AUDIT_CTE_PARAMS = 14
"""How many parameters :func:`audit_cte` binds, one after the other."""


_ROWS = COLUMNS.index("rows")


def _cte_values(row: AuditRecord) -> list[object]:
    """The parameters :func:`audit_cte` binds for a storable record (:func:`_row`), in its order: every column but
    ``rows``, which the statement counts. A write statement compiled once takes each later request's record in
    their place (:func:`planned_insert_audit`)."""
    return [*row[:_ROWS], *row[_ROWS + 1:]]


# --- the writer --------------------------------------------------------------------------------------


def _open_private(path: Path, flag: int) -> BinaryIO:
    """Open for writing, readable by this user only (the spool holds who called what)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | flag, 0o600), "ab" if flag == os.O_APPEND else "wb")


class Pending(NamedTuple):
    queued: int
    spooled: int

    @property
    def total(self) -> int:
        return self.queued + self.spooled


@dataclass(slots=True)
class _InDoubt:
    """A batch whose COMMIT got no answer: settled by ``pg_xact_status`` after reconnecting."""

    xid: str
    records: list[AuditRecord]
    spool_bytes: int = 0
    spool_lines: int = 0


async def _one(batch: list[AuditRecord]) -> AsyncIterator[list[AuditRecord]]:
    yield batch


FLUSH_ROWS = 128
"""Records that start a batch at once, without waiting for the flush interval (:class:`AuditWriter`)."""


class AuditWriter:
    """Writes the queued records in batches, off the request path (see the module's docstring).

    A batch goes out once ``flush_rows`` records wait, or ``flush_interval_s`` after the first one, and takes up
    to ``batch_size`` of the records then queued. Small batches while the writer keeps up: PostgreSQL spends
    about 8 µs on each row (nearly half of it the table's indexes), so a batch of 500 held one of the bench
    machine's two cores for 4 ms, and the reads queued behind it set the p99 (point lookups 4.8-5.4 ms against
    3.2-3.5 with batches of 128, the same throughput; 64 cost 5 % of it; bench/README.md). Large ones once it falls
    behind: a batch of 500 costs one round trip and one commit, so the writer still keeps up with a burst.
    """

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], spool_path: Path, *,
                 max_queue: int = 10_000, batch_size: int = 500, flush_rows: int = FLUSH_ROWS,
                 flush_interval_s: float = 0.2, max_spool_bytes: int = 64 * 1024 * 1024,
                 max_backoff_s: float = 5.0) -> None:
        self._connect = connect
        self._spool_path = Path(spool_path)
        self._max_queue, self._batch_size = max_queue, batch_size
        self._flush_rows = min(flush_rows, batch_size)
        self._flush_interval_s, self._max_backoff_s = flush_interval_s, max_backoff_s
        self._max_spool_bytes = max_spool_bytes
        self._queue: deque[AuditRecord] = deque()
        self._spool: BinaryIO | None = None  # the append handle, opened on first use
        self._spool_bytes = self._spool_lines = 0
        self._in_doubt: _InDoubt | None = None
        self._conn: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failures = 0

    def start(self) -> None:
        """Count what an earlier run left in the spool (replayed first) and start the writer task."""
        if self._task is not None:
            return
        self._stopping = False
        if self._spool_path.exists():
            data = self._spool_path.read_bytes()
            if data and not data.endswith(b"\n"):  # a line cut short by a crash: keep it apart from new ones
                with self._spool_path.open("ab") as spool:
                    spool.write(b"\n")
                data += b"\n"
            self._spool_lines, self._spool_bytes = data.count(b"\n"), len(data)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gatehouse-audit-writer")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Write everything out, or spool what the store would not take (even past the bound), and stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                await stop_tasks([self._task])
            self._task = None
        if self._in_doubt is not None:
            log.warning("audit: %d records may be written twice (commit unconfirmed at shutdown)",
                        len(self._in_doubt.records) or self._in_doubt.spool_lines)
            self._queue.extendleft(reversed(self._in_doubt.records))
            self._in_doubt = None
        self._spill(unbounded=True)
        await self._drop_connection()
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def pending(self) -> Pending:
        doubt = len(self._in_doubt.records) if self._in_doubt else 0
        return Pending(len(self._queue) + doubt, self._spool_lines)

    def accepting(self) -> bool:
        """Whether :meth:`submit` would take a record now (check before serving, to refuse early)."""
        return (self._task is not None and len(self._queue) < self._max_queue) or (
            self._spool_bytes + 4096 <= self._max_spool_bytes)

    def submit(self, record: AuditRecord) -> None:
        """Take a record without waiting. Raises :class:`AuditUnavailable` only when queue and spool are full."""
        if self._task is not None and len(self._queue) < self._max_queue:
            self._queue.append(record)  # checked with its batch (_batch_json), not here
            if len(self._queue) == 1 or len(self._queue) >= self._flush_rows:
                self._wake.set()
            return
        if not self._append_spool([record], unbounded=False):
            raise AuditUnavailable()
        self._wake.set()

    # -- spool --

    def _append_spool(self, records: list[AuditRecord], *, unbounded: bool) -> bool:
        data = b"".join(_to_line(record) for record in records)
        if not unbounded and self._spool_bytes + len(data) > self._max_spool_bytes:
            return False
        try:
            if self._spool is None:
                self._spool_path.parent.mkdir(parents=True, exist_ok=True)
                self._spool = _open_private(self._spool_path, os.O_APPEND)
            self._spool.write(data)
            self._spool.flush()
        except OSError as exc:
            log.error("audit: cannot write the spool %s: %s", self._spool_path, exc)
            return False
        self._spool_bytes += len(data)
        self._spool_lines += len(records)
        return True

    def _spill(self, *, unbounded: bool) -> None:
        """Move queued records to the spool, oldest first, as far as it holds them."""
        while self._queue:
            row = self._queue[0]
            if not self._append_spool([row], unbounded=unbounded):
                return
            self._queue.popleft()

    def _forget_spooled(self, upto: int, lines: int) -> None:
        """Drop the first ``upto`` bytes of the spool (committed); keep what was appended since."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        with self._spool_path.open("rb") as spool:
            spool.seek(upto)
            tail = spool.read()
        temporary = self._spool_path.with_name(self._spool_path.name + ".tmp")
        with _open_private(temporary, os.O_TRUNC) as out:
            out.write(tail)
        os.replace(temporary, self._spool_path)
        self._spool_bytes, self._spool_lines = len(tail), max(0, self._spool_lines - lines)

    async def _spooled(self, upto: int) -> AsyncGenerator[list[AuditRecord], None]:
        """The spool's records up to byte ``upto``, in batches (memory stays flat)."""
        offset = 0
        batch: list[AuditRecord] = []
        with self._spool_path.open("rb") as spool:
            for line in spool:
                offset += len(line)
                if offset > upto:
                    break
                try:
                    batch.append(_from_line(line))
                except (ValueError, KeyError, TypeError):
                    log.error("audit: skipped a damaged line of the spool %s", self._spool_path)
                if len(batch) == self._batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    # -- writing --

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if backoff:
                await self._sleep(backoff)
            elif not self._has_work():
                if self._stopping:
                    return
                await self._sleep(None)
                continue
            elif not (self._stopping or self._in_doubt or self._spool_lines or len(self._queue) >= self._flush_rows):
                await self._sleep(self._flush_interval_s)
            try:
                await self._step()
            except Exception as exc:  # the writer outlives any failure of the store
                await self._drop_connection()
                self._failures += 1
                if self._failures == 1:
                    log.warning("audit store unavailable (%s); retrying, then spooling to %s",
                                type(exc).__name__, self._spool_path)
                if self._failures > 1 or self._stopping:  # down, not a blip: move the queue to disk
                    self._spill(unbounded=self._stopping)
                if self._stopping:
                    return
                backoff = min(max(backoff * 2, 0.05), self._max_backoff_s)
            else:
                if self._failures:
                    log.info("audit store is back")
                self._failures, backoff = 0, 0.0

    def _has_work(self) -> bool:
        return bool(self._queue or self._spool_lines or self._in_doubt)

    async def _sleep(self, seconds: float | None) -> None:
        if self._stopping:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()

    async def _step(self) -> None:
        if self._conn is None or self._conn.is_closed():
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                self._conn = await self._connect()
        conn = self._conn
        if self._in_doubt is not None:
            await self._settle(conn, self._in_doubt)
        elif self._spool_lines:  # oldest first, in one transaction: the spool is emptied only once it committed
            upto, lines = self._spool_bytes, self._spool_lines
            async with contextlib.aclosing(self._spooled(upto)) as batches:
                await self._write(conn, batches, _InDoubt("", [], upto, lines))
            self._forget_spooled(upto, lines)
        elif self._queue:
            batch = list(itertools.islice(self._queue, self._batch_size))
            try:
                await self._write(conn, _one(batch), _InDoubt("", batch))
            except _REFUSED_VALUE:  # a record PostgreSQL cannot take: the batch again, each record made storable
                log.warning("audit: a batch held a value the store refused; storing its records trimmed to fit")
                storable = [_row(record) for record in batch]
                await self._write(conn, _one(storable), _InDoubt("", batch))
            for _ in batch:
                self._queue.popleft()

    async def _write(self, conn: asyncpg.Connection, batches: AsyncIterator[list[AuditRecord]],
                     doubt: _InDoubt) -> None:
        """One transaction: insert the batches (the trigger adds them to the roll-up), then COMMIT."""
        transaction = conn.transaction()
        await transaction.start()
        try:
            async for batch in batches:
                doubt.xid = await conn.fetchval(_INSERT_BATCH, _batch_json(batch), timeout=BATCH_TIMEOUT_S)
            if not doubt.xid:  # nothing to insert (damaged spool lines only)
                doubt.xid = await conn.fetchval("SELECT pg_current_xact_id()::text")
        except BaseException:
            with contextlib.suppress(Exception):
                await transaction.rollback()
            raise
        try:
            await transaction.commit()
        except BaseException:
            if doubt.records:
                for _ in doubt.records:  # out of the queue: the settlement decides whether they go back
                    self._queue.popleft()
            self._in_doubt = doubt
            raise

    async def _settle(self, conn: asyncpg.Connection, doubt: _InDoubt) -> None:
        status = await conn.fetchval("SELECT pg_xact_status($1::text::xid8)", doubt.xid)
        if status == "in progress":
            raise RuntimeError("the unconfirmed audit batch is still in progress")
        self._in_doubt = None
        if status == "committed":
            if doubt.spool_bytes:
                self._forget_spooled(doubt.spool_bytes, doubt.spool_lines)
            return
        log.warning("audit: batch of transaction %s was %s; sending it again", doubt.xid, status or "forgotten")
        self._queue.extendleft(reversed(doubt.records))
