"""Running one step (or compensation) and recording it: the exactly-once and at-least-once halves.

*Local*: the step runs on a connection of the saga app's pool, as that app, in one transaction; its record
and its audit row are inserted in that transaction before COMMIT (the record is the one statement a step adds
to its own work, besides the audit row every write has). If another runner already recorded the same
``(saga, n, kind)``, the insert (``ON CONFLICT DO NOTHING``, which waits for that runner's commit) writes
nothing, the transaction (with this runner's effect) is rolled back, and the other runner's recorded result is
used: the effect exists once, whoever raced.

*Remote*: the call is made with the idempotency key ``"<saga>:<n>"`` (``":undo"`` for a compensation); its
result is recorded afterwards on gatehouse's own connection to the home database, with an audit row, in one
transaction. A crash between the call and the record sends the call again with the same key.

This module raises the step's own exception unchanged (the caller judges it, ``faults.py``); the two signals
below derive from ``BaseException`` so that a saga function's ``except Exception`` cannot swallow them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from gatehouse.auth.identity import Identity
from gatehouse.db import rollback_quietly
from gatehouse.errors import SagaError
from gatehouse.logic.context import Context
from gatehouse.observe.audit import AuditRecord, audit_if_written
from gatehouse.observe.saga_metrics import SagaStats
from gatehouse.project import App
from gatehouse.sagas.declare import RemoteCall, Step
from gatehouse.sagas.faults import CrashHook, is_transient
from gatehouse.sagas.store import FENCED, RECORD_STEP, SagaRun

if TYPE_CHECKING:
    from gatehouse.runtime import Runtime


class Failed(BaseException):
    """A step (or the saga itself) failed: tried again later when ``transient`` and attempts remain, else the
    saga is compensated."""

    def __init__(self, message: str, *, transient: bool = False, n: int = 0, attempt: int = 1, retries: int = 0,
                 backoff_s: float = 0.0) -> None:
        super().__init__(message)
        self.message, self.transient, self.n = message, transient, n
        self.attempt, self.retries, self.backoff_s = attempt, retries, backoff_s


class Stop(BaseException):
    """The run stops where it is: the saga broke a rule (``error``: it is marked failed), or this runner lost
    its lease (``error`` None: another runner has the saga now, nothing is written)."""

    def __init__(self, error: SagaError | None) -> None:
        super().__init__(str(error) if error else "lease lost")
        self.error = error


@dataclass(slots=True)
class RunEnv:
    """What one run of one saga works with."""

    runtime: Runtime
    """The runtime pinned at the run's start (one generation of project and schemas for the whole run)."""
    run: SagaRun
    app: App
    version: int
    http: httpx.AsyncClient
    hook: CrashHook
    lease_lost: asyncio.Event = field(default_factory=asyncio.Event)
    stats: SagaStats = field(default_factory=SagaStats)
    """The engine's counts for /metrics (observe/saga_metrics.py)."""

    @property
    def identity(self) -> Identity:
        """The app, with the user who started the run: its steps see the same rows the user's request would."""
        return Identity(app=self.app.name, key_id="saga", subject=self.run.subject, claims=self.run.claims)

    @property
    def home(self) -> str:
        return self.runtime.project.home_database

    def check_lease(self) -> None:
        if self.lease_lost.is_set():
            raise Stop(None)

    def attempt(self, n: int) -> int:
        """Which attempt at step ``n`` this is: the stored count runs on while the same step keeps failing."""
        return self.run.attempts + 1 if self.run.failing_step == n else 1

    def audit(self, step: Step[Any, Any], n: int, kind: str, started: float) -> AuditRecord:
        return AuditRecord(at=datetime.now(UTC), request_id=f"saga:{self.run.id}", app=self.app.name,
                           key_id="saga", subject=self.run.subject, method="SAGA" if kind == "forward" else "UNDO",
                           target=f"saga:{self.run.name}.{step.name}", api_version=self.version,
                           query=f"n={n}", status=200, rows=None,
                           duration_ms=(time.perf_counter() - started) * 1000)


