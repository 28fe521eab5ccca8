"""The relay on ``/metrics``: per database and sink, events published, failed publishes, the age of the last
publish, and (from the instance leading the sink) the backlog and the age of the oldest event not yet delivered.

Counts are kept by each relay in a :class:`SinkStats` (plain attributes, written on the event loop's thread) and
turned into Prometheus series only when ``/metrics`` is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LABELS = ("database", "sink", "kind")


@dataclass(slots=True)
class SinkStats:
    """What one relay (one database, one sink) did in this process."""

    database: str
    sink: str
    kind: str
    published: int = 0
    """Events the broker acknowledged (republished ones count again)."""
    failures: int = 0
    """Publishes of a batch (or the rest of one) that failed and were tried again."""
    last_publish: float | None = None
    """Unix time of the last acknowledged publish."""
    leader: bool = False
    """True while this process holds the sink's lock and publishes."""
    backlog: int | None = None
    """Events waiting for this sink when last measured (by the leader)."""
    lag_s: float | None = None
    """Age of the oldest of them, in seconds (0 when none waits)."""

    @property
    def labels(self) -> list[str]:
        return [self.database, self.sink, self.kind]


class RelayCollector(Collector):
    def __init__(self, read: Callable[[], Iterable[SinkStats]], clock: Callable[[], float] = time.time) -> None:
        self._read, self._clock = read, clock

    def collect(self) -> Iterator[Metric]:
        published = CounterMetricFamily("gatehouse_events_published", "Events a sink's broker acknowledged, by this "
                                        "instance (a republished event counts again).", labels=LABELS)
        failures = CounterMetricFamily("gatehouse_event_publish_failures", "Publishes to a sink that failed and are "
                                       "tried again (events are never skipped).", labels=LABELS)
        age = GaugeMetricFamily("gatehouse_event_last_publish_age_seconds", "Seconds since this instance last "
                                "published to the sink (absent until it has).", labels=LABELS)
        leader = GaugeMetricFamily("gatehouse_event_relay_leader", "1 when this instance is the one publishing to "
                                   "the sink, 0 when it stands by.", labels=LABELS)
        lag = GaugeMetricFamily("gatehouse_event_relay_lag_seconds", "Age of the oldest event not yet delivered to "
                                "the sink (0 when none waits), as measured by the instance publishing to it.",
                                labels=LABELS)
        backlog = GaugeMetricFamily("gatehouse_event_relay_backlog", "Events not yet delivered to the sink "
                                    "(counted up to 100,000), as measured by the instance publishing to it.",
                                    labels=LABELS)
        now = self._clock()
        for stats in self._read():
            labels = stats.labels
            published.add_metric(labels, stats.published)
            failures.add_metric(labels, stats.failures)
            leader.add_metric(labels, 1.0 if stats.leader else 0.0)
            if stats.last_publish is not None:
                age.add_metric(labels, max(0.0, now - stats.last_publish))
            if stats.leader and stats.lag_s is not None:
                lag.add_metric(labels, stats.lag_s)
            if stats.leader and stats.backlog is not None:
                backlog.add_metric(labels, stats.backlog)
        yield from (published, failures, age, leader, lag, backlog)

    def describe(self) -> Iterator[Metric]:
        return iter(())
