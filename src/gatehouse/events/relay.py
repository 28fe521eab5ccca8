"""The relay: publishes each database's outbox to the sinks of ``gatehouse.toml``, at least once, in order.

One relay per (database, sink). It reads the events after the sink's stored position
(:func:`~gatehouse.events.outbox.read_after`: only transactions complete in the snapshot, in position order),
publishes the batch, and stores the position of the last event the broker acknowledged, only after the
acknowledgement (:mod:`.relay_store`). So an event is never lost: a relay killed between publishing and storing
publishes the batch again when it (or another) starts, with the same event ids, which the sinks carry for
deduplication (JetStream drops them itself within its window). A publish that fails is tried again with a
growing wait (0.1 s doubling, up to the sink's ``retry_max_s``) for as long as it takes: an event is never
skipped, and nothing after it is stored before it.

**One publisher per sink.** Every instance (``gatehouse serve``, ``gatehouse relay``) runs a relay for every
sink, but only the one holding the sink's session advisory lock on its database publishes; the others try
again every :data:`STANDBY_S` and take over within about that once the leader's session ends (its process died,
or its connection did: TCP keepalives end a session cut off by the network). One publisher in position order
keeps the order of each aggregate's events (two writes of one row are in position order, :mod:`.outbox`).

**Deleting.** Per database, one instance at a time (an advisory lock) deletes what every sink has and is older
than :data:`~gatehouse.events.relay_store.RETENTION_S` every :data:`CLEAN_EVERY_S`.

Test hook: with ``GATEHOUSE_RELAY_TEST_STALL_S`` set, a relay waits that long after a batch is acknowledged and
before storing its position, so that tests can kill it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING

import asyncpg
from prometheus_client.registry import CollectorRegistry

from gatehouse.background import stop_tasks
from gatehouse.config_events import SinkConfig
from gatehouse.errors import ProjectError
from gatehouse.events import relay_store as store
from gatehouse.events.mirror_plan import plan_mirrors
from gatehouse.events.mirrors import MIRROR_SINK
from gatehouse.events.outbox import Event, Position, read_after
from gatehouse.events.relay_metrics import RelayCollector, SinkStats
from gatehouse.events.sinks import Published, Sink, open_sink

if TYPE_CHECKING:
    from gatehouse.db.targets import DatabaseTarget
    from gatehouse.project import Project
    from gatehouse.runtime import Runtime

log = logging.getLogger(__name__)
Connect = Callable[[], Awaitable[asyncpg.Connection]]
APPLICATION_NAME = "gatehouse/relay"
STANDBY_S = 1.0
POLL_MIN_S, POLL_MAX_S = 0.05, 0.5
"""An idle relay looks again after 50 ms, then doubling up to 500 ms (no NOTIFY: next-wave.md §2.2)."""
MEASURE_EVERY_S = 2.0
CLEAN_EVERY_S = 60.0
FIRST_RETRY_S = 0.1
MAX_RETRY_AFTER_S = 600.0
STALL_ENV = "GATEHOUSE_RELAY_TEST_STALL_S"
DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
KEEPALIVES = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}


class Relay:
    """Publishes the events of ``contracts`` in one database to one sink, while it holds the sink's lock."""

    def __init__(self, database: str, sink: Sink, config: SinkConfig, contracts: Sequence[str],
                 connect: Connect) -> None:
        self.database, self.sink, self.config = database, sink, config
        self.contracts = list(contracts)
        self._connect = connect
        self.stats = SinkStats(database, sink.name, sink.kind)
        self.position: Position | None = None
        self._measured = 0.0
        self._trouble: str | None = None
        self._stall_s = float(os.environ.get(STALL_ENV) or 0)

    @property
    def what(self) -> str:
        return f"relay {self.database}/{self.sink.name}"

    async def run(self) -> None:
        """Lead or stand by until cancelled; a lost database connection means standing in line again."""
        delay = FIRST_RETRY_S
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                await store.ensure_tables(conn)
                if not await store.try_lead(conn, self.sink.name):
                    log.info("%s: standing by (another instance publishes to this sink)", self.what)
                    while not await store.try_lead(conn, self.sink.name):
                        await asyncio.sleep(STANDBY_S)
                self.stats.leader = True
                log.info("%s: publishing (this instance holds the sink's lock)", self.what)
                delay = FIRST_RETRY_S
                await self._lead(conn)
            except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
                self._report("the outbox is not in the database yet (run `gatehouse apply`)")
                await asyncio.sleep(self.config.retry_max_s)
            except DB_ERRORS as exc:
                self._report(f"database: {type(exc).__name__}")
                await asyncio.sleep(_jitter(min(delay, self.config.retry_max_s)))
                delay = min(delay * 2, self.config.retry_max_s)
            except Exception as exc:  # a bug must not end the relay for good
                log.exception("%s: failed (%s); starting again", self.what, type(exc).__name__)
                await asyncio.sleep(self.config.retry_max_s)
            finally:
                self.stats.leader = False
                if conn is not None:
                    await _close(conn)

    async def _lead(self, conn: asyncpg.Connection) -> None:
        position = self.position = await store.load_position(conn, self.sink.name)
        idle = POLL_MIN_S
        while True:
            events = await read_after(conn, position, self.config.batch, self.contracts)
            if time.monotonic() - self._measured >= MEASURE_EVERY_S:
                await self._measure(conn, position)
            if not events:
                await asyncio.sleep(idle)
                idle = min(idle * 2, POLL_MAX_S)
                continue
            idle = POLL_MIN_S
            await self._deliver(conn, events)
            if self._stall_s:
                log.warning("%s: %d events acknowledged, waiting %.1f s before storing the position (%s)",
                            self.what, len(events), self._stall_s, STALL_ENV)
                await asyncio.sleep(self._stall_s)
            position = events[-1].position
            await store.store_position(conn, self.sink.name, position)
            self.position = position
            self._over()

    async def _deliver(self, conn: asyncpg.Connection, events: Sequence[Event]) -> None:
        """Publish ``events`` until the broker acknowledged every one, storing progress after a partial success."""
        remaining, attempt, delay = events, 1, FIRST_RETRY_S
        while True:
            result = await self._publish(remaining)
            if self.sink.logs_deliveries:
                status = result.status or result.error or "ok"
                await store.log_deliveries(conn, self.sink.name, [e.id for e in remaining], attempt, status)
            if result.acked:
                self.stats.published += result.acked
                self.stats.last_publish = time.time()
            if result.acked >= len(remaining):
                return
            self.stats.failures += 1
            if result.acked:
                done = remaining[result.acked - 1].position
                await store.store_position(conn, self.sink.name, done)
                self.position = done
                remaining = remaining[result.acked:]
            self._report(result.error or "not acknowledged")
            self.stats.lag_s = max(0.0, time.time() - remaining[0].created_at.timestamp())
            pause = (min(result.retry_after_s, MAX_RETRY_AFTER_S) if result.retry_after_s
                     else _jitter(min(delay, self.config.retry_max_s)))
            await asyncio.sleep(pause)
            await conn.fetchval("SELECT 1")  # still leading? (the lock lives as long as this session)
            delay = min(delay * 2, self.config.retry_max_s)
            attempt += 1

    async def _publish(self, events: Sequence[Event]) -> Published:
        """The sink's publish, bounded in time even if the sink misbehaves."""
        try:
            async with asyncio.timeout(self.config.timeout_ms / 1000 * 2 + 5):
                return await self.sink.publish(events)
        except Exception as exc:  # a sink reports broker trouble itself; this is a bug or a hang
            log.error("%s: the sink failed (%s)", self.what, type(exc).__name__)
            await self.sink.close()
            return Published(0, type(exc).__name__)

    async def _measure(self, conn: asyncpg.Connection, position: Position) -> None:
        self._measured = time.monotonic()
        self.stats.backlog, self.stats.lag_s = await store.backlog(conn, position, self.contracts)

    def _report(self, trouble: str) -> None:
        """Log a failure once (until it is over), at warning."""
        if self._trouble is None:
            log.warning("%s: %s; trying again (nothing is skipped)", self.what, trouble)
        self._trouble = trouble

    def _over(self) -> None:
        if self._trouble is not None:
            log.info("%s: publishing again (after %s)", self.what, self._trouble)
            self._trouble = None