async def run_step(env: RunEnv, step: Step[Any, Any], n: int, kind: str, args: Sequence[Any],
                   kwargs: Mapping[str, Any], compensation: str | None) -> Any:
    """Run ``step`` as step ``n`` (``kind`` forward or compensation) and record it; its result as JSON data.
    Counted in ``env.stats`` by outcome (retried: what the callers will try again, by the same rule)."""
    started = time.perf_counter()
    try:
        if step.remote:
            data = await _remote(env, step, n, kind, args, kwargs, compensation)
        else:
            data = await _local(env, step, n, kind, args, kwargs, compensation)
    except Exception as exc:
        again = is_transient(exc) and env.attempt(n) <= step.retries
        env.stats.step(env.run.name, step.name, "retried" if again else "failed", time.perf_counter() - started)
        raise
    env.stats.step(env.run.name, step.name, "done" if kind == "forward" else "compensated",
                   time.perf_counter() - started)
    return data


async def _local(env: RunEnv, step: Step[Any, Any], n: int, kind: str, args: Sequence[Any],
                 kwargs: Mapping[str, Any], compensation: str | None) -> Any:
    runtime, saga_id = env.runtime, env.run.id
    database = step.database or env.home
    assert runtime.pools is not None
    started = time.perf_counter()
    try:
        async with runtime.pools.connection(env.app.name, database) as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                context = Context(project=runtime.project, app=env.app, identity=env.identity, version=env.version,
                                  schema=runtime.schemas[env.version], connection=conn, database=database)
                async with asyncio.timeout(step.timeout_s):
                    value = await step.function(context, *args, **kwargs)
                data = step.dump(value)
                env.hook("before_commit" if kind == "forward" else "compensation_before_commit", saga_id, n)
                env.check_lease()
                # the record and its audit row in one statement; nothing written means another runner recorded
                # this step (the insert waited for that runner's commit on the key): this effect is rolled back
                duplicate = not await audit_if_written(conn, RECORD_STEP, (
                    uuid.UUID(saga_id), n, kind, step.name, orjson.dumps(data).decode(), env.attempt(n),
                    compensation), env.audit(step, n, kind, started))
            except BaseException:
                await rollback_quietly(transaction)
                raise
            if duplicate:
                await transaction.rollback()  # another runner did this step: its effect is the one kept
            else:
                await transaction.commit()
    finally:
        runtime.cache.versions.wrote_database(database)
    if duplicate:
        return await _recorded(env, database, n, kind)
    return data


async def _remote(env: RunEnv, step: Step[Any, Any], n: int, kind: str, args: Sequence[Any],
                  kwargs: Mapping[str, Any], compensation: str | None) -> Any:
    saga_id = env.run.id
    key = f"{saga_id}:{n}" if kind == "forward" else f"{saga_id}:{n}:undo"
    call = RemoteCall(saga_id=saga_id, n=n, idempotency_key=key, http=env.http, attempt=env.attempt(n))
    started = time.perf_counter()
    async with asyncio.timeout(step.timeout_s):
        value = await step.function(call, *args, **kwargs)
    data = step.dump(value)
    env.hook("after_call" if kind == "forward" else "compensation_after_call", saga_id, n)
    env.check_lease()
    async with env.runtime.internal_pool(env.home).acquire() as conn:
        inserted = await audit_if_written(conn, RECORD_STEP, (
            uuid.UUID(saga_id), n, kind, step.name, orjson.dumps(data).decode(), env.attempt(n), compensation),
            env.audit(step, n, kind, started))
    return data if inserted else await _recorded(env, env.home, n, kind)


async def _recorded(env: RunEnv, database: str, n: int, kind: str) -> Any:
    """The result another runner recorded for this step; Stop when it is a fence (compensation has begun while
    this runner, its lease lost without its knowing, was running the step: execute.fence_and_load)."""
    async with env.runtime.internal_pool(database).acquire() as conn:
        row = await conn.fetchrow("SELECT status, result FROM gatehouse.saga_steps WHERE saga_id = $1 AND n = $2 "
                                  "AND kind = $3", uuid.UUID(env.run.id), n, kind)
    if row is None or row["status"] == FENCED:
        raise Stop(None)
    return None if row["result"] is None else orjson.loads(row["result"])
