"""The saga engine of one instance: start, look up, retry and cancel runs; claim due runs under leases.

Any number of instances share the same runs. A runner claims due runs with ``FOR UPDATE SKIP LOCKED`` and a
lease (``lease_s``, renewed every third of it while a run is in hand); a run whose runner died is due again
once its lease has expired, and any instance takes it. There are no executor ids to recover, so pods may come
and go under any name. ``run_due`` is one round (claim, advance each claimed run, let go): the server's
background loop calls it over and over, and tests call it step by step.

Interfaces meant for the layers above (``POST /sagas/<name>``, ``gatehouse sagas ...``): :meth:`start` (with
an idempotency key), :meth:`get`, :meth:`retry`, :meth:`cancel`; each answers a :class:`SagaRun`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from gatehouse.access import choose_version
from gatehouse.background import stop_tasks
from gatehouse.errors import InvalidArguments, SagaNotFound
from gatehouse.observe.saga_metrics import SagaStats
from gatehouse.sagas import store
from gatehouse.sagas.execute import advance
from gatehouse.sagas.faults import CrashHook
from gatehouse.sagas.steps import RunEnv
from gatehouse.sagas.store import SagaRun

if TYPE_CHECKING:
    from gatehouse.runtime import Runtime

log = logging.getLogger(__name__)
LEASE_S = 15.0
POLL_S = 0.5
BATCH = 16


def _no_hook(point: str, saga_id: str, n: int) -> None:
    return None


class SagaEngine:
    def __init__(self, runtime: Runtime, *, owner: str | None = None, lease_s: float = LEASE_S,
                 poll_s: float = POLL_S, batch: int = BATCH, hook: CrashHook | None = None) -> None:
        self.runtime = runtime
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_s, self.poll_s, self.batch = lease_s, poll_s, batch
        self.hook: CrashHook = hook or _no_hook
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._held: dict[str, RunEnv] = {}
        self.stats = SagaStats()
        """What this engine did, for /metrics (observe/saga_metrics.py)."""

    # -- runs, for callers -------------------------------------------------------------------------------

    async def start(self, app: str, name: str, data: Any, idempotency_key: str | None = None, *,
                    subject: str | None = None, claims: Mapping[str, Any] | None = None) -> SagaRun:
        """Start saga ``name`` as ``app`` with ``data`` (validated against the saga's input type): the new run,
        or the one an earlier call with the same key started (:class:`IdempotencyKeyReused` if its request
        differed). The run goes on in the background (or at the next :meth:`run_due`). ``subject`` and
        ``claims`` are the user who asked (a token's): every step runs with them, under the app's row filters."""
        project = self.runtime.project
        definition = project.sagas.sagas.get(name)
        if definition is None or app not in project.apps:
            raise SagaNotFound(f"Could not find the saga '{name}'")
        try:
            value = definition.input.validate_python(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors())
            raise InvalidArguments("The saga's input is not valid", details=problems) from None
        async with self._home().acquire() as conn:
            run, new = await store.insert_saga(conn, name=name, app=app, key=idempotency_key,
                                               data=definition.input.dump_python(value, mode="json"),
                                               timeout_s=definition.timeout_s, subject=subject, claims=claims)
        if new:
            self.stats.started[name] += 1
            self._wake.set()
        return run

    async def get(self, saga_id: str) -> SagaRun:
        async with self._home().acquire() as conn:
            run = await store.fetch_saga(conn, saga_id)
        if run is None:
            raise SagaNotFound(f"Could not find the saga run '{saga_id}'")
        return run

    async def retry(self, saga_id: str) -> SagaRun:
        """A failed run (needs attention) goes on where it failed: forward again after a non-deterministic
        replay was fixed, or compensating again after a compensation was fixed or its service came back."""
        run = await self.get(saga_id)
        state = run.failed_in if run.failed_in in store.ACTIVE else "compensating"
        async with self._home().acquire() as conn:
            reopened = await store.reopen(conn, saga_id, state=state, error=None, only_from=("failed",))
        self._wake.set()
        return reopened or await self.get(saga_id)

    async def cancel(self, saga_id: str) -> SagaRun:
        """A running saga is compensated (what it did is undone); a finished one is left as it is."""
        await self.get(saga_id)
        async with self._home().acquire() as conn:
            reopened = await store.reopen(conn, saga_id, state="compensating", error="cancelled",
                                          only_from=("running",))
        self._wake.set()
        return reopened or await self.get(saga_id)

    def _home(self) -> Any:
        return self.runtime.internal_pool(self.runtime.project.home_database)

    # -- running -----------------------------------------------------------------------------------------

    async def run_due(self, limit: int | None = None) -> int:
        """One round: claim the due runs (up to ``limit``), take each as far as it goes, let go. How many."""
        async with self._home().acquire() as conn:
            runs = await store.claim(conn, self.owner, self.lease_s, limit or self.batch)
        if not runs:
            return 0
        envs = [self._env(run) for run in runs]
        renewal = asyncio.get_running_loop().create_task(self._renew())
        try:
            outcomes = await asyncio.gather(*(self._advance(env) for env in envs), return_exceptions=True)
        finally:
            await stop_tasks([renewal])
        for outcome in outcomes:  # a crash injected by a test (or a cancellation) is not swallowed
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
        return len(runs)

    def _env(self, run: SagaRun) -> RunEnv | SagaRun:
        """The run's environment, or the run itself when its app is gone from the project."""
        runtime = self.runtime.pinned()
        app = runtime.project.apps.get(run.app)
        if app is None:
            return run
        return RunEnv(runtime=runtime, run=run, app=app, version=choose_version(runtime.project, app, None, None),
                      http=self.http, hook=self.hook, stats=self.stats)

    async def _advance(self, env: RunEnv | SagaRun) -> str:
        if isinstance(env, SagaRun):
            async with self._home().acquire() as conn:
                await store.settle(conn, env.id, self.owner, state="failed", failed_in=env.state,
                                   error=f"the app {env.app!r} is not in the project any more")
            self.stats.finish(env.name, "failed")
            return "failed"
        self._held[env.run.id] = env
        try:
            state = await advance(env)
            self.stats.finish(env.run.name, state)
            return state
        except Exception:  # the database went away mid-run: the lease expires and the run is taken again
            log.exception("saga %s: the run stopped on an error; it is taken again when its lease expires",
                          env.run.id)
            raise
        finally:
            self._held.pop(env.run.id, None)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            ids = list(self._held)
            if not ids:
                continue
            try:
                async with self._home().acquire() as conn:
                    kept = await store.renew(conn, self.owner, self.lease_s, ids)
            except Exception as exc:  # cannot renew: keep going; the checks before each step decide
                log.warning("sagas: could not renew leases (%s)", type(exc).__name__)
                continue
            for saga_id in ids:
                env = self._held.get(saga_id)
                if saga_id not in kept and env is not None:
                    env.lease_lost.set()

    def start_background(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="gatehouse-sagas")

    async def _loop(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake.clear()  # before the round: a start during it wakes the next wait at once
            try:
                claimed = await self.run_due()
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning("sagas: a round failed (%s); trying again", type(exc).__name__)
                await asyncio.sleep(min(10.0, self.poll_s * 2 ** failures))
                continue
            if claimed:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()

    async def stop(self) -> None:
        """Stop the loop; runs in hand are left to their leases (taken again by any instance when they expire).
        The loop also ends at its flag (a cancel can be lost: :mod:`gatehouse.background`)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
        await self.http.aclose()
