"""Test a project's logic functions without a server, against a real database.

    async with LogicHarness(Path("examples/shop")) as harness:
        total = await harness.call("order_total", app="analytics", order_id=7)

The harness opens the project the way ``gatehouse serve`` does (so the database must be migrated and
applied) and calls functions exactly as ``POST /rpc/<name>`` would: arguments validated, the function run
as the app, under its role, grants and row filters, in one transaction. ``rollback=True`` undoes a call's
writes, so tests can run against shared data.

Sagas run step by step, never in the background: ``await harness.run_saga("place_order", app="shop", data=...)``
starts one and drives it to a final state; :meth:`LogicHarness.saga_engine` makes further engines (another
"instance", a short lease, a hook that simulates a crash) to resume or race it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from gatehouse.access import choose_version
from gatehouse.auth.identity import Identity
from gatehouse.endpoints.rpc import invoke
from gatehouse.errors import ProjectError
from gatehouse.project import Project, load_project
from gatehouse.runtime import Runtime
from gatehouse.sagas.engine import SagaEngine
from gatehouse.sagas.faults import CrashHook
from gatehouse.sagas.store import SagaRun


class LogicHarness:
    def __init__(self, project: Project | Path) -> None:
        self.project = project if isinstance(project, Project) else load_project(project)
        self.runtime = Runtime(self.project, run_sagas=False)
        self._engines: list[SagaEngine] = []

    async def __aenter__(self) -> LogicHarness:
        await self.runtime.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for engine in self._engines:
            await engine.stop()
        await self.runtime.stop()

    async def call(self, name: str, *, app: str, claims: Mapping[str, Any] | None = None,
                   subject: str | None = None, version: int | None = None, rollback: bool = False,
                   **arguments: Any) -> Any:
        """Call ``name`` as ``app`` (with a user's ``claims``); raises what the HTTP caller would get as an error."""
        function = self.project.functions.get(name)
        if function is None:
            raise ProjectError(f"no logic function named {name!r}",
                               hint=f"published: {', '.join(sorted(self.project.functions)) or 'none'}")
        caller = self.project.apps[app]
        if name not in caller.config.functions:
            raise ProjectError(f"app {app!r} may not call {name!r}", hint="add it to the app's functions")
        chosen = choose_version(self.project, caller, None if version is None else f"v{version}", None)
        parameters = function.parameters.model_validate(arguments)
        identity = Identity(app=app, key_id="test", subject=subject, claims=dict(claims or {}))
        return await invoke(self.runtime, function, caller, identity, chosen, parameters, commit=not rollback)

    @property
    def sagas(self) -> SagaEngine:
        """The runtime's saga engine (start, get, retry, cancel, run_due)."""
        if self.runtime.sagas is None:
            raise ProjectError("the project declares no saga", hint="add @gatehouse.saga functions to logic/")
        return self.runtime.sagas

    def saga_engine(self, *, lease_s: float = 15.0, hook: CrashHook | None = None,
                    owner: str | None = None) -> SagaEngine:
        """Another engine on the same runtime, as a second instance would be (its own lease owner)."""
        self.sagas  # noqa: B018 (raises when there is no saga)
        engine = SagaEngine(self.runtime, lease_s=lease_s, hook=hook, owner=owner)
        self._engines.append(engine)
        return engine

    async def run_saga(self, name: str, *, app: str, data: Any, idempotency_key: str | None = None,
                       claims: Mapping[str, Any] | None = None, engine: SagaEngine | None = None,
                       timeout_s: float = 30.0) -> SagaRun:
        """Start a saga and run it until it is completed, compensated or failed (waiting out its backoffs).
        ``claims`` are those of the user who starts it (``sub`` is their subject), as a token would carry."""
        engine = engine or self.sagas
        subject = None if claims is None or claims.get("sub") is None else str(claims["sub"])
        run = await engine.start(app, name, data, idempotency_key, subject=subject, claims=claims)
        return await self.settle_saga(run.id, engine=engine, timeout_s=timeout_s)

    async def settle_saga(self, saga_id: str, *, engine: SagaEngine | None = None,
                          timeout_s: float = 30.0) -> SagaRun:
        """Drive ``engine`` until the run is in a final state; TimeoutError after ``timeout_s``."""
        engine = engine or self.sagas
        async with asyncio.timeout(timeout_s):
            while True:
                run = await engine.get(saga_id)
                if run.finished:
                    return run
                if not await engine.run_due():
                    await asyncio.sleep(0.02)


__all__ = ["LogicHarness", "SagaRun", "ValidationError"]
