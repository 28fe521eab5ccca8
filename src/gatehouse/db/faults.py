"""When a database cannot be reached: what a dead connection looks like, how long to leave the database
alone before trying again, and what the caller is told.

The caller gets PostgREST's answers: 503 ``PGRST000`` when no connection could be opened and 503 ``PGRST001``
when one died under a statement, each with ``Retry-After`` (whole seconds, at least 1) and a message written
here: PostgreSQL's and the operating system's texts (addresses, ports, "terminating connection due to
administrator command") are never passed on.

A pool that cannot connect backs off (:class:`Backoff`): 0.5 s after the first failure, doubling to 4 s,
each wait spread by ±20 % so that pools and instances do not knock in step. While it waits, requests that
would need a new connection are answered 503 at once instead of each waiting out a connect timeout, and
after it one request at a time tries (the *probe*); the first connection that opens ends the outage.
"""

from __future__ import annotations

import logging
import math
import random
import socket

import asyncpg

from gatehouse.db import Connection
from gatehouse.errors import ConnectionLost, ServiceUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
"""``Retry-After`` of a 503 whose cause has no backoff of its own (PostgreSQL said it is shutting down)."""
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 4.0
BACKOFF_SPREAD = 0.2

CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
"""What opening a connection raises when the database is down, refuses us, or is not there."""

_DEAD = (OSError, asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
         asyncpg.IdleSessionTimeoutError)
"""The connection is gone: reset, closed under a statement (asyncpg's ``ConnectionDoesNotExistError`` is one
of the class 08 errors), or ended by the server (``pg_terminate_backend``, shutdown, a crash, an idle timeout)."""

BROKEN = (*_DEAD, asyncpg.InterfaceError, asyncpg.InternalClientError)
"""After any of these, the connection's state is unknown: it is dropped, never reused."""


def is_dead(exc: BaseException, conn: Connection) -> bool:
    """Whether ``exc`` says that ``conn`` died, so that a statement that gave no result had no effect either
    and may run again on another connection.

    asyncpg's own errors count when the connection is closed: "connection is closed" (InterfaceError), and
    "cannot switch to state ...; another operation is in progress" (InternalClientError), which is what a
    statement sent just after the server ended an idle session gets (seen with ``pg_terminate_backend``)."""
    if isinstance(exc, _DEAD):
        return not isinstance(exc, TimeoutError)  # an OSError too, but ours: the connection may be fine
    return isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError) and conn.is_closed()


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def cannot_connect(wait_s: float = RETRY_AFTER_S) -> ServiceUnavailable:
    """503 PGRST000: no connection could be opened (refused, timed out, the server starting or full). The message
    is PostgREST's since 14.13, which dropped its "Retrying the connection." (PGRST001's still says it)."""
    return ServiceUnavailable("Database connection error.",
                              hint="The database did not answer; try again shortly.", headers=retry_after(wait_s))


def connection_lost(wait_s: float = RETRY_AFTER_S) -> ConnectionLost:
    """503 PGRST001: the connection died while a statement was on it."""
    return ConnectionLost("Database client error. Retrying the connection.",
                          hint="The connection to the database was lost; try again shortly.",
                          headers=retry_after(wait_s))


class Backoff:
    """Consecutive failures to connect, and when the next attempt may be made (times by the event loop's clock)."""

    __slots__ = ("failures", "probing", "retry_at")

    def __init__(self) -> None:
        self.failures = 0
        self.retry_at = 0.0
        self.probing = False
        """One attempt is under way after a failure: the others answer 503 meanwhile."""

    def blocks(self, now: float) -> bool:
        return bool(self.failures) and (self.probing or now < self.retry_at)

    def wait_s(self, now: float) -> float:
        return max(self.retry_at - now, 0.0)

    def failed(self, now: float) -> float:
        """Count a failed attempt; returns the wait before the next. Attempts that were already under way when
        the outage was first seen fail within its first wait and do not lengthen it."""
        self.probing = False
        if self.failures and now < self.retry_at:
            return self.retry_at - now
        self.failures += 1
        wait = min(BACKOFF_FIRST_S * 2.0 ** (self.failures - 1), BACKOFF_MAX_S)
        wait *= random.uniform(1 - BACKOFF_SPREAD, 1 + BACKOFF_SPREAD)
        self.retry_at = now + wait
        return wait

    def succeeded(self) -> None:
        self.failures, self.probing = 0, False


# --- dead peers ------------------------------------------------------------------------------------

KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3
USER_TIMEOUT_MS = 30_000


def watch_peer(conn: Connection) -> None:
    """Let the kernel notice a database that vanished without a word (a host gone, a NAT or firewall that
    drops packets silently), at no cost per statement.

    Without this, a statement sent on such a connection waits for an answer forever: ``statement_timeout``
    is kept by the server, which never sees the statement. TCP keepalive probes an idle connection (and keeps
    a NAT's mapping alive), and ``TCP_USER_TIMEOUT`` ends a connection whose sent data stays unacknowledged,
    so the wait ends in a connection error (then :func:`is_dead`). Unix sockets need none of it; where the
    platform lacks an option, it is skipped."""
    transport = getattr(conn, "_transport", None)  # asyncpg keeps no public handle on its socket
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES), ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    try:
        for level, option, value in options:
            sock.setsockopt(level, option, value)
    except OSError as exc:  # a platform that refuses one: the connection still works, unwatched
        log.debug("could not set TCP keepalive options: %s", exc)
