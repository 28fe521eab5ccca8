"""The alert evaluator that ``gatehouse serve`` runs in the background: ``[alerts]`` rules → webhooks.

Every ``interval`` the signals the rules need are read (:mod:`.alert_signals`), each rule judges each of its
subjects (:mod:`.alert_rules`), and each rule and subject moves through Prometheus's states: *inactive* →
*pending* (the condition holds, for less than ``for``) → *firing* (it held for ``for``) → resolved (it no longer
holds: at once, as Prometheus does). A pending subject whose condition stops holding goes back to inactive
without a word.

Firing and resolved are transitions claimed in the store (:mod:`.alert_state`): among several instances, and
across a restart, exactly one sends each. A (re)started instance takes over what the store says is firing, so
it never sends that again, and resolves it when the condition no longer holds.

When the store's database itself cannot be reached (the database-unreachable alert of the first database is
the case that matters), an instance decides alone: it sends what it sees, remembers that it did, and records it
once the database is back, so that nothing is sent twice from then on. Several instances each send their own
notification of such an alert meanwhile (each with an id of its own).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from gatehouse.background import stop_tasks
from gatehouse.config_alerts import AlertRule, AlertsConfig
from gatehouse.errors import DatabaseUnavailable, ProjectError
from gatehouse.observe.alert_rules import KINDS, Labels, Observation, Readings, TrafficHistory
from gatehouse.observe.alert_signals import AlertSignals, RuntimeSignals
from gatehouse.observe.alert_sinks import MAX_BACKOFF_S, Dispatcher, Notification, Webhook
from gatehouse.observe.alert_state import AlertStore, OwnerLink, Transition

if TYPE_CHECKING:
    from gatehouse.project import Project
    from gatehouse.runtime import Runtime

log = logging.getLogger(__name__)
APPLICATION_NAME = "gatehouse/alerts"
DATABASE_UP = "gatehouse_database_up"
DISK_USED = "gatehouse_database_disk_used_ratio"
LONGEST_STATEMENT = "gatehouse_statement_longest_seconds"


@dataclass(slots=True)
class Track:
    """A rule and subject that is pending or firing (inactive ones are not kept)."""

    labels: Labels
    since: float
    """When the condition began to hold (the evaluator's clock)."""
    firing: bool = False
    recorded: bool = True
    """False for an alert fired while the store was unreachable: it is recorded once it answers again."""
    episode: str = ""
    started_at: datetime | None = None


def check_rules(project: Project) -> None:
    """Every app and database a rule names exists (pydantic sees the section alone, not the project)."""
    where = str(project.root / "gatehouse.toml")
    for rule in project.config.alerts.rules:
        if rule.app is not None and rule.app not in project.apps:
            raise ProjectError(f"[[alerts.rules]] {rule.name!r}: app = {rule.app!r} is not in [apps] (there are: "
                               f"{', '.join(sorted(project.apps)) or 'none'})", where=where)
        if rule.database is not None and rule.database not in project.config.databases:
            raise ProjectError(f"[[alerts.rules]] {rule.name!r}: database = {rule.database!r} is not in "
                               f"[databases] (there are: {', '.join(project.config.databases)})", where=where)


def lease_s(config: AlertsConfig) -> float:
    """How long a claimed notification is left to its sender: longer than all its retries can take."""
    longest = 0.0
    for hook in config.webhooks.values():
        waits = sum(min(hook.backoff_s * 2**i, MAX_BACKOFF_S) for i in range(hook.retries))
        longest = max(longest, waits * 1.2 + (hook.retries + 1) * hook.timeout_s)
    return longest + 30.0


class AlertEvaluator:
    def __init__(self, config: AlertsConfig, project: str, signals: AlertSignals, store: AlertStore,
                 dispatcher: Dispatcher, *, clock: Callable[[], float] = time.monotonic,
                 registry: CollectorRegistry | None = None, links: Sequence[OwnerLink] = ()) -> None:
        self.config, self.project = config, project
        self.signals, self.store, self.dispatcher = signals, store, dispatcher
        self._clock = clock
        self._registry, self._collector = registry, _AlertCollector(self)
        self._links = list(links)
        self._rules = {rule.name: rule for rule in config.rules}
        self.tracks: dict[tuple[str, str], Track] = {}
        self._loaded = False
        self._history = TrafficHistory(max((r.window_s for r in config.rules if r.kind in ("error_rate", "latency")),
                                           default=0.0) + config.interval_s)
        self.last = Readings()
        self._task: asyncio.Task[None] | None = None
        self._said: set[str] = set()

    @classmethod
    def for_runtime(cls, runtime: Runtime) -> AlertEvaluator | None:
        """The evaluator of a server's project (None when it has no rules). A webhook's URL or secret that is
        not in the environment, or a rule naming an unknown app, is a :class:`ProjectError` here, at start."""
        project = runtime.project
        config = project.config.alerts
        if not config.rules:
            return None
        check_rules(project)
        links = {name: OwnerLink(_connector(target.owner_dsn, target.connect_timeout_s), name)
                 for name, target in runtime.targets.items()}
        client = httpx.AsyncClient(follow_redirects=False)
        webhooks = {name: Webhook(name, hook, client) for name, hook in config.webhooks.items()}
        store = AlertStore(links[project.home_database], lease_s(config))
        return cls(config, project.name, RuntimeSignals(runtime, links), store, Dispatcher(webhooks, store, client),
                   registry=runtime.metrics.registry, links=list(links.values()))

    async def start(self) -> None:
        """Evaluate in the background from now on (the first evaluation is at once)."""
        self.dispatcher.start()
        if self._registry is not None:
            self._registry.register(self._collector)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gatehouse-alerts")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
        await self.dispatcher.stop()
        if self._registry is not None:
            self._registry.unregister(self._collector)
            self._registry = None
        await asyncio.gather(*(link.close() for link in self._links), return_exceptions=True)

    async def _run(self) -> None:
        interval = self.config.interval_s
        while True:
            started = self._clock()
            try:
                await self.evaluate_once()
            except Exception as exc:  # an evaluation that failed must not end the loop
                self._once(f"loop:{type(exc).__name__}", "alerts: an evaluation failed (%s); trying again",
                           type(exc).__name__)
            await asyncio.sleep(max(0.0, interval - (self._clock() - started)))

    def _once(self, key: str, message: str, *args: object) -> None:
        """Log a trouble when it begins (not at every evaluation while it lasts: see :meth:`_over`)."""
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)

    def _over(self, key: str, message: str) -> None:
        """A trouble logged by :meth:`_once` has ended: say so, and log it again if it comes back."""
        if key in self._said:
            self._said.discard(key)
            log.info(message)

    # --- one evaluation ---------------------------------------------------------------------------

    async def evaluate_once(self) -> None:
        now = self._clock()
        for link in {*self._links, self.store.link}:
            link.new_round()
        store_ok = await self._take_over()
        readings = await self._read(now)
        self.last = readings
        for rule in self.config.rules:
            tracked = {s: t.labels for (name, s), t in self.tracks.items() if name == rule.name}
            seen = KINDS[rule.kind](rule, readings, tracked)
            subjects = {o.subject for o in seen}
            seen += [Observation(s, labels, False, None, f"{s}: no longer over the limit")
                     for s, labels in tracked.items() if s not in subjects]
            for observation in seen:
                await self._step(rule, observation, now)
        if store_ok:
            await self._catch_up()

    async def _take_over(self) -> bool:
        """Load what the store says is firing (once), and record alerts fired while it was unreachable."""
        try:
            if not self._loaded:
                for name, subject, labels in await self.store.firing():
                    if name in self._rules and (name, subject) not in self.tracks:
                        self.tracks[(name, subject)] = Track(labels, self._clock(), firing=True)
                self._loaded = True
            for (name, subject), track in list(self.tracks.items()):
                if track.firing and not track.recorded:
                    rule = self._rules[name]
                    await self.store.claim_firing(name, subject, track.labels, None, "", episode=track.episode,
                                                  started_at=track.started_at, delivered=self.config.webhooks_of(rule),
                                                  owed=False)
                    track.recorded = True
        except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
            self._store_failed(exc)
            return False
        self._over("store", "alerts: the state store answers again")
        return True

    def _store_failed(self, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, DatabaseUnavailable) else f"refused: {type(exc).__name__}"
        self._once("store", "alerts: the state store cannot be used (%s): this instance decides alone until it "
                   "can", reason)

    async def _read(self, now: float) -> Readings:
        kinds = {rule.kind for rule in self.config.rules}
        readings = Readings()
        signals = self.signals
        if "database_unreachable" in kinds:
            readings.reachable = await self._signal("reachable", signals.reachable)
        if "replica_lag" in kinds:
            readings.lags = await self._signal("replica lag", signals.replica_lags)
        if "pool_saturated" in kinds:
            readings.pools = await self._signal("pools", signals.pools)
        if "disk" in kinds:
            readings.disk = await self._signal("disk", signals.disk_used)
        if "saga_failed" in kinds:
            readings.failed_sagas = await self._signal("failed sagas", signals.failed_sagas)
        slow = [rule.threshold or 0.0 for rule in self.config.rules if rule.kind == "slow_statement"]
        if slow:
            readings.slow = await self._signal("statements", lambda: signals.slow_statements(min(slow)))
        windows = {rule.window_s for rule in self.config.rules if rule.kind in ("error_rate", "latency")}
        if windows:
            traffic = await self._signal("traffic", signals.traffic)
            if traffic is not None:
                if self._history.empty:  # the counts are the server's since it started, as the evaluator did
                    self._history.add(now, {})
                self._history.add(now, traffic)
                readings.windows = {w: self._history.window(w, now) for w in windows}
        return readings

    async def _signal(self, what: str, read: Callable[[], Any]) -> Any:
        """``read()`` (awaited if it is a coroutine), or None if it failed: said once, and the rules on it hold."""
        try:
            reading = read()
            result = await reading if inspect.isawaitable(reading) else reading
        except Exception as exc:
            self._once(f"signal:{what}", "alerts: reading %s failed (%s); rules on it keep their state", what,
                       type(exc).__name__)
            return None
        self._over(f"signal:{what}", f"alerts: reading {what} works again")
        return result

    async def _step(self, rule: AlertRule, o: Observation, now: float) -> None:
        key = (rule.name, o.subject)
        track = self.tracks.get(key)
        if o.active is None:
            return
        if o.active:
            if track is None:
                track = self.tracks[key] = Track(o.labels, now)
            if not track.firing and now - track.since >= rule.for_s:
                await self._fire(rule, o, track)
        elif track is not None:
            if not track.firing:
                del self.tracks[key]
            else:
                await self._resolve(rule, o, track)

    async def _fire(self, rule: AlertRule, o: Observation, track: Track) -> None:
        episode = uuid.uuid4().hex
        try:
            claimed = await self.store.claim_firing(rule.name, o.subject, o.labels, o.value, o.text, episode=episode)
        except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
            self._store_failed(exc)
            track.firing, track.recorded, track.episode = True, False, episode
            track.started_at = datetime.now(UTC)
            self._send(self._notification(rule, "firing", episode, o.subject, o.labels, o.value, o.text,
                                          track.started_at, None, None))
            return
        track.firing, track.recorded = True, True
        if claimed is not None:
            track.episode, track.started_at = claimed.episode, claimed.started_at
            self._send(self._from_transition(rule, claimed))

    async def _resolve(self, rule: AlertRule, o: Observation, track: Track) -> None:
        key = (rule.name, o.subject)
        if not track.recorded:  # fired alone while the store was away: resolved alone too
            del self.tracks[key]
            self._send(self._notification(rule, "resolved", track.episode, o.subject, track.labels, o.value, o.text,
                                          track.started_at or datetime.now(UTC), datetime.now(UTC), None))
            return
        try:
            claimed = await self.store.claim_resolved(rule.name, o.subject, o.value, o.text)
        except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
            self._store_failed(exc)  # still firing here: the claim is tried again next time
            return
        del self.tracks[key]
        if claimed is not None:
            self._send(self._from_transition(rule, claimed))

    async def _catch_up(self) -> None:
        """Send again what a store row still owes a webhook after its lease ran out (its sender died, or its
        retries ran out)."""
        def owed(rule: str, delivered: Sequence[str]) -> list[str]:
            found = self._rules.get(rule)
            return [] if found is None else [w for w in self.config.webhooks_of(found) if w not in delivered]

        try:
            due = await self.store.claim_redelivery(owed)
        except (DatabaseUnavailable, asyncpg.PostgresError) as exc:
            self._store_failed(exc)
            return
        for transition in due:
            self._send(self._from_transition(self._rules[transition.rule], transition))

    # --- notifications ----------------------------------------------------------------------------

    def _from_transition(self, rule: AlertRule, t: Transition) -> Notification:
        return self._notification(rule, "resolved" if t.state == "resolved" else "firing", t.episode, t.subject,
                                  t.labels, t.value, t.summary, t.started_at,
                                  t.changed_at if t.state == "resolved" else None, t)

    def _notification(self, rule: AlertRule, status: Any, episode: str, subject: str, labels: Labels,
                      value: float | None, text: str, started_at: datetime, resolved_at: datetime | None,
                      transition: Transition | None) -> Notification:
        return Notification(status=status, episode=episode, rule=rule.name, kind=rule.kind, severity=rule.severity,
                            subject=subject, labels=labels, value=value, threshold=rule.threshold, text=text,
                            summary=rule.summary, started_at=started_at, resolved_at=resolved_at,
                            project=self.project, webhooks=self.config.webhooks_of(rule), transition=transition)

    def _send(self, n: Notification) -> None:
        log.info("alert %s: %s (%s)", n.status, n.rule, n.text)
        if n.webhooks:
            self.dispatcher.submit(n)


