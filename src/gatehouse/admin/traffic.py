"""The overview's charts: requests, server errors and p95 latency per app and minute over the last hour, from
the audit trail's summaries per minute (``gatehouse.audit_minutes``: nothing unpacked but the batches that cross
the window's start), so the lines start before this server did and agree across instances. The console's own
records (``console:*``) are left out.

Each database holds the records of the requests it served; counts from several databases are added up, and the
p95 of a minute is the highest of theirs (percentiles do not add up; one database, the usual case, is exact).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg

from gatehouse import operations
from gatehouse.project import Project

MINUTES = 60
WINDOW = timedelta(minutes=MINUTES)
_PER_MINUTE = """
WITH m AS (
    SELECT * FROM gatehouse.audit_minutes(now() - $1::interval, 'infinity')
    WHERE app <> '' AND target NOT LIKE 'console:%'
)
SELECT extract(epoch FROM counted.minute)::bigint AS t, counted.app, counted.requests, counted.errors, timed.p95
FROM (SELECT minute, app, sum(requests)::bigint AS requests, sum(server_errors)::bigint AS errors
      FROM m GROUP BY 1, 2) AS counted
LEFT JOIN (SELECT minute, app, percentile_cont(0.95) WITHIN GROUP (ORDER BY d) AS p95
           FROM m, unnest(m.durations) AS d GROUP BY 1, 2) AS timed USING (minute, app)
"""


async def per_minute(project: Project) -> dict[str, Any]:
    """``{"t": [minute, ...], "apps": {app: {"requests": [...], "errors": [...], "p95": [...]}}}``: the 60
    minutes of the window up to the database's now, requests and errors 0 in a minute without any, p95 ``None``
    there (a gap in its line)."""
    async def read(_: str, conn: asyncpg.Connection) -> tuple[int, list[asyncpg.Record]]:
        now = int(await conn.fetchval("SELECT extract(epoch FROM date_trunc('minute', now()))::bigint"))
        try:
            return now, list(await conn.fetch(_PER_MINUTE, WINDOW))
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError):
            return now, []

    found = list((await operations.each_database(project, read)).values())
    end = max(now for now, _ in found)
    minutes = list(range(end - MINUTES * 60 + 60, end + 60, 60))
    index = {t: i for i, t in enumerate(minutes)}
    apps: dict[str, dict[str, list[float | None]]] = {}
    for row in (row for _, rows in found for row in rows):
        i = index.get(row["t"])
        if i is None:  # another database's clock, a minute apart
            continue
        series = apps.setdefault(row["app"], {"requests": [0] * len(minutes), "errors": [0] * len(minutes),
                                              "p95": [None] * len(minutes)})
        series["requests"][i] = (series["requests"][i] or 0) + row["requests"]
        series["errors"][i] = (series["errors"][i] or 0) + row["errors"]
        series["p95"][i] = max(series["p95"][i] or 0.0, round(float(row["p95"]), 2))
    return {"t": minutes, "apps": dict(sorted(apps.items()))}
