"""The writer of the audit records that are not part of a write: queued, then stored a batch at a time.

:meth:`AuditWriter.submit` puts a record on a bounded in-memory queue, off the request path; one background task
stores the queue in batches, each one row of ``gatehouse.audit_batch`` (the records as one JSON array, with their
summaries per minute: :mod:`gatehouse.observe.audit_batches`). When the audit store is down, records go to a
bounded local *spool* (JSON lines) and are replayed, oldest first and in a single transaction, once it is back;
when the spool is full too, ``submit`` raises :class:`~gatehouse.errors.AuditUnavailable` and the caller refuses
the request.

A batch whose COMMIT was cut off (the connection died while committing) is *in doubt*: its transaction id is kept,
and after reconnecting ``pg_xact_status`` says whether to send it again. Records are therefore written exactly
once, even when the writer's backend is killed mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, NamedTuple

import asyncpg
import orjson

from gatehouse.background import stop_tasks
from gatehouse.errors import AuditUnavailable
from gatehouse.observe.audit import COLUMNS, AuditRecord, storable_record
from gatehouse.observe.audit_batches import INSERT_BATCH, encode_batch

log = logging.getLogger("gatehouse.observe.audit")

CONNECT_TIMEOUT_S = 10.0
BATCH_TIMEOUT_S = 30.0
def _to_line(record: AuditRecord) -> bytes:
    """One spool line: the record made storable first, so that a replay never stalls on it."""
    return orjson.dumps(dict(zip(COLUMNS, storable_record(record), strict=True))) + b"\n"


def _from_line(line: bytes) -> AuditRecord:
    data = orjson.loads(line)  # a line spooled before a column existed takes that column's default
    return AuditRecord(datetime.fromisoformat(data["at"]), **{c: data[c] for c in COLUMNS[1:] if c in data})


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
            self._queue.append(record)  # checked with its batch (encode_batch), not here
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
            await self._write(conn, _one(batch), _InDoubt("", batch))
            for _ in batch:
                self._queue.popleft()

    async def _write(self, conn: asyncpg.Connection, batches: AsyncIterator[list[AuditRecord]],
                     doubt: _InDoubt) -> None:
        """One transaction: store the batches, then COMMIT."""
        transaction = conn.transaction()
        await transaction.start()
        try:
            async for batch in batches:
                doubt.xid = await conn.fetchval(INSERT_BATCH, *encode_batch(batch), timeout=BATCH_TIMEOUT_S)
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
