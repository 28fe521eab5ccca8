"""Each kind of alert rule as a function: the signals of one evaluation → one observation per subject.

A *subject* is what a rule watches one of: a database, a replica (``shop/r1``), an app (``mobile``), an app's
pool or statements on one database (``mobile/shop``). An observation says whether the rule's condition holds
for it now: True, False, or None when it cannot be told (the signal could not be read); the evaluator keeps
the state of an unknown subject as it was. A subject the evaluator tracks that is missing from the result
counts as False (an app removed, a statement that ended).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gatehouse.config_alerts import AlertRule, prometheus_duration
from gatehouse.observe.alert_signals import PoolReading, SlowStatement, Traffic

Labels = dict[str, str]


@dataclass(frozen=True, slots=True)
class Observation:
    subject: str
    labels: Labels
    active: bool | None
    value: float | None
    text: str
    """One line a person reads: what was measured, against which limit."""


@dataclass(slots=True)
class Readings:
    """The signals of one evaluation; a field left None was not needed, or could not be read."""

    reachable: Mapping[str, bool] | None = None
    lags: Mapping[tuple[str, str], float | None] | None = None
    pools: Mapping[tuple[str, str, str], PoolReading] | None = None
    disk: Mapping[str, float | None] | None = None
    slow: Mapping[str, Sequence[SlowStatement] | None] | None = None
    failed_sagas: Mapping[str, int] | None = None
    windows: Mapping[float, Mapping[str, Traffic] | None] = field(default_factory=dict)
    """Window in seconds → each app's requests within it (None: not enough history yet)."""


class TrafficHistory:
    """Cumulative traffic readings, kept as long as the longest window needs: what ``rate()`` needs."""

    def __init__(self, keep_s: float) -> None:
        self._keep_s = keep_s
        self._readings: deque[tuple[float, Mapping[str, Traffic]]] = deque()

    @property
    def empty(self) -> bool:
        return not self._readings

    def add(self, now: float, reading: Mapping[str, Traffic]) -> None:
        self._readings.append((now, reading))
        while len(self._readings) > 2 and self._readings[1][0] <= now - self._keep_s:
            self._readings.popleft()

    def window(self, seconds: float, now: float) -> dict[str, Traffic] | None:
        """Each app's requests in the last ``seconds`` (or since the oldest reading kept, if younger)."""
        if len(self._readings) < 2:
            return None
        start = self._readings[0][1]
        for moment, reading in self._readings:
            if moment > now - seconds:
                break
            start = reading
        latest = self._readings[-1][1]
        return {app: traffic.since(start[app]) if app in start else traffic for app, traffic in latest.items()}


