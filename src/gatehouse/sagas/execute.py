"""One run of one claimed saga: forward until it completes, fails for good or must wait; then compensation.

States move so::

    running ──(returns)──────────────────────────────► completed
       │ └──(transient failure, attempts left)──► running, due after a backoff
       └──(failure for good, or the saga's timeout)──► compensating ──(all undone)──► compensated
    compensating ──(a compensation fails for good or runs out of retries)──► failed (needs attention)
    running ──(non-deterministic replay, misuse)──► failed (needs attention)

Compensation walks the *recorded* forward steps, newest first, and runs the compensation named in each record
unless its own record (kind ``compensation``) says it ran. It does not replay the saga function, so a saga
whose code changed can still be undone. Every transition is conditional on this runner's lease
(``store.settle``): a runner that lost it writes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from gatehouse.sagas import store
from gatehouse.sagas.faults import backoff, describe, is_transient
from gatehouse.sagas.replay import Replay, Saga
from gatehouse.sagas.steps import Failed, RunEnv, Stop, run_step
from gatehouse.sagas.store import StepRecord

log = logging.getLogger(__name__)
Records = dict[tuple[int, str], StepRecord]


async def load_records(env: RunEnv) -> Records:
    """Every step record of the run, from each database that may hold one (one query per database)."""
    runtime = env.runtime
    records: Records = {}
    for database in sorted(runtime.project.sagas.databases(env.home)):
        async with runtime.internal_pool(database).acquire() as conn:
            for record in await store.step_records(conn, env.run.id, database):
                records[(record.n, record.kind)] = record
    return records


async def advance(env: RunEnv) -> str:
    """Take the run as far as it goes now; the state it is left in (``lost`` when the lease went elsewhere)."""
    try:
        if env.run.state == "running":
            outcome = await _forward(env)
            if outcome != "compensating":
                return outcome
        return await _compensate(env)
    except Stop as stop:
        if stop.error is None:
            log.warning("saga %s: lease lost to another runner; leaving it to that one", env.run.id)
            return "lost"
        return await _settle(env, "failed", error=str(stop.error), failed_in=env.run.state)


async def _settle(env: RunEnv, state: str, **values: Any) -> str:
    env.hook("before_settle", env.run.id, 0)
    async with env.runtime.internal_pool(env.home).acquire() as conn:
        ours = await store.settle(conn, env.run.id, _owner(env), state=state, **values)
    return state if ours else "lost"


def _owner(env: RunEnv) -> str:
    owner = env.run.lease_owner
    assert owner is not None  # a claimed run
    return owner


async def _postpone(env: RunEnv, failed: Failed, error: str | None) -> str:
    async with env.runtime.internal_pool(env.home).acquire() as conn:
        ours = await store.postpone(conn, env.run.id, _owner(env), step=failed.n, attempts=failed.attempt,
                                    delay_s=backoff(failed.backoff_s, failed.attempt), error=error)
    return env.run.state if ours else "lost"


async def _forward(env: RunEnv) -> str:
    project = env.runtime.project
    definition = project.sagas.sagas.get(env.run.name)
    if definition is None:
        return await _settle(env, "failed", error=f"no saga named {env.run.name!r} is declared any more",
                             failed_in="running")
    replay = Replay(env, await load_records(env))
    try:
        replay.check_deadline()
        data = definition.input.validate_python(env.run.input)
        value = await definition.function(Saga(replay), data)
        replay.check_awaited()
        result = definition.result.dump_python(value, mode="json")
    except Failed as failed:
        if failed.transient and failed.attempt <= failed.retries:
            return await _postpone(env, failed, failed.message)
        message = failed.message if not failed.transient else f"{failed.message} (after {failed.attempt} attempts)"
        return await _start_compensating(env, message)
    except Exception as exc:  # the saga function itself raised (not a step): it cannot go on
        log.warning("saga %s (%s) raised %s; compensating", env.run.id, env.run.name, type(exc).__name__,
                    exc_info=exc)
        return await _start_compensating(env, f"the saga raised {describe(exc)}")
    return await _settle(env, "completed", result=result)


async def _start_compensating(env: RunEnv, error: str) -> str:
    async with env.runtime.internal_pool(env.home).acquire() as conn:
        ours = await store.to_compensating(conn, env.run.id, _owner(env), error)
    if not ours:
        return "lost"
    env.run = _with(env.run, state="compensating", error=error, attempts=0, failing_step=None)
    return "compensating"


def _with(run: store.SagaRun, **changes: Any) -> store.SagaRun:
    values = {name: getattr(run, name) for name in run.__dataclass_fields__}
    values.update(changes)
    return store.SagaRun(**values)


async def fence_and_load(env: RunEnv) -> Records:
    """The records compensation must undo: every forward step that is or ever will be recorded.

    A runner that lost its lease without noticing (a process frozen past it between its last lease check and
    its COMMIT) may still record the step after the newest one recorded. So first a *fence* takes that step's
    key in every database that holds records: the runner's insert then writes nothing, its effect is rolled
    back and it stops (steps.py). A fence insert that meets the runner's uncommitted record waits for it; once
    that commits, the step is recorded after all, and the fence moves to the next number. Once every fence is
    in, no forward record can appear, and the records are read again (a read across databases is not one
    snapshot: one committed while they were being read the first time is seen now)."""
    databases = sorted(env.runtime.project.sagas.databases(env.home))
    while True:
        records = await load_records(env)
        after = max((n for n, kind in records if kind == "forward"), default=0) + 1
        fenced = True
        for database in databases:
            async with env.runtime.internal_pool(database).acquire() as conn:
                fenced = await store.fence(conn, env.run.id, after) and fenced
        if fenced:
            env.hook("after_fence", env.run.id, after)
            return await load_records(env)


async def _compensate(env: RunEnv) -> str:
    records = await fence_and_load(env)
    steps = env.runtime.project.sagas.steps
    done = sorted((r for r in records.values() if r.kind == "forward" and r.status == "done"),
                  key=lambda r: r.n, reverse=True)
    for record in done:
        if record.compensation is None or (record.n, "compensation") in records:
            continue
        undo = steps.get(record.compensation)
        if undo is None:
            return await _settle(env, "failed", failed_in="compensating",
                                 error=f"compensation {record.compensation!r} of step {record.n} ({record.name}) "
                                       "is not declared any more; the saga was being compensated because: "
                                       f"{env.run.error}")
        env.hook("before_compensation", env.run.id, record.n)
        env.check_lease()
        attempt = env.attempt(record.n)
        try:
            argument = undo.first_parameter.validate_python(record.result)
            await run_step(env, undo, record.n, "compensation", (argument,), {}, None)
        except Exception as exc:
            message = f"compensation {undo.name} of step {record.n} ({record.name}) failed: {describe(exc)}"
            if is_transient(exc) and attempt <= undo.retries:
                failed = Failed(message, transient=True, n=record.n, attempt=attempt, backoff_s=undo.backoff_s)
                return await _postpone(env, failed, None)  # the saga's error stays why it is compensated
            return await _settle(env, "failed", failed_in="compensating",
                                 error=f"{message} (after {attempt} attempts); the saga was being compensated "
                                       f"because: {env.run.error}")
        env.hook("after_compensation", env.run.id, record.n)
    return await _settle(env, "compensated")
