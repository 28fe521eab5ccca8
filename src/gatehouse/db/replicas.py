"""Streaming replicas of a project's databases: their pools, how fresh each one is, and which may answer a read.

**Freshness without trusting clocks.** Every ``replica_check_ms`` this instance writes its own heartbeat row
on the primary (``gatehouse.heartbeat``: a number that goes up by one each time), noting by its own monotonic
clock when it sent it; then it reads on each replica which number that replica has replayed. A replica that
shows number *n* has every commit the primary made before heartbeat *n* was sent, so its data is at most
``now - sent(n)`` old. That bound never understates the lag (it overstates it by at most one period plus the
replay of one commit), an idle primary does not look lagging (the heartbeat keeps writing), and no two
machines' clocks are compared. ``now() - pg_last_xact_replay_timestamp()`` is read too, for people (metrics,
doctor), never for routing.

**Which replica may answer.** One that is in recovery, answered its last check, replays the primary's
current ``apply`` revision (a contract version just published is read from the primary until the replica
has its views), and whose bound is within the read's ``max_staleness``; among those, the one with the most
free connections in the app's pool. A replica whose read failed for a reason of its own (gone, recovery
conflict) is skipped for :data:`EJECT_S` and the read runs on the primary in the same request.

**Read your writes.** A write's answer carries its transaction id (:mod:`gatehouse.db.consistency`). A read
that brings it back runs on a replica only in the same statement as a guard that the id is below the
replica's snapshot ``xmin``: then the write is complete and, if committed, visible in exactly the snapshot
the rows come from (``pg_xact_status`` checked before the rows would race with the replay, and the
standby's ``pg_current_snapshot`` lists no running ids). Each instance also remembers each app's latest
write per database for ``max_staleness``: after that long, any replica fresh enough for the app has it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from gatehouse.background import stop_tasks
from gatehouse.db.app_pools import PoolOptions, app_pool
from gatehouse.db.pools import AppPool
from gatehouse.db.targets import DatabaseTarget
from gatehouse.errors import ApiError, DatabaseUnavailable
from gatehouse.observe.db_metrics import PoolReading, ReplicaReading
from gatehouse.project import App, Project
from gatehouse.secrets import resolve_secret, source_of

log = logging.getLogger(__name__)
SOURCE_HEADER = "Gatehouse-Source"
"""On every read of a database with replicas: ``primary``, or the replica's name (``r1``)."""
AGE_HEADER = "Gatehouse-Data-Age"
"""How old the answer's data may be, in seconds: the replica's bound when it was chosen, 0 on the primary."""
PRIMARY_SOURCE = {SOURCE_HEADER: "primary", AGE_HEADER: "0"}
EJECT_S = 5.0
"""How long a replica whose read failed for a reason of its own is left out."""
CHECK_TIMEOUT_S = 1.0
MAX_REMEMBERED = 100_000
"""Heartbeats whose sending time is kept (5.5 hours at the default period) for a replica that is away."""
GUARD = "SELECT * FROM ({sql}) AS _gh_replica WHERE ${n}::text::xid8 < pg_snapshot_xmin(pg_current_snapshot())"
HEARTBEAT = """
INSERT INTO gatehouse.heartbeat (instance, seq, at) VALUES ($1, $2, clock_timestamp())
ON CONFLICT (instance) DO UPDATE SET seq = EXCLUDED.seq, at = EXCLUDED.at
RETURNING (SELECT value FROM gatehouse.state WHERE key = 'revision')
"""
REPLICA_STATE = """
SELECT (SELECT seq FROM gatehouse.heartbeat WHERE instance = $1) AS seq,
       (SELECT value FROM gatehouse.state WHERE key = 'revision') AS revision,
       pg_is_in_recovery() AS recovering,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_lag
"""
RETRY_ON_PRIMARY = ("40", "57", "08", "53", "55", "42P01", "42703", "42883", "3D000", "28000")
"""SQLSTATEs a replica can give where the primary would not: recovery conflicts (40001, 57P04), shutdown or
a lost connection, no resources, and a view or column not yet replayed. Not 57014, the app's own timeout."""


