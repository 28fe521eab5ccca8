"""Sagas on ``/metrics``: runs started and finished, steps run by outcome and how long they took, runs in hand.

* ``gatehouse_sagas_started_total{saga}``: runs this instance started (a start repeated under the same
  idempotency key is not counted again).
* ``gatehouse_sagas_finished_total{saga, state}``: runs this instance took to ``completed``, ``compensated`` or
  ``failed`` (needs attention).
* ``gatehouse_saga_steps_total{saga, step, outcome}``: steps and compensations this instance ran: ``done`` (a
  forward step committed or recorded), ``compensated`` (a compensation did), ``retried`` (failed, will be tried
  again after a backoff), ``failed`` (failed for good: the saga is compensated, or needs attention). A step
  replayed from its record is not run, so not counted.
* ``gatehouse_saga_step_duration_seconds{saga, step}``: time per run of a step, whatever its outcome.
* ``gatehouse_sagas_active{state}``: runs ``running`` or ``compensating`` now, in the database (every instance's).
* ``gatehouse_sagas_failed{saga}``: runs ``failed`` now, which need a person (``gatehouse sagas list --state
  failed``); what the ``saga_failed`` alert rule watches.

The counts are plain integers in a :class:`SagaStats` that the engine adds to where it already knows the
outcome (no database statement, no lock: one event loop writes them); they become Prometheus series only when
``/metrics`` is scraped. The gauges are read from the database like the outbox's: a scrape shows the last reading
and starts a new one when it is old (:mod:`gatehouse.observe.scrape_reading`). Their queries count through
partial indexes (of due runs, of failed runs), each capped at :data:`COUNT_CAP`, so they stay cheap with millions
of finished runs in the table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gatehouse.db import Connection
from gatehouse.observe.scrape_reading import ReadAtScrape

log = logging.getLogger(__name__)
TIMEOUT_S = 2.0
COUNT_CAP = 100_000
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ACTIVE_STATES = ("running", "compensating")

READING = f"""
SELECT (SELECT count(*) FROM (SELECT 1 FROM gatehouse.sagas WHERE state = 'running' LIMIT {COUNT_CAP}) AS r)
           AS running,
       (SELECT count(*) FROM (SELECT 1 FROM gatehouse.sagas WHERE state = 'compensating' LIMIT {COUNT_CAP}) AS c)
           AS compensating
"""

FAILED_READING = f"""
SELECT name, count(*) AS runs
FROM (SELECT name FROM gatehouse.sagas WHERE state = 'failed' LIMIT {COUNT_CAP}) AS f
GROUP BY name
"""


async def failed_runs(conn: Connection) -> dict[str, int]:
    """Saga → its runs that failed and need a person (those with none are left out)."""
    return {row["name"]: int(row["runs"]) for row in await conn.fetch(FAILED_READING)}


@dataclass(slots=True)
class SagaStats:
    """What one engine did in this process (written on the event loop's thread only)."""

    started: Counter[str] = field(default_factory=Counter)
    """saga → runs started."""
    finished: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(saga, final state) → runs."""
    steps: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """(saga, step, outcome) → runs of the step."""
    durations: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    """(saga, step) → one count per bucket of :data:`STEP_BUCKETS`, one for +Inf, then the sum of seconds."""

    def step(self, saga: str, step: str, outcome: str, seconds: float) -> None:
        self.steps[(saga, step, outcome)] += 1
        counts = self.durations.get((saga, step))
        if counts is None:
            counts = self.durations[(saga, step)] = [0.0] * (len(STEP_BUCKETS) + 2)
        counts[bisect_left(STEP_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def finish(self, saga: str, state: str) -> None:
        if state in ("completed", "compensated", "failed"):
            self.finished[(saga, state)] += 1


class SagaCollector(ReadAtScrape, Collector):
    """The saga series of one engine's ``stats``, and the active runs read from the home database's ``pool``."""

    def __init__(self, stats: SagaStats, pool: asyncpg.Pool) -> None:
        super().__init__("gatehouse/saga-metrics")
        self._stats, self._pool = stats, pool
        self._active: dict[str, int] | None = None
        self._failed: dict[str, int] | None = None

    async def refresh(self) -> None:
        """Count the active runs now (left as they were when the database does not answer)."""
        try:
            async with asyncio.timeout(TIMEOUT_S), self._pool.acquire() as conn:
                row = await conn.fetchrow(READING)
                failed = await failed_runs(conn)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.debug("could not count the active sagas: %s", type(exc).__name__)
            return
        finally:
            self._read_at = time.monotonic()
        assert row is not None
        self._active = {state: int(row[state]) for state in ACTIVE_STATES}
        self._failed = failed

    def collect(self) -> Iterator[Metric]:
        self._refresh_soon()
        stats = self._stats
        started = CounterMetricFamily("gatehouse_sagas_started", "Saga runs this instance started.",
                                      labels=["saga"])
        for saga, count in sorted(stats.started.items()):
            started.add_metric([saga], count)
        finished = CounterMetricFamily("gatehouse_sagas_finished", "Saga runs this instance took to a final state: "
                                       "completed, compensated or failed (needs attention).", labels=["saga", "state"])
        for (saga, state), count in sorted(stats.finished.items()):
            finished.add_metric([saga, state], count)
        steps = CounterMetricFamily("gatehouse_saga_steps", "Steps and compensations this instance ran, by outcome: "
                                    "done, compensated, retried (tried again later), failed (for good).",
                                    labels=["saga", "step", "outcome"])
        for (saga, step, outcome), count in sorted(stats.steps.items()):
            steps.add_metric([saga, step, outcome], count)
        duration = HistogramMetricFamily("gatehouse_saga_step_duration_seconds", "Time per run of a saga step or "
                                         "compensation, whatever its outcome.", labels=["saga", "step"])
        for (saga, step), counts in sorted(stats.durations.items()):
            cumulative, buckets = 0.0, []
            for bound, seen in zip((*map(str, STEP_BUCKETS), "+Inf"), counts, strict=False):
                cumulative += seen
                buckets.append((bound, cumulative))
            duration.add_metric([saga, step], buckets, counts[-1])
        yield from (started, finished, steps, duration)
        active = GaugeMetricFamily("gatehouse_sagas_active", "Saga runs running or compensating now, on every "
                                   "instance (read from the database at most once a second).", labels=["state"])
        for state, count in (self._active or {}).items():
            active.add_metric([state], count)
        yield active
        failed = GaugeMetricFamily("gatehouse_sagas_failed", "Saga runs failed now, which need a person (gatehouse "
                                   "sagas list --state failed), on every instance.", labels=["saga"])
        for saga, count in sorted((self._failed or {}).items()):
            failed.add_metric([saga], count)
        yield failed

    def describe(self) -> Iterator[Metric]:
        return iter(())
