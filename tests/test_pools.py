"""AppPool against a real PostgreSQL: the quota holds, and connections of unknown state are never reused."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from conftest import with_database
from gatehouse.db import Connection
from gatehouse.db.faults import BACKOFF_FIRST_S, BACKOFF_MAX_S, BACKOFF_SPREAD
from gatehouse.db.pools import AppPool
from gatehouse.db.waiters import SWEEP_RETRY_S, Waiters
from gatehouse.errors import PoolTimeout, ServiceUnavailable

Connect = Callable[[], Awaitable[Connection]]
REFUSED = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens on port 1: connection refused


@dataclass
class Harness:
    """Builds pools over the test server, each connection tagged with this test's own application_name."""

    dsn: str
    monitor: asyncpg.Connection[Any]
    app_name: str = field(default_factory=lambda: f"gh-pooltest-{uuid.uuid4().hex[:12]}")
    pools: list[AppPool] = field(default_factory=list)
    conns: list[Connection] = field(default_factory=list)

    async def connect(self) -> Connection:
        conn: Connection = await asyncpg.connect(self.dsn, server_settings={"application_name": self.app_name})
        self.conns.append(conn)
        return conn

    def pool(self, size: int, acquire_timeout_s: float = 5.0, connect: Connect | None = None) -> AppPool:
        pool = AppPool(connect or self.connect, size, acquire_timeout_s)
        self.pools.append(pool)
        return pool

    async def backends(self, state: str | None = None) -> int:
        """This test's connections as the server counts them (optionally only those in ``state``)."""
        count: int = await self.monitor.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND ($2::text IS NULL OR state = $2)",
            self.app_name, state)
        return count

    async def alive(self, pid: int) -> bool:
        found: bool = await self.monitor.fetchval("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", pid)
        return found


