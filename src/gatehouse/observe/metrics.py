"""Prometheus metrics of one server, in a registry of its own (so tests can run several servers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LABELS = ("app", "contract", "version", "method", "status")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gatehouse_requests", "Requests answered on the data port.", LABELS, registry=self.registry
        )
        self.latency = Histogram(
            "gatehouse_request_duration_seconds", "Time to answer a request on the data port.", LABELS,
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def observe(self, *, app: str, contract: str, version: str, method: str, status: int,
                seconds: float) -> None:
        labels = (app, contract, version, method, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
