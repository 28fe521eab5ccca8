"""Test a project's logic functions without a server, against a real database.

    async with LogicHarness(Path("examples/shop")) as harness:
        total = await harness.call("order_total", app="analytics", order_id=7)

The harness opens the project the way ``gatehouse serve`` does (so the database must be migrated and
applied) and calls functions exactly as ``POST /rpc/<name>`` would: arguments validated, the function run
as the app, under its role, grants and row filters, in one transaction. ``rollback=True`` undoes a call's
writes, so tests can run against shared data.
"""

from __future__ import annotations

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


class LogicHarness:
    def __init__(self, project: Project | Path) -> None:
        self.project = project if isinstance(project, Project) else load_project(project)
        self.runtime = Runtime(self.project)

    async def __aenter__(self) -> LogicHarness:
        await self.runtime.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
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


__all__ = ["LogicHarness", "ValidationError"]