def _connector(dsn: str, timeout_s: float) -> Callable[[], Any]:
    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(dsn, timeout=timeout_s, server_settings={"application_name": APPLICATION_NAME})
    return connect


class _AlertCollector(Collector):
    """What the evaluator knows, on ``/metrics``: alerts firing, notifications by outcome, and the readings
    that gatehouse's own metrics lack (database up, disk, longest statement), for ``alerts prometheus``."""

    def __init__(self, evaluator: AlertEvaluator) -> None:
        self._evaluator = evaluator

    def collect(self) -> Iterator[Metric]:
        e = self._evaluator
        firing = GaugeMetricFamily("gatehouse_alerts_firing", "Alerts firing (as this instance sees them).",
                                   labels=("rule", "subject"))
        for (rule, subject), track in sorted(e.tracks.items()):
            if track.firing:
                firing.add_metric([rule, subject], 1.0)
        yield firing
        sent = CounterMetricFamily("gatehouse_alert_notifications", "Alert notifications by webhook and outcome: "
                                   "sent, failed (retries ran out: tried again later), dropped (queue full).",
                                   labels=("webhook", "outcome"))
        for (webhook, outcome), count in sorted(e.dispatcher.counts.items()):
            sent.add_metric([webhook, outcome], float(count))
        yield sent
        yield from _readings(e.last)

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _readings(r: Readings) -> Iterator[Metric]:
    if r.reachable is not None:
        up = GaugeMetricFamily(DATABASE_UP, "1 when the database answered the last alert evaluation.",
                               labels=("database",))
        for db, ok in sorted(r.reachable.items()):
            up.add_metric([db], 1.0 if ok else 0.0)
        yield up
    if r.disk is not None:
        used = GaugeMetricFamily(DISK_USED, "Share of the database server's data disk in use (local servers).",
                                 labels=("database",))
        for db, share in sorted((k, v) for k, v in r.disk.items() if v is not None):
            used.add_metric([db], share)
        yield used
    if r.slow is not None:
        longest: dict[tuple[str, str], float] = {}
        for db, statements in r.slow.items():
            for s in statements or ():
                longest[(s.app, db)] = max(longest.get((s.app, db), 0.0), s.seconds)
        gauge = GaugeMetricFamily(LONGEST_STATEMENT, "The longest statement of an app running now (only those past "
                                  "the smallest slow_statement limit).", labels=("app", "database"))
        for (app, db), seconds in sorted(longest.items()):
            gauge.add_metric([app, db], seconds)
        yield gauge