@dataclass(eq=False)
class Replica:
    """One replica of one database, as this instance last saw it."""

    database: str
    name: str
    target: DatabaseTarget
    """Its address, with the primary's authenticator and settings."""
    pools: dict[str, AppPool] = field(default_factory=dict)
    fresh_at: float | None = None
    """By this instance's monotonic clock: the replica has every commit made before this moment."""
    seen_seq: int = 0
    """The newest of this instance's heartbeats the replica has replayed."""
    revision: str | None = None
    recovering: bool = False
    reachable: bool = False
    replay_lag_s: float | None = None
    """``now() - pg_last_xact_replay_timestamp()`` on the replica (overstates the lag of an idle primary)."""
    ejected_until: float = 0.0
    problem: str = "not checked yet"
    reads: int = 0
    failures: int = 0

    def staleness(self, now: float) -> float | None:
        """How old its data may be now, in seconds; None when it may not be used at all."""
        if not (self.reachable and self.recovering) or self.fresh_at is None or now < self.ejected_until:
            return None
        return max(0.0, now - self.fresh_at)


def replica_targets(project: Project, primaries: dict[str, DatabaseTarget]) -> dict[str, list[Replica]]:
    """The replicas ``[databases.<db>] replicas`` names (r1, r2... in order), each reached as the primary's
    authenticator. Raises :class:`~gatehouse.errors.ProjectError` when a URL's variable is not set."""
    found: dict[str, list[Replica]] = {}
    for database, config in project.config.databases.items():
        for number, reference in enumerate(config.replicas, start=1):
            what = f"[databases.{database}] replicas[{number - 1}]"
            url = resolve_secret(reference, what=what)
            assert url is not None
            target = dataclasses.replace(primaries[database], owner_dsn=url, embedded=False,
                                         source=source_of(reference))
            found.setdefault(database, []).append(Replica(database, f"r{number}", target))
    return found


def should_retry_on_primary(exc: BaseException) -> bool:
    """Did the replica fail for a reason of its own (so the primary may well answer)?"""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state != "57014" and state.startswith(RETRY_ON_PRIMARY)
    if isinstance(exc, ApiError):  # our pool's 503 (cannot connect) and 504 (no connection free in time)
        return exc.status in (503, 504)
    return isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError))


