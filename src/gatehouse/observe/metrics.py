"""Prometheus metrics of one server, in a registry of its own (so tests can run several servers).

Every request adds one sample, so recording is on the hot path. prometheus_client's ``Counter`` and
``Histogram`` take a lock and walk the buckets in Python on every call; here a sample is two list updates
on the event loop's thread (the only writer), and :class:`_RequestCollector` turns the counts into the same
Prometheus series when ``/metrics`` is scraped (on that same thread, so a scrape never sees half a sample).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

LABELS = ("app", "contract", "version", "method", "status")
METHODS = frozenset({"GET", "HEAD", "POST", "PATCH", "PUT", "DELETE", "OPTIONS"})
"""Methods recorded by name; any other is recorded as ``OTHER`` (a client cannot grow the series without bound)."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SUM = len(LATENCY_BUCKETS) + 1
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
        for (app, contract, version, method, status), counts in sorted(self._series.items()):
            labels = [app, contract, f"v{version}" if version else "", method, str(status)]
            cumulative, buckets = 0.0, []
            for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=False):
                cumulative += count
                buckets.append((bound, cumulative))
            requests.add_metric(labels, cumulative)
            latency.add_metric(labels, buckets, counts[_SUM])
        yield requests
        yield latency

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no fixed series: collect() only at scrape time


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
