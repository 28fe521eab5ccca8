"""Batched data migrations: a backfill in many short transactions, so no reader or writer waits for it.

A 50,000-row ``UPDATE`` in the same transaction as the ``ALTER TABLE`` that made it necessary keeps the
``ACCESS EXCLUSIVE`` lock of the ``ALTER`` until the last row is written: every reader of the table waits
seconds, and an app with a 1 s statement timeout fails. A file whose first line is ``-- gatehouse: batch``
(or ``-- gatehouse: batch 5000``: the batch size, 1000 by default) instead holds one ``UPDATE`` or
``DELETE`` whose rows come from a subquery bounded by ``LIMIT :batch_size`` that selects only rows not yet
done::

    -- gatehouse: batch 1000
    UPDATE products SET title = name
    WHERE id IN (SELECT id FROM products WHERE title IS NULL LIMIT :batch_size FOR UPDATE SKIP LOCKED);

:func:`run_batches` runs it again and again, each batch in its own transaction, until a batch changes no
row; then the migration is recorded in the history. A batch holds only a ``ROW EXCLUSIVE`` lock on the table
(readers never wait for it) and locks its own rows for the few milliseconds it runs. So that it never sits
in the lock queue with its rows locked, it runs with ``lock_timeout`` (:data:`LOCK_TIMEOUT_MS`); a batch
that waited too long, or lost a deadlock, is tried again after a pause that doubles each time, up to
:data:`ATTEMPTS` times. ``statement_timeout`` (:data:`STATEMENT_TIMEOUT_MS`) stops a batch too slow to be
one (a missing index makes each batch scan the table).

* **A crash loses nothing.** Committed batches stay, the migration is not recorded, and the next run starts
  the statement again: its WHERE leaves out the rows already done. A failure is recorded as retryable (not
  as a partial change to undo by hand): the next ``migrate`` continues, and the file may still be edited.
* **No endless loop.** A WHERE that does not leave out done rows would change rows forever. The table's rows
  are counted (``count(*)``) when the run starts; more rows changed than twice that plus ten batches stops
  the run with an error. An exact count, not ``pg_class.reltuples``: that estimate is -1 or stale until
  ANALYZE runs (a table filled by the previous migration), and a low estimate would stop a correct backfill
  halfway. The count reads the table once, as every backfill does anyway, and takes no lock a reader or
  writer waits for. Twice leaves room for rows the apps insert meanwhile (they may need the backfill too).
* **SKIP LOCKED does not end a run early.** A batch that skips locked rows changes none when all the rows
  left are locked by an app's transaction at that moment; then the same batch runs once more *without*
  ``SKIP LOCKED`` (waiting for those locks, within ``lock_timeout``), and the run ends only when that one
  changes no row either.
* **``migrate plan``** runs the pending migrations in one transaction that is rolled back. Batches cannot
  commit there, and running the backfill as one statement would bring back the very lock this module avoids
  (the plan holds the locks of the migrations before it, an ``ALTER TABLE``'s included, until it rolls back;
  and ``migrate`` plans before it applies). So the plan runs the statement with a batch of 0 rows
  (:func:`try_in_transaction`): PostgreSQL checks it against the migrated schema (a misspelled column fails
  the plan) and no row is read, locked or changed; the file is listed among those not tried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from gatehouse.db.changes import announce
from gatehouse.errors import ProjectError
from gatehouse.migrate.files import (
    CHECKSUM_ALGORITHM,
    DEFAULT_BATCH_SIZE,
    BatchStatement,
    Migration,
    MigrationFailed,
    batch_statement,
)
from gatehouse.migrate.history import record

LOCK_TIMEOUT_MS = 1000
"""How long one batch waits for a lock (the table's, or a row an app has locked) before it is tried again."""
STATEMENT_TIMEOUT_MS = 5000
"""How long one batch may run: its rows stay locked that long, and writers of those rows wait."""
ATTEMPTS = 10
FIRST_PAUSE, LONGEST_PAUSE = 0.1, 5.0
RETRIED = (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
GUARD_BATCHES = 10
"""The endless-loop guard allows twice the table's rows at the start plus this many batches."""


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """Where a run stands, handed to the ``progress`` callback after each committed batch."""

    migration: Migration
    batches: int
    rows: int  # changed by this run so far
    table_rows: int  # in the table when this run started
    retries: int  # batches tried again after a lock wait or a deadlock


Progress = Callable[[BatchProgress], None]


async def try_in_transaction(conn: asyncpg.Connection, migration: Migration) -> None:
    """In ``migrate plan``'s transaction: run the statement with a batch of 0 rows, so PostgreSQL checks it
    against the schema the earlier migrations made, without reading, locking or changing a row. The table's
    lock is waited for at most :data:`LOCK_TIMEOUT_MS`, as a batch would; if it is not had by then, the plan
    goes on without the check (the locks the plan holds meanwhile would make others wait)."""
    target = batch_statement(migration.path, migration.sql)
    sent = target.sql(0)
    before = await conn.fetchval("SELECT current_setting('lock_timeout')")
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
            await conn.execute(sent)
    except asyncpg.LockNotAvailableError:
        return  # the savepoint's rollback undid the SET
    except asyncpg.PostgresError as error:
        raise MigrationFailed(migration, error, line=target.line_of(error, sent)) from error
    await conn.execute("SELECT set_config('lock_timeout', $1, true)", before)  # the plan's own, for what follows


async def run_batches(conn: asyncpg.Connection, migration: Migration, *, progress: Progress | None = None) -> float:
    """Run a batch migration to the end and record it; returns how long it took (seconds). Call it outside a
    transaction, under the migration lock."""
    started = time.perf_counter()
    target = batch_statement(migration.path, migration.sql)
    size = migration.batch_size or DEFAULT_BATCH_SIZE
    done = BatchProgress(migration, 0, 0, 0, 0)
    sent = ""
    try:
        done = BatchProgress(migration, 0, 0, await _count(conn, target.table), 0)
        bound = 2 * done.table_rows + GUARD_BATCHES * size
        sweeping = False  # the last batch skipped locked rows and changed none: now wait for those rows
        while True:
            sent = target.sql(size, skip_locked=not sweeping)
            changed, retries = await _batch(conn, sent)
            done = BatchProgress(migration, done.batches + int(changed > 0), done.rows + changed, done.table_rows,
                                 done.retries + retries)
            if changed == 0 and (sweeping or not target.skips_locked):
                break
            sweeping = changed == 0
            if done.rows > bound:
                raise EndlessBatches(migration, target, done)
            if changed and progress is not None:
                progress(done)
    except asyncpg.PostgresError as error:
        line = target.line_of(error, sent) if sent else target.statement.line
        failure = MigrationFailed(migration, error, line=line)
        failure.hint = _hint(error, target, size, done)
        await _record(conn, migration, started, failure, failure.reason)
        raise failure from error
    except EndlessBatches as endless:
        await _record(conn, migration, started, endless, str(endless.args[0]))
        raise
    await _record(conn, migration, started)
    await announce(conn, f"migration {migration.label}")  # as every migration that commits does
    return time.perf_counter() - started


class EndlessBatches(ProjectError):
    """The batches changed more rows than the table can need: the WHERE does not leave out done rows."""

    def __init__(self, migration: Migration, target: BatchStatement, done: BatchProgress) -> None:
        super().__init__(
            f"migration {migration.label} stopped after changing {done.rows:,} rows in {done.batches:,} batches, "
            f"more than twice the {done.table_rows:,} rows {target.table} had when it started: its subquery does "
            "not leave out the rows already done, so it would never end", where=str(migration.path),
            hint="select only rows not yet done (e.g. for `SET title = name`, `WHERE title IS NULL` in the "
                 f"subquery); what its {done.batches:,} batches committed stays: some rows were changed more "
                 "than once, so check them before you run it again")


async def _record(conn: asyncpg.Connection, migration: Migration, started: float, failure: Exception | None = None,
                  reason: str | None = None) -> None:
    """Record the run in the history: done, or failed. A failure is recorded as retryable (``in_transaction``):
    its committed batches are finished work, not a partial change to undo by hand, and the next run continues
    them. A failure that cannot be recorded says so on the error."""
    try:
        await record(conn, version=migration.version, description=migration.description,
                     checksum=migration.checksum, checksum_algorithm=CHECKSUM_ALGORITHM,
                     duration_ms=int((time.perf_counter() - started) * 1000), success=failure is None,
                     in_transaction=failure is not None, error=reason)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as unrecorded:
        if failure is None:
            raise
        failure.add_note(f"the failed attempt could not be recorded: {unrecorded}")


async def _count(conn: asyncpg.Connection, table: str) -> int:
    """The table's rows now (0 when it does not exist: the first batch then fails with PostgreSQL's error)."""
    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
        return 0
    return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))  # a name the file itself runs against


