"""The migration history table, ``gatehouse.migrations``: one row per attempt, successful or not.

Shape (close to Flyway's ``flyway_schema_history``)::

    id                  apply order (identity, the key: a repeatable migration gets a new row each time it runs)
    version             the V number; NULL for a repeatable migration
    description         from the file name (``V003__add_sku.sql`` -> ``add_sku``); a repeatable's identity
    kind                'versioned' | 'repeatable'
    checksum            of the file's text, by
    checksum_algorithm  the algorithm's name (see ``files.CHECKSUMS``), so it can change without false alarms
    applied_by          the database user that ran it
    applied_at, duration_ms
    success             false: the attempt failed (the row is written after the rollback)
    in_transaction      false: a ``no-transaction`` migration; if it failed it may have left a partial change
    error               PostgreSQL's message, for a failed attempt

A versioned migration has at most one successful row (a unique partial index). A repeatable migration's
current state is its newest row. The first gatehouse releases made ``version`` the primary key and had
neither kind, success nor algorithm: :func:`ensure_history` upgrades that table in place, once, keeping its
rows in version order; :func:`read_history` reads either shape without changing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from gatehouse.db.sync import bootstrap

TABLE = "gatehouse.migrations"

CREATE = """
CREATE TABLE IF NOT EXISTS gatehouse.migrations (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version             integer,
    description         text NOT NULL,
    kind                text NOT NULL DEFAULT 'versioned' CHECK (kind IN ('versioned', 'repeatable')),
    checksum            text NOT NULL,
    checksum_algorithm  text NOT NULL DEFAULT 'sha256',
    applied_by          text NOT NULL DEFAULT current_user,
    applied_at          timestamptz NOT NULL DEFAULT now(),
    duration_ms         integer NOT NULL,
    success             boolean NOT NULL DEFAULT true,
    in_transaction      boolean NOT NULL DEFAULT true,
    error               text,
    CHECK ((kind = 'versioned') = (version IS NOT NULL))
)
"""

# Columns added since the first release, with what the first release's rows mean for them.
ADDED_COLUMNS = {
    "kind": "text NOT NULL DEFAULT 'versioned' CHECK (kind IN ('versioned', 'repeatable'))",
    "checksum_algorithm": "text NOT NULL DEFAULT 'sha256'",
    "success": "boolean NOT NULL DEFAULT true",
    "in_transaction": "boolean NOT NULL DEFAULT true",
    "error": "text",
}
DEFAULTS = {"kind": "'versioned'", "checksum_algorithm": "'sha256'", "success": "true",
            "in_transaction": "true", "error": "NULL::text", "id": "version::bigint"}
COLUMNS = ("id", "version", "description", "kind", "checksum", "checksum_algorithm", "applied_by",
           "applied_at", "duration_ms", "success", "in_transaction", "error")


@dataclass(frozen=True, slots=True)
class HistoryRow:
    id: int
    version: int | None
    description: str
    kind: str
    checksum: str
    checksum_algorithm: str
    applied_by: str
    applied_at: datetime
    duration_ms: int
    success: bool
    in_transaction: bool
    error: str | None

    @property
    def label(self) -> str:
        text = self.description.replace("_", " ")
        return f"V{self.version:03d} {text}" if self.version is not None else f"R {text}"


async def _columns(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
        TABLE,
    )
    return {r["attname"] for r in rows}


async def ensure_history(conn: asyncpg.Connection) -> None:
    """Create the history table, or upgrade the first release's shape in place. Call it under the lock."""
    await bootstrap(conn)
    async with conn.transaction():
        await conn.execute(CREATE)
        present = await _columns(conn)
        for column, definition in ADDED_COLUMNS.items():
            if column not in present:
                await conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS {column} {definition}")
        if "id" not in present:  # the first release: version was the primary key
            await _key_by_id(conn)
        await conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS migrations_version_once ON {TABLE} (version) "
                           "WHERE kind = 'versioned' AND success")
        await conn.execute(f"CREATE INDEX IF NOT EXISTS migrations_description_idx ON {TABLE} (kind, description)")


async def _key_by_id(conn: asyncpg.Connection) -> None:
    await conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN id bigint")
    await conn.execute(f"UPDATE {TABLE} m SET id = o.rank FROM (SELECT version, row_number() OVER "
                       f"(ORDER BY version) AS rank FROM {TABLE}) o WHERE o.version = m.version")
    start = int(await conn.fetchval(f"SELECT coalesce(max(id), 0) + 1 FROM {TABLE}"))
    await conn.execute(f"ALTER TABLE {TABLE} ALTER COLUMN id SET NOT NULL")
    await conn.execute(f"ALTER TABLE {TABLE} ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (START WITH {start})")
    primary_key = await conn.fetchval(
        "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass($1) AND contype = 'p'", TABLE)
    if primary_key is not None:
        await conn.execute(f'ALTER TABLE {TABLE} DROP CONSTRAINT "{primary_key}"')
    await conn.execute(f"ALTER TABLE {TABLE} ADD PRIMARY KEY (id)")
    await conn.execute(f"ALTER TABLE {TABLE} ALTER COLUMN version DROP NOT NULL")
    await conn.execute(f"ALTER TABLE {TABLE} ADD CHECK ((kind = 'versioned') = (version IS NOT NULL))")


async def read_history(conn: asyncpg.Connection) -> list[HistoryRow]:
    """Every row in apply order; no table yet is an empty history. Reads either shape, writes nothing."""
    present = await _columns(conn)
    if not present:
        return []
    select = ", ".join(c if c in present else f"{DEFAULTS[c]} AS {c}" for c in COLUMNS)
    rows = await conn.fetch(f"SELECT {select} FROM {TABLE} ORDER BY id")
    return [HistoryRow(**dict(r)) for r in rows]


async def record(conn: asyncpg.Connection, *, version: int | None, description: str, checksum: str,
                 checksum_algorithm: str, duration_ms: int, success: bool = True, in_transaction: bool = True,
                 error: str | None = None) -> None:
    await conn.execute(
        f"INSERT INTO {TABLE} (version, description, kind, checksum, checksum_algorithm, duration_ms, success, "
        "in_transaction, error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        version, description, "versioned" if version is not None else "repeatable", checksum, checksum_algorithm,
        duration_ms, success, in_transaction, error,
    )


async def delete_failed(conn: asyncpg.Connection) -> list[HistoryRow]:
    """Remove the rows of failed attempts; returns them."""
    failed = [row for row in await read_history(conn) if not row.success]
    await conn.execute(f"DELETE FROM {TABLE} WHERE NOT success")
    return failed


async def realign(conn: asyncpg.Connection, row_id: int, *, description: str, checksum: str, algorithm: str) -> None:
    """Accept a changed file as what was applied (Flyway's ``repair``)."""
    await conn.execute(f"UPDATE {TABLE} SET description = $2, checksum = $3, checksum_algorithm = $4 WHERE id = $1",
                       row_id, description, checksum, algorithm)
