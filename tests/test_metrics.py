"""The data port's metrics: what a scrape of ``/metrics`` shows after some samples (no server needed)."""

from __future__ import annotations

import re

from gatehouse.observe.metrics import Metrics


def sample(metrics: Metrics, seconds: float, *, method: str = "GET", status: int = 200) -> None:
    metrics.observe(app="web", contract="products", api_version=1, method=method, status=status, seconds=seconds)


def series(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric in the exposition text, ``le`` (if any) moved to the end of the labels."""
    found = {}
    for match in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.MULTILINE):
        labels = match.group(1).split(",")
        found[",".join(sorted(labels, key=lambda label: label.startswith("le=")))] = float(match.group(2))
    return found


def test_counts_buckets_and_sum_per_label_set() -> None:
    metrics = Metrics()
    for seconds in (0.0004, 0.0005, 0.003, 0.2, 30.0):  # 0.0005 sits on a bound: counted in le="0.0005"
        sample(metrics, seconds)
    sample(metrics, 0.01, status=404)
    text = metrics.render().decode()

    ok = 'app="web",contract="products",method="GET",status="200",version="v1"'
    assert series(text, "gatehouse_requests_total") == {
        ok: 5.0, ok.replace('"200"', '"404"'): 1.0}
    buckets = series(text, "gatehouse_request_duration_seconds_bucket")
    assert buckets[f'{ok},le="0.0005"'] == 2.0
    assert buckets[f'{ok},le="0.0025"'] == 2.0
    assert buckets[f'{ok},le="0.005"'] == 3.0
    assert buckets[f'{ok},le="0.25"'] == 4.0
    assert buckets[f'{ok},le="10.0"'] == 4.0
    assert buckets[f'{ok},le="+Inf"'] == 5.0
    assert series(text, "gatehouse_request_duration_seconds_count")[ok] == 5.0
    assert abs(series(text, "gatehouse_request_duration_seconds_sum")[ok] - 30.2039) < 1e-9


def test_unknown_methods_share_one_series() -> None:
    metrics = Metrics()
    for method in ("BREW", "PROPFIND", "X" * 100):
        sample(metrics, 0.001, method=method, status=405)
    counts = series(metrics.render().decode(), "gatehouse_requests_total")
    assert list(counts.values()) == [3.0] and 'method="OTHER"' in next(iter(counts))
