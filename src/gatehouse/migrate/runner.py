"""Versioned SQL migrations: ``migrations/V<NNN>__<description>.sql``, each applied once, in order.

Each migration runs in its own transaction together with its history row, under an advisory lock so two
deployers cannot apply the same migration twice. An applied migration whose file has changed since is
reported and nothing further runs: history is not rewritten silently.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from gatehouse.db.sync import bootstrap
from gatehouse.errors import ProjectError

FILE_PATTERN = re.compile(r"^V(?P<version>[0-9]{1,9})__(?P<description>[A-Za-z0-9_]+)\.sql$")
MIGRATE_LOCK_KEY = 0x67686D6967  # "ghmig"

HISTORY = """
CREATE TABLE IF NOT EXISTS gatehouse.migrations (
    version      integer PRIMARY KEY,
    description  text NOT NULL,
    checksum     text NOT NULL,
    applied_by   text NOT NULL DEFAULT current_user,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    duration_ms  integer NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    path: Path
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        return f"V{self.version:03d} {self.description.replace('_', ' ')}"


def discover(folder: Path) -> list[Migration]:
    if not folder.is_dir():
        return []
    migrations: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        match = FILE_PATTERN.match(path.name)
        if match is None:
            raise ProjectError("a migration file is named V<number>__<description>.sql",
                               where=str(path), hint="for example V003__add_product_sku.sql")
        version = int(match["version"])
        if version in migrations:
            raise ProjectError(f"version {version} is used twice (also {migrations[version].path.name})",
                               where=str(path))
        migrations[version] = Migration(version, match["description"], path, path.read_text(encoding="utf-8"))
    return [migrations[v] for v in sorted(migrations)]


async def applied_checksums(conn: asyncpg.Connection) -> dict[int, str]:
    await bootstrap(conn)
    await conn.execute(HISTORY)
    return {r["version"]: r["checksum"] for r in await conn.fetch("SELECT version, checksum FROM gatehouse.migrations")}


def _check_history(migrations: list[Migration], applied: dict[int, str]) -> list[Migration]:
    by_version = {m.version: m for m in migrations}
    for version, checksum in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            raise ProjectError(f"migration V{version:03d} was applied but its file is gone",
                               hint="restore the file; applied migrations are history")
        if migration.checksum != checksum:
            raise ProjectError(f"{migration.path.name} changed after it was applied (checksum differs)",
                               where=str(migration.path),
                               hint="never edit an applied migration: restore it and add a new one")
    pending = [m for m in migrations if m.version not in applied]
    newest_applied = max(applied, default=0)
    late = [m for m in pending if m.version < newest_applied]
    if late:
        raise ProjectError(f"{late[0].path.name} is older than V{newest_applied:03d}, which is already applied",
                           where=str(late[0].path), hint="give it a version number above the newest applied")
    return pending


async def pending_migrations(conn: asyncpg.Connection, folder: Path) -> list[Migration]:
    return _check_history(discover(folder), await applied_checksums(conn))


async def migrate(conn: asyncpg.Connection, folder: Path) -> list[tuple[Migration, float]]:
    """Apply every pending migration; returns what ran and how long each took (seconds)."""
    done: list[tuple[Migration, float]] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK_KEY)
    try:
        for migration in await pending_migrations(conn, folder):
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(migration.sql)
                elapsed = time.perf_counter() - started
                await conn.execute(
                    "INSERT INTO gatehouse.migrations (version, description, checksum, duration_ms) "
                    "VALUES ($1, $2, $3, $4)",
                    migration.version, migration.description, migration.checksum, int(elapsed * 1000),
                )
            done.append((migration, elapsed))
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_KEY)
    return done