async def _batch(conn: asyncpg.Connection, sql: str) -> tuple[int, int]:
    """One batch in its own transaction: (rows changed, times it was tried again)."""
    attempt = 0
    while True:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}; "
                                   f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
                status = await conn.execute(sql)
            return int(status.rsplit(" ", 1)[-1]), attempt
        except RETRIED:
            attempt += 1
            if attempt == ATTEMPTS:
                raise
            await asyncio.sleep(min(FIRST_PAUSE * 2 ** (attempt - 1), LONGEST_PAUSE))


def _kept(done: BatchProgress) -> str:
    if not done.rows:
        return "no row was changed; `gatehouse migrate` runs it again"
    return (f"the {done.rows:,} rows changed by {done.batches:,} committed batches stay, and `gatehouse migrate` "
            "continues with the rows not yet done")


def _hint(error: asyncpg.PostgresError, target: BatchStatement, size: int, done: BatchProgress) -> str:
    if isinstance(error, RETRIED):
        cause = (f"a batch waited more than {LOCK_TIMEOUT_MS} ms for a lock on {target.table} (or lost a deadlock) "
                 f"{ATTEMPTS} times in a row: a long transaction holds it, or an ALTER TABLE waits for it (look in "
                 "pg_stat_activity and pg_locks)")
    elif isinstance(error, asyncpg.QueryCanceledError):
        cause = (f"a batch ran longer than {STATEMENT_TIMEOUT_MS} ms, with its rows locked all along: make batches "
                 f"smaller (`-- gatehouse: batch {max(size // 10, 1)}`) or index the rows not yet done "
                 "(CREATE INDEX CONCURRENTLY ... WHERE <the condition of rows not yet done>)")
    else:
        cause = "fix the file (it is not recorded as applied, so it may still be edited)"
    return f"{cause}; {_kept(done)}"
