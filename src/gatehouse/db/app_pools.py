"""The pools of a server: one :class:`~gatehouse.db.pools.AppPool` per application and database, and how an
app's connection is opened.

Each connection logs in as the authenticator with ``role`` and ``application_name`` as startup parameters, so
every statement runs as the app's NOLOGIN role (PostgreSQL refuses whatever the app was not granted) and
``pg_stat_activity`` names the app (``gatehouse/<app>``). Through a transaction pooler the pooler sets the
role instead (:mod:`.pooler`), and each new connection is checked to run as the app. Opening one is bounded
by a connect timeout, and the kernel is asked to notice a peer that vanished silently (``faults.watch_peer``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import asyncpg

from gatehouse.background import stop_tasks
from gatehouse.db import Connection
from gatehouse.db.faults import watch_peer
from gatehouse.db.pooler import check_role
from gatehouse.db.pools import MAX_IDLE_S, MAX_LIFETIME_S, AppPool, Lease
from gatehouse.db.statement_groups import GROUP_MAX, Merge, StatementGroups, WriteAnswer
from gatehouse.db.targets import DatabaseTarget
from gatehouse.observe.db_metrics import PoolReading
from gatehouse.project import App

CONNECT_TIMEOUT_MAX_S = 10.0
MIN_SIZE = 2
"""Connections each pool opens at start (fewer if its quota is smaller); idle ones age out like any other."""


def application_name(app: str) -> str:
    return f"gatehouse/{app}"


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """The ``[server]`` settings every app pool shares."""

    acquire_timeout_s: float = 5.0
    max_idle_s: float = MAX_IDLE_S
    max_lifetime_s: float = MAX_LIFETIME_S
    group_statements: int = GROUP_MAX
    """Requests of one statement waiting for an app's connections that run together at most
    (``db/statement_groups.py``); 1: none."""

    def connect_timeout_s(self, database_s: float | None) -> float:
        """A request that opens a connection waits no longer than one waiting for a free one (but at least
        1 s), nor longer than the database's own connect timeout."""
        return min(database_s or CONNECT_TIMEOUT_MAX_S, max(self.acquire_timeout_s, 1.0))


def app_pool(target: DatabaseTarget, app: App, options: PoolOptions) -> AppPool:
    """The app's pool on ``target``, with no connection opened yet."""
    quota = app.config.quota
    pooled = target.pooler_dsn is not None
    settings = {"application_name": application_name(app.name)}
    if pooled:  # the pooler's database for the app sets both (db/pooler.py): a transaction pooler refuses them
        arguments = target.pooler_kwargs(app.name)
        if not target.pooler_prepared_statements:
            arguments["statement_cache_size"] = 0  # parsed with each execution, on the same server connection
    else:
        settings |= {"role": app.role, "statement_timeout": str(quota.statement_timeout_ms)}
        arguments = target.authenticator_kwargs()
    arguments["timeout"] = options.connect_timeout_s(arguments.get("timeout"))

    async def connect() -> Connection:
        conn: Connection = await asyncpg.connect(**arguments, server_settings=settings)
        if pooled:
            try:
                await check_role(conn, target, app)
            except BaseException:
                conn.terminate()
                raise
        watch_peer(conn)
        return conn

    return AppPool(connect, quota.pool_size, options.acquire_timeout_s, max_idle_s=options.max_idle_s,
                   max_lifetime_s=options.max_lifetime_s, name=f"{app.name}/{target.name}")


async def open_app_pool(target: DatabaseTarget, app: App, options: PoolOptions) -> AppPool:
    pool = app_pool(target, app, options)
    await pool.open(min_size=MIN_SIZE)
    return pool


