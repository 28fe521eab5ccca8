"""What the alert rules read: the :class:`AlertSignals` protocol, and its reading of a running server.

The evaluator (:mod:`gatehouse.observe.alerts`) asks for each signal once per evaluation and only for the
kinds of rule configured. :class:`RuntimeSignals` reads them from the server itself:

* traffic: the per-app counts and latency histogram of :mod:`gatehouse.observe.metrics` (cumulative since
  start; the evaluator takes differences over each rule's window, as Prometheus's ``rate`` does);
* pools: each app pool's connections in use, size and waiters (on the primary and each replica);
* replica lag: ``runtime.replicas.lags()`` when the server has replicas;
* reachability, disk and slow statements: small queries on a connection of their own per database, as its
  owner (the runtime's internal pool is left to the requests' needs). Seeing other roles' statements needs
  ``pg_read_all_stats`` (or ``pg_monitor``) and the data directory ``pg_read_all_settings``; without them
  those signals are *unknown* (said once in the log) and rules on them keep their state.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

import asyncpg

from gatehouse.db.app_pools import application_name
from gatehouse.errors import DatabaseUnavailable
from gatehouse.observe.alert_state import OwnerLink
from gatehouse.observe.metrics import LATENCY_BUCKETS
from gatehouse.observe.saga_metrics import failed_runs

if TYPE_CHECKING:
    from gatehouse.runtime import Runtime

log = logging.getLogger(__name__)
BOUNDS = LATENCY_BUCKETS
"""Upper bounds of the latency buckets; a :class:`Traffic` has one count per bound, then one for ``+Inf``."""
LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True, slots=True)
class Traffic:
    """One app's requests since the server started (or within a window: :meth:`since`)."""

    requests: float
    client_errors: float
    """Answers 400-499."""
    server_errors: float
    """Answers 500-599."""
    buckets: tuple[float, ...]
    """Requests answered within each bound of :data:`BOUNDS`, cumulative; the last is every request."""

    def since(self, earlier: Traffic) -> Traffic:
        """The requests between ``earlier`` and this reading (this one alone if the counts restarted)."""
        if earlier.requests > self.requests:
            return self
        return Traffic(self.requests - earlier.requests, self.client_errors - earlier.client_errors,
                       self.server_errors - earlier.server_errors,
                       tuple(a - b for a, b in zip(self.buckets, earlier.buckets, strict=True)))

    def quantile(self, q: float) -> float | None:
        """The q-quantile of latency in seconds, interpolated within its bucket as Prometheus's
        ``histogram_quantile`` does (the largest finite bound when it falls in ``+Inf``); None without requests."""
        total = self.buckets[-1]
        if total <= 0:
            return None
        rank = q * total
        below, lower = 0.0, 0.0
        for bound, count in zip(BOUNDS, self.buckets, strict=False):
            if count >= rank:
                share = (rank - below) / (count - below) if count > below else 1.0
                return lower + (bound - lower) * share
            below, lower = count, bound
        return BOUNDS[-1]


NO_TRAFFIC = Traffic(0.0, 0.0, 0.0, (0.0,) * (len(BOUNDS) + 1))


@dataclass(frozen=True, slots=True)
class PoolReading:
    in_use: int
    size: int
    waiting: int


@dataclass(frozen=True, slots=True)
class SlowStatement:
    app: str
    database: str
    pid: int
    seconds: float


class AlertSignals(Protocol):
    """The readings the rules need. Mappings hold what could be read; None in a value means unknown."""

    async def reachable(self) -> Mapping[str, bool]:
        """Database → does it answer now."""
        ...

    async def replica_lags(self) -> Mapping[tuple[str, str], float | None]:
        """(database, replica) → replication lag in seconds (None: unreachable or not measured yet)."""
        ...

    def traffic(self) -> Mapping[str, Traffic]:
        """App → its requests so far (cumulative)."""
        ...

    def pools(self) -> Mapping[tuple[str, str, str], PoolReading]:
        """(app, database, server: ``primary`` or a replica's name) → its pool now."""
        ...

    async def disk_used(self) -> Mapping[str, float | None]:
        """Database → share (0-1) of its server's data disk in use."""
        ...

    async def slow_statements(self, longer_than_s: float) -> Mapping[str, Sequence[SlowStatement] | None]:
        """Database → the apps' statements running longer than this now (None: cannot tell)."""
        ...

    async def failed_sagas(self) -> Mapping[str, int]:
        """Saga → its runs that failed and need a person now (sagas with none are left out)."""
        ...


def server_is_local(dsn: str) -> bool:
    """Does a PostgreSQL URL point at this machine (a Unix socket or a loopback address)?"""
    try:
        parts = urlsplit(dsn)
        host = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
    except ValueError:
        return False
    return host.startswith("/") or host.lower() in LOCAL_HOSTS


SLOW_STATEMENTS = """
SELECT application_name, pid, extract(epoch FROM clock_timestamp() - query_start)::float8 AS seconds
FROM pg_stat_activity
WHERE datname = current_database() AND state = 'active' AND application_name = ANY ($1::text[])
  AND usename = $2 AND query_start < clock_timestamp() - $3::float8 * interval '1 second'
ORDER BY query_start
"""
CAN_SEE = """
SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS stats,
       rolsuper OR pg_has_role(current_user, 'pg_read_all_settings', 'USAGE') AS settings
FROM pg_roles WHERE rolname = current_user
"""


