"""The ``[alerts]`` section of ``gatehouse.toml``: rules, and the webhooks they notify.

```toml
[alerts]
interval = "15s"                       # how often the rules are evaluated

[alerts.webhooks.ops]
url = "env:SLACK_WEBHOOK_URL"
format = "slack"

[alerts.webhooks.pager]
url = "env:PAGER_WEBHOOK_URL"
format = "json"
secret = "env:ALERT_SECRET"            # signs each body (HMAC-SHA256)

[[alerts.rules]]
name = "replica lag"
kind = "replica_lag"
over = "10s"
for = "1m"
```

Kept apart from :mod:`gatehouse.config` (which imports this module, never the reverse), so it has its own
strict base and duration reader; durations are Prometheus's (``"90s"``, ``"1m30s"``, ``"500ms"``, ``"0s"``)
plus config.py's ``"1min"``. How each rule is evaluated: :mod:`gatehouse.observe.alerts`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gatehouse.secrets import SecretRef

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Kind = Literal["database_unreachable", "replica_lag", "error_rate", "latency", "pool_saturated", "disk",
               "slow_statement", "saga_failed"]

_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|min|sec|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_HINT = 'write e.g. "30s", "5m", "1h30m" or "500ms"'


def parse_duration(text: str) -> float:
    """``"1m30s"`` → 90.0 (seconds); ``"0s"`` is allowed (a rule's ``for``). The ValueError says what is accepted."""
    position, total = 0, 0.0
    stripped = text.rstrip()
    while position < len(stripped):
        match = _PART.match(stripped, position)
        if match is None:
            raise ValueError(f"cannot read the duration {text!r}: {_DURATION_HINT}")
        total += float(match[1]) * _UNITS[match[2]]
        position = match.end()
    if position == 0:
        raise ValueError(f"cannot read the duration {text!r}: {_DURATION_HINT}")
    return total


def parse_percent(text: str) -> float:
    """``"5%"`` → 5.0; between 0 and 100."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*", text)
    if match is None or not 0 < float(match[1]) <= 100:
        raise ValueError(f'cannot read the share {text!r}: write a percentage above 0, e.g. "5%" or "90%"')
    return float(match[1])


def prometheus_duration(seconds: float) -> str:
    """90.0 → ``"1m30s"``, 0.5 → ``"500ms"``: Prometheus's own notation."""
    milliseconds = round(seconds * 1000)
    if milliseconds == 0:
        return "0s"
    text = ""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, milliseconds = divmod(milliseconds, size)
        if count:
            text += f"{count}{unit}"
    return text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WebhookConfig(_Strict):
    """Where notifications go: a Slack-compatible incoming webhook, or any receiver of signed JSON."""

    url: SecretRef = Field(description="'env:VAR' naming the webhook's URL (a URL often is the credential)")
    format: Literal["slack", "json"] = Field(default="json", description="slack: {text, blocks}; json: the "
                                             "documented body, signed with secret (docs/alerts.md)")
    secret: SecretRef = Field(default=None, description="'env:VAR' with the key the json body is signed with "
                                                        "(HMAC-SHA256, header Gatehouse-Signature)")
    timeout: str = Field(default="5s", description="one attempt's limit")
    retries: int = Field(default=5, ge=0, le=20, description="attempts after the first, with backoff")
    backoff: str = Field(default="1s", description="wait before the first retry; doubles each time (60s at most)")

    @field_validator("url")
    @classmethod
    def _required(cls, value: str | None) -> str | None:
        if value is None:
            raise ValueError('a webhook needs url = "env:VARIABLE"')
        return value

    @field_validator("timeout", "backoff")
    @classmethod
    def _duration(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError(f"{value!r} must be longer than zero")
        return value

    @model_validator(mode="after")
    def _signed(self) -> WebhookConfig:
        if self.format == "json" and self.secret is None:
            raise ValueError('format = "json" needs secret = "env:VARIABLE": receivers check each body\'s '
                             "signature with it (docs/alerts.md)")
        if self.format == "slack" and self.secret is not None:
            raise ValueError('secret applies to format = "json" only: Slack checks nothing (drop secret)')
        return self

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout)

    @property
    def backoff_s(self) -> float:
        return parse_duration(self.backoff)


DURATION_THRESHOLD: frozenset[str] = frozenset({"replica_lag", "latency", "slow_statement"})
PERCENT_THRESHOLD: frozenset[str] = frozenset({"error_rate", "disk"})
APP_KINDS: frozenset[str] = frozenset({"error_rate", "latency", "pool_saturated", "slow_statement"})
DATABASE_KINDS: frozenset[str] = frozenset({"database_unreachable", "replica_lag", "disk", "pool_saturated",
                                            "slow_statement"})
TRAFFIC_KINDS: frozenset[str] = frozenset({"error_rate", "latency"})
_ONLY_FOR = {"quantile": {"latency"}, "statuses": {"error_rate"}, "window": TRAFFIC_KINDS,
             "min_requests": TRAFFIC_KINDS}


class AlertRule(_Strict):
    """One condition watched per subject (a database, a replica, an app, an app's pool), with how long it must
    hold before the rule fires (``for``, as in Prometheus)."""

    name: str = Field(min_length=1, max_length=80, pattern=r"^[^\x00-\x1f\x7f]+$",
                      description="what people read in the notification; the rule's identity (unique)")
    kind: Kind
    app: Name | None = Field(default=None, description="watch only this app (default: every app)")
    database: Name | None = Field(default=None, description="watch only this database (default: every one)")
    over: str | None = Field(default=None, description='the threshold: a duration ("10s", "500ms") for '
                                                      'replica_lag, latency, slow_statement; a share ("5%", '
                                                      '"90%") for error_rate and disk')
    for_: str = Field(default="0s", alias="for", description="how long the condition must hold before firing")
    quantile: Literal["p50", "p90", "p95", "p99"] = Field(default="p95", description="latency: which one")
    statuses: Literal["5xx", "4xx+5xx"] = Field(default="5xx", description="error_rate: which answers count")
    window: str = Field(default="5m", description="error_rate, latency: the span the share or quantile is of")
    min_requests: int = Field(default=10, ge=1, le=1_000_000,
                              description="error_rate, latency: fewer requests in the window never fire")
    severity: Literal["critical", "warning", "info"] = "warning"
    webhooks: tuple[Name, ...] | None = Field(default=None, description="notify only these (default: all)")
    summary: str = Field(default="", max_length=500, description="a sentence added to the notification")

    @field_validator("for_", "window")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @model_validator(mode="after")
    def _fits_kind(self) -> AlertRule:
        kind = self.kind
        if kind in DURATION_THRESHOLD or kind in PERCENT_THRESHOLD:
            if self.over is None:
                example = '"90%"' if kind == "disk" else '"5%"' if kind in PERCENT_THRESHOLD else '"10s"'
                raise ValueError(f"rule {self.name!r} (kind = {kind!r}) needs over = {example}")
            if kind in PERCENT_THRESHOLD:
                parse_percent(self.over)
            elif parse_duration(self.over) <= 0:
                raise ValueError(f"rule {self.name!r}: over must be longer than zero")
        elif self.over is not None:
            raise ValueError(f"rule {self.name!r}: kind = {kind!r} takes no over (drop it)")
        if self.app is not None and kind not in APP_KINDS:
            raise ValueError(f"rule {self.name!r}: kind = {kind!r} is about databases, not apps (drop app)")
        if self.database is not None and kind not in DATABASE_KINDS:
            raise ValueError(f"rule {self.name!r}: kind = {kind!r} is about apps, not databases (drop database)")
        for key, kinds in _ONLY_FOR.items():
            if key in self.model_fields_set and kind not in kinds:
                raise ValueError(f"rule {self.name!r}: {key} applies to kind = {' or '.join(sorted(kinds))} only")
        return self

    @property
    def for_s(self) -> float:
        return parse_duration(self.for_)

    @property
    def window_s(self) -> float:
        return parse_duration(self.window)

    @property
    def threshold(self) -> float | None:
        """Seconds for the duration kinds, a share between 0 and 1 for error_rate and disk, None otherwise."""
        if self.over is None:
            return None
        return parse_percent(self.over) / 100 if self.kind in PERCENT_THRESHOLD else parse_duration(self.over)

    @property
    def quantile_q(self) -> float:
        return int(self.quantile[1:]) / 100


class AlertsConfig(_Strict):
    """Rules evaluated by ``gatehouse serve``; each transition (firing, resolved) is sent once to each webhook."""

    interval: str = Field(default="15s", description="how often the rules are evaluated (100ms at least)")
    webhooks: dict[Name, WebhookConfig] = {}
    rules: tuple[AlertRule, ...] = ()

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: str) -> str:
        if parse_duration(value) < 0.1:
            raise ValueError(f"interval {value!r} is too short: 100ms at least")
        return value

    @model_validator(mode="after")
    def _names(self) -> AlertsConfig:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}: a rule's name is its identity, rename one")
            seen.add(rule.name)
            unknown = sorted(set(rule.webhooks or ()) - set(self.webhooks))
            if unknown:
                raise ValueError(f"rule {rule.name!r} names the webhook(s) {', '.join(unknown)}, which "
                                 f"[alerts.webhooks] does not have (it has: {', '.join(self.webhooks) or 'none'})")
        return self

    @property
    def interval_s(self) -> float:
        return parse_duration(self.interval)

    def webhooks_of(self, rule: AlertRule) -> tuple[str, ...]:
        return tuple(self.webhooks) if rule.webhooks is None else rule.webhooks
