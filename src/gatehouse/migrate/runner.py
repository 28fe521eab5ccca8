"""SQL migrations: versioned ``V<NNN>__<description>.sql`` and repeatable ``R__<description>.sql``.

* A **versioned** migration is applied once, in version order. Editing it after it was applied is detected
  by its checksum, and nothing further runs until the file is restored (or the edit accepted with
  :func:`repair`). A file numbered below the newest applied one is refused.
* A **repeatable** migration (views, functions: ``CREATE OR REPLACE``) is applied after all versioned
  ones, in name order, and again whenever its text changes.
* Each migration runs in its own transaction together with its history row, so a failure leaves no
  partial change; the failed attempt is then recorded (``success = false``, PostgreSQL's message) and the
  run stops with an error naming the file, the line and PostgreSQL's message.
* A file whose first line is ``-- gatehouse: no-transaction`` runs its statements one by one, outside any
  transaction, for what PostgreSQL cannot run in one (``CREATE INDEX CONCURRENTLY``). A failure midway can
  leave a partial change (and a failed ``CREATE INDEX CONCURRENTLY`` can leave an invalid index), so keep
  such a file to one statement. After such a failure nothing runs until the change is undone or finished
  by hand and :func:`repair` is run.
* A file whose first line is ``-- gatehouse: batch`` (or ``-- gatehouse: batch 5000``) holds one UPDATE or
  DELETE that :mod:`gatehouse.migrate.batch` runs in batches, each in a short transaction of its own, until
  no row is left: a backfill that never holds a lock long enough for an app to notice.
* One deployer at a time per database: an advisory lock, waited for by polling (a session blocked in
  ``pg_advisory_lock`` would hold a snapshot that ``CREATE INDEX CONCURRENTLY`` waits for: a deadlock).

The history table is described in :mod:`gatehouse.migrate.history`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from gatehouse.db.changes import announce
from gatehouse.errors import ProjectError
from gatehouse.migrate import batch
from gatehouse.migrate.files import CHECKSUM_ALGORITHM, Migration, MigrationFailed, discover
from gatehouse.migrate.history import HistoryRow, delete_failed, ensure_history, read_history, realign, record
from gatehouse.migrate.statements import Statement
from gatehouse.migrate.views import ContractsWouldBreak, StatementFailed, ViewKeeper

MIGRATE_LOCK_KEY = 0x67686D6967  # "ghmig"
LOCK_TIMEOUT_MS = 500
"""How long a migration's statement waits for a table's lock before its transaction gives way (see
:func:`_in_transaction`)."""
LOCK_ATTEMPTS = 12
FIRST_LOCK_PAUSE_S, LONGEST_LOCK_PAUSE_S = 0.05, 2.0


def _latest_repeatable(history: list[HistoryRow]) -> dict[str, HistoryRow]:
    return {row.description: row for row in history if row.kind == "repeatable"}  # in id order: newest wins


def _applied_versions(history: list[HistoryRow]) -> dict[int, HistoryRow]:
    return {row.version: row for row in history if row.version is not None and row.success}


def _to_apply(migrations: list[Migration], history: list[HistoryRow]) -> list[Migration]:
    """What a run applies, in order; raises when the history forbids running anything."""
    files = {(m.version, m.description if m.version is None else ""): m.path for m in migrations}
    for row in history:
        if not row.success and not row.in_transaction:
            path = files.get((row.version, row.description if row.version is None else ""))
            raise ProjectError(f"{row.label} failed outside a transaction on {row.applied_at:%Y-%m-%d %H:%M %Z} "
                               f"and may have left a partial change: {row.error}", where=str(path) if path else None,
                               hint="undo or finish it by hand, then run `gatehouse migrate repair`")
    applied = _applied_versions(history)
    by_version = {m.version: m for m in migrations if m.version is not None}
    for version, row in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            raise ProjectError(f"migration {row.label} was applied but its file is gone",
                               hint="restore the file; applied migrations are history")
        if migration.checksum_with(row.checksum_algorithm) != row.checksum:
            raise ProjectError(f"{migration.path.name} changed after it was applied (checksum differs)",
                               where=str(migration.path),
                               hint="never edit an applied migration: restore it and add a new one "
                                    "(or accept the edit with `gatehouse migrate repair`)")
    pending = [m for m in migrations if m.version is not None and m.version not in applied]
    newest = max(applied, default=0)
    late = [m for m in pending if m.version is not None and m.version < newest]
    if late:
        raise ProjectError(f"{late[0].path.name} is older than V{newest:03d}, which is already applied",
                           where=str(late[0].path), hint="give it a version number above the newest applied")
    latest = _latest_repeatable(history)
    for m in migrations:
        last = latest.get(m.description)
        if m.version is None and (last is None or not last.success
                                  or m.checksum_with(last.checksum_algorithm) != last.checksum):
            pending.append(m)
    return pending


async def pending_migrations(conn: asyncpg.Connection, folder: Path) -> list[Migration]:
    """What :func:`migrate` would apply, in order (reads the history, changes nothing)."""
    return _to_apply(discover(folder), await read_history(conn))


@asynccontextmanager
async def migration_lock(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Hold the per-database migration lock (to the end of the transaction, when called inside one)."""
    in_transaction = conn.is_in_transaction()
    take = "pg_try_advisory_xact_lock" if in_transaction else "pg_try_advisory_lock"
    pause = 0.05
    while not await conn.fetchval(f"SELECT {take}($1)", MIGRATE_LOCK_KEY):
        await asyncio.sleep(pause)
        pause = min(pause * 1.5, 1.0)
    if in_transaction:
        yield
        return
    try:
        yield
    except BaseException:
        with suppress(Exception):  # the connection may be gone; its lock went with it
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_KEY)
        raise
    await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_KEY)


