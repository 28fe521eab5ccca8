"""Steps every read takes, whether it is answered by one statement (:mod:`gatehouse.pipeline`) or composed across
databases (:mod:`gatehouse.composed_read`): the page a request asks for, and the counts PostgREST's
``Prefer: count=planned|estimated`` give."""

from __future__ import annotations

import orjson

from gatehouse.db import Connection
from gatehouse.query.sql import CompiledQuery
from gatehouse.query.tree import Level


def intersect_range(level: Level, requested: tuple[int, int | None] | None) -> None:
    """The Range header and limit/offset both apply: keep the rows inside both."""
    if requested is None:
        return
    first, length = requested
    start = max(level.offset, first)
    ends = [end for end in (
        None if level.limit is None else level.offset + level.limit,
        None if length is None else first + length,
    ) if end is not None]
    level.offset = start
    if ends:
        level.limit = max(0, min(ends) - start)


async def estimated_count(conn: Connection, rows: CompiledQuery, *, exact_up_to: int) -> int:
    """``count=estimated``: exact while there are at most ``exact_up_to`` rows, else the planner's estimate
    (``count=planned`` is ``exact_up_to=0``)."""
    if exact_up_to > 0:
        limit = f"${len(rows.params) + 1}"
        counted = await conn.fetchval(f"SELECT count(*) FROM ({rows.sql} LIMIT {limit}) AS _gh_n",
                                      *rows.params, exact_up_to + 1)
        if counted <= exact_up_to:
            return int(counted)
    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {rows.sql}", *rows.params)
    return int(orjson.loads(plan)[0]["Plan"]["Plan Rows"])
