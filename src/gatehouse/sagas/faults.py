"""How a step's failure is judged: transient (try again later) or final (compensate), and how it is told.

Transient: the step may well succeed if tried again, and trying again is safe because a local step's effect
was rolled back and a remote step is resent with the same idempotency key. That is a timeout, a connection
that died or could not be opened (gatehouse's own 503/504 answers included: they say "the database is away",
not "your request is wrong"), PostgreSQL's serialization failure (40001) or deadlock (40P01), and an HTTP
transport error or a 5xx/429 answer. Everything else is final: a ``LogicError`` the step raised on purpose, a
write the database refused, a 4xx answer, a bug.

The message kept in ``gatehouse.sagas.error`` is written here from the exception's class and, for gatehouse's
own errors, its message: PostgreSQL's text (which may quote SQL) and tracebacks never reach it.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import httpx

from gatehouse.errors import ApiError, PoolTimeout, ServiceUnavailable

MAX_BACKOFF_S = 300.0

CrashHook = Callable[[str, str, int], None]
"""``hook(point, saga_id, n)``, called at every boundary the engine crosses; tests raise from it to simulate
a crash there (a ``BaseException``, which the engine never catches). Points: ``before_step``,
``before_commit`` (a local step's effect done, its transaction not committed), ``after_commit``,
``after_call`` (a remote step returned, not recorded yet), ``after_record``, ``before_compensation``,
``after_fence`` (compensation fenced the forward steps: n is the step number fenced),
``compensation_before_commit``, ``compensation_after_call``, ``after_compensation``, ``before_settle``."""

_TRANSIENT_SQLSTATES = {"40001", "40P01"}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError | ServiceUnavailable | PoolTimeout):
        return True
    if isinstance(exc, ApiError):  # gatehouse's mapping of a PostgreSQL error keeps its SQLSTATE as the code
        return exc.code in _TRANSIENT_SQLSTATES
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate in _TRANSIENT_SQLSTATES or isinstance(exc, asyncpg.PostgresConnectionError)
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, httpx.TransportError | OSError | asyncpg.InterfaceError | asyncpg.InternalClientError)


def describe(exc: BaseException) -> str:
    """A one-line account of ``exc`` fit for the saga's record and an operator's eyes."""
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncpg.PostgresError):
        return f"the database refused it (SQLSTATE {exc.sqlstate})"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"the remote service answered {exc.response.status_code}"
    if isinstance(exc, httpx.TransportError | OSError):
        return f"the connection failed ({type(exc).__name__})"
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def backoff(base_s: float, attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``: ``base_s`` doubling per attempt, capped at five minutes."""
    return float(min(MAX_BACKOFF_S, base_s * 2 ** max(0, attempt - 1)))
