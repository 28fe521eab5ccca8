"""One connection pool per application and database: the app's connection quota, under the app's role.

Each connection logs in as the authenticator with ``role`` and ``application_name`` as startup parameters, so
every statement runs as the app's NOLOGIN role (PostgreSQL refuses whatever the app was not granted) and
``pg_stat_activity`` names the app. The pool's size is the app's quota, so a noisy app waits for its own
connections instead of taking everyone else's.

Why not ``asyncpg.Pool``: it costs about as much CPU per checkout as the query itself (a holder object, a
proxy around every connection, a timeout task, the reset hook), which made it a third of the cost of a point
lookup. A request here runs one statement (or one transaction it ends itself) and sets no session state, so
the pool needs none of that: an idle stack, a queue of waiters, and a rule for connections whose state is
unknown (dropped, never reused). Connections are not reset on return for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType

import asyncpg

from gatehouse.db import Connection
from gatehouse.db.targets import DatabaseTarget
from gatehouse.errors import PoolTimeout, ServiceUnavailable
from gatehouse.project import App

CLOSE_TIMEOUT_S = 5.0
_BROKEN = (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("Database connection error. Retrying the connection.",
                              hint="The database did not answer; try again shortly.")


def application_name(app: str) -> str:
    return f"gatehouse/{app}"


class AppPool:
    """At most ``size`` connections, opened on demand (``min_size`` at start) and handed out newest-idle first."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]], size: int, acquire_timeout_s: float) -> None:
        self._connect = connect
        self.size = size
        self._acquire_timeout_s = acquire_timeout_s
        self._idle: list[Connection] = []
        self._waiters: deque[tuple[float, asyncio.Future[Connection | None]]] = deque()
        """Who waits for a connection, first come first served, each with its deadline."""
        self._sweeper: asyncio.TimerHandle | None = None
        self._opened = 0  # connections that exist or are being opened
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once: asyncio's lookup is a syscall

    @property
    def in_use(self) -> int:
        return self._opened - len(self._idle)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def opened(self) -> int:
        return self._opened

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
        deadline = None
        while True:
            if self._closed:
                raise _unavailable()
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn
                self._opened -= 1
            if self._opened < self.size:
                return await self._open_one()
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            if deadline is None:  # one timeout for the whole wait, however often a freed slot is lost to a race
                deadline = self._loop.time() + self._acquire_timeout_s
            conn_or_retry = await self._wait(deadline)
            if conn_or_retry is not None:
                return conn_or_retry

    async def _open_one(self) -> Connection:
        self._opened += 1
        try:
            return await self._connect()
        except BaseException:
            self._opened -= 1
            self._wake_one(None)  # a waiter may try to open one in our place
            raise

    async def _wait(self, deadline: float) -> Connection | None:
        """Wait for a returned connection (or ``None``: a slot came free, or the pool closed: look again).

        Deadlines are kept by one timer per pool (:meth:`_sweep`), not one per waiter: this runs for most
        requests of a busy app, and a timer per wait was a measurable part of a request."""
        assert self._loop is not None
        waiter: asyncio.Future[Connection | None] = self._loop.create_future()
        self._waiters.append((deadline, waiter))
        if self._sweeper is None or deadline < self._sweeper.when():
            self._schedule_sweep(deadline)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()  # handed over just as the caller was cancelled: pass it on
                if handed is not None:
                    self.checkin(handed)
                else:
                    self._wake_one(None)
            else:
                waiter.cancel()
            raise

    def _schedule_sweep(self, when: float) -> None:
        assert self._loop is not None
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweeper = self._loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        """Fail the waiters whose deadline has passed with :class:`PoolTimeout`; come back for the next one."""
        assert self._loop is not None
        self._sweeper = None
        now = self._loop.time()
        pending: deque[tuple[float, asyncio.Future[Connection | None]]] = deque()
        for deadline, waiter in self._waiters:
            if waiter.done():  # served or cancelled already
                continue
            if deadline <= now:
                waiter.set_exception(PoolTimeout("Timed out acquiring connection from connection pool.",
                                                 hint="The application is using all the connections its quota "
                                                      "allows."))
            else:
                pending.append((deadline, waiter))
        self._waiters = pending
        if pending:
            self._schedule_sweep(min(deadline for deadline, _ in pending))

    def _wake_one(self, conn: Connection | None) -> bool:
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def checkin(self, conn: Connection) -> None:
        """Return a connection after a statement the server answered; one left in a transaction is dropped."""
        if self._closed or conn.is_closed() or conn.is_in_transaction():
            self.discard(conn)
        elif not self._wake_one(conn):
            self._idle.append(conn)

    def discard(self, conn: Connection) -> None:
        """Drop a connection whose state is unknown (cancelled mid-statement, broken, left in a transaction).

        It is closed, not terminated, so that a statement cancelled on our side is cancelled on the server
        too (asyncpg sends the cancel request first); its slot stays taken until then, keeping the quota exact.
        """
        if conn.is_closed():
            self._release_slot()
            return
        task = asyncio.get_running_loop().create_task(self._close_quietly(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

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
            self._wake_one(None)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._wake_one(None):  # each waiter looks again, finds the pool closed and answers 503
            pass
        idle, self._idle = self._idle, []
        self._opened -= len(idle)
        for conn in idle:
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
        try:
            self._conn = await self._pool.checkout()
        except PoolTimeout:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            raise _unavailable() from None  # could not open a connection
        return self._conn

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if kind is None or (issubclass(kind, Exception) and not issubclass(kind, _BROKEN)):
            self._pool.checkin(self._conn)  # the server answered, or our code raised between statements
        else:
            self._pool.discard(self._conn)  # cancelled or broken mid-statement: its state is unknown
        if kind is not None and issubclass(kind, (*_BROKEN, asyncpg.AdminShutdownError)):
            raise _unavailable() from None


async def open_app_pool(target: DatabaseTarget, app: App, acquire_timeout_s: float) -> AppPool:
    quota = app.config.quota
    settings = {
        "role": app.role,
        "application_name": application_name(app.name),
        "statement_timeout": str(quota.statement_timeout_ms),
    }

    async def connect() -> Connection:
        conn: Connection = await asyncpg.connect(**target.authenticator_kwargs(), server_settings=settings)
        return conn

    pool = AppPool(connect, quota.pool_size, acquire_timeout_s)
    await pool.open(min_size=2)
    return pool


class AppPools:
    """The pools of every (app, database) pair, opened at start and closed at shutdown."""

    def __init__(self, acquire_timeout_s: float) -> None:
        self._pools: dict[tuple[str, str], AppPool] = {}
        self._acquire_timeout_s = acquire_timeout_s

    async def open(self, targets: dict[str, DatabaseTarget], apps: dict[str, App],
                   databases_of_app: dict[str, set[str]]) -> None:
        jobs = {
            (app, db): open_app_pool(targets[db], apps[app], self._acquire_timeout_s)
            for app, dbs in databases_of_app.items() for db in dbs
        }
        results = await asyncio.gather(*jobs.values(), return_exceptions=True)
        opened = {key: pool for key, pool in zip(jobs, results, strict=True) if isinstance(pool, AppPool)}
        failed = [error for error in results if isinstance(error, BaseException)]
        if failed:
            await asyncio.gather(*(pool.close() for pool in opened.values()), return_exceptions=True)
            raise failed[0]
        self._pools = opened

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.gather(*(pool.close() for pool in self._pools.values()))
        self._pools.clear()

    def pool(self, app: str, database: str) -> AppPool:
        return self._pools[(app, database)]

    def connection(self, app: str, database: str) -> Lease:
        """``async with pools.connection(app, db) as conn``: a connection under the app's role."""
        return Lease(self._pools[(app, database)])