class ReplicaSet:
    """Every replica of a project's databases, their per-app pools and the loop that measures them."""

    def __init__(self, replicas: dict[str, list[Replica]], options: PoolOptions, check_s: dict[str, float]) -> None:
        self.by_database = replicas
        self._options = dataclasses.replace(options, acquire_timeout_s=min(options.acquire_timeout_s, 1.0))
        self._check_s = check_s
        self._instance = uuid.uuid4().hex[:16]
        self._seq = 0
        self._sent: dict[str, dict[int, float]] = {db: {} for db in replicas}
        self._revision: dict[str, str | None] = {}
        self._writes: dict[tuple[str, str], tuple[int, float]] = {}
        """(app, database) → the largest transaction id of its writes through this instance, and when."""
        self._tasks: list[asyncio.Task[None]] = []
        self._checkers: dict[Replica, asyncpg.Connection] = {}
        self._pool_quotas: dict[tuple[Replica, str], object] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.fallbacks: dict[tuple[str, str], int] = {}
        """(database, reason) → reads that could go to a replica and went to the primary: ``none fresh`` (no
        replica reachable, caught up and within the bound), ``lacks the write`` (the caller's last write not
        there yet), ``failed`` (the replica failed the read)."""

    @classmethod
    def none(cls) -> ReplicaSet:
        return cls({}, PoolOptions(), {})

    @classmethod
    def for_project(cls, project: Project, primaries: dict[str, DatabaseTarget], options: PoolOptions) -> ReplicaSet:
        replicas = replica_targets(project, primaries)
        check_s = {db: project.config.databases[db].replica_check_ms / 1000 for db in replicas}
        return cls(replicas, options, check_s)

    def __bool__(self) -> bool:
        return bool(self.by_database)

    def has(self, database: str) -> bool:
        return database in self.by_database

    async def start(self, primaries: dict[str, asyncpg.Pool]) -> None:
        """Measure every replica once (so the first reads can use them), then every ``replica_check_ms``."""
        for database in self.by_database:
            async with primaries[database].acquire() as conn:  # rows of instances long gone
                try:
                    await conn.execute("DELETE FROM gatehouse.heartbeat WHERE at < now() - interval '1 day'")
                except asyncpg.UndefinedTableError:
                    raise DatabaseUnavailable(f"database {database} has replicas but no gatehouse.heartbeat, which "
                                              "measures their lag: run `gatehouse apply`") from None
            await self._check(database, primaries[database])
            task = asyncio.get_running_loop().create_task(self._watch(database, primaries[database]),
                                                          name=f"gatehouse-replicas-{database}")
            self._tasks.append(task)

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks.clear()
        for conn in self._checkers.values():
            conn.terminate()
        self._checkers.clear()
        pools = [pool for replicas in self.by_database.values() for r in replicas for pool in r.pools.values()]
        await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)

    # -- measuring ------------------------------------------------------------------------------------------

    async def _watch(self, database: str, primary: asyncpg.Pool) -> None:
        period = self._check_s[database]
        while True:
            await asyncio.sleep(period)
            try:
                await self._check(database, primary)
            except Exception as exc:  # never let the loop die: the next round tries again
                log.warning("checking the replicas of %s failed: %s", database, type(exc).__name__)

    async def _check(self, database: str, primary: asyncpg.Pool) -> None:
        self._seq += 1
        seq, sent_at = self._seq, time.monotonic()
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S), primary.acquire() as conn:
                self._revision[database] = await conn.fetchval(HEARTBEAT, self._instance, seq)
            self._sent[database][seq] = sent_at
        except Exception as exc:  # the primary is away: the replicas' bounds grow until it is back
            log.debug("heartbeat on %s failed: %s", database, type(exc).__name__)
        replicas = self.by_database[database]
        await asyncio.gather(*(self._check_replica(r) for r in replicas))
        sent = self._sent[database]
        needed = min(r.seen_seq for r in replicas)  # a replica only ever shows newer numbers than it did
        for old in [s for s in sent if s < needed or s <= seq - MAX_REMEMBERED]:
            del sent[old]

    async def _check_replica(self, replica: Replica) -> None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                conn = self._checkers.get(replica)
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(**replica.target.authenticator_kwargs(),
                                                 server_settings={"application_name": "gatehouse/replicas"})
                    self._checkers[replica] = conn
                row = await conn.fetchrow(REPLICA_STATE, self._instance)
        except Exception as exc:
            self._lost(replica, f"unreachable ({type(exc).__name__})")
            return
        assert row is not None
        was = replica.reachable
        replica.reachable, replica.recovering = True, bool(row["recovering"])
        replica.revision, replica.replay_lag_s = row["revision"], row["replay_lag"]
        seq = row["seq"]
        if seq is not None and seq > replica.seen_seq:
            replica.seen_seq = seq
            sent = self._sent[replica.database].get(seq)
            if sent is not None:  # (else older than this instance remembers: the next round will know)
                replica.fresh_at = sent
        replica.problem = "" if replica.recovering else "not in recovery (promoted?): not used"
        if not was:
            log.info("replica %s of %s answers", replica.name, replica.database)

    def _lost(self, replica: Replica, why: str) -> None:
        conn = self._checkers.pop(replica, None)
        if conn is not None:
            conn.terminate()
        if replica.reachable or replica.problem == "not checked yet":
            log.warning("replica %s of %s: %s; its reads go elsewhere", replica.name, replica.database, why)
        replica.reachable, replica.problem = False, why

    # -- routing --------------------------------------------------------------------------------------------

    def choose(self, app: App, database: str, max_staleness_s: float) -> tuple[Replica, float] | None:
        """The replica that may answer ``app``'s read now and how old its data may be, or None (the primary)."""
        now = time.monotonic()
        revision = self._revision.get(database)
        best: tuple[int, Replica, float] | None = None
        for replica in self.by_database.get(database, ()):
            age = replica.staleness(now)
            if age is None or age > max_staleness_s or replica.revision != revision:
                continue
            pool = self.pool(replica, app)
            free = pool.size - pool.in_use
            if best is None or free > best[0]:
                best = (free, replica, age)
        if best is None:
            self._fell_back(database, "none fresh")
            return None
        return best[1], best[2]

    def _fell_back(self, database: str, reason: str) -> None:
        key = (database, reason)
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def pool(self, replica: Replica, app: App) -> AppPool:
        """The app's pool on ``replica`` (opened on first use; a changed quota gets a new one)."""
        pool = replica.pools.get(app.name)
        quota = app.config.quota
        known = self._pool_quotas.get((replica, app.name))
        if pool is not None and known is not quota:  # (identity first: comparing two quotas is slow)
            if known == quota:
                self._pool_quotas[(replica, app.name)] = quota
            else:  # a reload changed the quota: the old pool ends once its reads are done
                self._closing.add(task := asyncio.get_running_loop().create_task(pool.close()))
                task.add_done_callback(self._closing.discard)
                pool = None
        if pool is None:
            pool = replica.pools[app.name] = app_pool(replica.target, app, self._options)
            self._pool_quotas[(replica, app.name)] = quota
        return pool

    def own_write(self, app: str, database: str, max_staleness_s: float) -> int | None:
        """The app's latest write through this instance, while a replica fresh enough could still lack it."""
        last = self._writes.get((app, database))
        if last is None:
            return None
        if time.monotonic() - last[1] > max_staleness_s:
            return None
        return last[0]

    def wrote(self, app: str, database: str, xid: int) -> None:
        last = self._writes.get((app, database))
        self._writes[(app, database)] = (max(xid, last[0]) if last is not None else xid, time.monotonic())

    async def read_row(self, replica: Replica, app: App, sql: str, params: Sequence[object],
                       after: int | None) -> asyncpg.Record | None:
        """Run one read on ``replica``; None when it may not answer (it lacks the write ``after``, or failed for
        a reason of its own: then it is left out for a while). Errors of the read itself are raised."""
        if after is not None:
            sql = GUARD.format(sql=sql, n=len(params) + 1)
            params = (*params, str(after))
        try:
            row = await self.pool(replica, app).read_row(sql, params)
        except Exception as exc:
            if not should_retry_on_primary(exc):
                raise
            replica.failures += 1
            replica.ejected_until = time.monotonic() + EJECT_S
            self._fell_back(replica.database, "failed")
            log.warning("replica %s of %s failed a read (%s); reading from the primary", replica.name,
                        replica.database, getattr(exc, "sqlstate", None) or type(exc).__name__)
            return None
        if row is not None:
            replica.reads += 1
        else:
            self._fell_back(replica.database, "lacks the write")
        return row

    # -- reporting ------------------------------------------------------------------------------------------

    def lags(self) -> dict[tuple[str, str], float | None]:
        """(database, replica) → how old its data may be now (seconds), None when it is not usable."""
        now = time.monotonic()
        return {(r.database, r.name): r.staleness(now) for rs in self.by_database.values() for r in rs}

    def fallback_readings(self) -> list[tuple[str, str, int]]:
        return [(database, reason, count) for (database, reason), count in sorted(self.fallbacks.items())]

    def readings(self) -> tuple[list[ReplicaReading], list[PoolReading]]:
        """Each replica's lag and counts, and each app's pool on it, for ``/metrics``."""
        now = time.monotonic()
        replicas: list[ReplicaReading] = []
        pools: list[PoolReading] = []
        for rs in self.by_database.values():
            for r in rs:
                replicas.append(ReplicaReading(r.database, r.name, r.staleness(now), r.replay_lag_s, r.reads,
                                               r.failures))
                pools.extend(PoolReading(app, r.database, r.name, p.size, p.in_use, p.idle, p.waiting)
                             for app, p in sorted(r.pools.items()))
        return replicas, pools

    def report(self) -> dict[str, str]:
        """``<db>/<replica>`` → 'ok (lag 0.21 s)' or what is wrong, for ``/ready`` (never makes it false)."""
        now = time.monotonic()
        out: dict[str, str] = {}
        for replicas in self.by_database.values():
            for r in replicas:
                age = r.staleness(now)
                key = f"{r.database}/{r.name}"
                if age is not None:
                    out[key] = f"ok (data at most {age:.2f} s old)"
                elif now < r.ejected_until:
                    out[key] = "left out for a moment after a failed read"
                else:
                    out[key] = r.problem or "no heartbeat seen yet"
        return out