def seconds_text(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    return prometheus_duration(round(seconds))


def _share(value: float) -> str:
    return f"{value * 100:.1f} %".replace(".0 %", " %")


def _hold(tracked: Mapping[str, Labels], database: str | None = None) -> list[Observation]:
    """Unknown for the tracked subjects (of one database, if given): their state stays."""
    return [Observation(subject, labels, None, None, "cannot be measured now") for subject, labels in tracked.items()
            if database is None or labels.get("database") == database]


Kind = Callable[[AlertRule, Readings, Mapping[str, Labels]], list[Observation]]


def database_unreachable(rule: AlertRule, r: Readings, tracked: Mapping[str, Labels]) -> list[Observation]:
    if r.reachable is None:
        return _hold(tracked)
    return [Observation(db, {"database": db}, not ok, None, f"database {db} " + ("answers" if ok else
                                                                                 "does not answer"))
            for db, ok in r.reachable.items() if rule.database in (None, db)]


def replica_lag(rule: AlertRule, r: Readings, tracked: Mapping[str, Labels]) -> list[Observation]:
    if r.lags is None:
        return _hold(tracked)
    limit = rule.threshold or 0.0
    found = []
    for (db, replica), lag in r.lags.items():
        if rule.database not in (None, db):
            continue
        labels = {"database": db, "replica": replica}
        if lag is None:  # a replica that cannot be reached is as bad as one far behind
            found.append(Observation(f"{db}/{replica}", labels, True, None, f"replica {db}/{replica} cannot be "
                                     "reached, or its lag is not known"))
        else:
            found.append(Observation(f"{db}/{replica}", labels, lag > limit, lag, f"replica {db}/{replica} is "
                                     f"{seconds_text(lag)} behind (limit {seconds_text(limit)})"))
    return found


def _traffic(rule: AlertRule, r: Readings, tracked: Mapping[str, Labels],
             judge: Callable[[str, Traffic], Observation]) -> list[Observation]:
    window = r.windows.get(rule.window_s)
    if window is None:
        return _hold(tracked)
    return [judge(app, traffic) for app, traffic in sorted(window.items()) if rule.app in (None, app)]


def error_rate(rule: AlertRule, r: Readings, tracked: Mapping[str, Labels]) -> list[Observation]:
    limit = rule.threshold or 0.0

    def judge(app: str, t: Traffic) -> Observation:
        errors = t.server_errors + (t.client_errors if rule.statuses == "4xx+5xx" else 0.0)
        share = errors / t.requests if t.requests else 0.0
        text = (f"app {app}: {_share(share)} of {t.requests:.0f} requests answered {rule.statuses} in the last "
                f"{rule.window} (limit {_share(limit)})")
        return Observation(app, {"app": app}, t.requests >= rule.min_requests and share > limit, share, text)

    return _traffic(rule, r, tracked, judge)


def latency(rule: AlertRule, r: Readings, tracked: Mapping[str, Labels]) -> list[Observation]:
    limit = rule.threshold or 0.0

    def judge(app: str, t: Traffic) -> Observation:
        value = t.quantile(rule.quantile_q)
        text = (f"app {app}: {rule.quantile} latency " + ("unknown" if value is None else seconds_text(value))
                + f" over {t.requests:.0f} requests in the last {rule.window} (limit {seconds_text(limit)})")
        active = value is not None and t.requests >= rule.min_requests and value > limit
        return Observation(app, {"app": app}, active, value, text)

    return _traffic(rule, r, tracked, judge)


def pool_saturated(rule: AlertRule, r: Readings, tracked: Mapping[str, Labels]) -> list[Observation]:
    if r.pools is None:
        return _hold(tracked)
    found = []
    for (app, db, server), pool in sorted(r.pools.items()):
        if rule.app not in (None, app) or rule.database not in (None, db):
            continue
        where = db if server == "primary" else f"{db} (replica {server})"
        text = (f"app {app}: {pool.in_use} of {pool.size} connections to {where} in use, "
                f"{pool.waiting} request(s) waiting for one")
        subject = f"{app}/{db}" if server == "primary" else f"{app}/{db}/{server}"
        found.append(Observation(subject, {"app": app, "database": db, "server": server},
                                 pool.in_use >= pool.size or pool.waiting > 0, float(pool.in_use), text))
    return found


def disk(rule: AlertRule, r: Readings, tracked: Mapping[str, Labels]) -> list[Observation]:
    if r.disk is None:
        return _hold(tracked)
    limit = rule.threshold or 0.0
    found = []
    for db, used in r.disk.items():
        if rule.database not in (None, db):
            continue
        if used is None:
            found.extend(_hold({s: labels for s, labels in tracked.items() if s == db}))
            continue
        found.append(Observation(db, {"database": db}, used > limit, used,
                                 f"database {db}: its disk is {_share(used)} full (limit {_share(limit)})"))
    return found


def slow_statement(rule: AlertRule, r: Readings, tracked: Mapping[str, Labels]) -> list[Observation]:
    if r.slow is None:
        return _hold(tracked)
    limit = rule.threshold or 0.0
    found = []
    for db, statements in r.slow.items():
        if rule.database not in (None, db):
            continue
        if statements is None:
            found.extend(_hold(tracked, db))
            continue
        longest: dict[str, SlowStatement] = {}
        for statement in statements:
            if rule.app in (None, statement.app) and statement.seconds > limit and (
                    statement.app not in longest or statement.seconds > longest[statement.app].seconds):
                longest[statement.app] = statement
        for app, statement in sorted(longest.items()):
            found.append(Observation(f"{app}/{db}", {"app": app, "database": db}, True, statement.seconds,
                                     f"app {app}: a statement on {db} has run {seconds_text(statement.seconds)} "
                                     f"(limit {seconds_text(limit)}; backend pid {statement.pid})"))
    return found


def saga_failed(rule: AlertRule, r: Readings, tracked: Mapping[str, Labels]) -> list[Observation]:
    """A saga with runs that failed for good (a compensation that could not be done, a broken replay): a person
    must look. It resolves once none is left failed (retried, or cancelled by hand)."""
    if r.failed_sagas is None:
        return _hold(tracked)
    return [Observation(saga, {"saga": saga}, count > 0, float(count),
                        f"saga {saga}: {count} run(s) failed and need a person (gatehouse sagas list --state failed "
                        f"--name {saga})") for saga, count in sorted(r.failed_sagas.items())]


KINDS: dict[str, Kind] = {"database_unreachable": database_unreachable, "replica_lag": replica_lag,
                          "error_rate": error_rate, "latency": latency, "pool_saturated": pool_saturated,
                          "disk": disk, "slow_statement": slow_statement, "saga_failed": saga_failed}
