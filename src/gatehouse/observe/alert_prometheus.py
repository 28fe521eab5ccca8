"""``[alerts]`` rules as Prometheus alerting rules, for teams whose alerts go through Alertmanager.

Each rule becomes one rule of one group, over gatehouse's own ``/metrics`` (summed over instances where a rate
is taken): the request counter and latency histogram (:mod:`.metrics`), the pools and replicas
(:mod:`.db_metrics`), and what the alert evaluator adds (database up, disk, longest statement: it runs, and
exports them, whenever ``[alerts]`` has rules). A disk rule reads the evaluator's gauge, which exists only where
the database server is on the same machine; elsewhere use node_exporter's filesystem metrics.

The YAML is written by hand (no YAML library is a dependency): every scalar is a JSON string, which YAML
reads as a double-quoted string.
"""

from __future__ import annotations

import json

from gatehouse.config_alerts import AlertRule, AlertsConfig, prometheus_duration
from gatehouse.observe.alerts import DATABASE_UP, DISK_USED, LONGEST_STATEMENT

REQUESTS = "gatehouse_requests_total"
LATENCY_BUCKETS = "gatehouse_request_duration_seconds_bucket"
LATENCY_COUNT = "gatehouse_request_duration_seconds_count"
POOL_CONNECTIONS = "gatehouse_pool_connections"
POOL_SIZE = "gatehouse_pool_size"
POOL_WAITING = "gatehouse_pool_waiting"
REPLICA_LAG = "gatehouse_replica_lag_seconds"
REPLICA_UP = "gatehouse_replica_up"
SAGAS_FAILED = "gatehouse_sagas_failed"


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _selector(rule: AlertRule, *extra: str, app_label: bool = False) -> str:
    matchers = list(extra)
    if rule.app is not None:
        matchers.append(f"app={_q(rule.app)}")
    elif app_label:
        matchers.append('app!=""')
    if rule.database is not None:
        matchers.append(f"database={_q(rule.database)}")
    return "{" + ",".join(matchers) + "}" if matchers else ""


def _number(value: float) -> str:
    return f"{value:.6g}"


def expression(rule: AlertRule) -> str:
    """The PromQL of one rule: a series per subject while its condition holds."""
    limit = rule.threshold or 0.0
    window = prometheus_duration(rule.window_s)
    if rule.kind == "database_unreachable":
        return f"{DATABASE_UP}{_selector(rule)} == 0"
    if rule.kind == "replica_lag":
        return f"{REPLICA_LAG}{_selector(rule)} > {_number(limit)} or {REPLICA_UP}{_selector(rule)} == 0"
    if rule.kind == "error_rate":
        statuses = 'status=~"5.."' if rule.statuses == "5xx" else 'status=~"[45].."'
        errors = f"sum by (app) (rate({REQUESTS}{_selector(rule, statuses, app_label=True)}[{window}]))"
        everything = f"sum by (app) (rate({REQUESTS}{_selector(rule, app_label=True)}[{window}]))"
        enough = f"sum by (app) (increase({REQUESTS}{_selector(rule, app_label=True)}[{window}]))"
        return f"({errors} / {everything} > {_number(limit)}) and ({enough} >= {rule.min_requests})"
    if rule.kind == "latency":
        buckets = f"sum by (app, le) (rate({LATENCY_BUCKETS}{_selector(rule, app_label=True)}[{window}]))"
        enough = f"sum by (app) (increase({LATENCY_COUNT}{_selector(rule, app_label=True)}[{window}]))"
        return (f"(histogram_quantile({_number(rule.quantile_q)}, {buckets}) > {_number(limit)}) "
                f"and ({enough} >= {rule.min_requests})")
    if rule.kind == "pool_saturated":
        in_use_only = 'state="in_use"'
        in_use = f"max without (state) ({POOL_CONNECTIONS}{_selector(rule, in_use_only)})"
        return f"({in_use} >= {POOL_SIZE}{_selector(rule)}) or {POOL_WAITING}{_selector(rule)} > 0"
    if rule.kind == "disk":
        return f"{DISK_USED}{_selector(rule)} > {_number(limit)}"
    if rule.kind == "slow_statement":
        return f"{LONGEST_STATEMENT}{_selector(rule)} > {_number(limit)}"
    if rule.kind == "saga_failed":
        return f"{SAGAS_FAILED}{_selector(rule)} > 0"
    raise AssertionError(f"unknown kind {rule.kind}")


_SUBJECT = {"database_unreachable": "database {{ $labels.database }}",
            "replica_lag": "replica {{ $labels.database }}/{{ $labels.replica }}",
            "error_rate": "app {{ $labels.app }}", "latency": "app {{ $labels.app }}",
            "pool_saturated": "app {{ $labels.app }} on {{ $labels.database }} ({{ $labels.server }})",
            "disk": "database {{ $labels.database }}",
            "slow_statement": "app {{ $labels.app }} on {{ $labels.database }}",
            "saga_failed": "saga {{ $labels.saga }} has {{ $value }} failed run(s)"}


def _summary(rule: AlertRule) -> str:
    over = f" over {rule.over}" if rule.over else ""
    text = f"{rule.name}: {_SUBJECT[rule.kind]}{over}"
    if rule.kind in ("replica_lag", "latency", "slow_statement"):
        text += " (now {{ $value | humanizeDuration }})"
    elif rule.kind in ("error_rate", "disk"):
        text += " (now {{ $value | humanizePercentage }})"
    return text


def prometheus_rules(config: AlertsConfig, project: str) -> str:
    """The rules file (``rule_files:`` in prometheus.yml), one group named after the project."""
    lines = [f"# Alerting rules of the gatehouse project {project!s}, from [alerts] in gatehouse.toml.",
             "# Written by `gatehouse alerts prometheus`; write it again after changing the rules.",
             "groups:",
             f"  - name: {_q('gatehouse-' + project)}",
             f"    interval: {_q(prometheus_duration(config.interval_s))}",
             "    rules:" if config.rules else "    rules: []"]
    for rule in config.rules:
        lines += [f"      - alert: {_q(rule.name)}",
                  f"        expr: {_q(expression(rule))}"]
        if rule.for_s > 0:
            lines.append(f"        for: {_q(prometheus_duration(rule.for_s))}")
        lines += ["        labels:",
                  f"          severity: {_q(rule.severity)}",
                  f"          gatehouse_project: {_q(project)}",
                  f"          gatehouse_kind: {_q(rule.kind)}",
                  "        annotations:",
                  f"          summary: {_q(_summary(rule))}"]
        if rule.summary:
            lines.append(f"          description: {_q(rule.summary)}")
    return "\n".join(lines) + "\n"