class Cleaner:
    """Deletes, in one database, the events every sink has once they are older than the retention."""

    def __init__(self, database: str, connect: Connect, routes: Sequence[tuple[str, str]], log_sinks: Sequence[str],
                 every_s: float = CLEAN_EVERY_S, retention_s: float = store.RETENTION_S) -> None:
        self.database, self._connect = database, connect
        self.routes, self.log_sinks = list(routes), list(log_sinks)
        self.every_s, self.retention_s = every_s, retention_s
        self.deleted = 0

    async def run(self) -> None:
        said = False
        while True:
            await asyncio.sleep(self.every_s * (0.5 + random.random()))
            try:
                deleted = await self.once()
                said = False
            except DB_ERRORS as exc:
                if not said:
                    log.warning("outbox of %s: cleaning failed (%s); trying again later", self.database,
                                type(exc).__name__)
                said = True
                continue
            if deleted:
                log.debug("outbox of %s: deleted %d delivered events", self.database, deleted)

    async def once(self) -> int | None:
        conn = await self._connect()
        try:
            deleted = await store.clean(conn, self.routes, self.log_sinks, self.retention_s)
        finally:
            await _close(conn)
        self.deleted += deleted or 0
        return deleted


def routes(project: Project) -> dict[str, dict[str, list[str]]]:
    """database → sink → the evented contracts it publishes (a database whose events go to no sink maps to {})."""
    where = str(project.root / "gatehouse.toml")
    config = project.config
    result: dict[str, dict[str, list[str]]] = {}
    for contract, settings in config.events.items():
        database = project.database_of(contract)
        if database is None:
            raise ProjectError(f"[events.{contract}]: there is no contract {contract!r}", where=where,
                               hint="name a contract of contracts/ (the file name before .v<N>.sql)")
        sinks = result.setdefault(database, {})
        for sink in (settings.sinks if settings.sinks is not None else tuple(config.sinks)):
            if sink not in config.sinks:
                raise ProjectError(f"[events.{contract}] sinks: there is no [sinks.{sink}]", where=where,
                                   hint=f"there are: {', '.join(config.sinks) or 'none'}")
            sinks.setdefault(sink, []).append(contract)
    return result