class AppPools:
    """The pools of every (app, database) pair, opened at start and closed at shutdown. Each pool is held by its
    :class:`StatementGroups`, through which its reads and plain writes go."""

    def __init__(self, options: PoolOptions) -> None:
        self._groups: dict[tuple[str, str], StatementGroups] = {}
        self._quotas: dict[tuple[str, str], object] = {}
        """The quota each pool was opened with: a changed one gets a new pool."""
        self._options = options
        self._retiring: dict[asyncio.Task[None], StatementGroups] = {}

    def _held(self, pool: AppPool) -> StatementGroups:
        return StatementGroups(pool, self._options.group_statements)

    async def open(self, targets: dict[str, DatabaseTarget], apps: dict[str, App],
                   databases_of_app: dict[str, set[str]]) -> None:
        jobs = {
            (app, db): open_app_pool(targets[db], apps[app], self._options)
            for app, dbs in databases_of_app.items() for db in dbs
        }
        results = await asyncio.gather(*jobs.values(), return_exceptions=True)
        opened = {key: pool for key, pool in zip(jobs, results, strict=True) if isinstance(pool, AppPool)}
        failed = [error for error in results if isinstance(error, BaseException)]
        if failed:
            await asyncio.gather(*(pool.close() for pool in opened.values()), return_exceptions=True)
            raise failed[0]
        self._groups = {key: self._held(pool) for key, pool in opened.items()}
        self._quotas = {(app, db): apps[app].config.quota for app, db in opened}

    async def update(self, targets: dict[str, DatabaseTarget], apps: dict[str, App],
                     databases_of_app: dict[str, set[str]]) -> None:
        """Follow a reloaded project: pools for new apps (or new databases of an app) open, an app whose quota
        changed gets a new pool, and pools no longer needed are retired. A retired pool is closed only after
        ``acquire_timeout_s``, so a request already waiting on it is served, not refused."""
        wanted = {(app, db) for app, dbs in databases_of_app.items() for db in dbs}
        held = set(self._groups)
        changed = {key for key in wanted & held if self._quotas.get(key) != apps[key[0]].config.quota}
        to_open = (wanted - held) | changed
        jobs = {key: open_app_pool(targets[key[1]], apps[key[0]], self._options) for key in sorted(to_open)}
        results = await asyncio.gather(*jobs.values(), return_exceptions=True)
        failed = [error for error in results if isinstance(error, BaseException)]
        if failed:
            await asyncio.gather(*(r.close() for r in results if isinstance(r, AppPool)), return_exceptions=True)
            raise failed[0]
        retired = [self._groups[key] for key in (held - wanted) | changed]
        for key, pool in zip(jobs, results, strict=True):
            assert isinstance(pool, AppPool)
            self._groups[key], self._quotas[key] = self._held(pool), apps[key[0]].config.quota
        for key in held - wanted:
            del self._groups[key]
            self._quotas.pop(key, None)
        for groups in retired:
            task = asyncio.get_running_loop().create_task(self._retire(groups))
            self._retiring[task] = groups
            task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _retire(self, groups: StatementGroups) -> None:
        await asyncio.sleep(self._options.acquire_timeout_s + 1)
        with contextlib.suppress(Exception):
            await _close(groups)

    async def close(self) -> None:
        everything = [*self._groups.values(), *self._retiring.values()]
        await stop_tasks(self._retiring)
        await asyncio.gather(*(_close(groups) for groups in everything), return_exceptions=True)
        self._groups.clear()

    def readings(self) -> list[PoolReading]:
        """Each pool's connections and statement groups now, for ``/metrics``."""
        return [PoolReading(app, db, "primary", g.pool.size, g.pool.in_use, g.pool.idle, g.pool.waiting, g.groups,
                            g.grouped, g.alone_again, g.merged)
                for (app, db), g in sorted(self._groups.items())]

    def pool(self, app: str, database: str) -> AppPool:
        return self._groups[(app, database)].pool

    def connection(self, app: str, database: str) -> Lease:
        """``async with pools.connection(app, db) as conn``: a connection under the app's role."""
        return Lease(self._groups[(app, database)].pool)

    def statement_groups(self, app: str, database: str) -> StatementGroups:
        """The statement groups of the app's pool on the database (their counts)."""
        return self._groups[(app, database)]

    def write_row(self, app: str, database: str, sql: str, params: Sequence[object],
                  merge: Merge | None = None) -> Awaitable[WriteAnswer | None]:
        """One autocommit write statement under the app's role, committed alone or with other requests' inserts
        of the same statement that wait for the app's connections (``db/statement_groups.py``), in one statement
        with them when each has a ``merge``; its answer row."""
        return self._groups[(app, database)].write(sql, params, merge)

    def read_row(self, app: str, database: str, sql: str,
                 params: Sequence[object]) -> Awaitable[asyncpg.Record | None]:
        """One read statement under the app's role, alone or in one round trip with other requests of the same
        statement that wait for the app's connections (``db/statement_groups.py``); run once more on a fresh
        connection if the pooled one was dead (:meth:`AppPool.read_row`). Never for a write."""
        return self._groups[(app, database)].read(sql, params)


async def _close(groups: StatementGroups) -> None:
    """Close a pool: its connections, then wait for the groups still running (they end with their statement)."""
    try:
        await groups.pool.close()
    finally:
        await groups.close()
