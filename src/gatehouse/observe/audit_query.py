"""Reading the audit trail back: ``gatehouse audit`` (records, filtered) and ``gatehouse versions`` (who still
calls each API version in a window, pinned or moved on: :mod:`gatehouse.observe.usage`). Parameterized SQL
only; the CLI formats what these return.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import orjson

from gatehouse.db import Connection
from gatehouse.observe import usage

MAX_LIMIT = 10_000
STATUS_CLASS = re.compile(r"^([1-5])xx$")
RECORD_COLUMNS = ("at", "request_id", "app", "key_id", "subject", "method", "target", "api_version", "query",
                  "status", "rows", "duration_ms", "cached", "replica", "client")
AUDIT_TABLE_HEADER = ("time", "request", "client", "app", "key", "user", "method", "target", "ver", "status", "rows",
                      "ms", "from", "query")
VERSIONS_TABLE_HEADER = ("version", "app", "calls", "calls/day", "errors", "last call", "use", "targets")


def _status_condition(status: int | str, params: list[Any]) -> str:
    if isinstance(status, int) or re.fullmatch(r"[0-9]{3}", str(status)):
        params.append(int(status))
        return f"status = ${len(params)}"
    match = STATUS_CLASS.match(str(status).strip().lower())
    if match is None:
        raise ValueError(f"status must be a number or one of 1xx..5xx, not {status!r}")
    params.append(int(match.group(1)) * 100)
    return f"status >= ${len(params)} AND status < ${len(params)} + 100"


_SPANS = (timedelta(minutes=1), timedelta(minutes=10), timedelta(hours=1), timedelta(days=1), timedelta(days=30))
"""How far back from ``until`` a search looks first. A window's batches are unpacked whole
(``gatehouse.audit_window``, about 5 µs of PostgreSQL a record), so the newest records are looked for in the last
minute, then the last ten, hour, day and month, and only then in the whole window asked for: a window that already
holds ``limit`` matching records holds the newest ones."""


async def search(conn: Connection, *, app: str | None = None, subject: str | None = None,
                 target: str | None = None, status: int | str | None = None, since: datetime | None = None,
                 until: datetime | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Audit records, newest first, matching every filter given. ``status`` is a code (404) or a class
    ("4xx"); ``target`` a contract name or ``rpc:<name>``; ``since`` inclusive, ``until`` exclusive."""
    conditions: list[str] = []
    # $3: a value the records must hold, as JSON: a batch without it is skipped unread (rows are not filtered by it)
    containing = next((orjson.dumps(v).decode() for v in (subject, app, target) if v), None)
    params: list[Any] = [since, until, containing]
    for column, value in (("app", app), ("subject", subject), ("target", target)):
        if value is not None:
            params.append(value)
            conditions.append(f"{column} = ${len(params)}")
    if status is not None:
        conditions.append(_status_condition(status, params))
    params.append(max(1, min(MAX_LIMIT, int(limit))))
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    columns = ", ".join(f'"{c}"' for c in RECORD_COLUMNS)
    window = "gatehouse.audit_window(coalesce($1::timestamptz, '-infinity'), coalesce($2::timestamptz, 'infinity'), $3)"
    sql = f"SELECT {columns} FROM {window} {where} ORDER BY at DESC, id DESC NULLS LAST LIMIT ${len(params)}"
    newest: datetime = until if until is not None else await conn.fetchval("SELECT now()")
    for span in _SPANS:
        start = newest - span
        if since is not None and start <= since:
            break
        rows = await conn.fetch(sql, start, *params[1:])
        if len(rows) >= params[-1]:
            return [dict(row) for row in rows]
    return [dict(row) for row in await conn.fetch(sql, *params)]


async def version_usage(conn: Connection, *, days: int = 30, since: datetime | None = None) -> list[dict[str, Any]]:
    """Per API version and app that called it since ``since`` (or in the last ``days`` days), from the audit
    rows: calls, errors and calls per day in that window, the last call, the targets called, and whether the app
    is ``pinned`` to the version (its latest call to one of those targets used it) or ``moved_to`` a newer one
    (its latest call to each of them used that version). Requests that never reached a contract in a version are
    left out. Pinned apps come first in each version, then the most recent."""
    found = await usage.window(conn, since=since, days=days)
    latest = found.latest()
    grouped: dict[tuple[int, str], list[usage.Calls]] = {}
    for c in found.calls:
        grouped.setdefault((c.api_version, c.app), []).append(c)
    rows: list[dict[str, Any]] = []
    for (version, app), calls in grouped.items():
        now_on = {latest[app, c.target] for c in calls}
        total = sum(c.calls for c in calls)
        rows.append({
            "api_version": version, "app": app, "calls": total, "errors": sum(c.errors for c in calls),
            "per_day": found.rate(calls), "last_call": max(c.last_call for c in calls),
            "targets": sorted(c.target for c in calls), "pinned": version in now_on,
            "moved_to": None if version in now_on else max(now_on),
        })
    rows.sort(key=lambda r: (r["api_version"], not r["pinned"], -r["last_call"].timestamp(), r["app"]))
    return rows


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def as_table_rows(records: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """:func:`search` results as text cells in the order of :data:`AUDIT_TABLE_HEADER`."""
    def origin(record: dict[str, Any]) -> str:
        return ",".join(name for name in ("cache", "replica") if record.get("cached" if name == "cache" else name))

    return [(
        _when(r["at"]), r["request_id"], r["client"] or "-", r["app"] or "-", r["key_id"] or "-",
        r["subject"] or "-", r["method"],
        r["target"] or "-", "" if r["api_version"] is None else f"v{r['api_version']}", str(r["status"]),
        "" if r["rows"] is None else str(r["rows"]), f"{r['duration_ms']:.1f}", origin(r), r["query"],
    ) for r in records]


def version_table_rows(usage_rows: list[dict[str, Any]], served: list[int] | None = None) -> list[tuple[str, ...]]:
    """:func:`version_usage` results as text cells (:data:`VERSIONS_TABLE_HEADER`); a served version nobody
    called in the window gets a row saying so."""
    called = {u["api_version"] for u in usage_rows}
    rows = [(f"v{u['api_version']}", u["app"], f"{u['calls']:,}", usage.rate_text(u["per_day"]), f"{u['errors']:,}",
             _when(u["last_call"]), "pinned" if u["pinned"] else f"moved to v{u['moved_to']}", ", ".join(u["targets"]))
            for u in usage_rows]
    rows += [(f"v{n}", "(no calls)", "0", "0", "0", "", "", "") for n in (served or []) if n not in called]
    return sorted(rows, key=lambda row: int(row[0][1:]))


def as_json(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results ready for ``json.dumps`` (times as ISO 8601)."""
    return [{k: v.isoformat() if isinstance(v, datetime) else v for k, v in r.items()} for r in records]
