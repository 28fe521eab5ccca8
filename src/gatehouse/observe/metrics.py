"""Prometheus metrics of one server, in a registry of its own (so tests can run several servers)."""

from __future__ import annotations

from typing import Any

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
        self._children: dict[tuple[str, str, str, str, int], tuple[Any, Any]] = {}

    def observe(self, *, app: str, contract: str, version: str, method: str, status: int,
                seconds: float) -> None:
        key = (app, contract, version, method, status)
        children = self._children.get(key)
        if children is None:  # label lookups take a lock; do them once per label set
            labels = (app, contract, version, method, str(status))
            children = self._children[key] = (self.requests.labels(*labels), self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
