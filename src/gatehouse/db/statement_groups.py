"""Statement groups: requests of one statement that wait for the same app's busy pool run together, in one round
trip; inserts also in one transaction (group commit).

Why: once an app's connections are all busy, the requests that wait for one gain nothing by waiting one by one.
The first connection that comes free takes every waiting request of a statement (up to ``max_group``) and runs
the statement once per request, each with its own parameters, in one round trip: asyncpg's ``fetchmany``, every
``Execute`` before one ``Sync``. PostgreSQL then reads one message and writes one answer for the group, and
inserts share one commit, one WAL flush, where each would have flushed its own (with ``synchronous_commit = off``
the bench's inserts ran three times as fast). bench/README.md measures it.

What a request sees is what it would see alone:

- Nothing waits for company longer than one turn of the event loop (no timer, as PostgreSQL's ``commit_delay``
  has). A read of a *cheap* statement (its pace, the time a request of it took in its last run, lets at least
  two fit in :data:`GROUP_BUDGET_S`) that has had company lately (its recent runs took
  :data:`COMPANY_MIN` requests or more on average) joins the requests of its statement that came in the same
  turn even while a connection is free: the bench's point lookups, 94 % of them in groups where 56 % were, cost
  PostgreSQL 24 µs each instead of 36 and the server 78 instead of 96 (bench/README.md, twenty-fourth session).
  A statement that runs alone (one app among a hundred, each with its own pool and groups) does not wait a turn
  for company that does not come: that cost 21 µs of CPU a request and 13 % of the throughput at 100 apps
  (twenty-fifth session). Any other read or write that finds an idle connection runs at once, alone; under
  load, what waits for a connection goes together, and so a statement gets company again.
- A group of reads takes what fits in :data:`GROUP_BUDGET_S` at its statement's pace (and at most
  ``max_group``): the rest goes on the next connection free, so that slow reads still run side by side. A group
  of writes takes up to ``max_group``: they share one commit, the dearer part of a small insert.
- Plain inserts go further: one statement of them runs at a time (a funnel), the first after one turn of the
  loop, and what comes meanwhile waits for it rather than for a free connection, then goes together
  (:meth:`StatementGroups._hold`).
- Each request has its own parameters and gets its own answer row. A group is of one statement (one query
  shape), so its requests cost alike: none waits long behind a different, slower one.
- Reads: every statement of the implicit transaction takes its own snapshot (READ COMMITTED), taken after the
  request arrived, so it sees every write acknowledged before that, as alone.
- Inserts: the group commits, or nothing of it does, each insert with its own audit record.
- Plain inserts (each with a :class:`Merge`) go further: the group is *one* statement, every request's rows in
  one ``INSERT`` and every audit record in another, where each statement of a group cost PostgreSQL its own
  executor start, two ``INSERT`` nodes and their indexes opened: 60-65 µs of its CPU per insert instead of
  157-206 (bench/README.md). Each request is answered with its own rows' count. The statement checks that it
  wrote exactly the rows sent and fails otherwise (a trigger that skipped one would leave the counts unknown),
  and a failed group runs again alone, below.
- When PostgreSQL refuses a group (a bad value, a bad row, a constraint, a deadlock; a value asyncpg cannot
  encode is raised the same way, the group rolled back before its ``Sync``), nothing of it is kept and each
  request runs again alone on the same connection, so each gets the answer it would have had alone: a bad
  request refuses only itself.
- A connection lost under a group: its reads run again on a fresh connection, as a read alone does
  (:meth:`AppPool.read_row`); its inserts fail with 503, as one insert alone does (whether they committed is
  unknown, so they are never sent again). A pool with no connection for the group within its acquire timeout
  answers each request as it answers one.
- A request given up by its caller while waiting is left out; once its group runs, it runs to the end.

The group runs in a task of its own, not in any one request's, so that a caller who goes away cannot cancel the
others' statements.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import asyncpg

from gatehouse.db import Connection
from gatehouse.db.faults import is_dead
from gatehouse.db.pools import AppPool
from gatehouse.errors import ApiError

GROUP_MAX = 32
"""Requests one group takes at most by default (``[server] group_statements``): a bound on the size of one round
trip, and on how much one refused request makes run again."""

GROUP_BUDGET_S = 0.002
"""PostgreSQL time one group is meant to take, by its statement's pace: what bounds a group's size, and decides
which reads wait a loop turn for company (see the module's docstring)."""

COMPANY_MIN = 1.5
"""The requests a cheap read's statement must have run with lately, on average, for a read of it to wait a turn
for company while a connection is free."""

COMPANY_WEIGHT = 0.25
"""The weight of a statement's last run in its average company (an exponential moving average)."""

PACES_KEPT = 1024
"""Statements whose pace is remembered (least recently run out first)."""

FUNNEL_HOLD_S = 0.05
"""How long a running plain insert holds back the next ones of its shape at most (:meth:`StatementGroups._hold`):
a slow one (a lock wait, a slow trigger) lets them go on other connections after this."""

_AGAIN = object()
"""A read's answer when its group's connection died: the read runs again alone, on a fresh connection."""


class Merge(NamedTuple):
    """How one insert of a group joins the others in one statement (see the module's docstring)."""

    sql: str
    """The statement that writes a whole group: one parameter per part, each the members' parts joined into one
    JSON array, then the number of rows they send together. It answers one row with the columns of the insert's
    own statement, ``written`` the rows of the whole group."""
    parts: tuple[str, ...]
    """This request's share of each of those parameters: a JSON array."""
    rows: int
    """The rows this request sends, which is its answer's ``written``."""


class _Pace(NamedTuple):
    """What the runs of one statement said about it."""

    seconds: float
    """The time a request of it took in its last run (its round trip shared by its group)."""
    company: float
    """The requests its runs took lately, on average (:data:`COMPANY_WEIGHT`)."""


_Member = tuple[Sequence[object], "asyncio.Future[object]", Merge | None]
WriteAnswer = asyncpg.Record | dict[str, Any]
"""A write's answer row: its own statement's, or a merged group's with its own ``written`` (:class:`Merge`)."""


class _Queue:
    """The requests of one statement waiting for a connection, and whether a task is already getting one."""

    __slots__ = ("draining", "funnel", "holder", "members", "reading", "sql")

    def __init__(self, sql: str, reading: bool, funnel: bool = False) -> None:
        self.sql = sql
        self.reading = reading
        self.members: deque[_Member] = deque()
        self.draining = False
        self.funnel = funnel
        """One statement of the queue at a time (inserts with a :class:`Merge`): ``draining`` stays set while it
        runs, and what came meanwhile goes next, together (:meth:`StatementGroups._hold`)."""
        self.holder: object | None = None
        """The statement holding the funnel now, if any."""


class StatementGroups:
    """The statement groups of one app's pool on one database (see the module's docstring)."""

    def __init__(self, pool: AppPool, max_group: int = GROUP_MAX) -> None:
        self.pool = pool
        self._max_group = max_group
        self._queues: dict[str, _Queue] = {}
        self._paces: OrderedDict[str, _Pace] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.groups = 0
        """Groups of two or more requests run."""
        self.grouped = 0
        """Requests that ran in such a group."""
        self.alone_again = 0
        """Requests that ran again alone after their group was refused."""
        self.merged = 0
        """Groups that ran as one statement (:class:`Merge`)."""

    @property
    def statements_waiting(self) -> int:
        """Statements with requests waiting for a connection now."""
        return len(self._queues)

    async def read(self, sql: str, params: Sequence[object]) -> asyncpg.Record | None:
        """A read-only statement's first row (every read statement of gatehouse answers one)."""
        queue = self._queues.get(sql)
        if self._max_group <= 1:
            return await self.pool.read_row(sql, params)
        if self.pool.idle and (queue is None or not queue.members) and not self._cheap(sql):
            started = time.perf_counter()  # a connection is free, and company is not worth a turn: alone
            row = await self.pool.read_row(sql, params)
            self._paced(sql, time.perf_counter() - started, 1)
            return row
        answer = await self._join(queue, sql, params, reading=True)
        if answer is _AGAIN:
            return await self.pool.read_row(sql, params)
        assert answer is None or isinstance(answer, asyncpg.Record)
        return answer

    async def write(self, sql: str, params: Sequence[object],
                    merge: Merge | None = None) -> WriteAnswer | None:
        """An autocommit write statement's one answer row, committed (alone or with the others of its group).
        ``merge``: how it may run in one statement with the others of its group, which all have one too."""
        pool = self.pool
        queue = self._queues.get(sql)
        if merge is not None and queue is None and self._max_group > 1:  # the first through the funnel
            queue = self._queues[sql] = _Queue(sql, reading=False, funnel=True)
        elif self._max_group <= 1 or (pool.idle and (queue is None or not queue.members)):
            async with pool.acquire() as conn:
                return await conn.fetchrow(sql, *params)
        answer = await self._join(queue, sql, params, reading=False, merge=merge)
        assert answer is None or isinstance(answer, asyncpg.Record | dict)
        return answer

    def _cheap(self, sql: str) -> bool:
        """Whether at least two requests of the statement fit in :data:`GROUP_BUDGET_S`, by its last pace, and its
        runs had company lately (:data:`COMPANY_MIN`)."""
        pace = self._paces.get(sql)
        return pace is not None and pace.seconds * 2 <= GROUP_BUDGET_S and pace.company >= COMPANY_MIN

    def _paced(self, sql: str, seconds: float, requests: int) -> None:
        paces = self._paces
        last = paces.get(sql)
        company = requests if last is None else last.company + (requests - last.company) * COMPANY_WEIGHT
        paces[sql] = _Pace(seconds / requests, company)
        paces.move_to_end(sql)
        if len(paces) > PACES_KEPT:
            paces.popitem(last=False)

    def _hold(self, queue: _Queue) -> Callable[[], None]:
        """Hold a funnel for one statement; what this returns lets go of it, once the statement is done. After
        :data:`FUNNEL_HOLD_S` it lets go by itself, the statement still running: a slow one holds no one back.

        Why a funnel: letting plain inserts run alone on any free connection left 40 % of the bench's inserts
        alone (each its own statement and commit, three times the database's work of one in a merged group) for
        no gain in latency: they wait for one statement, and :data:`FUNNEL_HOLD_S` at most."""
        queue.draining = True
        token = queue.holder = object()

        def release() -> None:
            timer.cancel()
            if queue.holder is token:
                queue.holder = None
                self._next(queue)

        timer = self._running_loop().call_later(FUNNEL_HOLD_S, release)
        return release

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop, kept from the first call: CPython 3.11's ``asyncio.get_running_loop()`` makes a
        ``getpid()`` system call each time (a fork check), one or two a request here."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _next(self, queue: _Queue) -> None:
        """A funnel let go: the requests that came meanwhile go next, together, or the queue is forgotten."""
        queue.draining = False
        if queue.members:
            self._drain_soon(queue)
        elif self._queues.get(queue.sql) is queue:
            del self._queues[queue.sql]

    def _join(self, queue: _Queue | None, sql: str, params: Sequence[object],
              reading: bool, merge: Merge | None = None) -> asyncio.Future[object]:
        if queue is None:
            queue = self._queues[sql] = _Queue(sql, reading)
        future: asyncio.Future[object] = self._running_loop().create_future()
        queue.members.append((params, future, merge))
        if not queue.draining:
            self._drain_soon(queue)
        return future

    def _drain_soon(self, queue: _Queue) -> None:
        queue.draining = True
        task = self._running_loop().create_task(self._drain(queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self, queue: _Queue) -> list[_Member]:
        """The next group (callers still waiting, oldest first); a new task is started for any left over."""
        members, group, most = queue.members, list[_Member](), self._max_group
        pace = self._paces.get(queue.sql) if queue.reading else None  # (writes share a commit: the more the better)
        if pace is not None and pace.seconds > 0:  # (None: not run yet)
            most = max(1, min(most, int(GROUP_BUDGET_S / pace.seconds)))
        while members and len(group) < most:
            member = members.popleft()
            if not member[1].done():  # (cancelled: its caller went away before the group ran)
                group.append(member)
        if queue.funnel:  # the rest goes after this group (_hold)
            return group
        queue.draining = False
        if members:
            self._drain_soon(queue)
        elif self._queues.get(queue.sql) is queue:  # kept only while requests wait: shapes are many, waits few
            del self._queues[queue.sql]
        return group

    async def _drain(self, queue: _Queue) -> None:
        release = self._hold(queue) if queue.funnel else None
        try:
            await self._drain_group(queue)
        finally:
            if release is not None:
                release()

    async def _drain_group(self, queue: _Queue) -> None:
        try:
            conn = await self.pool.lease()
        except BaseException as exc:  # no connection within the acquire timeout, or none can be opened
            _fail(self._take(queue), exc)
            if not isinstance(exc, Exception):
                raise
            return
        group = self._take(queue)
        if not group:
            self.pool.checkin(conn)
            return
        started = time.perf_counter()
        try:
            await self._run(conn, queue.sql, group)
        except BaseException as exc:
            again = isinstance(exc, Exception) and queue.reading and is_dead(exc, conn)  # reads run again alone
            try:
                self.pool.release(conn, exc)
            except ApiError as replaced:  # the connection died under the group: 503 for each of its writes
                exc = replaced
            _fail(group, _AGAIN if again else exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self.pool.checkin(conn)
            if queue.reading:
                self._paced(queue.sql, time.perf_counter() - started, len(group))

    async def _run(self, conn: Connection, sql: str, group: list[_Member]) -> None:
        if len(group) == 1:
            params, future, _ = group[0]
            row = await conn.fetchrow(sql, *params)
            if not future.done():
                future.set_result(row)
            return
        merges = [merge for _, _, merge in group if merge is not None]
        if len(merges) == len(group):
            await self._run_merged(conn, sql, group, merges)
            return
        try:
            rows = await conn.fetchmany(sql, [params for params, _, _ in group])
        except asyncpg.PostgresError as exc:
            if is_dead(exc, conn) or conn.is_in_transaction():
                raise
            await self._each_alone(conn, sql, group)  # the group was rolled back: nothing of it is kept
            return
        if len(rows) != len(group):  # every statement given here answers one row
            raise RuntimeError(f"statement group: {len(rows)} answer rows for {len(group)} statements")
        self.groups += 1
        self.grouped += len(group)
        for (_, future, _), row in zip(group, rows, strict=True):
            if not future.done():
                future.set_result(row)

    async def _run_merged(self, conn: Connection, sql: str, group: list[_Member], merges: list[Merge]) -> None:
        """The group as one statement (:class:`Merge`); refused, each request again alone (as any group)."""
        params: list[object] = [_joined([merge.parts[i] for merge in merges]) for i in range(len(merges[0].parts))]
        params.append(sum(merge.rows for merge in merges))
        try:
            row = await conn.fetchrow(merges[0].sql, *params)
        except asyncpg.PostgresError as exc:
            if is_dead(exc, conn) or conn.is_in_transaction():
                raise
            await self._each_alone(conn, sql, group)  # nothing of it was kept
            return
        assert row is not None  # the statement's answer is one row of aggregates
        self.groups += 1
        self.grouped += len(group)
        self.merged += 1
        shared = dict(row.items())
        for (_, future, _), merge in zip(group, merges, strict=True):
            if not future.done():
                future.set_result({**shared, "written": merge.rows})

    async def _each_alone(self, conn: Connection, sql: str, group: list[_Member]) -> None:
        """Each request of a refused group on its own, in order: its own answer, or its own error. A connection
        that dies meanwhile is raised to the caller, which answers the requests not yet answered."""
        for params, future, _ in group:
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


def _fail(group: list[_Member], outcome: BaseException | object) -> None:
    """Answer the group's requests not yet answered: with an error, cancelled, or with ``_AGAIN``."""
    for _, future, _ in group:
        if future.done():
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        elif isinstance(outcome, BaseException):
            future.cancel()
        else:
            future.set_result(outcome)


def _joined(arrays: list[str]) -> str:
    """JSON arrays (as orjson writes them: no space around the brackets) joined into one."""
    return "[" + ",".join(inner for array in arrays if (inner := array[1:-1])) + "]"