async def migrate(conn: asyncpg.Connection, folder: Path, *, skip_no_transaction: bool = False,
                  keeper: ViewKeeper | None = None, progress: batch.Progress | None = None,
                  on_applied: Callable[[Migration, float], None] | None = None) -> list[tuple[Migration, float]]:
    """Apply what is pending; returns what ran and how long each took (seconds).

    Called inside a transaction (a dry run), a ``no-transaction`` migration cannot run: it raises, or is
    left out when ``skip_no_transaction`` is set. With a ``keeper``, gatehouse's contract views are dropped
    and created again inside each migration's transaction as the migration needs (:mod:`.views`); every
    migration that commits tells the running servers to reload (:func:`gatehouse.db.changes.announce`).
    ``progress`` hears of each committed batch of a batch migration. In a dry run, a batch migration is only
    tried with a batch of 0 rows (:func:`batch.try_in_transaction`) and is not in the result, and the dry run
    stops there: a later migration may need the rows the backfill writes (a ``VALIDATE CONSTRAINT``, a
    ``SET NOT NULL``), so trying it without them would report a failure that will not happen.
    """
    migrations = discover(folder)
    done: list[tuple[Migration, float]] = []
    async with migration_lock(conn):
        await ensure_history(conn)
        todo = _to_apply(migrations, await read_history(conn))
        if conn.is_in_transaction():
            outside = [m for m in todo if not m.transactional]
            if outside and not skip_no_transaction:
                raise ProjectError(f"{outside[0].label} runs outside a transaction, so it cannot run inside one",
                                   where=str(outside[0].path))
            todo = [m for m in todo if m.transactional or m.batch_size is not None]
        for migration in todo:
            if migration.batch_size is None:
                done.append((migration, await _apply(conn, migration, keeper)))
            elif conn.is_in_transaction():  # a dry run: what follows a backfill depends on its rows, which
                await batch.try_in_transaction(conn, migration)  # the dry run cannot write; it stops here
                break
            else:
                done.append((migration, await batch.run_batches(conn, migration, progress=progress)))
            if on_applied is not None:
                on_applied(*done[-1])
    return done