class RuntimeSignals:
    """:class:`AlertSignals` of a running server (see the module's docstring)."""

    def __init__(self, runtime: Runtime, links: Mapping[str, OwnerLink]) -> None:
        self._runtime = runtime
        self._links = dict(links)
        self._said: set[str] = set()
        self._rights: dict[str, asyncpg.Record | None] = {}

    def _once(self, key: str, message: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)

    async def reachable(self) -> dict[str, bool]:
        async def answers(link: OwnerLink) -> bool:
            try:
                await link.run(lambda conn: conn.fetchval("SELECT 1"))
            except DatabaseUnavailable:
                return False
            return True

        names = list(self._links)
        return dict(zip(names, await asyncio.gather(*(answers(self._links[n]) for n in names)), strict=True))

    async def replica_lags(self) -> dict[tuple[str, str], float | None]:
        return self._runtime.replicas.lags()

    async def failed_sagas(self) -> dict[str, int]:
        project = self._runtime.project
        if not project.sagas:
            return {}
        return await self._links[project.home_database].run(failed_runs)

    def traffic(self) -> dict[str, Traffic]:
        """From the request histogram (its ``+Inf`` bucket is the count of each series (app, status, ...))."""
        totals: dict[str, list[float]] = {}
        errors: dict[str, list[float]] = {}
        index = {str(bound): i for i, bound in enumerate(BOUNDS)} | {"+Inf": len(BOUNDS)}
        for family in self._runtime.metrics.registry.collect():
            if family.name != "gatehouse_request_duration_seconds":
                continue
            for sample in family.samples:
                app, le = sample.labels.get("app", ""), sample.labels.get("le")
                if not app or le is None or not sample.name.endswith("_bucket"):
                    continue
                counts = totals.setdefault(app, [0.0] * (len(BOUNDS) + 1))
                counts[index[le]] += sample.value
                if le == "+Inf":
                    status = sample.labels.get("status", "")
                    by_class = errors.setdefault(app, [0.0, 0.0])
                    if status.startswith("4"):
                        by_class[0] += sample.value
                    elif status.startswith("5"):
                        by_class[1] += sample.value
            break  # the request histogram is the only family needed: the other collectors are left alone
        split = {app: errors.get(app, [0.0, 0.0]) for app in totals}
        return {app: Traffic(counts[-1], split[app][0], split[app][1], tuple(counts))
                for app, counts in totals.items()}

    def pools(self) -> dict[tuple[str, str, str], PoolReading]:
        """Each app's pool on each database, on the primary and on each replica."""
        found = list(self._runtime.pools.readings()) if self._runtime.pools is not None else []
        found += self._runtime.replicas.readings()[1]
        return {(p.app, p.database, p.server): PoolReading(p.in_use, p.size, p.waiting) for p in found}

    async def _privileges(self, name: str) -> asyncpg.Record | None:
        """What the owner may see in database ``name`` (asked once, then kept)."""
        if name not in self._rights:
            self._rights[name] = await self._links[name].run(lambda conn: conn.fetchrow(CAN_SEE))
        return self._rights[name]

    async def disk_used(self) -> dict[str, float | None]:
        used: dict[str, float | None] = {}
        for name, target in self._runtime.targets.items():
            used[name] = None
            if name not in self._links:
                continue
            if not server_is_local(target.owner_dsn):
                self._once(f"disk-remote:{name}", "alerts: the disk of database %s cannot be measured: its server "
                           "is not on this machine (watch it where it runs, e.g. node_exporter)", name)
                continue
            try:
                rights = await self._privileges(name)
                if rights is None or not rights["settings"]:
                    self._once(f"disk-rights:{name}", "alerts: the disk of database %s cannot be measured: its "
                               "owner may not read data_directory (GRANT pg_read_all_settings TO the owner)", name)
                    continue
                path = await self._links[name].run(lambda conn: conn.fetchval(
                    "SELECT current_setting('data_directory')"))
                usage = await asyncio.to_thread(shutil.disk_usage, path)
            except (DatabaseUnavailable, OSError):
                continue
            used[name] = usage.used / usage.total if usage.total else None
        return used

    async def slow_statements(self, longer_than_s: float) -> dict[str, list[SlowStatement] | None]:
        project = self._runtime.project
        names = {application_name(app): app for app in project.apps}
        found: dict[str, list[SlowStatement] | None] = {}
        for database, link in self._links.items():
            found[database] = None
            try:
                rights = await self._privileges(database)
                if rights is None or not rights["stats"]:
                    self._once(f"stats-rights:{database}", "alerts: statements of database %s cannot be seen: its "
                               "owner lacks pg_read_all_stats (GRANT pg_monitor TO the owner)", database)
                    continue
                rows = await link.run(lambda conn: conn.fetch(SLOW_STATEMENTS, list(names),
                                                              project.authenticator_role, longer_than_s))
            except DatabaseUnavailable:
                continue
            found[database] = [SlowStatement(names[r["application_name"]], database, r["pid"], r["seconds"])
                               for r in rows]
        return found
