"""Prometheus metrics of one server, in a registry of its own (so tests can run several servers).

Every request adds one sample, so recording is on the hot path. prometheus_client's ``Counter`` and
``Histogram`` take a lock and walk the buckets in Python on every call; here a sample is two list updates
on the event loop's thread (the only writer), and :class:`_RequestCollector` turns the counts into the same
Prometheus series when ``/metrics`` is scraped (on that same thread, so a scrape never sees half a sample).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gatehouse.observe.db_metrics import DatabaseCollector, PoolReading, ReplicaReading

LABELS = ("app", "contract", "version", "method", "status")
METHODS = frozenset({"GET", "HEAD", "POST", "PATCH", "PUT", "DELETE", "OPTIONS"})
"""Methods recorded by name; any other is recorded as ``OTHER`` (a client cannot grow the series without bound)."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SUM = len(LATENCY_BUCKETS) + 1
SLOW_FROM = LATENCY_BUCKETS.index(1.0) + 1
"""Index of the first bucket above one second: what ``gatehouse_slow_requests_total`` counts."""
"""Index of the sum of seconds in a series; before it, one count per bucket and the last for ``+Inf``."""

SeriesKey = tuple[str, str, int, str, int]
"""app, contract, API version (0 before the request got as far as one), method, status."""


class _RequestCollector(Collector):
    """``gatehouse_requests_total`` and ``gatehouse_request_duration_seconds`` from per-label-set counts."""

    def __init__(self, series: dict[SeriesKey, list[float]]) -> None:
        self._series = series

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("gatehouse_requests", "Requests answered on the data port.", labels=LABELS)
        latency = HistogramMetricFamily("gatehouse_request_duration_seconds",
                                        "Time to answer a request on the data port.", labels=LABELS)
        slow: dict[str, float] = {}
        for (app, contract, version, method, status), counts in sorted(self._series.items()):
            slow[app] = slow.get(app, 0.0) + sum(counts[SLOW_FROM:_SUM])
            labels = [app, contract, f"v{version}" if version else "", method, str(status)]
            cumulative, buckets = 0.0, []
            for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=False):
                cumulative += count
                buckets.append((bound, cumulative))
            requests.add_metric(labels, cumulative)
            latency.add_metric(labels, buckets, counts[_SUM])
        yield requests
        yield latency
        slow_family = CounterMetricFamily("gatehouse_slow_requests", f"Requests of each app that took longer than "
                                          f"{LATENCY_BUCKETS[SLOW_FROM - 1]:g} s (one statement each, but for "
                                          "logic functions).", labels=["app"])
        for app, count in sorted(slow.items()):
            slow_family.add_metric([app], count)
        yield slow_family

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no fixed series: collect() only at scrape time


CacheCounts = Callable[[], Mapping[tuple[str, str, str], int]]
"""(app, contract, result) → reads with that result, as the response cache counts them."""


class _CacheCollector(Collector):
    """``gatehouse_cache_reads_total{app,contract,result}`` and the in-process tier's size, read at scrape."""

    def __init__(self, counts: CacheCounts, size: Callable[[], tuple[int, int]]) -> None:
        self._counts, self._size = counts, size

    def collect(self) -> Iterator[Metric]:
        reads = CounterMetricFamily("gatehouse_cache_reads", "Reads of cached contracts by result: hit, "
                                    "revalidated (304 without the database), miss, stale (an entry older than "
                                    "its data), bypass (not served from the cache: freshness unproven).",
                                    labels=("app", "contract", "result"))
        for (app, contract, result), count in sorted(self._counts().items()):
            reads.add_metric([app, contract, result], count)
        yield reads
        entries, size = self._size()
        yield GaugeMetricFamily("gatehouse_cache_entries", "Answers kept in this process.", value=entries)
        yield GaugeMetricFamily("gatehouse_cache_bytes", "Bytes of the answers kept in this process.", value=size)

    def describe(self) -> Iterator[Metric]:
        return iter(())