@pytest.fixture
async def harness(server_uri: str) -> AsyncIterator[Harness]:
    monitor = await asyncpg.connect(server_uri)
    h = Harness(dsn=server_uri, monitor=monitor)
    try:
        yield h
    finally:
        for pool in h.pools:
            await pool.close()
        for conn in h.conns:
            if not conn.is_closed():
                conn.terminate()
        # Whatever the server still runs for us (a statement whose client went away) is ended too.
        await monitor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                              h.app_name)
        await monitor.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 2.0) -> bool:
    """Poll ``check`` until it holds or ``timeout_s`` passes; its last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


def _is_closed(conn: Connection) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return conn.is_closed()
    return check


def _gone(harness: Harness, pid: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not await harness.alive(pid)
    return check


def _no_backends(harness: Harness) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await harness.backends() == 0
    return check


async def pid_of(pool: AppPool) -> int:
    async with pool.acquire() as conn:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        return pid


# --- 1. the quota -------------------------------------------------------------------------------


async def test_never_more_than_size_connections_under_concurrent_leases(harness: Harness) -> None:
    size = 3
    pool = harness.pool(size)
    running = peak_running = peak_opened = 0
    peak_server = peak_server_active = 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal peak_server, peak_server_active, peak_opened
        while not stop.is_set():
            peak_server = max(peak_server, await harness.backends())
            peak_server_active = max(peak_server_active, await harness.backends("active"))
            peak_opened = max(peak_opened, pool.opened)
            await asyncio.sleep(0.005)

    async def lease(i: int) -> int:
        nonlocal running, peak_running, peak_opened
        async with pool.acquire() as conn:
            running += 1
            peak_running = max(peak_running, running)
            peak_opened = max(peak_opened, pool.opened)
            assert pool.opened <= size
            await conn.execute("SELECT pg_sleep(0.05)")
            running -= 1
            answer: int = await conn.fetchval("SELECT $1::int", i)
            return answer

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(lease(i) for i in range(20)))
    finally:
        stop.set()
        await watcher
    assert results == list(range(20))
    assert peak_opened == size  # all of the quota was used, and never more
    assert peak_running == size
    assert 1 <= peak_server <= size
    assert 1 <= peak_server_active <= size
    assert (pool.opened, pool.idle, pool.in_use) == (size, size, 0)
    assert await harness.backends() == size  # opened once, kept: the connections are reused, not reopened
    assert len(harness.conns) == size


# --- 2. waiting too long ------------------------------------------------------------------------


async def test_waiter_times_out_with_pool_timeout_and_pool_stays_usable(harness: Harness) -> None:
    pool = harness.pool(1, acquire_timeout_s=0.2)
    async with pool.acquire() as held:
        held_pid = await held.fetchval("SELECT pg_backend_pid()")
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            async with pool.acquire():
                pytest.fail("got a connection beyond the pool's size")
        waited = time.monotonic() - started
        assert 0.19 <= waited < 1.0
        assert (pool.opened, pool.in_use) == (1, 1)
    assert (pool.opened, pool.idle, pool.in_use) == (1, 1, 0)  # returned to the stack, not to the gone waiter
    assert await pid_of(pool) == held_pid
    assert pool.in_use == 0


async def test_each_waiter_times_out_at_its_own_deadline(harness: Harness) -> None:
    """One timer serves all the waiters of a pool: each still fails at its own deadline, not at the first
    waiter's nor a later one's, and a waiter served in time is left alone."""
    pool = harness.pool(1, acquire_timeout_s=0.4)
    started = time.monotonic()

    async def wait_for_one() -> float:
        try:
            async with pool.acquire():
                return -1.0  # served
        except PoolTimeout:
            return time.monotonic() - started

    async with pool.acquire():
        first = asyncio.create_task(wait_for_one())
        await asyncio.sleep(0.2)
        second = asyncio.create_task(wait_for_one())
        assert 0.35 <= await first < 0.55  # its deadline, not the second's
        assert not second.done()
        assert 0.55 <= await second < 0.8
        third = asyncio.create_task(wait_for_one())
        await asyncio.sleep(0.1)
    assert await third == -1.0  # got the connection when it came back
    await asyncio.sleep(0.5)  # past the third's deadline: nothing left to fail
    assert (pool.opened, pool.idle, pool.in_use) == (1, 1, 0)


async def test_waiter_gets_the_connection_returned_before_its_timeout(harness: Harness) -> None:
    pool = harness.pool(1, acquire_timeout_s=2.0)
    release = asyncio.Event()

    async def holder() -> int:
        async with pool.acquire() as conn:
            pid: int = await conn.fetchval("SELECT pg_backend_pid()")
            await release.wait()
            return pid

    holding = asyncio.create_task(holder())
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(pid_of(pool))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    release.set()
    assert await asyncio.wait_for(waiting, 1.0) == await holding
    assert (pool.opened, pool.idle) == (1, 1)


async def test_cancelled_waiter_passes_on_a_connection_handed_to_it(harness: Harness) -> None:
    pool = harness.pool(1)
    conn = await pool.checkout()
    waiting = asyncio.create_task(pid_of(pool))
    await asyncio.sleep(0.05)
    pool.checkin(conn)  # hands the connection to the waiter...
    waiting.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (pool.opened, pool.idle, pool.in_use) == (1, 1, 0)
    assert not conn.is_closed()
    assert await pid_of(pool) == await harness.monitor.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", harness.app_name)


# --- 3. cancelled mid-statement ---------------------------------------------------------------


async def _cancel_mid_statement(pool: AppPool, seconds: float) -> tuple[int, Connection]:
    """A lease cancelled while the server runs ``pg_sleep(seconds)``; its backend pid and connection."""
    inside: asyncio.Future[tuple[int, Connection]] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        async with pool.acquire() as conn:
            inside.set_result((await conn.fetchval("SELECT pg_backend_pid()"), conn))
            await conn.execute(f"SELECT pg_sleep({seconds})")

    task = asyncio.create_task(work())
    pid, conn = await inside
    await asyncio.sleep(0.05)  # the sleep is on the server now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return pid, conn


async def test_cancelled_lease_discards_its_connection(harness: Harness) -> None:
    pool = harness.pool(2)
    pid, conn = await _cancel_mid_statement(pool, 5)
    assert pool.idle == 0 and pool.opened == 1  # its slot stays taken until the server has let go of it

    async def slot_freed() -> bool:
        return pool.opened == 0

    assert await eventually(slot_freed)
    assert await eventually(_is_closed(conn))
    fresh = await pid_of(pool)
    assert fresh != pid
    assert (pool.opened, pool.idle, pool.in_use) == (1, 1, 0)
    assert len(harness.conns) == 2


async def test_cancelled_statement_stops_on_the_server(harness: Harness) -> None:
    pool = harness.pool(2)
    pid, _ = await _cancel_mid_statement(pool, 30)
    assert await eventually(_gone(harness, pid), timeout_s=1.5)


# --- 4. an error the server answered ------------------------------------------------------------


async def test_postgres_error_returns_the_connection_for_reuse(harness: Harness) -> None:
    pool = harness.pool(2)
    with pytest.raises(asyncpg.DivisionByZeroError):
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.execute("SELECT 1/0")
    assert (pool.opened, pool.idle, pool.in_use) == (1, 1, 0)
    assert await pid_of(pool) == pid


async def test_error_of_our_own_between_statements_returns_the_connection(harness: Harness) -> None:
    pool = harness.pool(2)
    with pytest.raises(ValueError, match="not the database's fault"):
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            raise ValueError("not the database's fault")
    assert await pid_of(pool) == pid
    assert pool.opened == 1


# --- 5. left in a transaction -------------------------------------------------------------------


@pytest.mark.parametrize(("leave", "raises"), [
    ("returning", nullcontext()),
    ("raising", pytest.raises(ValueError)),
    ("failed", pytest.raises(asyncpg.DivisionByZeroError)),
])
async def test_connection_left_in_a_transaction_is_not_reused(harness: Harness, leave: str,
                                                              raises: AbstractContextManager[object]) -> None:
    pool = harness.pool(2)
    with raises:
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.execute("BEGIN")
            if leave == "raising":
                raise ValueError("between statements")
            if leave == "failed":
                await conn.execute("SELECT 1/0")  # the transaction is now aborted, still open
    assert await eventually(_is_closed(conn))
    assert (pool.opened, pool.idle, pool.in_use) == (0, 0, 0)
    async with pool.acquire() as fresh:
        fresh_pid = await fresh.fetchval("SELECT pg_backend_pid()")
        assert fresh_pid != pid
        assert not fresh.is_in_transaction()
    state = await harness.monitor.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", fresh_pid)
    assert state == "idle"  # not "idle in transaction": the server agrees
    assert await eventually(_gone(harness, pid))  # the abandoned transaction does not linger on the server


# --- 6. killed on the server while idle ---------------------------------------------------------


async def test_connection_killed_server_side_while_idle_is_replaced(harness: Harness) -> None:
    pool = harness.pool(2)
    async with pool.acquire() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
    assert pool.idle == 1
    assert await harness.monitor.fetchval("SELECT pg_terminate_backend($1)", pid) is True
    assert await eventually(_gone(harness, pid))
    assert await eventually(_is_closed(conn))  # the client has read the server's goodbye

    async with pool.acquire() as fresh:
        assert fresh is not conn
        assert await fresh.fetchval("SELECT pg_backend_pid()") != pid
    assert (pool.opened, pool.idle, pool.in_use) == (1, 1, 0)
    assert await harness.backends() == 1


# --- 7. connecting fails ------------------------------------------------------------------------

PAST_FIRST_BACKOFF_S = BACKOFF_FIRST_S * (1 + BACKOFF_SPREAD) + 0.05


def _retry_after(error: ServiceUnavailable) -> int:
    seconds = int(error.headers["Retry-After"])
    assert 1 <= seconds <= BACKOFF_MAX_S * (1 + BACKOFF_SPREAD) + 1
    return seconds


@pytest.mark.parametrize("failure", ["refused", "no_such_database", "timeout"])
async def test_failing_connect_is_service_unavailable_and_frees_its_slot(harness: Harness, failure: str) -> None:
    failing = True

    async def connect() -> Connection:
        if not failing:
            return await harness.connect()
        if failure == "refused":
            conn: Connection = await asyncpg.connect(REFUSED)
        elif failure == "no_such_database":
            conn = await asyncpg.connect(with_database(harness.dsn, f"gh_no_such_db_{uuid.uuid4().hex[:8]}"))
        else:
            conn = await asyncpg.connect(harness.dsn, timeout=0.000001)
        harness.conns.append(conn)  # not expected; closed at the end if it happens
        return conn

    pool = harness.pool(2, connect=connect)
    failing = False
    async with pool.acquire() as held:
        assert pool.opened == 1
        failing = True
        with pytest.raises(ServiceUnavailable) as refused:
            async with pool.acquire():
                pytest.fail("a failed connect gave a connection")
        assert refused.value.code == "PGRST000" and _retry_after(refused.value) >= 1
        assert "refused" not in refused.value.message.lower() and refused.value.details is None
        assert (pool.opened, pool.in_use) == (1, 1)  # the failed attempt gave its slot back
        failing = False
        await asyncio.sleep(PAST_FIRST_BACKOFF_S)  # the database is left alone for a moment, then tried again
        async with pool.acquire() as second:
            assert second is not held
            assert pool.opened == 2
            assert await second.fetchval("SELECT 1") == 1
    assert (pool.opened, pool.idle, pool.in_use) == (2, 2, 0)


async def test_failing_connect_fails_its_waiters_at_once_then_backs_off(harness: Harness) -> None:
    """A refused connect answers the requests waiting behind it with 503 at once (not at their timeout), and
    the database is not asked again until the backoff has passed."""
    calls = 0

    async def connect() -> Connection:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.1)
            raise OSError("network is unreachable")
        return await harness.connect()

    pool = harness.pool(1, acquire_timeout_s=5.0, connect=connect)
    first = asyncio.create_task(pid_of(pool))
    await asyncio.sleep(0.02)
    started = time.monotonic()
    second = asyncio.create_task(pid_of(pool))  # waits: the only slot is being opened
    await asyncio.sleep(0.02)
    assert not second.done()
    with pytest.raises(ServiceUnavailable):
        await first
    with pytest.raises(ServiceUnavailable) as waited:
        await second
    assert time.monotonic() - started < 0.5  # woken by the failure, not by its own timeout
    assert waited.value.code == "PGRST000" and _retry_after(waited.value) == 1
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        await pid_of(pool)  # during the backoff: answered at once, the database is not asked
    assert time.monotonic() - started < 0.05
    assert calls == 1
    await asyncio.sleep(PAST_FIRST_BACKOFF_S)
    assert await pid_of(pool) > 0
    assert (pool.opened, pool.idle, calls) == (1, 1, 2)


async def test_a_database_that_stays_down_is_asked_less_and_less(harness: Harness) -> None:
    """Requests keep coming every 20 ms for 2.5 s while nothing listens: each is answered 503 at once, and
    the pool tries to connect only after each backoff (0.5, 1, 2 s ±20 %): four times, not a hundred."""
    calls = 0

    async def connect() -> Connection:
        nonlocal calls
        calls += 1
        conn: Connection = await asyncpg.connect(REFUSED)
        return conn

    pool = harness.pool(3, connect=connect)
    answered = 0
    slowest = 0.0
    stop = time.monotonic() + 2.5
    while time.monotonic() < stop:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable) as refused:
            await pid_of(pool)
        slowest = max(slowest, time.monotonic() - started)
        _retry_after(refused.value)
        answered += 1
        await asyncio.sleep(0.02)
    assert answered > 50
    assert 3 <= calls <= 4, calls
    assert slowest < 0.2
    assert pool.opened == 0


async def test_after_the_backoff_one_request_at_a_time_tries_to_connect(harness: Harness) -> None:
    calls = 0
    down = True

    async def connect() -> Connection:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        if down:
            raise OSError("no route to host")
        return await harness.connect()

    pool = harness.pool(3, connect=connect)
    with pytest.raises(ServiceUnavailable):
        await pid_of(pool)
    await asyncio.sleep(PAST_FIRST_BACKOFF_S)
    down = False
    probe = asyncio.create_task(pid_of(pool))
    await asyncio.sleep(0.02)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        await pid_of(pool)  # while the probe is under way
    assert time.monotonic() - started < 0.05
    assert await probe > 0
    assert calls == 2
    pids = await asyncio.gather(*(pid_of(pool) for _ in range(3)))  # back: connections open in parallel again
    assert all(pid > 0 for pid in pids) and pool.opened <= 3


# --- 8. closing ---------------------------------------------------------------------------------


async def test_close_wakes_waiters_with_service_unavailable(harness: Harness) -> None:
    pool = harness.pool(1, acquire_timeout_s=5.0)
    held = await pool.checkout()
    waiters = [asyncio.create_task(pid_of(pool)) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)
    started = time.monotonic()
    await pool.close()
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 1.0)
    assert time.monotonic() - started < 1.0
    assert all(isinstance(r, ServiceUnavailable) for r in results), results
    assert not held.is_closed()  # a connection in use is the lease's until it returns...
    pool.checkin(held)
    assert await eventually(_is_closed(held))  # ...and is closed, not kept, when it does
    assert (pool.opened, pool.idle, pool.in_use) == (0, 0, 0)
    with pytest.raises(ServiceUnavailable):
        async with pool.acquire():
            pytest.fail("a closed pool gave a connection")


async def test_close_closes_idle_connections(harness: Harness) -> None:
    pool = harness.pool(3)
    async with pool.acquire() as a, pool.acquire() as b, pool.acquire() as c:
        conns = [a, b, c]
    assert (pool.opened, pool.idle) == (3, 3)
    assert await harness.backends() == 3
    await pool.close()
    assert all(conn.is_closed() for conn in conns)
    assert (pool.opened, pool.idle, pool.in_use) == (0, 0, 0)
    assert await eventually(_no_backends(harness))


# --- 9. aging -----------------------------------------------------------------------------------


def _aging_pool(harness: Harness, size: int, *, max_idle_s: float = 60.0, max_lifetime_s: float = 600.0) -> AppPool:
    pool = AppPool(harness.connect, size, 5.0, max_idle_s=max_idle_s, max_lifetime_s=max_lifetime_s)
    harness.pools.append(pool)
    return pool


async def test_idle_connections_are_closed_after_max_idle_and_reopened_on_demand(harness: Harness) -> None:
    pool = _aging_pool(harness, 2, max_idle_s=0.4)
    async with pool.acquire() as a, pool.acquire() as b:
        old = {await a.fetchval("SELECT pg_backend_pid()"), await b.fetchval("SELECT pg_backend_pid()")}
    await asyncio.sleep(0.25)
    assert (pool.opened, pool.idle) == (2, 2)  # not before max idle
    assert await harness.backends() == 2

    async def aged_out() -> bool:
        return pool.opened == 0 and await harness.backends() == 0

    assert await eventually(aged_out, timeout_s=1.5)
    fresh = await pid_of(pool)
    assert fresh not in old
    assert (pool.opened, pool.idle) == (1, 1)


async def test_a_connection_in_steady_use_is_replaced_after_its_lifetime(harness: Harness) -> None:
    """Never idle, so only its lifetime ends it: closed when it comes back, and the next request opens a new
    one. Every request on the way succeeds."""
    pool = _aging_pool(harness, 1, max_lifetime_s=0.3)
    pids: list[int] = []
    stop = time.monotonic() + 1.2
    while time.monotonic() < stop:
        pids.append(await pid_of(pool))
        await asyncio.sleep(0.01)
    distinct = list(dict.fromkeys(pids))
    assert len(distinct) >= 3, distinct  # about one per 0.27-0.3 s
    assert pool.opened <= 1
    for pid in distinct[:-1]:
        assert await eventually(_gone(harness, pid))


async def test_a_connection_past_its_lifetime_is_not_taken_from_its_lease(harness: Harness) -> None:
    pool = _aging_pool(harness, 1, max_lifetime_s=0.2)
    async with pool.acquire() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await asyncio.sleep(0.4)  # past its lifetime while in use: still the lease's
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
    assert await eventually(_gone(harness, pid))
    assert await pid_of(pool) != pid


async def test_a_pool_without_connections_keeps_no_timer(harness: Harness) -> None:
    pool = _aging_pool(harness, 1, max_idle_s=0.1)
    assert pool._ager is None
    await pid_of(pool)
    assert pool._ager is not None

    async def stopped() -> bool:
        return pool.opened == 0 and pool._ager is None

    assert await eventually(stopped)


# --- 10. the timers survive an error -----------------------------------------------------------


async def test_a_sweep_that_fails_still_times_out_every_waiter(caplog: pytest.LogCaptureFixture) -> None:
    """The one timer that times out every waiter of a pool must not die of an exception: here making the
    first waiter's error fails once. That waiter is timed out on the next try, the other one on time."""
    calls = 0

    def flaky() -> BaseException:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("could not build the error")
        return PoolTimeout("timed out")

    waiters = Waiters(flaky, "test")
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def wait(deadline_s: float) -> float:
        with pytest.raises(PoolTimeout):
            await waiters.add(loop, started + deadline_s)
        return loop.time() - started

    first, second = await asyncio.gather(wait(0.1), wait(0.3))
    assert 0.1 <= first < 0.1 + SWEEP_RETRY_S + 0.1
    assert 0.3 <= second < 0.4
    assert calls == 3
    assert "could not time out a waiter (RuntimeError)" in caplog.text
    late = loop.time()
    with pytest.raises(PoolTimeout):  # and the timer still serves new waiters
        await waiters.add(loop, late + 0.05)
    assert loop.time() - late < 0.2


async def test_aging_that_fails_once_goes_on(harness: Harness, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    pool = _aging_pool(harness, 1, max_idle_s=0.2)
    real = pool._retire
    failures = 0

    def flaky(now: float) -> None:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("aging went wrong")
        real(now)

    monkeypatch.setattr(pool, "_retire", flaky)
    pid = await pid_of(pool)
    assert await eventually(_gone(harness, pid), timeout_s=2.0)  # closed by a later tick

    async def slot_given_back() -> bool:  # once its close has finished, a moment after the backend left
        return pool.opened == 0

    assert await eventually(slot_given_back, timeout_s=2.0)
    assert failures == 1
    assert "aging connections failed (RuntimeError)" in caplog.text