class Relays:
    """Every relay and cleaner of a project, run as background tasks."""

    def __init__(self, relays: Sequence[Relay], cleaners: Sequence[Cleaner],
                 registry: CollectorRegistry | None = None) -> None:
        self.relays, self.cleaners = list(relays), list(cleaners)
        self._registry, self._collector = registry, RelayCollector(lambda: [r.stats for r in self.relays])
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def for_project(cls, project: Project, targets: dict[str, DatabaseTarget], *,
                    only: Collection[str] | None = None, registry: CollectorRegistry | None = None) -> Relays | None:
        """The relays of ``project`` (those of the sinks in ``only``, when given), None when it has no events.
        A sink's URL or secret missing from the environment is a :class:`ProjectError` here, at start."""
        config = project.config
        if only is not None:
            unknown = sorted(set(only) - set(config.sinks))
            if unknown:
                raise ProjectError(f"there is no [sinks.{unknown[0]}] in gatehouse.toml",
                                   hint=f"there are: {', '.join(config.sinks) or 'none'}")
        relays, cleaners = [], []
        for database, sinks in routes(project).items():
            connect = _connector(targets[database])
            for name, contracts in sinks.items():
                if only is None or name in only:
                    sink_config = config.sinks[name]
                    relays.append(Relay(database, open_sink(name, sink_config, database), sink_config, contracts,
                                        connect))
            pairs = [(name, contract) for name, contracts in sinks.items() for contract in contracts]
            pairs += [(MIRROR_SINK + p.name, p.source.name) for p in plan_mirrors(project)
                      if p.source_database == database]  # (a mirror's position is kept like a sink's)
            cleaners.append(Cleaner(database, connect, pairs,
                                    [name for name, sink in config.sinks.items() if sink.kind == "webhook"]))
        if not cleaners:
            return None
        return cls(relays, cleaners, registry)

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> Relays | None:
        return cls.for_project(runtime.project, runtime.targets, registry=runtime.metrics.registry)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._registry is not None:
            self._registry.register(self._collector)
        self._tasks = [loop.create_task(r.run(), name=f"gatehouse-relay-{r.database}-{r.sink.name}")
                       for r in self.relays]
        self._tasks += [loop.create_task(c.run(), name=f"gatehouse-outbox-clean-{c.database}") for c in self.cleaners]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks = []
        await asyncio.gather(*(r.sink.close() for r in self.relays), return_exceptions=True)
        if self._registry is not None:
            with contextlib.suppress(KeyError):
                self._registry.unregister(self._collector)
            self._registry = None


def _connector(target: DatabaseTarget) -> Connect:
    """The relay's own connections: as the database's owner (it deletes from the outbox), with keepalives so a
    leader cut off by the network loses its lock within about 25 s."""
    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(target.owner_dsn, timeout=target.connect_timeout_s, command_timeout=60,
                                     server_settings={"application_name": APPLICATION_NAME, **KEEPALIVES})
    return connect


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2)
    except Exception:
        conn.terminate()


def _jitter(seconds: float) -> float:
    return seconds * (0.8 + 0.4 * random.random())
