"""Who uses an API version now: the apps *pinned* to it apart from those that called it recently but moved on.

An app is pinned to a version of a contract when its most recent call to that contract used that version: it
would break if that version changed or went away. An app that called the version in the window but whose most
recent call to the contract used another version has moved on (to that version); it is listed, apart, so that
the decision to retire a version is plain. ``migrate plan``, the migration runner and ``gatehouse versions``
all read this module, so they name the same apps.

Why from the per-minute summaries and not from ``gatehouse.usage``: the view counts since the beginning, so it can
tell neither the calls of a window nor a rate. ``gatehouse.audit_minutes`` adds up the summaries that the audit
writer stores with each batch (a line per minute, app, target and version: :mod:`.audit_writer`) and counts the
rest (the rows of writes, and the records of a batch that crosses the window's start) one by one, so a window is
exact and costs about a line per minute and app rather than a record per request; it is grouped down to a line
per app, target and version before it leaves the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from gatehouse.db import Connection

DAY_SECONDS = 86_400.0
MIN_SPAN_S = 3_600.0
"""A rate is never taken over less than an hour: ten calls in the last minute are not 14,400 a day."""


@dataclass(frozen=True, slots=True)
class Calls:
    """The calls of one app to one target (a contract, or ``rpc:<name>``) at one API version, in a window."""

    app: str
    target: str
    api_version: int
    calls: int
    errors: int
    last_call: datetime
    first_call: datetime


@dataclass(frozen=True, slots=True)
class Window:
    """Every app's calls from ``since`` up to ``until`` (the database's clock when it was read)."""

    since: datetime
    until: datetime
    calls: list[Calls]

    @property
    def days(self) -> float:
        """The window's length in days; at least a second, so a rate is always defined."""
        return max((self.until - self.since).total_seconds(), 1.0) / DAY_SECONDS

    def rate(self, calls: list[Calls]) -> float:
        """Calls per day over the time these calls span in the window: from the first of them to the window's
        end (at least an hour). So an app's rate is the same whatever the window, once the window holds all of
        its calls: a plan's 30 days and ``versions --since 7d`` agree about an app that started 2 days ago."""
        first = min(c.first_call for c in calls)
        span = max((self.until - max(first, self.since)).total_seconds(), MIN_SPAN_S)
        return sum(c.calls for c in calls) / (span / DAY_SECONDS)

    def latest(self) -> dict[tuple[str, str], int]:
        """(app, target) → the API version of the app's most recent call to that target in the window.

        A call in the window is never older than the app's most recent call to the same target, so the window
        holds that call too. On a tie in time the newer version wins."""
        newest: dict[tuple[str, str], tuple[datetime, int]] = {}
        for c in self.calls:
            key = (c.app, c.target)
            if key not in newest or (c.last_call, c.api_version) > newest[key]:
                newest[key] = (c.last_call, c.api_version)
        return {key: version for key, (_, version) in newest.items()}


async def window(conn: Connection, *, since: datetime | None = None, days: float = 30,
                 target: str | None = None) -> Window:
    """The calls since ``since`` (or the last ``days`` days), of one target or of all.

    Requests that never reached a contract in a version (no app, no target or no version: refused before) are
    left out. Returns an empty window where the audit table does not exist yet."""
    until: datetime = await conn.fetchval("SELECT now()")
    start = since if since is not None else until - timedelta(days=days)
    if not await conn.fetchval("SELECT to_regclass('gatehouse.audit_batch') IS NOT NULL"):
        return Window(start, until, [])
    params: list[object] = [start]
    condition = "target <> ''"
    if target is not None:
        params.append(target)
        condition = "target = $2"
    rows = await conn.fetch(
        f"""
        SELECT app, target, api_version, sum(requests)::bigint AS calls, sum(errors)::bigint AS errors,
               max(last_at) AS last_call, min(first_at) AS first_call
        FROM gatehouse.audit_minutes($1, 'infinity')
        WHERE {condition} AND app <> '' AND api_version > 0
        GROUP BY app, target, api_version
        """,
        *params,
    )
    return Window(start, until, [Calls(r["app"], r["target"], r["api_version"], r["calls"], r["errors"],
                                       r["last_call"], r["first_call"]) for r in rows])


@dataclass(frozen=True, slots=True)
class AppUse:
    """One app's use of a contract's affected API versions, over a window."""

    app: str
    pinned: bool
    """Its most recent call to the contract used one of the versions: it would notice a change to them."""
    latest: int
    """The API version of its most recent call to the contract: the one it is pinned to, or moved to."""
    versions: tuple[int, ...]
    """The affected versions it called in the window."""
    last_call: datetime
    """Its last call to those versions."""
    calls: int
    """Its calls to those versions in the window."""
    per_day: float


def uses_of(found: Window, target: str, versions: tuple[int, ...]) -> list[AppUse]:
    """The apps that called ``target`` at any of ``versions`` in the window: pinned ones first, busiest first."""
    latest = found.latest()
    mine: dict[str, list[Calls]] = {}
    for c in found.calls:
        if c.target == target and c.api_version in versions:
            mine.setdefault(c.app, []).append(c)
    uses = []
    for app, calls in mine.items():
        total = sum(c.calls for c in calls)
        uses.append(AppUse(app, latest[app, target] in versions, latest[app, target],
                           tuple(sorted(c.api_version for c in calls)), max(c.last_call for c in calls), total,
                           found.rate(calls)))
    return sorted(uses, key=lambda u: (not u.pinned, -u.calls, u.app))


async def affected_apps(conn: Connection, contract: str, versions: tuple[int, ...], *,
                        days: int = 30) -> list[AppUse]:
    """The apps that called ``contract`` in any of the API ``versions`` in the last ``days`` days, pinned ones
    (whose latest call to it used one of those versions) first. Read it on a connection outside a migration's
    transaction: the scan then holds none of the migration's locks."""
    if not versions:
        return []
    return uses_of(await window(conn, days=days, target=contract), contract, versions)


def rate_text(per_day: float) -> str:
    """Calls per day for people: ``1,204``, ``3.5``, ``2.0``, ``0.033``."""
    if round(per_day, 1) >= 10:
        return f"{per_day:,.0f}"
    return f"{per_day:.1f}" if per_day >= 0.1 else f"{per_day:.2g}"


def when_text(moment: datetime) -> str:
    """A time for people, to the minute, in the local time zone (as ``gatehouse audit`` shows them)."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M")


def describe(use: AppUse) -> str:
    """One line: ``mobile pinned to v1 · last call 2026-12-02 14:03 · 1,204 calls/day``; an app that moved on:
    ``web moved to v3 · last call to v1 2026-11-20 09:12 · 3.5 calls/day``."""
    called = ", ".join(f"v{n}" for n in use.versions)
    state = f"pinned to v{use.latest}" if use.pinned else f"moved to v{use.latest}"
    last = "last call" if use.pinned else f"last call to {called}"
    return f"{use.app} {state} · {last} {when_text(use.last_call)} · {rate_text(use.per_day)} calls/day"
