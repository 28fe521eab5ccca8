"""``/metrics`` of the databases as this server uses them: each app's pools and each replica's lag.

Read at scrape time from the pools and the replica monitor (no work on the request path):

* ``gatehouse_pool_connections{app,database,server,state}`` (``in_use``, ``idle``), ``gatehouse_pool_size`` and
  ``gatehouse_pool_waiting`` (requests waiting for a connection of the app's quota); ``server`` is ``primary``
  or a replica's name; ``gatehouse_statement_groups_total``, ``gatehouse_statement_grouped_total`` and
  ``gatehouse_statement_group_retries_total`` count the statement groups of each pool (``db/statement_groups.py``:
  groups run, requests answered in them, requests run again alone after a refused group);
* ``gatehouse_replica_up{database,replica}`` (1 while it may answer reads), ``gatehouse_replica_lag_seconds``
  (how old its data may be, by the primary's heartbeat: what routing uses; absent while it is not usable),
  ``gatehouse_replica_replay_lag_seconds`` (``now() - pg_last_xact_replay_timestamp()`` on it: overstates the lag
  of an idle primary), ``gatehouse_replica_reads_total`` and ``gatehouse_replica_failures_total`` (reads it
  failed for a reason of its own, then answered by the primary), ``gatehouse_replica_fallbacks_total{database,
  reason}`` (reads that could have gone to a replica and were answered by the primary, and why).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class PoolReading(NamedTuple):
    app: str
    database: str
    server: str
    size: int
    in_use: int
    idle: int
    waiting: int
    groups: int = 0
    grouped: int = 0
    alone_again: int = 0
    merged: int = 0


class ReplicaReading(NamedTuple):
    database: str
    replica: str
    lag_s: float | None
    replay_lag_s: float | None
    reads: int
    failures: int


class DatabaseCollector(Collector):
    def __init__(self, pools: Callable[[], Iterable[PoolReading]], replicas: Callable[[], Iterable[ReplicaReading]],
                 fallbacks: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self._pools = pools
        self._replicas = replicas
        self._fallbacks = fallbacks

    def collect(self) -> Iterator[Metric]:
        where = ["app", "database", "server"]
        connections = GaugeMetricFamily("gatehouse_pool_connections", "Connections of each app's pool, by state.",
                                        labels=[*where, "state"])
        size = GaugeMetricFamily("gatehouse_pool_size", "Connections each app's quota allows (pool_size).",
                                 labels=where)
        waiting = GaugeMetricFamily("gatehouse_pool_waiting", "Requests waiting for a connection of the app's pool.",
                                    labels=where)
        groups = CounterMetricFamily("gatehouse_statement_groups", "Groups of two or more requests of one statement, "
                                     "waiting for the app's pool, run in one round trip.", labels=where)
        grouped = CounterMetricFamily("gatehouse_statement_grouped", "Requests answered in such a group.",
                                      labels=where)
        again = CounterMetricFamily("gatehouse_statement_group_retries", "Requests run again alone after the "
                                    "database refused their group.", labels=where)
        merged = CounterMetricFamily("gatehouse_statement_groups_merged", "Groups of inserts run as one statement "
                                     "(every request's rows in one INSERT).", labels=where)
        for pool in self._pools():
            labels = [pool.app, pool.database, pool.server]
            connections.add_metric([*labels, "in_use"], pool.in_use)
            connections.add_metric([*labels, "idle"], pool.idle)
            size.add_metric(labels, pool.size)
            waiting.add_metric(labels, pool.waiting)
            groups.add_metric(labels, pool.groups)
            grouped.add_metric(labels, pool.grouped)
            again.add_metric(labels, pool.alone_again)
            merged.add_metric(labels, pool.merged)
        yield from (connections, size, waiting, groups, grouped, again, merged)
        names = ["database", "replica"]
        up = GaugeMetricFamily("gatehouse_replica_up", "1 while the replica may answer reads.", labels=names)
        lag = GaugeMetricFamily("gatehouse_replica_lag_seconds", "How old the replica's data may be, by the "
                                "primary's heartbeat (what read routing uses).", labels=names)
        replay = GaugeMetricFamily("gatehouse_replica_replay_lag_seconds", "now() - pg_last_xact_replay_timestamp() "
                                   "on the replica (overstates the lag of an idle primary).", labels=names)
        reads = CounterMetricFamily("gatehouse_replica_reads", "Reads answered by the replica.", labels=names)
        failures = CounterMetricFamily("gatehouse_replica_failures", "Reads the replica failed for a reason of its "
                                       "own (then answered by the primary).", labels=names)
        for replica in self._replicas():
            labels = [replica.database, replica.replica]
            up.add_metric(labels, 0 if replica.lag_s is None else 1)
            if replica.lag_s is not None:
                lag.add_metric(labels, replica.lag_s)
            if replica.replay_lag_s is not None:
                replay.add_metric(labels, replica.replay_lag_s)
            reads.add_metric(labels, replica.reads)
            failures.add_metric(labels, replica.failures)
        fallbacks = CounterMetricFamily("gatehouse_replica_fallbacks", "Reads an app let go to a replica that the "
                                        "primary answered, by reason: none fresh, lacks the write, failed.",
                                        labels=["database", "reason"])
        for database, reason, count in self._fallbacks():
            fallbacks.add_metric([database, reason], count)
        yield from (up, lag, replay, reads, failures, fallbacks)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no fixed series: collect() only at scrape time
