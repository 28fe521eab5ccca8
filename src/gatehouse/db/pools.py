"""One asyncpg pool per application and database: the app's connection quota, under the app's role.

Each pool logs in as the authenticator with ``role`` and ``application_name`` as startup parameters, so
every statement runs as the app's NOLOGIN role (PostgreSQL refuses whatever the app was not granted) and
``pg_stat_activity`` names the app. The pool's size is the app's quota, so a noisy app waits for its own
connections instead of taking everyone else's.

Connections are not reset when returned: a request runs one statement and sets no session state, and the
role is fixed at login, so the reset round trip (``RESET ALL`` and friends) would only cost time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from gatehouse.db import Connection
from gatehouse.db.targets import DatabaseTarget
from gatehouse.errors import PoolTimeout, ServiceUnavailable
from gatehouse.project import App


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("Database connection error. Retrying the connection.",
                              hint="The database did not answer; try again shortly.")


async def _no_reset(_: asyncpg.Connection) -> None:
    return None


def application_name(app: str) -> str:
    return f"gatehouse/{app}"


async def create_app_pool(target: DatabaseTarget, app: App) -> asyncpg.Pool:
    quota = app.config.quota
    pool = await asyncpg.create_pool(
        **target.authenticator_kwargs(),
        min_size=min(2, quota.pool_size),
        max_size=quota.pool_size,
        reset=_no_reset,
        server_settings={
            "role": app.role,
            "application_name": application_name(app.name),
            "statement_timeout": str(quota.statement_timeout_ms),
        },
    )
    assert pool is not None
    return pool


class AppPools:
    """The pools of every (app, database) pair, opened at start and closed at shutdown."""

    def __init__(self, acquire_timeout_s: float) -> None:
        self._pools: dict[tuple[str, str], asyncpg.Pool] = {}
        self._acquire_timeout_s = acquire_timeout_s

    async def open(self, targets: dict[str, DatabaseTarget], apps: dict[str, App],
                   databases_of_app: dict[str, set[str]]) -> None:
        jobs = {
            (app, db): create_app_pool(targets[db], apps[app])
            for app, dbs in databases_of_app.items() for db in dbs
        }
        results = await asyncio.gather(*jobs.values())
        self._pools = dict(zip(jobs, results, strict=True))

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self._pools.values()))
        self._pools.clear()

    def pool(self, app: str, database: str) -> asyncpg.Pool:
        return self._pools[(app, database)]

    @asynccontextmanager
    async def connection(self, app: str, database: str) -> AsyncIterator[Connection]:
        pool = self._pools[(app, database)]
        try:
            if pool.get_idle_size() > 0:
                # An idle connection is handed over without waiting, and asyncpg's timeout wrapper costs a task
                # per call: skip it on this, the common, path.
                conn = await pool.acquire()
            else:
                conn = await pool.acquire(timeout=self._acquire_timeout_s)
        except TimeoutError:
            raise PoolTimeout("Timed out acquiring connection from connection pool.",
                              hint="The application is using all the connections its quota allows.") from None
        except (OSError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError):
            raise _unavailable() from None
        try:
            yield conn
        except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError, asyncpg.AdminShutdownError):
            raise _unavailable() from None
        finally:
            with contextlib.suppress(OSError, asyncpg.InterfaceError):
                await pool.release(conn)
