"""The contracts and versions pages: each API version's life cycle (current, deprecated with its sunset,
retired), the contracts it serves, and who called it lately (:func:`gatehouse.operations.version_usage`, the
data of ``gatehouse versions``); the pending migrations and, when asked, their impact (``migrate plan``); each
contract's versions with their columns as the lockfile recorded them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from gatehouse import operations
from gatehouse.admin.pages import error_page, render
from gatehouse.admin.sessions import Session
from gatehouse.contracts.lockfile import read_lock
from gatehouse.contracts.shape import Column
from gatehouse.http.exchange import HttpResponse
from gatehouse.migrate.plan import RECENT_DAYS
from gatehouse.observe.usage import describe as describe_use
from gatehouse.project import Project

DEFAULT_DAYS = 30
MAX_DAYS = 365


@dataclass
class VersionRow:
    number: int
    status: str
    sunset: str
    contracts: list[tuple[str, int]]
    callers: list[dict[str, Any]] = field(default_factory=list)


async def versions_page(project: Project, session: Session, params: dict[str, str]) -> HttpResponse:
    text = params.get("days", "") or str(DEFAULT_DAYS)
    if not text.isdigit() or not 1 <= int(text) <= MAX_DAYS:
        return error_page(400, "Bad window", f"days is a number from 1 to {MAX_DAYS}.", session)
    days = int(text)
    usage = await operations.version_usage(project, days=days)
    numbers = sorted(set(project.versions.numbers) | set(project.versions.retired))
    rows = []
    for number in numbers:
        settings = project.config.version_settings(number)
        served = project.versions.served.get(number, {})
        rows.append(VersionRow(number, settings.status, settings.sunset.isoformat() if settings.sunset else "",
                               sorted((name, cv.version) for name, cv in served.items()),
                               [u for u in usage if u["api_version"] == number]))
    pending = {database: [row.script or row.description for row in found if row.state == "pending"]
               for database, found in (await operations.migration_status(project)).items()}
    return render("versions.html", session=session, rows=rows, days=days, default=project.default_version,
                  pending={database: files for database, files in pending.items() if files})


async def impact_page(project: Project, session: Session, params: dict[str, str]) -> HttpResponse:
    """``gatehouse migrate plan`` in the browser: what the pending migrations would do to every released contract
    version, and which apps would notice. Run when asked (a link on the versions page), never on its own: each
    migration runs in a transaction that is rolled back, and holds its locks while it runs."""
    plans = await operations.plan_all(project)
    return render("impact.html", session=session, plans=plans, recent_days=RECENT_DAYS, describe=describe_use)


async def contract_page(project: Project, session: Session, name: str) -> HttpResponse:
    versions = sorted((c for c in project.contracts if c.name == name), key=lambda c: c.version)
    if not versions:
        return error_page(404, "No such contract", f"There is no contract named {name!r}.", session)
    lock = await asyncio.to_thread(read_lock, project.root)  # a file read, away from the loop
    shown = []
    for contract in versions:
        entry = lock.get(contract.label) if lock is not None else None
        columns: list[Column] = list(entry.signature.columns) if entry is not None else []
        serving = [n for n in project.versions.numbers
                   if (cv := project.versions.resolve(n, name)) is not None and cv.version == contract.version]
        shown.append((contract, columns, entry is not None, serving))
    granted = sorted(app for app, config in project.config.apps.items()
                     if any(g.contract == name for g in config.grants))
    return render("contract.html", session=session, name=name, versions=shown, granted=granted)
