"""What an operator reads and does with saga runs, without a server: ``gatehouse sagas list|show|retry|cancel``.

:func:`operator_engine` is the lightest engine that can act on runs: gatehouse's own connection (the
authenticator) to each database that holds saga records, and nothing else: no app pools, no keys, no schema
cache, no background runner. ``retry`` and ``cancel`` only mark a run (due now, in the state it goes on in);
the runners of the serving instances take it at their next round, as they take any due run. Nothing here runs
a step.

The reads are bounded: ``list`` takes the newest runs up to a limit (and counts their step records with one
query per database), ``show`` reads one run and its records.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from gatehouse.db.targets import resolve_targets
from gatehouse.errors import ProjectError
from gatehouse.project import Project
from gatehouse.sagas.store import ACTIVE, FENCED, FINAL

if TYPE_CHECKING:
    from gatehouse.sagas.engine import SagaEngine

STATES = ACTIVE + FINAL


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One line of ``gatehouse sagas list``."""

    id: str
    name: str
    app: str
    state: str
    attempts: int
    failing_step: int | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    steps_done: int
    """Forward steps recorded (done) so far."""
    steps_undone: int
    """Compensations recorded so far."""


@dataclass(frozen=True, slots=True)
class StepDetail:
    """One record of ``gatehouse.saga_steps``, with the database that holds it."""

    n: int
    kind: str
    name: str
    status: str
    attempts: int
    compensation: str | None
    result: Any
    error: str | None
    finished_at: datetime
    database: str


def saga_databases(project: Project) -> list[str]:
    """The databases that hold saga records, the home one (which holds the runs) first."""
    home = project.home_database
    return [home, *sorted(project.sagas.databases(home) - {home})]


@asynccontextmanager
async def operator_engine(project: Project) -> AsyncIterator[SagaEngine]:
    """An engine over one connection per saga database, for an operator's command (closed on the way out)."""
    if not project.sagas:
        raise ProjectError("this project declares no saga", hint="sagas are @gatehouse.saga functions in logic/ "
                                                                 "(docs/sagas.md)")
    targets = await resolve_targets(project)
    pools: dict[str, asyncpg.Pool] = {}
    try:
        for database in saga_databases(project):
            pool = await asyncpg.create_pool(**targets[database].authenticator_kwargs(), min_size=1, max_size=1,
                                             server_settings={"application_name": "gatehouse/sagas-cli"})
            assert pool is not None
            pools[database] = pool
            async with pool.acquire() as conn:
                if await conn.fetchval("SELECT to_regclass('gatehouse.saga_steps') IS NULL"):
                    raise ProjectError(f"the database {database} has no saga tables yet",
                                       hint="run `gatehouse apply`")
        # Imported here: every `gatehouse` command loads this module, and only the `sagas` ones need an engine.
        from gatehouse.runtime import Runtime
        from gatehouse.sagas.engine import SagaEngine

        engine = SagaEngine(Runtime(project, targets=targets, run_sagas=False, _internal=pools))
        try:
            yield engine
        finally:
            await engine.stop()
    finally:
        for pool in pools.values():
            await pool.close()


async def list_runs(engine: SagaEngine, *, state: str | None = None, name: str | None = None,
                    limit: int = 50) -> list[RunSummary]:
    """The newest runs (of a state, of a saga), newest first, with their step records counted."""
    runtime = engine.runtime
    home = runtime.project.home_database
    async with runtime.internal_pool(home).acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, name, app, state, attempts, failing_step, error, created_at, updated_at FROM gatehouse.sagas "
            "WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR name = $2) "
            "ORDER BY created_at DESC, id LIMIT $3", state, name, limit)
    counts = await _count_steps(engine, [row["id"] for row in rows])
    return [RunSummary(id=str(r["id"]), name=r["name"], app=r["app"], state=r["state"], attempts=r["attempts"],
                       failing_step=r["failing_step"], error=r["error"], created_at=r["created_at"],
                       updated_at=r["updated_at"], steps_done=counts.get((r["id"], "forward"), 0),
                       steps_undone=counts.get((r["id"], "compensation"), 0)) for r in rows]


async def _count_steps(engine: SagaEngine, ids: Sequence[uuid.UUID]) -> dict[tuple[uuid.UUID, str], int]:
    counts: dict[tuple[uuid.UUID, str], int] = {}
    if not ids:
        return counts
    for database in saga_databases(engine.runtime.project):
        async with engine.runtime.internal_pool(database).acquire() as conn:
            for row in await conn.fetch(f"SELECT saga_id, kind, count(*) AS n FROM gatehouse.saga_steps WHERE "
                                        f"saga_id = ANY($1::uuid[]) AND status <> '{FENCED}' GROUP BY 1, 2", list(ids)):
                key = (row["saga_id"], row["kind"])
                counts[key] = counts.get(key, 0) + int(row["n"])
    return counts


async def step_details(engine: SagaEngine, saga_id: str) -> list[StepDetail]:
    """Every record of a run, from every saga database, in the order they ran: forward steps by number, then
    compensations newest step first."""
    details: list[StepDetail] = []
    for database in saga_databases(engine.runtime.project):
        async with engine.runtime.internal_pool(database).acquire() as conn:
            rows = await conn.fetch("SELECT n, kind, name, status, attempts, compensation, result, error, "
                                    "finished_at FROM gatehouse.saga_steps WHERE saga_id = $1 "
                                    f"AND status <> '{FENCED}'", uuid.UUID(saga_id))  # (fences: nothing done)
        details.extend(StepDetail(n=r["n"], kind=r["kind"], name=r["name"], status=r["status"],
                                  attempts=r["attempts"], compensation=r["compensation"],
                                  result=None if r["result"] is None else orjson.loads(r["result"]),
                                  error=r["error"], finished_at=r["finished_at"], database=database) for r in rows)
    return sorted(details, key=lambda d: (d.kind != "forward", d.n if d.kind == "forward" else -d.n))
