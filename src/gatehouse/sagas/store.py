"""The saga tables, read and written: starting a run, claiming due runs under a lease, recording outcomes.

Everything here runs on gatehouse's own connections (the authenticator), never an app's: the saga state is
gatehouse's bookkeeping. A state change is conditional on the caller still holding the lease
(``lease_owner = $me``): a runner that lost its lease (it stalled past it and another took over) changes
nothing, and learns so from the row count.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from gatehouse.db import Connection
from gatehouse.errors import IdempotencyKeyReused

ACTIVE = ("running", "compensating")
FINAL = ("completed", "compensated", "failed")
_COLUMNS = ("id, name, app, idempotency_key, state, result, error, failed_in, attempts, failing_step, "
            "next_run_at, deadline, created_at, updated_at, input, request_hash, lease_owner, lease_until, subject, "
            "claims")


@dataclass(frozen=True, slots=True)
class SagaRun:
    """One saga run as stored: what ``get`` answers (and, later, ``GET /sagas/<name>/<id>``)."""

    id: str
    name: str
    app: str
    idempotency_key: str | None
    state: str
    """running | compensating | completed | compensated | failed (needs attention)."""
    result: Any
    """The saga's result as JSON data once completed, else None."""
    error: str | None
    """Why it is compensating / compensated / failed: a message, never a trace or SQL."""
    failed_in: str | None
    attempts: int
    failing_step: int | None
    next_run_at: datetime
    deadline: datetime | None
    created_at: datetime
    updated_at: datetime
    input: Any
    request_hash: str
    lease_owner: str | None
    lease_until: datetime | None
    subject: str | None = None
    """The user who started it (a token's ``sub``), None when it was started with a key alone."""
    claims: Mapping[str, Any] = field(default_factory=dict)
    """That user's claims: its steps run with them, so the app's row filters apply to them as to the request."""

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> SagaRun:
        values = dict(row)
        values["id"] = str(values["id"])
        for key in ("result", "input"):
            values[key] = None if values[key] is None else orjson.loads(values[key])
        values["claims"] = {} if values["claims"] is None else orjson.loads(values["claims"])
        return cls(**values)


@dataclass(frozen=True, slots=True)
class StepRecord:
    n: int
    kind: str
    name: str
    status: str
    result: Any
    attempts: int
    compensation: str | None
    database: str


def request_hash(name: str, data: Any, subject: str | None = None, claims: Mapping[str, Any] | None = None) -> str:
    """What tells a repeated request from a different one under the same idempotency key: the saga's name, its
    validated input and who asked (user and claims), as canonical JSON. So another user of the same app who
    happens to send the same key is refused (422), never handed the first user's run."""
    caller = [subject, claims] if subject is not None or claims else []
    return hashlib.sha256(orjson.dumps([name, data, *caller], option=orjson.OPT_SORT_KEYS)).hexdigest()


async def insert_saga(conn: Connection, *, name: str, app: str, key: str | None, data: Any,
                      timeout_s: float | None, subject: str | None = None,
                      claims: Mapping[str, Any] | None = None) -> tuple[SagaRun, bool]:
    """Start a run, or find the one this key started: (run, whether it is new). The same key with another
    request is :class:`IdempotencyKeyReused`."""
    digest = request_hash(name, data, subject, claims)
    row = await conn.fetchrow(
        f"INSERT INTO gatehouse.sagas (id, name, app, idempotency_key, request_hash, input, deadline, subject, "
        f"claims) VALUES ($1, $2, $3, $4, $5, $6::jsonb, now() + make_interval(secs => $7::float8), $8, $9::jsonb) "
        f"ON CONFLICT (app, idempotency_key) DO NOTHING RETURNING {_COLUMNS}",
        uuid.uuid4(), name, app, key, digest, orjson.dumps(data).decode(), timeout_s, subject,
        orjson.dumps(dict(claims)).decode() if claims else None)
    if row is not None:
        return SagaRun.from_row(row), True
    found = await conn.fetchrow(f"SELECT {_COLUMNS} FROM gatehouse.sagas WHERE app = $1 AND idempotency_key = $2",
                                app, key)
    assert found is not None  # a conflict means the row exists (saga rows are never deleted here)
    existing = SagaRun.from_row(found)
    if existing.request_hash != digest:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used for a different request",
            hint="Send a new key for a new request; repeat a key only with the same saga and input.")
    return existing, False


async def fetch_saga(conn: Connection, saga_id: str) -> SagaRun | None:
    try:
        parsed = uuid.UUID(saga_id)
    except ValueError:
        return None
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM gatehouse.sagas WHERE id = $1", parsed)
    return None if row is None else SagaRun.from_row(row)


async def claim(conn: Connection, owner: str, lease_s: float, limit: int) -> list[SagaRun]:
    """Take up to ``limit`` due runs whose lease is free or expired (a dead runner's), under a lease of ours."""
    rows = await conn.fetch(
        f"UPDATE gatehouse.sagas SET lease_owner = $1, lease_until = now() + make_interval(secs => $2::float8) "
        f"WHERE id IN (SELECT id FROM gatehouse.sagas WHERE state IN ('running', 'compensating') "
        f"AND next_run_at <= now() AND (lease_until IS NULL OR lease_until < now()) "
        f"ORDER BY next_run_at FOR UPDATE SKIP LOCKED LIMIT $3) RETURNING {_COLUMNS}",
        owner, lease_s, limit)
    return [SagaRun.from_row(row) for row in rows]