async def _apply(conn: asyncpg.Connection, migration: Migration, keeper: ViewKeeper | None = None) -> float:
    started = time.perf_counter()

    def elapsed_ms() -> int:
        return int((time.perf_counter() - started) * 1000)

    statements = [] if migration.transactional else migration.statements()
    current: Statement | None = None
    try:
        if migration.transactional:
            await _in_transaction(conn, migration, keeper, elapsed_ms)
        else:
            for current in statements:
                await conn.execute(current.sql)
            current = None
            await record(conn, version=migration.version, description=migration.description,
                         checksum=migration.checksum, checksum_algorithm=CHECKSUM_ALGORITHM,
                         duration_ms=elapsed_ms(), in_transaction=False)
            await announce(conn, f"migration {migration.label}")
    except ContractsWouldBreak as refused:
        if keeper is not None and not conn.is_in_transaction():  # rolled back: reading usage holds no lock
            refused = await keeper.explained(conn, refused)
        await _record_failure(conn, migration, refused, str(refused.args[0]), elapsed_ms())
        raise refused from None
    except (asyncpg.PostgresError, StatementFailed) as raised:
        error = raised.error if isinstance(raised, StatementFailed) else raised
        at = raised.statement if isinstance(raised, StatementFailed) else current
        position = int(error.position) if error.position and error.position.isdigit() else None
        if at is None:
            line = migration.sql.count("\n", 0, position - 1) + 1 if position else None
        else:
            line = at.line_of(position) if position else at.line
        failure = MigrationFailed(migration, error, line=line, statement=current)
        await _record_failure(conn, migration, failure, failure.reason, elapsed_ms())
        raise failure from error
    return time.perf_counter() - started


async def _in_transaction(conn: asyncpg.Connection, migration: Migration, keeper: ViewKeeper | None,
                          elapsed_ms: Callable[[], int]) -> None:
    """The migration and its history row in one transaction, waiting for no lock longer than
    :func:`lock_timeout_ms`: when one is not had by then, the transaction is rolled back (so the readers queued
    behind the migration go on) and tried again after a pause, up to :data:`LOCK_ATTEMPTS` times.

    Why: an ``ALTER TABLE`` locks its table, then each view that depends on it; a reader locks a view, then its
    table. Both at once is a deadlock, and PostgreSQL may pick the *reader* as its victim (an app's 500). A
    migration that waits less than ``deadlock_timeout`` gives way first, every time; and while it waits, every
    reader of the table queues behind it, which a short wait also bounds. A file's own ``SET LOCAL
    lock_timeout`` still wins for the statements after it."""
    timeout = await lock_timeout_ms(conn)
    pause = FIRST_LOCK_PAUSE_S
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {timeout}")
                if keeper is not None:
                    await keeper.run(conn, migration.sql, migration.label)
                else:
                    await conn.execute(migration.sql)
                await record(conn, version=migration.version, description=migration.description,
                             checksum=migration.checksum, checksum_algorithm=CHECKSUM_ALGORITHM,
                             duration_ms=elapsed_ms())
                await announce(conn, f"migration {migration.label}")
            return
        except (asyncpg.LockNotAvailableError, StatementFailed) as waited:
            error = waited.error if isinstance(waited, StatementFailed) else waited
            if not isinstance(error, asyncpg.LockNotAvailableError) or attempt == LOCK_ATTEMPTS:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, LONGEST_LOCK_PAUSE_S)


