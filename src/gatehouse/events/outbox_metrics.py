"""``/metrics``: how many events wait in each database's outbox, and how old the oldest is.

* ``gatehouse_outbox_events{database}``: rows in ``gatehouse.outbox`` (counted up to :data:`COUNT_CAP`, beyond
  which the planner's estimate is shown). With sinks, the relay deletes what every sink acknowledged, so this is
  the backlog; a database served by the HTTP feed alone keeps its events, and this is what it keeps.
* ``gatehouse_outbox_oldest_event_age_seconds{database}``: age of the oldest row (0 when there is none).

A scrape never waits for a database: it shows the last reading (:mod:`gatehouse.observe.scrape_reading`); a caller
that wants the reading of this very moment awaits :meth:`OutboxCollector.refresh` before rendering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping

import asyncpg
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gatehouse.observe.scrape_reading import ReadAtScrape

log = logging.getLogger(__name__)
TIMEOUT_S = 2.0
COUNT_CAP = 100_000

READING = f"""
SELECT (SELECT count(*) FROM (SELECT 1 FROM gatehouse.outbox LIMIT {COUNT_CAP}) AS capped) AS counted,
       (SELECT reltuples::bigint FROM pg_class WHERE oid = 'gatehouse.outbox'::regclass) AS estimated,
       coalesce((SELECT extract(epoch FROM now() - o.created_at)::float8 FROM gatehouse.outbox o
                 ORDER BY o.seq LIMIT 1), 0) AS age
"""


class OutboxCollector(ReadAtScrape, Collector):
    """The outbox gauges of every database gatehouse reads on its internal ``pools`` (database → pool)."""

    def __init__(self, pools: Mapping[str, asyncpg.Pool]) -> None:
        super().__init__("gatehouse/outbox-metrics")
        self._pools = pools
        self._readings: dict[str, tuple[int, float]] = {}

    async def refresh(self) -> None:
        """Read every database's outbox now (a database without one, or not answering, is left out)."""
        readings: dict[str, tuple[int, float]] = {}
        for name, pool in list(self._pools.items()):
            try:
                async with asyncio.timeout(TIMEOUT_S), pool.acquire() as conn:
                    if await conn.fetchval("SELECT to_regclass('gatehouse.outbox') IS NULL"):
                        continue
                    row = await conn.fetchrow(READING)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.debug("could not read the outbox of %s: %s", name, type(exc).__name__)
                continue
            assert row is not None
            rows = row["counted"] if row["counted"] < COUNT_CAP else max(row["counted"], row["estimated"])
            readings[name] = (int(rows), float(row["age"]))
        self._readings, self._read_at = readings, time.monotonic()

    def collect(self) -> Iterator[Metric]:
        self._refresh_soon()
        rows = GaugeMetricFamily("gatehouse_outbox_events", "Events in the outbox: not yet acknowledged by every "
                                 "sink, or kept for the HTTP feed.", labels=["database"])
        age = GaugeMetricFamily("gatehouse_outbox_oldest_event_age_seconds",
                                "Age of the oldest event in the outbox.", labels=["database"])
        for name, (count, seconds) in sorted(self._readings.items()):
            rows.add_metric([name], count)
            age.add_metric([name], seconds)
        yield rows
        yield age
