"""Reading the audit trail back: ``gatehouse audit`` (records, filtered) and ``gatehouse versions`` (who still
calls each API version). Parameterized SQL only; the CLI formats what these return.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from gatehouse.db import Connection

MAX_LIMIT = 10_000
STATUS_CLASS = re.compile(r"^([1-5])xx$")
RECORD_COLUMNS = ("at", "request_id", "app", "key_id", "subject", "method", "target", "api_version", "query",
                  "status", "rows", "duration_ms", "cached", "replica", "client")
AUDIT_TABLE_HEADER = ("time", "request", "client", "app", "key", "user", "method", "target", "ver", "status", "rows",
                      "ms", "from", "query")
VERSIONS_TABLE_HEADER = ("version", "app", "calls", "errors", "last call", "targets")


def _status_condition(status: int | str, params: list[Any]) -> str:
    if isinstance(status, int) or re.fullmatch(r"[0-9]{3}", str(status)):
        params.append(int(status))
        return f"status = ${len(params)}"
    match = STATUS_CLASS.match(str(status).strip().lower())
    if match is None:
        raise ValueError(f"status must be a number or one of 1xx..5xx, not {status!r}")
    params.append(int(match.group(1)) * 100)
    return f"status >= ${len(params)} AND status < ${len(params)} + 100"


async def search(conn: Connection, *, app: str | None = None, subject: str | None = None,
                 target: str | None = None, status: int | str | None = None, since: datetime | None = None,
                 until: datetime | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Audit records, newest first, matching every filter given. ``status`` is a code (404) or a class
    ("4xx"); ``target`` a contract name or ``rpc:<name>``; ``since`` inclusive, ``until`` exclusive."""
    conditions: list[str] = []
    params: list[Any] = []
    for column, value in (("app", app), ("subject", subject), ("target", target)):
        if value is not None:
            params.append(value)
            conditions.append(f"{column} = ${len(params)}")
    if status is not None:
        conditions.append(_status_condition(status, params))
    if since is not None:
        params.append(since)
        conditions.append(f"at >= ${len(params)}")
    if until is not None:
        params.append(until)
        conditions.append(f"at < ${len(params)}")
    params.append(max(1, min(MAX_LIMIT, int(limit))))
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    columns = ", ".join(f'"{c}"' for c in RECORD_COLUMNS)
    rows = await conn.fetch(
        f"SELECT {columns} FROM gatehouse.audit {where} ORDER BY at DESC, id DESC LIMIT ${len(params)}", *params
    )
    return [dict(row) for row in rows]


async def version_usage(conn: Connection, *, days: int = 30) -> list[dict[str, Any]]:
    """Per API version and app, from the roll-up: calls, errors, last call and the targets called, for apps
    that called in the last ``days`` days. Requests that never got as far as a version are left out."""
    rows = await conn.fetch(
        """
        SELECT api_version, app, sum(calls)::bigint AS calls, sum(errors)::bigint AS errors,
               max(last_call) AS last_call, array_agg(DISTINCT target ORDER BY target) AS targets
        FROM gatehouse.usage
        WHERE api_version > 0 AND app <> '' AND last_call >= now() - make_interval(days => $1)
        GROUP BY api_version, app
        ORDER BY api_version, max(last_call) DESC, app
        """,
        max(0, int(days)),
    )
    return [dict(row) for row in rows]


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


def version_table_rows(usage: list[dict[str, Any]], served: list[int] | None = None) -> list[tuple[str, ...]]:
    """:func:`version_usage` results as text cells (:data:`VERSIONS_TABLE_HEADER`); a served version nobody
    called in the window gets a row saying so."""
    called = {u["api_version"] for u in usage}
    rows = [(f"v{u['api_version']}", u["app"], str(u["calls"]), str(u["errors"]), _when(u["last_call"]),
             ", ".join(u["targets"])) for u in usage]
    rows += [(f"v{n}", "(no calls)", "0", "0", "", "") for n in (served or []) if n not in called]
    return sorted(rows, key=lambda row: int(row[0][1:]))


def as_json(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results ready for ``json.dumps`` (times as ISO 8601)."""
    return [{k: v.isoformat() if isinstance(v, datetime) else v for k, v in r.items()} for r in records]