SHARED_LIMIT_COUNTERS = {
    "lease_calls": "Lease calls Redis answered (each grants tokens to this instance for several requests).",
    "tokens_leased": "Tokens Redis granted this instance.",
    "waits": "Limited requests that waited for a lease call (the others were decided without Redis).",
    "degraded": "Decisions made by this instance's share of a limit because Redis was down or slow.",
    "redis_errors": "Calls to Redis that failed or timed out.",
    "breaker_opens": "Times the breaker opened (Redis left aside until a trial call succeeds).",
}


class _SharedLimitsCollector(Collector):
    """The Redis-shared rate limits: calls, leases, fallbacks, the breaker (read from the store at scrape)."""

    def __init__(self, read: Callable[[], Mapping[str, float | str]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        for name, text in SHARED_LIMIT_COUNTERS.items():
            yield CounterMetricFamily(f"gatehouse_ratelimit_{name}", text, value=float(stats[name]))
        live = GaugeMetricFamily("gatehouse_ratelimit_live_instances", "Instances sharing the limits (from their "
                                 "heartbeats): a local share is the limit divided by this.", value=float(stats["live"]))
        yield live
        state = GaugeMetricFamily("gatehouse_ratelimit_breaker_state", "1 for the breaker's current state.",
                                  labels=("state",))
        for name in ("closed", "open", "half_open"):
            state.add_metric([name], 1.0 if stats["breaker"] == name else 0.0)
        yield state

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _WorkSlotsCollector(Collector):
    """Fair sharing (``limits/fair.py``): requests being answered, queued for a turn, and how many waited."""

    def __init__(self, read: Callable[[], tuple[int, int, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        active, queued, waited = self._read()
        yield GaugeMetricFamily("gatehouse_work_active", "Requests being answered now (all apps).", value=active)
        yield GaugeMetricFamily("gatehouse_work_queued", "Requests waiting for their app's turn.", value=queued)
        yield CounterMetricFamily("gatehouse_work_waits", "Requests that waited for a turn.", value=waited)

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._series: dict[SeriesKey, list[float]] = {}
        self.registry.register(_RequestCollector(self._series))
        self._reloads = Counter("gatehouse_reloads", "Reloads after apply or migrate changed a database, by outcome: "
                                "project (a new project served), schema (the catalog read again), kept (the "
                                "database does not serve this server's project yet), failed.", ["outcome"],
                                registry=self.registry)

    def watch_cache(self, counts: CacheCounts, size: Callable[[], tuple[int, int]]) -> None:
        """Report the response cache's counts and size (once per server)."""
        self.registry.register(_CacheCollector(counts, size))

    def watch_limits(self, read: Callable[[], Mapping[str, float | str]]) -> None:
        """Report the shared rate limits' counts (``read`` gives the counters, ``live`` and ``breaker``)."""
        self.registry.register(_SharedLimitsCollector(read))

    def watch_work(self, read: Callable[[], tuple[int, int, int]]) -> None:
        """Report the work slots: (active, queued, waited so far)."""
        self.registry.register(_WorkSlotsCollector(read))

    def watch_databases(self, pools: Callable[[], Iterable[PoolReading]],
                        replicas: Callable[[], Iterable[ReplicaReading]],
                        fallbacks: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Report every pool's connections and every replica's lag (``observe/db_metrics.py``)."""
        self.registry.register(DatabaseCollector(pools, replicas, fallbacks))

    def reloaded(self, outcome: str) -> None:
        self._reloads.labels(outcome).inc()

    def observe(self, app: str, contract: str, api_version: int | None, method: str, status: int,
                seconds: float) -> None:
        """One request answered (positional arguments: this runs for every request)."""
        key = (app, contract, api_version or 0, method if method in METHODS else "OTHER", status)
        counts = self._series.get(key)
        if counts is None:
            counts = self._series[key] = [0.0] * (_SUM + 1)
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bucket whose bound is >= seconds
        counts[_SUM] += seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)