async def lock_timeout_ms(conn: asyncpg.Connection) -> int:
    """What a migration's statements wait for a lock, at most: :data:`LOCK_TIMEOUT_MS`, and always less than
    the server's ``deadlock_timeout`` (so that a deadlock with a reader ends with the migration giving way)."""
    deadlock_ms = await conn.fetchval("SELECT setting::int FROM pg_settings WHERE name = 'deadlock_timeout'")
    return max(10, min(LOCK_TIMEOUT_MS, int(deadlock_ms or 1000) // 2))


async def _record_failure(conn: asyncpg.Connection, migration: Migration, failure: Exception, reason: str,
                          duration_ms: int) -> None:
    """Record a failed attempt (after its rollback), or say on the failure why it could not be."""
    try:
        await record(conn, version=migration.version, description=migration.description,
                     checksum=migration.checksum, checksum_algorithm=CHECKSUM_ALGORITHM,
                     duration_ms=duration_ms, success=False, in_transaction=migration.transactional, error=reason)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as unrecorded:
        failure.add_note(f"the failed attempt could not be recorded: {unrecorded}")


@dataclass(frozen=True, slots=True)
class StatusRow:
    kind: str  # versioned | repeatable
    version: int | None
    description: str
    script: str | None  # the file's name; None when the file is gone
    state: str  # applied | pending | changed | failed | missing
    applied_at: datetime | None
    applied_by: str | None
    duration_ms: int | None
    note: str

    @property
    def label(self) -> str:
        text = self.description.replace("_", " ")
        return f"V{self.version:03d} {text}" if self.version is not None else f"R {text}"


def _row(m: Migration | None, kind: str, version: int | None, description: str, state: str,
         row: HistoryRow | None, note: str) -> StatusRow:
    return StatusRow(kind, version, description, m.path.name if m else None, state,
                     row.applied_at if row else None, row.applied_by if row else None,
                     row.duration_ms if row else None, note)


def _failed_note(row: HistoryRow) -> str:
    then = "retried by the next `gatehouse migrate`" if row.in_transaction else \
        "ran outside a transaction: undo or finish it by hand, then `gatehouse migrate repair`"
    return f"{row.error} ({then})"


def _status(migrations: list[Migration], history: list[HistoryRow]) -> list[StatusRow]:
    applied = _applied_versions(history)
    failed = {row.version: row for row in history if row.version is not None and not row.success}
    files = {m.version: m for m in migrations if m.version is not None}
    newest = max(applied, default=0)
    rows: list[StatusRow] = []
    for version in sorted(set(files) | set(applied) | set(failed)):
        m, ok = files.get(version), applied.get(version)
        description = m.description if m else (ok or failed[version]).description
        if ok is not None and m is None:
            rows.append(_row(m, "versioned", version, description, "missing", ok, "applied, but its file is gone"))
        elif ok is not None and m is not None and m.checksum_with(ok.checksum_algorithm) != ok.checksum:
            rows.append(_row(m, "versioned", version, description, "changed", ok,
                             "edited after it was applied: restore it, or accept it with `gatehouse migrate repair`"))
        elif ok is not None:
            rows.append(_row(m, "versioned", version, description, "applied", ok, ""))
        elif version in failed:
            rows.append(_row(m, "versioned", version, description, "failed", failed[version],
                             _failed_note(failed[version])))
        else:
            late = f"older than V{newest:03d}, which is applied: renumber it" if version < newest else ""
            rows.append(_row(m, "versioned", version, description, "pending", None, late))
    latest = _latest_repeatable(history)
    repeatables = {m.description: m for m in migrations if m.version is None}
    for description in sorted(set(repeatables) | set(latest)):
        m, last = repeatables.get(description), latest.get(description)
        if last is None:
            rows.append(_row(m, "repeatable", None, description, "pending", None, ""))
        elif not last.success:
            rows.append(_row(m, "repeatable", None, description, "failed", last, _failed_note(last)))
        elif m is None:
            rows.append(_row(m, "repeatable", None, description, "missing", last, "its file is gone; nothing runs"))
        elif m.checksum_with(last.checksum_algorithm) != last.checksum:
            rows.append(_row(m, "repeatable", None, description, "changed", last, "changed: apply runs it again"))
        else:
            rows.append(_row(m, "repeatable", None, description, "applied", last, ""))
    return rows


async def status(conn: asyncpg.Connection, folder: Path) -> list[StatusRow]:
    """One row per migration, file or history: versioned in version order, then repeatable (changes nothing)."""
    return _status(discover(folder), await read_history(conn))


async def repair(conn: asyncpg.Connection, folder: Path) -> list[str]:
    """Remove failed attempts and accept edited applied migrations as applied (Flyway's ``repair``).

    Returns one line per thing done (or deliberately not done); empty when there was nothing to repair.
    """
    migrations = discover(folder)
    files = {m.version: m for m in migrations if m.version is not None}
    report: list[str] = []
    async with migration_lock(conn):
        await ensure_history(conn)
        async with conn.transaction():
            for row in await delete_failed(conn):
                report.append(f"removed the failed attempt of {row.label} "
                              f"({row.applied_at:%Y-%m-%d %H:%M %Z}): {row.error}")
            for version, row in sorted(_applied_versions(await read_history(conn)).items()):
                m = files.get(version)
                if m is None:
                    report.append(f"left {row.label} alone: it was applied but its file is gone; restore the file")
                elif m.checksum_with(row.checksum_algorithm) != row.checksum or m.description != row.description:
                    await realign(conn, row.id, description=m.description, checksum=m.checksum,
                                  algorithm=CHECKSUM_ALGORITHM)
                    report.append(f"re-recorded {m.label} from its current file: the edited file is now taken as "
                                  "applied (the edit itself is not run)")
    return report
