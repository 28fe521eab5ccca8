"""``gatehouse apply``'s part for sagas: their tables, and who may write them.

* ``gatehouse.sagas`` (the home database): one row per saga run, its state and its lease. Written only by
  gatehouse itself (the authenticator role), never by an app role.
* ``gatehouse.saga_steps`` (the home database and every database a local step acts on): one row per finished
  step or compensation. A local step's row is inserted *by the app's role in the step's own transaction*, so the
  app roles get INSERT on it (as on ``gatehouse.audit``) and nothing else: they cannot read other runs' results
  or change a record. The primary key ``(saga_id, n, kind)`` is what makes a local step exactly-once: a second
  runner's insert of the same step fails, and its transaction (with the step's effect) is rolled back.

Columns beyond the first sketch, and why: ``failing_step`` (which step the ``attempts`` count is for, so a
retry budget is per step without an update per step), ``failed_in`` (the state a failed saga was in, so
``retry`` knows whether to run forward again or go on compensating), ``deadline`` (the saga's timeout fixed at
its start, so a deploy that changes ``timeout_s`` does not move running sagas' deadlines), and on steps
``compensation`` (the name of the step that undoes it, chosen at the call: a saga being compensated after a
crash is not replayed, so the record must say what undoes each step).
"""

from __future__ import annotations

import asyncpg

from gatehouse.db import quote_ident
from gatehouse.project import Project

SAGAS_DDL = """
CREATE SCHEMA IF NOT EXISTS gatehouse;
CREATE TABLE IF NOT EXISTS gatehouse.sagas (
    id               uuid PRIMARY KEY,
    name             text NOT NULL,
    app              text NOT NULL,
    idempotency_key  text,
    request_hash     text NOT NULL,
    input            jsonb NOT NULL,
    state            text NOT NULL DEFAULT 'running'
                     CHECK (state IN ('running', 'compensating', 'completed', 'compensated', 'failed')),
    result           jsonb,
    error            text,
    failed_in        text,
    lease_owner      text,
    lease_until      timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    failing_step     integer,
    next_run_at      timestamptz NOT NULL DEFAULT now(),
    deadline         timestamptz,
    subject          text,
    claims           jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (app, idempotency_key)
);
CREATE INDEX IF NOT EXISTS sagas_due_idx ON gatehouse.sagas (next_run_at)
    WHERE state IN ('running', 'compensating');
CREATE INDEX IF NOT EXISTS sagas_failed_idx ON gatehouse.sagas (name) WHERE state = 'failed';
"""
FAILED_INDEX = "CREATE INDEX sagas_failed_idx ON gatehouse.sagas (name) WHERE state = 'failed'"
"""Failed runs, which need a person: what /metrics and the saga_failed alert rule count (a few rows at most)."""

SAGA_STEPS_DDL = """
CREATE SCHEMA IF NOT EXISTS gatehouse;
CREATE TABLE IF NOT EXISTS gatehouse.saga_steps (
    saga_id       uuid NOT NULL,
    n             integer NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('forward', 'compensation')),
    name          text NOT NULL,
    status        text NOT NULL DEFAULT 'done',
    result        jsonb,
    error         text,
    attempts      integer NOT NULL DEFAULT 1,
    compensation  text,
    finished_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, n, kind)
);
"""


CALLER_COLUMNS = {"subject": "text", "claims": "jsonb"}
"""Columns of ``gatehouse.sagas`` added after its first release (the user who started a run, and their claims);
its index of failed runs came then too."""


async def _add_missing_columns(conn: asyncpg.Connection) -> list[str]:
    """Add the columns and the index a table made by an older gatehouse lacks (looked up first: ``ADD COLUMN IF
    NOT EXISTS`` and ``CREATE INDEX IF NOT EXISTS`` would lock the table even when there is nothing to add)."""
    present = {r["attname"] for r in await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'gatehouse.sagas'::regclass AND NOT attisdropped")}
    added = []
    for column, kind in CALLER_COLUMNS.items():
        if column not in present:
            await conn.execute(f"ALTER TABLE gatehouse.sagas ADD COLUMN {column} {kind}")
            added.append(f"added column gatehouse.sagas.{column}")
    if not await conn.fetchval("SELECT to_regclass('gatehouse.sagas_failed_idx') IS NOT NULL"):
        await conn.execute(FAILED_INDEX)
        added.append("created index gatehouse.sagas_failed_idx")
    return added


async def sync_saga_tables(conn: asyncpg.Connection, project: Project, database: str) -> list[str]:
    """Create the saga tables this database holds (none when the project declares no saga) and grant them."""
    holds = project.sagas.databases(project.home_database)
    if database not in holds:
        return []
    changes: list[str] = []
    auth = quote_ident(project.authenticator_role)
    wanted = ["saga_steps"] + (["sagas"] if database == project.home_database else [])
    existing = {r["relname"] for r in await conn.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'gatehouse' AND c.relname = ANY($1::text[])", wanted)}
    # (the DDL only when a table is missing: its CREATE INDEX IF NOT EXISTS would lock the table before looking,
    # and so wait for every saga writing now, as the outbox's would: events/outbox.py)
    if database == project.home_database:
        if "sagas" not in existing:
            await conn.execute(SAGAS_DDL)
        else:
            changes += await _add_missing_columns(conn)
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE ON gatehouse.sagas TO {auth}")
    if "saga_steps" not in existing:
        await conn.execute(SAGA_STEPS_DDL)
    await conn.execute(f"GRANT SELECT, INSERT ON gatehouse.saga_steps TO {auth}")  # reads, remote steps' records
    for app in sorted(project.apps.values(), key=lambda a: a.name):  # a local step's record, in its transaction
        # (SELECT of the key columns only: what ON CONFLICT needs to find another runner's record of the step)
        await conn.execute("GRANT INSERT, SELECT (saga_id, n, kind) ON gatehouse.saga_steps TO "
                           f"{quote_ident(app.role)}")
    changes.extend(f"created table gatehouse.{name}" for name in wanted if name not in existing)
    return changes
