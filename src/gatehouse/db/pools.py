"""One application's connections to one database: at most its quota, opened on demand, reused newest first.

The pool's size is the app's quota, so a noisy app waits for its own connections instead of taking everyone
else's (how its connections log in: ``db/app_pools.py``).

Why not ``asyncpg.Pool``: it costs about as much CPU per checkout as the query itself (a holder object, a
proxy around every connection, a timeout task, the reset hook), which made it a third of the cost of a point
lookup. A request here runs one statement (or one transaction it ends itself) and sets no session state, so
the pool needs none of that: an idle stack, a queue of waiters, and a rule for connections whose state is
unknown (dropped, never reused). Connections are not reset on return for the same reason.

Connections age out as PostgREST's do: one idle longer than ``max_idle_s`` or older than ``max_lifetime_s``
is closed (an in-use one when it comes back), so that a pool follows a failover, lets the server reclaim
memory, and never keeps a connection that a NAT or proxy has long forgotten. Nothing of this is on the
request path: a checkin stamps the time of the last tick (no clock call), and one timer per pool
(:meth:`AppPool._age`, every quarter of the shorter limit, at most 5 s, while it has connections) compares
the stamps; an idle connection is closed after between one and about one and a half times ``max_idle_s``.
A database that cannot be reached is answered 503 with ``Retry-After``, and left alone for a short backoff
between connect attempts (``db/faults.py``); a read that meets a dead connection runs once more on a fresh
one (:meth:`AppPool.read_row`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

import asyncpg

from gatehouse.db import Connection
from gatehouse.db.faults import (
    BROKEN,
    CONNECT_ERRORS,
    Backoff,
    cannot_connect,
    connection_lost,
    is_dead,
)
from gatehouse.db.waiters import Waiters
from gatehouse.errors import ApiError, DatabaseUnavailable, PoolTimeout

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0
MAX_IDLE_S = 30.0
MAX_LIFETIME_S = 1800.0
LIFETIME_SPREAD = 0.1
"""A connection's lifetime is shortened by up to this share, so that connections opened together (at start)
are not all closed, and reopened, at once."""
AGING_TICK_MAX_S = 5.0


def _timed_out() -> PoolTimeout:
    return PoolTimeout("Timed out acquiring connection from connection pool.",
                       hint="The application is using all the connections its quota allows.")


class AppPool:
    """At most ``size`` connections, opened on demand (``min_size`` at start) and handed out newest-idle first."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]], size: int, acquire_timeout_s: float, *,
                 max_idle_s: float = MAX_IDLE_S, max_lifetime_s: float = MAX_LIFETIME_S, name: str = "-") -> None:
        self._connect = connect
        self.size = size
        self.name = name
        self._acquire_timeout_s = acquire_timeout_s
        self._idle: list[Connection] = []
        self._idle_since: list[float] = []
        """When each idle connection came back, by the coarse clock ``_now``: in stack order, so ascending."""
        self._waiters = Waiters(_timed_out, name)
        self._opened = 0  # connections that exist or are being opened
        self._connecting = 0  # of which being opened
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once: asyncio's lookup is a syscall
        self._max_idle_s, self._max_lifetime_s = max_idle_s, max_lifetime_s
        self._tick_s = min(max(min(max_idle_s, max_lifetime_s) / 4, 0.01), AGING_TICK_MAX_S)
        self._ager: asyncio.TimerHandle | None = None
        self._now = 0.0
        """The loop's time at the last aging tick or connect: what a checkin stamps, without a clock call."""
        self._ends: dict[Connection, float] = {}
        """Each open connection's end of life."""
        self._retiring: set[Connection] = set()
        """In use past their end of life: closed when they come back."""
        self._backoff = Backoff()
        self.retried_reads = 0
        """Reads that met a dead connection and ran again on a fresh one."""

    @property
    def in_use(self) -> int:
        return self._opened - len(self._idle)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests waiting for one of its connections."""
        return len(self._waiters)

    @property
    def opened(self) -> int:
        return self._opened

    def _time(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    async def open(self, min_size: int) -> None:
        opened = await asyncio.gather(*(self._open_one() for _ in range(min(min_size, self.size))),
                                      return_exceptions=True)
        for conn in opened:
            if not isinstance(conn, BaseException):
                self.checkin(conn)
        failed = [error for error in opened if isinstance(error, BaseException)]
        if failed:
            await self.close()
            raise failed[0]

    def acquire(self) -> Lease:
        """``async with pool.acquire() as conn``: a connection for one request, returned (or dropped) after."""
        return Lease(self)

    async def checkout(self) -> Connection:
        """A connection: an idle one, a new one, or one given back within the acquire timeout (else
        :class:`PoolTimeout`). While the database is backed off, a pool with no connection at all answers
        503 at once; connect errors are raised as they are (:meth:`lease` turns them into 503)."""
        deadline = None
        while True:
            if self._closed:
                raise cannot_connect()
            idle = self._idle
            while idle:
                conn = idle.pop()
                self._idle_since.pop()
                if not conn.is_closed():
                    return conn
                self._forget(conn)
                self._opened -= 1
            if self._opened < self.size:
                backoff = self._backoff
                if not backoff.failures:
                    return await self._open_one()
                now = self._time()
                if not backoff.blocks(now):
                    backoff.probing = True
                    return await self._open_one()
                if self._opened == self._connecting:  # no connection that could come back to wait for
                    raise cannot_connect(backoff.wait_s(now))
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            if deadline is None:  # one timeout for the whole wait, however often a freed slot is lost to a race
                deadline = self._loop.time() + self._acquire_timeout_s
            conn_or_retry = await self._wait(deadline)
            if conn_or_retry is not None:
                return conn_or_retry

    async def lease(self) -> Connection:
        """:meth:`checkout`, with a failure to connect answered as 503 PGRST000 with ``Retry-After``."""
        try:
            return await self.checkout()
        except (*CONNECT_ERRORS, DatabaseUnavailable):
            raise cannot_connect(self._backoff.wait_s(self._time())) from None

    async def _open_one(self) -> Connection:
        self._opened += 1
        return await self._open_in_slot()

    async def _open_in_slot(self) -> Connection:
        """Open a connection in a slot already counted in ``_opened``. On failure the slot is given back (a
        waiter is woken to use it) and the backoff grows; the error is raised as it is."""
        self._connecting += 1
        try:
            conn = await self._connect()
        except BaseException as exc:
            self._connecting -= 1
            self._opened -= 1
            self._waiters.wake_one(None)  # a waiter may try to open one in our place
            if isinstance(exc, Exception):
                first = not self._backoff.failures
                self._backoff.failed(self._time())
                if first:
                    log.warning("pool %s: cannot connect to the database (%s); backing off", self.name,
                                type(exc).__name__)
            else:  # cancelled: says nothing about the database
                self._backoff.probing = False
            raise
        self._connecting -= 1
        if self._backoff.failures:
            log.info("pool %s: the database is reachable again", self.name)
            self._backoff.succeeded()
        now = self._now = self._time()
        self._ends[conn] = now + self._max_lifetime_s * (1 - LIFETIME_SPREAD * random.random())
        if self._ager is None and not self._closed:
            self._schedule_aging()
        return conn

    async def _wait(self, deadline: float) -> Connection | None:
        """Wait for a returned connection (or ``None``: a slot came free, or the pool closed: look again)."""
        assert self._loop is not None
        waiter = self._waiters.add(self._loop, deadline)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()  # handed over just as the caller was cancelled: pass it on
                if handed is not None:
                    self.checkin(handed)
                else:
                    self._waiters.wake_one(None)
            else:
                waiter.cancel()
            raise

    def checkin(self, conn: Connection) -> None:
        """Return a connection after a statement the server answered; one left in a transaction is dropped,
        and so is one past its lifetime."""
        if (self._closed or conn.is_closed() or conn.is_in_transaction()
                or (self._retiring and conn in self._retiring)):
            self.discard(conn)
        elif not self._waiters.wake_one(conn):
            self._idle.append(conn)
            self._idle_since.append(self._now)

    def release(self, conn: Connection, exc: BaseException | None) -> None:
        """Give back a leased connection as the lease ended with ``exc``: kept after an answer or an error of
        our own, dropped when its state is unknown. A broken connection raises 503 PGRST001 in place of ``exc``."""
        if exc is None:
            self.checkin(conn)
        elif not isinstance(exc, Exception):
            self.discard(conn)  # cancelled mid-statement: closed with a cancel request, so the server stops too
        elif is_dead(exc, conn):
            self._drop(conn)
            raise connection_lost() from None
        elif isinstance(exc, BROKEN):
            self.discard(conn)  # a client-side timeout or fault: the server may still be running something
            raise connection_lost() from None
        elif isinstance(exc, ApiError) and exc.status == 503:
            self._drop(conn)  # the database answered that it is going away or out of resources
        else:
            self.checkin(conn)  # the server answered, or our code raised between statements

    async def read_row(self, sql: str, params: Sequence[object]) -> asyncpg.Record | None:
        """Run one read-only statement and return its first row.

        If the connection turns out dead (killed by ``pg_terminate_backend``, a server restart, or a NAT or
        proxy that dropped it while idle), the statement had no effect and gave no result, so it runs once
        more on a connection opened for it in the dead one's slot; a second failure is 503. Only for reads:
        a write whose connection died may have committed, and is never sent twice."""
        conn = await self.lease()
        retry = True
        while True:
            try:
                row = await conn.fetchrow(sql, *params)
            except BaseException as exc:
                if not (retry and isinstance(exc, Exception) and is_dead(exc, conn)):
                    self.release(conn, exc)
                    raise
            else:
                self.checkin(conn)
                return row
            retry = False
            self.retried_reads += 1
            self._forget(conn)
            conn.terminate()
            conn = await self._reopen()

    async def _reopen(self) -> Connection:
        """A new connection in the slot of one found dead, kept for it so that no waiter takes it meanwhile."""
        now = self._time()
        if self._closed or self._backoff.blocks(now):
            self._opened -= 1
            self._waiters.wake_one(None)
            raise cannot_connect(self._backoff.wait_s(now))
        if self._backoff.failures:
            self._backoff.probing = True
        try:
            return await self._open_in_slot()
        except (*CONNECT_ERRORS, DatabaseUnavailable):
            raise cannot_connect(self._backoff.wait_s(self._time())) from None

    def discard(self, conn: Connection) -> None:
        """Drop a connection whose state is unknown (cancelled mid-statement, broken, left in a transaction).

        It is closed, not terminated, so that a statement cancelled on our side is cancelled on the server
        too (asyncpg sends the cancel request first); its slot stays taken until then, keeping the quota exact.
        """
        self._forget(conn)
        if conn.is_closed():
            self._release_slot()
            return
        task = asyncio.get_running_loop().create_task(self._close_quietly(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _drop(self, conn: Connection) -> None:
        """Drop a connection that has nothing running on the server (dead, or ended by it): at once."""
        self._forget(conn)
        conn.terminate()
        self._release_slot()

    def _forget(self, conn: Connection) -> None:
        self._ends.pop(conn, None)
        self._retiring.discard(conn)

    async def _close_quietly(self, conn: Connection) -> None:
        try:
            await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError, TimeoutError):
            conn.terminate()
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        self._opened -= 1
        if not self._closed:
            self._waiters.wake_one(None)

    # --- aging ---------------------------------------------------------------------------------------

    def _schedule_aging(self) -> None:
        self._ager = asyncio.get_running_loop().call_later(self._tick_s, self._age)

    def _age(self) -> None:
        """The aging tick, while the pool has connections. Guarded like the waiters' sweep: an error is logged and
        the next tick still comes."""
        self._ager = None
        try:
            self._retire(self._time())
        except Exception as exc:
            log.error("pool %s: aging connections failed (%s)", self.name, type(exc).__name__)
        finally:
            if not self._closed and self._opened:
                self._schedule_aging()

    def _retire(self, now: float) -> None:
        """Close idle connections idle too long or past their lifetime; mark in-use ones past their lifetime."""
        self._now = now
        idle, since = self._idle, self._idle_since
        # A stamp is up to one tick early (the clock of the tick before the checkin): count that tick out, so
        # that no connection is closed before it really was idle for max_idle_s.
        stale = now - self._max_idle_s - self._tick_s
        count = 0
        while count < len(since) and since[count] <= stale:
            count += 1
        expired = idle[:count]
        del idle[:count], since[:count]
        ends = self._ends
        for i in range(len(idle) - 1, -1, -1):
            if ends.get(idle[i], now) <= now:
                expired.append(idle.pop(i))
                since.pop(i)
        for conn in expired:
            self.discard(conn)
        for conn, end in ends.items():  # idle ones past their end are gone by now: these are in use
            if end <= now:
                self._retiring.add(conn)

    async def close(self) -> None:
        self._closed = True
        if self._ager is not None:
            self._ager.cancel()
            self._ager = None
        self._waiters.close()  # each waiter looks again, finds the pool closed and answers 503
        idle, self._idle, self._idle_since = self._idle, [], []
        self._opened -= len(idle)
        for conn in idle:
            self._forget(conn)
            try:
                await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)
            except (OSError, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class Lease:
    """A connection held for one request. Written as a class, not ``@asynccontextmanager``: it is on every
    request's path and a generator-based context manager costs several times as much."""

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: AppPool) -> None:
        self._pool = pool

    async def __aenter__(self) -> Connection:
        self._conn = await self._pool.lease()
        return self._conn

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._pool.release(self._conn, exc)
