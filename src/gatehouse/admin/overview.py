"""The overview's numbers: requests, errors (429s, the limits hit, apart) and mean latency per app since this
server started, and the server's own readings (cache, work slots, pools, replicas, outbox, relays, sagas,
alerts: whichever this server runs), read from the metrics registry (the same series ``/metrics`` exposes), so
the page costs no database work of its own (the collectors that count in the database refresh in the
background, as for a scrape)."""

from __future__ import annotations

from dataclasses import dataclass

from gatehouse.observe.metrics import Metrics


@dataclass
class AppNumbers:
    app: str
    requests: int = 0
    client_errors: int = 0
    limited: int = 0
    """Of the client errors: 429s, refused by a rate limit or the app's in-flight bound."""
    server_errors: int = 0
    seconds: float = 0.0

    @property
    def mean_ms(self) -> str:
        return f"{self.seconds / self.requests * 1000:.1f}" if self.requests else "-"


def per_app(metrics: Metrics, apps: list[str]) -> list[AppNumbers]:
    """Every configured app (zeros when it made no request) and any other caller seen (``(none)``: requests
    refused before an app was known)."""
    numbers = {app: AppNumbers(app) for app in apps}
    for family in metrics.registry.collect():
        if family.name != "gatehouse_request_duration_seconds":
            continue
        for sample in family.samples:
            app = sample.labels.get("app", "") or "(none)"
            row = numbers.setdefault(app, AppNumbers(app))
            if sample.name.endswith("_count"):
                status = int(sample.labels.get("status", "0") or 0)
                row.requests += int(sample.value)
                if 400 <= status < 500:
                    row.client_errors += int(sample.value)
                    row.limited += int(sample.value) if status == 429 else 0
                elif status >= 500:
                    row.server_errors += int(sample.value)
            elif sample.name.endswith("_sum"):
                row.seconds += sample.value
    return sorted(numbers.values(), key=lambda n: (n.app == "(none)", n.app))


READINGS = ("gatehouse_cache_reads", "gatehouse_cache_entries", "gatehouse_work_active", "gatehouse_work_queued",
            "gatehouse_work_waits", "gatehouse_ratelimit_live_instances", "gatehouse_ratelimit_breaker_state",
            "gatehouse_pool_connections", "gatehouse_pool_waiting", "gatehouse_replica_up",
            "gatehouse_replica_lag_seconds", "gatehouse_outbox_events", "gatehouse_outbox_oldest_event_age_seconds",
            "gatehouse_event_relay_backlog", "gatehouse_sagas_active", "gatehouse_sagas_failed",
            "gatehouse_alerts_firing", "gatehouse_slow_requests")
"""The families the overview shows, in this order; one that this server does not run is simply absent."""
MAX_READINGS = 200


@dataclass(frozen=True)
class Reading:
    name: str
    help: str
    labels: str
    value: str


def server_readings(metrics: Metrics) -> list[Reading]:
    found: dict[str, list[Reading]] = {}
    for family in metrics.registry.collect():
        if family.name not in READINGS:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ", ".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            value = f"{sample.value:g}" if sample.value != int(sample.value) else str(int(sample.value))
            found.setdefault(family.name, []).append(
                Reading(family.name.removeprefix("gatehouse_"), family.documentation, labels, value))
    rows = [reading for name in READINGS for reading in found.get(name, [])]
    return rows[:MAX_READINGS]
