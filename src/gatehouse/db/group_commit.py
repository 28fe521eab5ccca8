"""Group commit: inserts of one statement waiting for the same app's connections run together, in one transaction.

Why: an insert's largest cost here is the flush of its commit to the WAL (with ``synchronous_commit = off`` the
bench's inserts ran three times as fast), and every write also commits its audit record. Inserts that queue for
a busy pool gain nothing by waiting one by one: the first connection that comes free takes all of them (up to
``max_group``) and runs the statement once per request in one round trip and one transaction (asyncpg's
``fetchmany``: every ``Execute`` before one ``Sync``), so they share one commit. bench/README.md measures it.

What a request sees is what it would see alone:

- Only what already waits is grouped. An insert that finds an idle connection runs at once, alone, as before;
  nothing ever waits for company (no timer, as PostgreSQL's ``commit_delay`` has).
- Each request has its own parameters (its rows, its audit record) and gets its own answer row.
- The group commits, or nothing of it does. When PostgreSQL refuses the group (one bad row, a constraint, a
  deadlock), its transaction is rolled back and each request runs again alone on the same connection, so each
  gets the answer it would have had alone: a bad row refuses only its own request.
- A connection lost under the group fails every request of it with 503, as it fails one insert alone (whether
  it committed is unknown, so it is never sent again); a pool that has no connection for them within its
  acquire timeout answers each 429/503 as for one request.
- A request given up by its caller while waiting is left out; once its group runs, it runs to the end.

The group's statement runs in a task of its own, not in any one request's, so that a caller who goes away
cannot cancel the others' inserts.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

import asyncpg

from gatehouse.db import Connection
from gatehouse.db.faults import is_dead
from gatehouse.db.pools import AppPool
from gatehouse.errors import ApiError

GROUP_COMMIT_MAX = 32
"""Requests one group takes at most by default (``[server] group_commit``): a bound on the size of one round
trip, and on how much one refused row makes run again."""

_Member = tuple[Sequence[object], "asyncio.Future[asyncpg.Record | None]"]


class _Queue:
    """The inserts of one statement waiting for a connection, and whether a task is already getting one."""

    __slots__ = ("draining", "members", "sql")

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.members: deque[_Member] = deque()
        self.draining = False


class CommitGroups:
    """The group commit of one app's pool on one database (see the module's docstring)."""

    def __init__(self, pool: AppPool, max_group: int = GROUP_COMMIT_MAX) -> None:
        self._pool = pool
        self._max_group = max_group
        self._queues: dict[str, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.groups = 0
        """Groups of two or more requests run."""
        self.grouped = 0
        """Requests that ran in such a group."""
        self.alone_again = 0
        """Requests that ran again alone after their group was refused."""

    async def fetchrow(self, sql: str, params: Sequence[object]) -> asyncpg.Record | None:
        """The statement's one answer row for these parameters, committed (alone or in a group)."""
        pool = self._pool
        queue = self._queues.get(sql)
        if self._max_group <= 1 or (pool.idle and (queue is None or not queue.members)):
            async with pool.acquire() as conn:  # a connection is free: no one to wait for
                return await conn.fetchrow(sql, *params)
        if queue is None:
            queue = self._queues[sql] = _Queue(sql)
        future: asyncio.Future[asyncpg.Record | None] = asyncio.get_running_loop().create_future()
        queue.members.append((params, future))
        if not queue.draining:
            self._drain_soon(queue)
        return await future

    def _drain_soon(self, queue: _Queue) -> None:
        queue.draining = True
        task = asyncio.get_running_loop().create_task(self._drain(queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self, queue: _Queue) -> list[_Member]:
        """The next group (callers still waiting, oldest first); a new task is started for any left over."""
        members, group = queue.members, list[_Member]()
        while members and len(group) < self._max_group:
            member = members.popleft()
            if not member[1].done():  # (cancelled: its caller went away before the group ran)
                group.append(member)
        queue.draining = False
        if members:
            self._drain_soon(queue)
        return group

    async def _drain(self, queue: _Queue) -> None:
        try:
            conn = await self._pool.lease()
        except BaseException as exc:  # no connection within the acquire timeout, or none can be opened
            _fail(self._take(queue), exc)
            if not isinstance(exc, Exception):
                raise
            return
        group = self._take(queue)
        if not group:
            self._pool.checkin(conn)
            return
        try:
            await self._run(conn, queue.sql, group)
        except BaseException as exc:
            try:
                self._pool.release(conn, exc)
            except ApiError as replaced:  # the connection died under the group: 503 for each of its requests
                exc = replaced
            _fail(group, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self._pool.checkin(conn)

    async def _run(self, conn: Connection, sql: str, group: list[_Member]) -> None:
        if len(group) == 1:
            params, future = group[0]
            row = await conn.fetchrow(sql, *params)
            if not future.done():
                future.set_result(row)
            return
        try:
            rows = await conn.fetchmany(sql, [params for params, _ in group])
        except asyncpg.PostgresError as exc:
            if is_dead(exc, conn) or conn.is_in_transaction():
                raise
            await self._each_alone(conn, sql, group)  # the group was rolled back: nothing of it is kept
            return
        if len(rows) != len(group):  # every statement given here answers one row (a write's tail)
            raise RuntimeError(f"group commit: {len(rows)} answer rows for {len(group)} statements")
        self.groups += 1
        self.grouped += len(group)
        for (_, future), row in zip(group, rows, strict=True):
            if not future.done():
                future.set_result(row)

    async def _each_alone(self, conn: Connection, sql: str, group: list[_Member]) -> None:
        """Each request of a refused group on its own, in order: its own commit, or its own error. A connection
        that dies meanwhile is raised to the caller, which fails the requests not yet answered."""
        for params, future in group:
            self.alone_again += 1
            try:
                row = await conn.fetchrow(sql, *params)
            except asyncpg.PostgresError as exc:
                if is_dead(exc, conn):
                    raise
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(row)

    async def close(self) -> None:
        """Wait for the groups being run (the pool closes after)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _fail(group: list[_Member], exc: BaseException) -> None:
    for _, future in group:
        if not future.done():
            if isinstance(exc, Exception):
                future.set_exception(exc)
            else:
                future.cancel()
