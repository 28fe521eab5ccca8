"""Is this server ready? Per database: does it answer, and does it serve every view this server serves?

``/ready`` (the admin port) and the console ask it. The answer is the database's state now: each database is
asked, all at once, each within :data:`READY_TIMEOUT_S`, on the server's internal pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import asyncpg

from gatehouse.contracts.versions import schema_name
from gatehouse.db.changes import current_revision
from gatehouse.db.faults import is_dead
from gatehouse.follow import Follower
from gatehouse.project import Project

READY_TIMEOUT_S = 2.0

SERVED_VIEWS = """
SELECT v.schema_name, v.view_name, v.checksum FROM gatehouse.views v
JOIN pg_views p ON p.schemaname = v.schema_name AND p.viewname = v.view_name
"""


async def readiness_report(pools: Mapping[str, asyncpg.Pool], project: Callable[[], Project],
                           follower: Follower | None) -> dict[str, str]:
    """Per database (its internal pool in ``pools``): 'ok', or what is wrong.

    A database is 'ok' when it answers and serves every view this server serves, as this server's project has it
    (``gatehouse.views`` records each view's contract checksum). That stays true through ``apply`` and ``migrate``
    (a migration re-creates views in its own transaction; readers of the catalog see the old views until it
    commits) and through a server's reload (a view dropped by ``apply`` while this server has yet to load that
    revision counts as served, for :data:`~gatehouse.follow.CATCH_UP_S`), so a load balancer never pulls every
    instance at once; it turns false when a view this server needs is gone.

    ``project``: the project the server serves now, asked once every database has answered (a reload installs
    the project, then marks its revision seen). ``follower``: what tells a revision this server is about to load
    from one it lacks."""
    names = list(pools)
    answers = await asyncio.gather(*(_served(pools[name]) for name in names), return_exceptions=True)
    served_project = project()
    report: dict[str, str] = {}
    for name, served in zip(names, answers, strict=True):
        if isinstance(served, BaseException):
            if not isinstance(served, Exception):
                raise served
            report[name] = f"unreachable ({type(served).__name__})"
            continue
        views, revision = served
        wanted = {(schema_name(n), c.name, c.checksum) for n, c in served_project.versions.views()
                  if c.database == name}
        missing = sorted(f"{schema}.{view}" for schema, view, _ in wanted - views)
        following = follower is not None and follower.catching_up(name, revision)
        report[name] = "ok" if not missing or following else (
            f"does not serve {', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''} as this "
            "server's project has it: run `gatehouse apply`")
    return report


async def _served(pool: asyncpg.Pool) -> tuple[set[tuple[str, str, str]], str | None]:
    """(schema, view, contract checksum) of every contract view that exists, and the database's revision;
    asked twice if the pool's connection turns out dead (the database restarted since it was last used)."""
    async with asyncio.timeout(READY_TIMEOUT_S):
        for attempt in (1, 2):
            async with pool.acquire() as conn:
                try:
                    rows = await conn.fetch(SERVED_VIEWS)
                    views = {(r["schema_name"], r["view_name"], r["checksum"]) for r in rows}
                    return views, await current_revision(conn)
                except Exception as exc:
                    if attempt == 2 or not is_dead(exc, conn):
                        raise
    raise AssertionError("not reached: the second attempt returns or raises")