async def renew(conn: Connection, owner: str, lease_s: float, ids: list[str]) -> set[str]:
    """Extend our leases; the ids returned are the ones we still hold."""
    rows = await conn.fetch(
        "UPDATE gatehouse.sagas SET lease_until = now() + make_interval(secs => $2::float8) "
        "WHERE id = ANY($3::uuid[]) AND lease_owner = $1 RETURNING id",
        owner, lease_s, [uuid.UUID(i) for i in ids])
    return {str(row["id"]) for row in rows}


async def settle(conn: Connection, saga_id: str, owner: str, *, state: str, result: Any = None,
                 error: str | None = None, failed_in: str | None = None) -> bool:
    """Record a state and let go of the lease (an active state is due again at once). False: not ours any more."""
    status = await conn.execute(
        "UPDATE gatehouse.sagas SET state = $3, result = $4::jsonb, "
        "error = CASE WHEN $3 = 'completed' THEN NULL ELSE coalesce($5, error) END, "
        "failed_in = $6, attempts = 0, failing_step = NULL, next_run_at = now(), lease_owner = NULL, "
        "lease_until = NULL, updated_at = now() WHERE id = $1 AND lease_owner = $2",
        uuid.UUID(saga_id), owner, state, None if result is None else orjson.dumps(result).decode(), error,
        failed_in)
    return bool(status.endswith(" 1"))


async def to_compensating(conn: Connection, saga_id: str, owner: str, error: str) -> bool:
    """A step failed for good: the saga is compensated from now on (by this runner, which keeps its lease)."""
    status = await conn.execute(
        "UPDATE gatehouse.sagas SET state = 'compensating', error = $3, attempts = 0, failing_step = NULL, "
        "updated_at = now() WHERE id = $1 AND lease_owner = $2", uuid.UUID(saga_id), owner, error)
    return bool(status.endswith(" 1"))


async def postpone(conn: Connection, saga_id: str, owner: str, *, step: int, attempts: int, delay_s: float,
                   error: str | None) -> bool:
    """A transient failure of step ``step``: due again after ``delay_s``, the lease let go."""
    status = await conn.execute(
        "UPDATE gatehouse.sagas SET attempts = $3, failing_step = $4, error = coalesce($5, error), "
        "next_run_at = now() + make_interval(secs => $6::float8), lease_owner = NULL, lease_until = NULL, "
        "updated_at = now() WHERE id = $1 AND lease_owner = $2",
        uuid.UUID(saga_id), owner, attempts, step, error, delay_s)
    return bool(status.endswith(" 1"))


async def reopen(conn: Connection, saga_id: str, *, state: str, error: str | None, only_from: tuple[str, ...],
                 ) -> SagaRun | None:
    """An operator's move (``retry``, ``cancel``): set an active state, due now. The lease is taken from whoever
    held it, so a runner advancing the run at that moment can write nothing more of its state (every transition
    is conditional on the lease): it stops, and the next claim starts from the new state."""
    row = await conn.fetchrow(
        f"UPDATE gatehouse.sagas SET state = $2, error = coalesce($3, error), attempts = 0, failing_step = NULL, "
        f"failed_in = NULL, next_run_at = now(), lease_owner = NULL, lease_until = NULL, updated_at = now() "
        f"WHERE id = $1 AND state = ANY($4::text[]) RETURNING {_COLUMNS}",
        uuid.UUID(saga_id), state, error, list(only_from))
    return None if row is None else SagaRun.from_row(row)


async def step_records(conn: Connection, saga_id: str, database: str) -> list[StepRecord]:
    """The run's records in one database (its fences left out: they record nothing done)."""
    rows = await conn.fetch(
        "SELECT n, kind, name, status, result, attempts, compensation FROM gatehouse.saga_steps "
        f"WHERE saga_id = $1 AND status <> '{FENCED}'", uuid.UUID(saga_id))
    return [StepRecord(r["n"], r["kind"], r["name"], r["status"],
                       None if r["result"] is None else orjson.loads(r["result"]), r["attempts"],
                       r["compensation"], database) for r in rows]


INSERT_STEP = ("INSERT INTO gatehouse.saga_steps (saga_id, n, kind, name, status, result, attempts, compensation) "
               "VALUES ($1, $2, $3, $4, 'done', $5::jsonb, $6, $7)")
"""A step's record (see :data:`RECORD_STEP`)."""

FENCED = "fenced"
"""The status of a fence: a forward record with no step behind it (see :func:`fence`)."""
FENCE = f"""
WITH put AS (
    INSERT INTO gatehouse.saga_steps (saga_id, n, kind, name, status)
    VALUES ($1, $2, 'forward', '', '{FENCED}')
    ON CONFLICT (saga_id, n, kind) DO NOTHING RETURNING true
)
SELECT coalesce((SELECT true FROM put),
                (SELECT status = '{FENCED}' FROM gatehouse.saga_steps
                 WHERE saga_id = $1 AND n = $2 AND kind = 'forward'))
"""


async def fence(conn: Connection, saga_id: str, n: int) -> bool:
    """Take forward step ``n``'s key in this database before any runner records it; whether the key is a fence
    now (False: a real record of step ``n`` holds it, committed meanwhile by a runner that lost its lease)."""
    return bool(await conn.fetchval(FENCE, uuid.UUID(saga_id), n))


RECORD_STEP = INSERT_STEP + " ON CONFLICT (saga_id, n, kind) DO NOTHING RETURNING n"
"""A step's record, writing nothing when another runner's is there first (a local step: in the step's transaction,
whose effect is then rolled back; a remote step: after the call, with the same key, so the same outcome)."""
