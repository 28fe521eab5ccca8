"""Alerts: rules evaluated against fake signals and against a served project, sent to a real local webhook
receiver, their state kept in the real PostgreSQL (so two instances, or a restarted one, send each transition
exactly once)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import httpx
import orjson
import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from conftest import ProjectFactory, prepare, with_database
from gatehouse.cli import app as cli_app
from gatehouse.config import load_config
from gatehouse.config_alerts import AlertRule, AlertsConfig, parse_duration, prometheus_duration
from gatehouse.errors import ProjectError
from gatehouse.observe.alert_prometheus import expression, prometheus_rules
from gatehouse.observe.alert_signals import BOUNDS, PoolReading, SlowStatement, Traffic, server_is_local
from gatehouse.observe.alert_sinks import Dispatcher, Notification, Webhook, payload_of, sign, slack_body
from gatehouse.observe.alert_state import AlertStore, OwnerLink
from gatehouse.observe.alerts import AlertEvaluator
from gatehouse.project import Project, load_project
from replica_cluster import ReplicaPair
from webhook_receiver import Receiver

DOCS = Path(__file__).resolve().parents[1] / "docs" / "alerts.md"
SECRET = "s3cret-for-tests"


# --- a webhook receiver: asyncio.start_server, HTTP/1.1 with keep-alive ------------------------------------

async def until(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def verify_from_docs() -> Callable[[bytes, str, bytes], bool]:
    """The receiver's check as docs/alerts.md writes it (so the documented code is the tested code)."""
    text = DOCS.read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def verify" in b)
    namespace: dict[str, Any] = {}
    exec(compile(block, str(DOCS), "exec"), namespace)
    verify: Callable[[bytes, str, bytes], bool] = namespace["verify"]
    return verify


# --- fake signals and a clock -----------------------------------------------------------------------------

def traffic(requests: int, *, server_errors: int = 0, client_errors: int = 0, seconds: float = 0.001) -> Traffic:
    """``requests`` requests that all took ``seconds``, as cumulative counts."""
    index = next((i for i, bound in enumerate(BOUNDS) if seconds <= bound), len(BOUNDS))
    buckets = tuple(0.0 if i < index else float(requests) for i in range(len(BOUNDS) + 1))
    return Traffic(float(requests), float(client_errors), float(server_errors), buckets)


def add(a: Traffic, b: Traffic) -> Traffic:
    return Traffic(a.requests + b.requests, a.client_errors + b.client_errors, a.server_errors + b.server_errors,
                   tuple(x + y for x, y in zip(a.buckets, b.buckets, strict=True)))


@dataclass
class FakeSignals:
    """An :class:`AlertSignals` whose readings the test sets."""

    up: dict[str, bool] = field(default_factory=dict)
    lags: dict[tuple[str, str], float | None] = field(default_factory=dict)
    requests: dict[str, Traffic] = field(default_factory=dict)
    pool: dict[tuple[str, str, str], PoolReading] = field(default_factory=dict)
    disk: dict[str, float | None] = field(default_factory=dict)
    slow: dict[str, list[SlowStatement] | None] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)

    async def reachable(self) -> Mapping[str, bool]:
        if "reachable" in self.broken:
            raise OSError("cannot look")
        return dict(self.up)

    async def replica_lags(self) -> Mapping[tuple[str, str], float | None]:
        return dict(self.lags)

    def traffic(self) -> Mapping[str, Traffic]:
        return dict(self.requests)

    def pools(self) -> Mapping[tuple[str, str, str], PoolReading]:
        return dict(self.pool)

    async def disk_used(self) -> Mapping[str, float | None]:
        return dict(self.disk)

    async def slow_statements(self, longer_than_s: float) -> Mapping[str, Sequence[SlowStatement] | None]:
        return {db: None if found is None else [s for s in found if s.seconds > longer_than_s]
                for db, found in self.slow.items()}

    async def failed_sagas(self) -> Mapping[str, int]:
        return {saga: count for saga, count in self.failed.items() if count}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def state_dsn(make_project: ProjectFactory, server_uri: str) -> str:
    """A database of its own (nothing migrated): where the alert state table goes."""
    project = make_project(from_shop=True)
    return with_database(server_uri, f"{project.name}_shop")


Build = Callable[..., AlertEvaluator]


@pytest.fixture
async def build(state_dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Build]:
    """``build(alerts_dict, signals, clock, lease_s=...)`` → an evaluator over the test's state database."""
    made: list[AlertEvaluator] = []
    clients: list[httpx.AsyncClient] = []
    monkeypatch.setenv("ALERT_SECRET", SECRET)

    def factory(alerts: dict[str, Any], signals: FakeSignals, clock: Clock, *, lease_s: float = 60.0) -> AlertEvaluator:
        config = AlertsConfig.model_validate(alerts)
        client = httpx.AsyncClient()
        clients.append(client)
        store = AlertStore(OwnerLink(lambda: asyncpg.connect(state_dsn), "shop"), lease_s)
        hooks = {name: Webhook(name, hook, client) for name, hook in config.webhooks.items()}
        evaluator = AlertEvaluator(config, "shop", signals, store, Dispatcher(hooks, store), clock=clock)
        evaluator.dispatcher.start()
        made.append(evaluator)
        return evaluator

    yield factory
    for evaluator in made:
        await evaluator.stop()
    for client in clients:
        await client.aclose()


def hook(url_variable: str = "HOOK_URL", **settings: Any) -> dict[str, Any]:
    return {"url": f"env:{url_variable}", "format": "json", "secret": "env:ALERT_SECRET", **settings}


async def settle(*evaluators: AlertEvaluator) -> None:
    for evaluator in evaluators:
        await evaluator.dispatcher.drain(10)


async def rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch("SELECT * FROM gatehouse.alert_state ORDER BY rule, subject"))
    finally:
        await conn.close()


# --- configuration ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("0s", 0.0), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("5min", 300.0), ("1h30m", 5400.0), ("2d", 172800.0),
])
def test_durations_read_as_prometheus_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(prometheus_duration(seconds)) == seconds


BASE = """
[project]
name = "shop"
[databases.shop]
[apps.mobile]
"""


@pytest.mark.parametrize(("section", "message"), [
    ('[[alerts.rules]]\nname = "lag"\nkind = "replica_lag"', 'needs over = "10s"'),
    ('[[alerts.rules]]\nname = "down"\nkind = "database_unreachable"\nover = "5s"', "takes no over"),
    ('[[alerts.rules]]\nname = "e"\nkind = "error_rate"\nover = "5"', "cannot read the share"),
    ('[[alerts.rules]]\nname = "e"\nkind = "error_rate"\nover = "5%"\nquantile = "p99"', "quantile applies to kind = latency only"),
    ('[[alerts.rules]]\nname = "d"\nkind = "disk"\nover = "90%"\napp = "mobile"', "is about databases, not apps"),
    ('[[alerts.rules]]\nname = "l"\nkind = "latency"\nover = "1 fortnight"', "cannot read the duration"),
    ('[[alerts.rules]]\nname = "l"\nkind = "latency"\nover = "1s"\nfor = "soon"', "cannot read the duration"),
    ('[[alerts.rules]]\nname = "x"\nkind = "database_unreachable"\n[[alerts.rules]]\nname = "x"\nkind = "disk"\nover = "90%"',
     "two rules are named 'x'"),
    ('[[alerts.rules]]\nname = "x"\nkind = "database_unreachable"\nwebhooks = ["pager"]', "names the webhook(s) pager"),
    ('[alerts.webhooks.ops]\nurl = "https://hooks.slack.com/services/T/B/X"\nformat = "slack"', "never written in the file"),
    ('[alerts.webhooks.ops]\nurl = "env:HOOK"\nformat = "json"', 'format = "json" needs secret = "env:'),
    ('[alerts.webhooks.ops]\nurl = "env:HOOK"\nformat = "teams"', "alerts.webhooks.ops.format"),
    ('[alerts]\ninterval = "10ms"', "too short"),
    ('[[alerts.rules]]\nname = "x"\nkind = "disk_full"', "alerts.rules[0].kind"),
])
def test_mistakes_in_the_section_are_named(tmp_path: Path, section: str, message: str) -> None:
    (tmp_path / "gatehouse.toml").write_text(BASE + section + "\n")
    with pytest.raises(ProjectError) as caught:
        load_config(tmp_path / "gatehouse.toml", environ={})
    assert message in str(caught.value)


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    example = next(b for b in re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S) if "[alerts]" in b)
    shop = (Path(__file__).resolve().parents[1] / "examples" / "shop" / "gatehouse.toml").read_text()
    (tmp_path / "gatehouse.toml").write_text(shop + "\n" + example)
    alerts = load_config(tmp_path / "gatehouse.toml", environ={}).alerts
    assert [rule.kind for rule in alerts.rules] == ["database_unreachable", "replica_lag", "error_rate", "latency",
                                                    "pool_saturated", "disk", "slow_statement"]
    assert alerts.webhooks_of(alerts.rules[2]) == ("pager",) and alerts.webhooks_of(alerts.rules[0]) == ("ops", "pager")
    assert alerts.rules[2].threshold == 0.05 and alerts.rules[3].threshold == 0.5 and alerts.rules[3].quantile_q == 0.99


def test_rules_naming_an_unknown_app_are_refused_at_start(make_project: ProjectFactory) -> None:
    project = make_project(toml=BASE + '[[alerts.rules]]\nname = "e"\nkind = "error_rate"\napp = "mobil"\nover = "5%"\n')
    from gatehouse.observe.alerts import check_rules
    with pytest.raises(ProjectError, match="app = 'mobil' is not in \\[apps\\] \\(there are: mobile\\)"):
        check_rules(project)


# --- signals: the histogram and the server's address --------------------------------------------------------

def test_quantiles_interpolate_within_a_bucket_like_histogram_quantile() -> None:
    # 100 requests: 50 within 10 ms (bucket 5-10 ms), 40 within 100 ms (50-100 ms), 10 within 1 s (0.5-1 s)
    t = add(add(traffic(50, seconds=0.008), traffic(40, seconds=0.08)), traffic(10, seconds=0.8))
    assert t.quantile(0.5) == pytest.approx(0.01)
    assert t.quantile(0.25) == pytest.approx(0.005 + 0.005 * 25 / 50)
    assert t.quantile(0.95) == pytest.approx(0.5 + 0.5 * 5 / 10)
    assert traffic(10, seconds=60).quantile(0.99) == BOUNDS[-1]  # in +Inf: the largest finite bound
    assert traffic(0).quantile(0.5) is None
    assert traffic(5).since(traffic(8)) == traffic(5)  # counts that went back: the server restarted


@pytest.mark.parametrize(("dsn", "local"), [
    ("postgresql://postgres@127.0.0.1:5432/shop", True), ("postgresql://u@localhost/shop", True),
    ("postgresql://postgres:@/postgres?host=/tmp/pg", True), ("postgresql://u@[::1]:5432/x", True),
    ("postgresql://u@db.internal:5432/shop", False), ("postgresql://u@10.0.0.5/shop", False),
])
def test_disk_is_measured_only_for_a_server_on_this_machine(dsn: str, local: bool) -> None:
    assert server_is_local(dsn) is local


# --- the evaluator, with fake signals, a real state table and a real receiver -------------------------------

async def test_fires_after_for_and_resolves_once_each_with_a_valid_signature(
        build: Build, monkeypatch: pytest.MonkeyPatch, state_dsn: str) -> None:
    verify = verify_from_docs()
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        signals, clock = FakeSignals(up={"shop": False}), Clock()
        evaluator = build({"webhooks": {"pager": hook()}, "rules": [
            {"name": "shop down", "kind": "database_unreachable", "for": "30s", "severity": "critical"}]},
            signals, clock)
        for step, up in [(0, False), (20, False), (5, True), (5, False), (20, False)]:  # pending, forgotten, again
            clock.now += step
            signals.up["shop"] = up
            await evaluator.evaluate_once()
        await settle(evaluator)
        assert receiver.received == []
        assert evaluator.tracks[("shop down", "shop")].firing is False
        for step in (11, 10, 10):  # 31 s since it began to hold: fires, then stays firing without a word
            clock.now += step
            await evaluator.evaluate_once()
        await settle(evaluator)
        assert [b["status"] for b in receiver.bodies()] == ["firing"]
        signals.up["shop"] = True
        for _ in range(3):
            clock.now += 10
            await evaluator.evaluate_once()
        await settle(evaluator)
    firing, resolved = receiver.bodies()
    assert (firing["status"], resolved["status"]) == ("firing", "resolved")
    assert firing["episode"] == resolved["episode"] and firing["id"] == f"{firing['episode']}.firing"
    assert resolved["id"] == f"{firing['episode']}.resolved" and resolved["resolved_at"] is not None
    assert firing | {"id": 0, "episode": 0, "started_at": 0} == {
        "id": 0, "type": "gatehouse.alert", "status": "firing", "episode": 0, "rule": "shop down",
        "kind": "database_unreachable", "severity": "critical", "subject": "shop", "labels": {"database": "shop"},
        "value": None, "threshold": None, "text": "database shop does not answer", "summary": "", "started_at": 0,
        "resolved_at": None, "project": "shop"}
    for request in receiver.received:
        assert request.headers["gatehouse-event-id"] == request.json["id"]
        assert verify(SECRET.encode(), request.headers["gatehouse-signature"], request.body)
        assert not verify(b"another secret", request.headers["gatehouse-signature"], request.body)
        assert not verify(SECRET.encode(), request.headers["gatehouse-signature"], request.body + b" ")
    [row] = await rows(state_dsn)
    assert (row["state"], row["episode"], row["delivered"], row["lease_until"]) == (
        "resolved", firing["episode"], ["pager"], None)


async def test_two_instances_send_each_transition_exactly_once(build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        signals, clock = FakeSignals(disk={"shop": 0.95}), Clock()
        alerts = {"webhooks": {"pager": hook()}, "rules": [{"name": "disk", "kind": "disk", "over": "90%"}]}
        instances = [build(alerts, signals, clock) for _ in range(4)]
        for _ in range(3):
            await asyncio.gather(*(e.evaluate_once() for e in instances))
        signals.disk["shop"] = 0.5
        for _ in range(3):
            await asyncio.gather(*(e.evaluate_once() for e in instances))
        await settle(*instances)
        assert [b["status"] for b in receiver.bodies()] == ["firing", "resolved"]
        assert receiver.bodies()[0]["text"] == "database shop: its disk is 95 % full (limit 90 %)"
        assert receiver.bodies()[1]["value"] == 0.5


async def test_failed_sagas_fire_until_none_is_left(build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        signals, clock = FakeSignals(failed={"place_order": 2}), Clock()
        evaluator = build({"webhooks": {"pager": hook()},
                           "rules": [{"name": "sagas need a person", "kind": "saga_failed"}]}, signals, clock)
        await evaluator.evaluate_once()
        signals.failed["place_order"] = 0  # retried or cancelled by hand
        clock.now += 1
        await evaluator.evaluate_once()
        await settle(evaluator)
        assert [b["status"] for b in receiver.bodies()] == ["firing", "resolved"]
        assert receiver.bodies()[0]["text"] == ("saga place_order: 2 run(s) failed and need a person (gatehouse "
                                                "sagas list --state failed --name place_order)")
    with pytest.raises(ValidationError, match="is about databases, not apps"):
        AlertRule.model_validate({"name": "x", "kind": "saga_failed", "app": "web"})


async def test_a_restart_takes_over_what_fires_without_sending_it_again(
        build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        signals, clock = FakeSignals(lags={("shop", "r1"): 30.0, ("shop", "r2"): 1.0}), Clock()
        alerts = {"webhooks": {"pager": hook()}, "rules": [
            {"name": "lag", "kind": "replica_lag", "over": "10s", "for": "1m"}]}
        first = build(alerts, signals, clock)
        await first.evaluate_once()
        clock.now += 61
        await first.evaluate_once()
        await settle(first)
        await first.stop()
        assert [(b["status"], b["subject"]) for b in receiver.bodies()] == [("firing", "shop/r1")]

        restarted = build(alerts, signals, Clock())  # a new process: its clock and memory start afresh
        for _ in range(3):
            await restarted.evaluate_once()
        await settle(restarted)
        assert len(receiver.received) == 1
        assert restarted.tracks[("lag", "shop/r1")].firing
        signals.lags[("shop", "r1")] = None  # unreachable counts as lagging: still firing
        await restarted.evaluate_once()
        signals.lags[("shop", "r1")] = 2.0
        await restarted.evaluate_once()
        await settle(restarted)
        assert [(b["status"], b["subject"]) for b in receiver.bodies()] == [("firing", "shop/r1"), ("resolved", "shop/r1")]
        assert receiver.bodies()[1]["text"] == "replica shop/r1 is 2 s behind (limit 10 s)"


async def test_error_rate_and_latency_over_their_window(build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        signals, clock = FakeSignals(requests={"mobile": traffic(0), "web": traffic(0)}), Clock()
        evaluator = build({"webhooks": {"pager": hook()}, "rules": [
            {"name": "errors", "kind": "error_rate", "over": "10%", "window": "1m", "min_requests": 20},
            {"name": "4xx too", "kind": "error_rate", "app": "web", "over": "10%", "statuses": "4xx+5xx", "window": "1m"},
            {"name": "slow", "kind": "latency", "quantile": "p99", "over": "200ms", "window": "1m"},
        ]}, signals, clock)

        async def tick(seconds: float, **more: Traffic) -> None:
            clock.now += seconds
            for app, extra in more.items():
                signals.requests[app] = add(signals.requests[app], extra)
            await evaluator.evaluate_once()

        await tick(0)
        await tick(10, mobile=traffic(10, server_errors=10))  # 100 % of 10 requests: too few to judge
        await tick(10, web=traffic(100, client_errors=50))  # 4xx: only the rule that counts them
        await settle(evaluator)
        assert [(b["rule"], b["subject"]) for b in receiver.bodies("firing")] == [("4xx too", "web")]
        await tick(10, mobile=traffic(20, server_errors=5, seconds=0.6))  # 15 of 30 in the window; slow ones
        await settle(evaluator)
        assert {(b["rule"], b["subject"]) for b in receiver.bodies("firing")} == {
            ("4xx too", "web"), ("errors", "mobile"), ("slow", "mobile")}
        text = next(b["text"] for b in receiver.bodies("firing") if b["rule"] == "errors")
        assert text == "app mobile: 50 % of 30 requests answered 5xx in the last 1m (limit 10 %)"
        await tick(61, mobile=traffic(500), web=traffic(500))  # the bad minute has left the window
        await settle(evaluator)
        assert sorted(b["rule"] for b in receiver.bodies("resolved")) == ["4xx too", "errors", "slow"]


async def test_unknown_readings_keep_the_state_and_vanished_subjects_resolve(
        build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        slow = SlowStatement("analytics", "shop", 4242, 45.0)
        signals = FakeSignals(up={"shop": False}, slow={"shop": [slow]},
                              pool={("mobile", "shop", "primary"): PoolReading(4, 4, 3)})
        evaluator = build({"webhooks": {"pager": hook()}, "rules": [
            {"name": "down", "kind": "database_unreachable"},
            {"name": "long", "kind": "slow_statement", "over": "30s"},
            {"name": "pool", "kind": "pool_saturated", "app": "mobile"}]}, signals, Clock())
        await evaluator.evaluate_once()
        await settle(evaluator)
        assert sorted(b["text"] for b in receiver.bodies("firing")) == [
            "app analytics: a statement on shop has run 45 s (limit 30 s; backend pid 4242)",
            "app mobile: 4 of 4 connections to shop in use, 3 request(s) waiting for one",
            "database shop does not answer"]
        signals.broken.add("reachable")  # cannot tell: stays firing
        signals.slow["shop"] = None
        signals.pool.clear()  # the app's pool is gone: resolved
        await evaluator.evaluate_once()
        await settle(evaluator)
        assert [b["rule"] for b in receiver.bodies("resolved")] == ["pool"]
        signals.broken.clear()
        signals.up["shop"] = True
        signals.slow["shop"] = []  # the statement ended
        await evaluator.evaluate_once()
        await settle(evaluator)
        assert sorted(b["rule"] for b in receiver.bodies("resolved")) == ["down", "long", "pool"]


async def test_retries_with_backoff_then_failures_are_logged_once_and_sent_again_later(
        build: Build, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, state_dsn: str) -> None:
    async with Receiver(statuses=[503, 500]) as flaky, Receiver(statuses=[500] * 4) as down:
        monkeypatch.setenv("FLAKY_URL", flaky.url)
        monkeypatch.setenv("DOWN_URL", down.url)
        signals, clock = FakeSignals(up={"shop": False}), Clock()
        evaluator = build({"webhooks": {
            "flaky": hook("FLAKY_URL", retries=3, backoff="50ms"),
            "down": hook("DOWN_URL", retries=1, backoff="50ms")},
            "rules": [{"name": "down", "kind": "database_unreachable"}]}, signals, clock, lease_s=0.5)
        started = time.monotonic()
        await evaluator.evaluate_once()
        await settle(evaluator)
        assert flaky.answered == [503, 500, 200] and time.monotonic() - started >= 0.1  # waited 50 + 100 ms
        assert down.answered == [500, 500] and down.received == []
        counts = evaluator.dispatcher.counts
        assert (counts[("flaky", "sent")], counts[("down", "failed")]) == (1, 1)
        failures = [r for r in caplog.records if "webhook down did not take" in r.getMessage()]
        assert len(failures) == 1 and down.url not in failures[0].getMessage()
        [row] = await rows(state_dsn)
        assert row["delivered"] == ["flaky"] and row["lease_until"] is not None

        await asyncio.sleep(0.6)  # the lease ran out: any instance sends it again, to the webhook missing it only
        await evaluator.evaluate_once()
        await settle(evaluator)
        assert down.answered == [500, 500, 500, 500] and counts[("down", "failed")] == 2
        assert len([r for r in caplog.records if "webhook down did not take" in r.getMessage()]) == 1  # once
        await asyncio.sleep(0.6)
        await evaluator.evaluate_once()
        await settle(evaluator)
        assert [r.json["id"] for r in down.received] == [flaky.received[0].json["id"]]  # the same id: dedupe
        assert len(flaky.received) == 1
        [row] = await rows(state_dsn)
        assert sorted(row["delivered"]) == ["down", "flaky"] and row["lease_until"] is None


async def test_a_final_answer_is_not_retried(build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Receiver(statuses=[404]) as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        evaluator = build({"webhooks": {"pager": hook(retries=5, backoff="10ms")},
                           "rules": [{"name": "down", "kind": "database_unreachable"}]},
                          FakeSignals(up={"shop": False}), Clock())
        await evaluator.evaluate_once()
        await settle(evaluator)
        assert receiver.answered == [404] and evaluator.dispatcher.counts[("pager", "failed")] == 1


async def test_while_the_state_database_is_away_an_instance_decides_alone_then_records_it(
        build: Build, monkeypatch: pytest.MonkeyPatch, state_dsn: str, server_uri: str) -> None:
    database = state_dsn.rsplit("/", 1)[1].partition("?")[0]
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        signals = FakeSignals(up={"shop": True})
        alerts = {"webhooks": {"pager": hook()}, "rules": [{"name": "down", "kind": "database_unreachable"}]}
        evaluator = build(alerts, signals, Clock())
        await evaluator.evaluate_once()  # creates the table, nothing firing
        admin = await asyncpg.connect(server_uri)
        try:
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database)
            signals.up["shop"] = False
            await evaluator.evaluate_once()
            await evaluator.evaluate_once()
            await settle(evaluator)
            assert [b["status"] for b in receiver.bodies()] == ["firing"]
            assert evaluator.tracks[("down", "shop")].recorded is False
        finally:
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            await admin.close()
        await evaluator.evaluate_once()  # the store is back: the firing is recorded, not sent again
        await settle(evaluator)
        assert evaluator.tracks[("down", "shop")].recorded is True and len(receiver.received) == 1
        [row] = await rows(state_dsn)
        assert (row["state"], row["episode"], row["lease_until"]) == ("firing", receiver.bodies()[0]["episode"], None)

        another = build(alerts, signals, Clock())  # a second instance, or a restart: knows it fires
        await another.evaluate_once()
        signals.up["shop"] = True
        await asyncio.gather(evaluator.evaluate_once(), another.evaluate_once())
        await settle(evaluator, another)
        assert [b["status"] for b in receiver.bodies()] == ["firing", "resolved"]
        assert receiver.bodies()[1]["episode"] == receiver.bodies()[0]["episode"]


def test_slack_payload_is_an_incoming_webhook_message() -> None:
    from datetime import UTC, datetime
    n = Notification(status="firing", episode="e1", rule="lag <prod>", kind="replica_lag", severity="warning",
                     subject="shop/r1", labels={}, value=12.4, threshold=10.0,
                     text="replica shop/r1 is 12.4 s behind (limit 10 s) & rising", summary="",
                     started_at=datetime(2026, 3, 2, 9, 14, 5, tzinfo=UTC), resolved_at=None, project="shop",
                     webhooks=("ops",))
    body = orjson.loads(slack_body(n))
    assert body["text"] == "\U0001f534 Firing: lag <prod>: replica shop/r1 is 12.4 s behind (limit 10 s) & rising"
    assert [b["type"] for b in body["blocks"]] == ["header", "section", "context"]
    assert body["blocks"][0]["text"] == {"type": "plain_text", "text": "\U0001f534 Firing: lag <prod>"}
    assert body["blocks"][1]["text"]["text"] == "replica shop/r1 is 12.4 s behind (limit 10 s) &amp; rising"
    assert "since 2026-03-02T09:14:05Z" in body["blocks"][2]["elements"][0]["text"]
    assert payload_of(n, "json")["started_at"] == "2026-03-02T09:14:05Z"
    assert sign(b"k", b"{}", 1700000000) == "t=1700000000,v1=" + hmac.new(
        b"k", b"1700000000.{}", hashlib.sha256).hexdigest()


# --- Prometheus rules and the commands ------------------------------------------------------------------------

ALL_KINDS = """
[alerts]
interval = "30s"

[alerts.webhooks.ops]
url = "env:SLACK_WEBHOOK_URL"
format = "slack"

[[alerts.rules]]
name = "down"
kind = "database_unreachable"
database = "shop"
for = "30s"
severity = "critical"

[[alerts.rules]]
name = "replica lag"
kind = "replica_lag"
over = "10s"
for = "1min"

[[alerts.rules]]
name = "mobile errors"
kind = "error_rate"
app = "mobile"
over = "5%"
min_requests = 20

[[alerts.rules]]
name = "any 4xx"
kind = "error_rate"
over = "25%"
statuses = "4xx+5xx"
window = "10m"

[[alerts.rules]]
name = "slow answers"
kind = "latency"
quantile = "p99"
over = "500ms"

[[alerts.rules]]
name = "pool"
kind = "pool_saturated"
app = "web"
for = "1m"

[[alerts.rules]]
name = "disk"
kind = "disk"
over = "90%"

[[alerts.rules]]
name = "long statement"
kind = "slow_statement"
app = "analytics"
over = "30s"
summary = "Dashboards may be scanning: run `gatehouse doctor`."

[[alerts.rules]]
name = "sagas"
kind = "saga_failed"
"""


def test_prometheus_rules_are_the_same_rules_over_the_metrics(make_project: ProjectFactory) -> None:
    project = make_project(from_shop=True, toml=(Path(__file__).resolve().parents[1] / "examples" / "shop" /
                                                 "gatehouse.toml").read_text() + ALL_KINDS)
    document = yaml.safe_load(prometheus_rules(project.config.alerts, "shop"))
    [group] = document["groups"]
    assert (group["name"], group["interval"]) == ("gatehouse-shop", "30s")
    by_name = {rule["alert"]: rule for rule in group["rules"]}
    assert list(by_name) == [rule.name for rule in project.config.alerts.rules]
    assert by_name["down"] == {"alert": "down", "expr": 'gatehouse_database_up{database="shop"} == 0', "for": "30s",
                               "labels": {"severity": "critical", "gatehouse_project": "shop",
                                          "gatehouse_kind": "database_unreachable"},
                               "annotations": {"summary": "down: database {{ $labels.database }}"}}
    assert by_name["replica lag"]["expr"] == "gatehouse_replica_lag_seconds > 10 or gatehouse_replica_up == 0"
    assert by_name["replica lag"]["for"] == "1m"
    assert by_name["mobile errors"]["expr"] == (
        '(sum by (app) (rate(gatehouse_requests_total{status=~"5..",app="mobile"}[5m])) / sum by (app) '
        '(rate(gatehouse_requests_total{app="mobile"}[5m])) > 0.05) and (sum by (app) '
        '(increase(gatehouse_requests_total{app="mobile"}[5m])) >= 20)')
    assert "for" not in by_name["mobile errors"]
    assert 'status=~"[45].."' in by_name["any 4xx"]["expr"] and "[10m]" in by_name["any 4xx"]["expr"]
    assert by_name["slow answers"]["expr"].startswith(
        '(histogram_quantile(0.99, sum by (app, le) (rate(gatehouse_request_duration_seconds_bucket{app!=""}[5m]))) '
        "> 0.5)")
    assert by_name["pool"]["expr"] == (
        '(max without (state) (gatehouse_pool_connections{state="in_use",app="web"}) >= gatehouse_pool_size{app="web"})'
        ' or gatehouse_pool_waiting{app="web"} > 0')
    assert by_name["disk"]["expr"] == "gatehouse_database_disk_used_ratio > 0.9"
    assert by_name["long statement"]["expr"] == 'gatehouse_statement_longest_seconds{app="analytics"} > 30'
    assert by_name["long statement"]["annotations"]["description"] == project.config.alerts.rules[-2].summary
    assert expression(project.config.alerts.rules[-2]) == by_name["long statement"]["expr"]
    assert by_name["sagas"]["expr"] == "gatehouse_sagas_failed > 0"
    assert by_name["sagas"]["annotations"]["summary"] == "sagas: saga {{ $labels.saga }} has {{ $value }} failed run(s)"


def test_the_prometheus_command_writes_the_file(make_project: ProjectFactory, tmp_path: Path) -> None:
    project = make_project(from_shop=True, toml=(Path(__file__).resolve().parents[1] / "examples" / "shop" /
                                                 "gatehouse.toml").read_text() + ALL_KINDS)
    target = tmp_path / "rules.yml"
    result = CliRunner().invoke(cli_app, ["--project", str(project.root), "alerts", "prometheus", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert "wrote 9 rules" in result.output
    assert len(yaml.safe_load(target.read_text())["groups"][0]["rules"]) == 9
    printed = CliRunner().invoke(cli_app, ["--project", str(project.root), "alerts", "prometheus"])
    assert printed.exit_code == 0 and printed.output == target.read_text()


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    status: ClassVar[int] = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_test_command_sends_one_notification_to_each_webhook(
        make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        project = make_project(toml=BASE + """
[alerts.webhooks.ops]
url = "env:OPS_URL"
format = "slack"
[alerts.webhooks.pager]
url = "env:PAGER_URL"
format = "json"
secret = "env:PAGER_SECRET"
""")
        monkeypatch.setenv("OPS_URL", url)
        monkeypatch.setenv("PAGER_URL", url + "/pager")
        monkeypatch.setenv("PAGER_SECRET", SECRET)
        result = CliRunner().invoke(cli_app, ["--project", str(project.root), "alerts", "test"])
        assert result.exit_code == 0, result.output
        assert "ok    ops (slack): HTTP 200" in result.output and "ok    pager (json): HTTP 200" in result.output
        bodies = {orjson.loads(body).get("status", "slack"): (headers, body) for headers, body in _Hook.received}
        headers, body = bodies["test"]
        assert verify_from_docs()(SECRET.encode(), headers["gatehouse-signature"], body)
        assert "test notification" in orjson.loads(bodies["slack"][1])["text"]

        _Hook.status = 500
        failed = CliRunner().invoke(cli_app, ["--project", str(project.root), "alerts", "test", "--webhook", "pager"])
        assert failed.exit_code == 1 and "fail  pager (json): HTTP 500" in failed.output
        monkeypatch.delenv("PAGER_SECRET")
        missing = CliRunner().invoke(cli_app, ["--project", str(project.root), "alerts", "test"])
        assert missing.exit_code == 1
        assert "[alerts.webhooks.pager] secret names the environment variable PAGER_SECRET" in missing.output
        assert url not in missing.output
    finally:
        server.shutdown()
        _Hook.received.clear()
        _Hook.status = 200


# --- end to end: a served project, its real signals, a real receiver ----------------------------------------------

SHOP_TOML = (Path(__file__).resolve().parents[1] / "examples" / "shop" / "gatehouse.toml").read_text()
PAGER = """
[alerts]
interval = "100ms"

[alerts.webhooks.pager]
url = "env:HOOK_URL"
format = "json"
secret = "env:ALERT_SECRET"
"""


async def evaluator_of(runtime: Any) -> AlertEvaluator:
    """The server's own evaluator (started by ``Runtime.start``)."""
    assert isinstance(runtime.alerts, AlertEvaluator)
    return runtime.alerts


async def served(make_project: ProjectFactory, serve_project: Callable[[Project], Any], rules: str,
                 instances: int = 1) -> tuple[Project, dict[str, str], list[tuple[httpx.AsyncClient, Any, AlertEvaluator]]]:
    """The shop with these rules, migrated, applied (app → key) and served by ``instances`` servers."""
    project = make_project(from_shop=True, toml=SHOP_TOML + PAGER + rules)
    keys = await prepare(project)
    started = []
    for _ in range(instances):
        client, runtime = await serve_project(project)
        started.append((client, runtime, await evaluator_of(runtime)))
    return project, keys, started


async def test_served_slow_statement_fires_and_resolves_once_across_two_instances_and_a_restart(
        make_project: ProjectFactory, serve_project: Callable[[Project], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALERT_SECRET", SECRET)
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        project, _, [(_, runtime, first), (_, _, second)] = await served(make_project, serve_project, """
[[alerts.rules]]
name = "long statement"
kind = "slow_statement"
app = "analytics"
over = "400ms"
""", instances=2)

        async def report() -> None:  # a long statement of the analytics app, through its own pool
            async with runtime.pools.connection("analytics", project.home_database) as conn:
                await conn.execute("SELECT pg_sleep(3)")

        statement = asyncio.get_running_loop().create_task(report())
        await until(lambda: len(receiver.received) == 1, what="the firing")
        firing = receiver.bodies()[0]
        assert (firing["status"], firing["subject"], firing["labels"]) == (
            "firing", "analytics/shop", {"app": "analytics", "database": "shop"})
        assert re.fullmatch(r"app analytics: a statement on shop has run [0-9.]+ m?s \(limit 400 ms; backend pid \d+\)",
                            firing["text"]), firing["text"]
        subject = ("long statement", "analytics/shop")
        await until(lambda: all(subject in e.tracks and e.tracks[subject].firing for e in (first, second)),
                    what="both instances to know it fires")
        metrics = runtime.metrics.render().decode()
        assert 'gatehouse_alerts_firing{rule="long statement",subject="analytics/shop"} 1.0' in metrics
        assert 'gatehouse_statement_longest_seconds{app="analytics",database="shop"}' in metrics

        await first.stop()  # a restart of the first instance, while the statement still runs
        restarted = AlertEvaluator.for_runtime(runtime)
        assert restarted is not None
        await restarted.start()
        try:
            await asyncio.sleep(0.5)
            assert len(receiver.received) == 1 and restarted.tracks[subject].firing
            await statement
            await until(lambda: len(receiver.received) == 2, what="the resolution")
            await asyncio.sleep(0.5)  # nothing more comes, from any of them
        finally:
            await restarted.stop()
    assert [(b["status"], b["episode"]) for b in receiver.bodies()] == [
        ("firing", firing["episode"]), ("resolved", firing["episode"])]
    for request in receiver.received:
        assert verify_from_docs()(SECRET.encode(), request.headers["gatehouse-signature"], request.body)
    assert not second.tracks


async def test_served_error_rate_of_an_app_fires_and_resolves(
        make_project: ProjectFactory, serve_project: Callable[[Project], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALERT_SECRET", SECRET)
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        _, keys, [(client, _, _)] = await served(make_project, serve_project, """
[[alerts.rules]]
name = "mobile errors"
kind = "error_rate"
app = "mobile"
statuses = "4xx+5xx"
over = "50%"
window = "1s"
min_requests = 5
""")
        key = keys["mobile"]
        for _ in range(8):
            assert (await client.get("/no_such_contract", headers={"apikey": key})).status_code == 404
        await until(lambda: len(receiver.received) == 1, what="the firing")
        assert receiver.bodies()[0]["text"] == ("app mobile: 100 % of 8 requests answered 4xx+5xx in the last 1s "
                                                "(limit 50 %)")
        for _ in range(30):  # good answers for more than the window
            assert (await client.get("/products?limit=1", headers={"apikey": key})).status_code == 200
            await asyncio.sleep(0.05)
        await until(lambda: len(receiver.received) == 2, what="the resolution")
        await asyncio.sleep(0.3)
    assert [b["status"] for b in receiver.bodies()] == ["firing", "resolved"]


async def test_served_database_unreachable_fires_and_resolves_once(
        make_project: ProjectFactory, serve_project: Callable[[Project], Any], monkeypatch: pytest.MonkeyPatch,
        server_uri: str) -> None:
    monkeypatch.setenv("ALERT_SECRET", SECRET)
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        project, _, _ = await served(make_project, serve_project, """
[[alerts.rules]]
name = "database down"
kind = "database_unreachable"
for = "200ms"
severity = "critical"
""")
        database = f"{project.name}_shop"
        await asyncio.sleep(0.3)
        assert receiver.received == []
        admin = await asyncpg.connect(server_uri)
        try:
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database)
            await until(lambda: len(receiver.received) == 1, what="the firing")
        finally:
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            await admin.close()
        await until(lambda: len(receiver.received) == 2, what="the resolution")
        await asyncio.sleep(0.3)
        assert [(b["status"], b["text"]) for b in receiver.bodies()] == [
            ("firing", "database shop does not answer"), ("resolved", "database shop answers")]
        assert receiver.bodies()[0]["episode"] == receiver.bodies()[1]["episode"]
        conn = await asyncpg.connect(with_database(server_uri, database))
        try:
            row = await conn.fetchrow("SELECT state, episode FROM gatehouse.alert_state")
        finally:
            await conn.close()
        assert row is not None and tuple(row) == ("resolved", receiver.bodies()[0]["episode"])


async def test_runtime_signals_read_the_served_project(
        make_project: ProjectFactory, serve_project: Callable[[Project], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALERT_SECRET", SECRET)
    monkeypatch.setenv("HOOK_URL", "http://127.0.0.1:9/unused")
    _, keys, [(client, runtime, evaluator)] = await served(make_project, serve_project, """
[[alerts.rules]]
name = "disk"
kind = "disk"
over = "99.9%"
""")
    signals = evaluator.signals
    key = keys["mobile"]
    assert (await client.get("/products?limit=1", headers={"apikey": key})).status_code == 200
    assert await signals.reachable() == {"shop": True}
    [used] = (await signals.disk_used()).values()
    assert used is not None and 0 < used < 1  # the test server is on this machine
    assert await signals.replica_lags() == {}
    pools = signals.pools()
    assert pools[("mobile", "shop", "primary")] == PoolReading(0, 4, 0)
    assert signals.traffic()["mobile"].requests == 1
    assert await signals.slow_statements(0.001) == {"shop": []}
    async with runtime.pools.connection("web", "shop") as conn:
        assert signals.pools()[("web", "shop", "primary")].in_use == 1
        slow = asyncio.get_running_loop().create_task(conn.execute("SELECT pg_sleep(0.5)"))
        await asyncio.sleep(0.2)
        [statement] = (await signals.slow_statements(0.1))["shop"]
        assert (statement.app, statement.database) == ("web", "shop") and statement.seconds > 0.1
        await slow



async def test_served_replica_lag_fires_when_replay_pauses_and_resolves_when_it_resumes(
        replica_cluster: ReplicaPair, make_project: ProjectFactory, serve_project: Callable[[Project], Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALERT_SECRET", SECRET)
    async with Receiver() as receiver:
        monkeypatch.setenv("HOOK_URL", receiver.url)
        project = make_project(toml=BASE.replace("[databases.shop]", "[databases.shop]\nreplica_check_ms = 50") + PAGER + """
[[alerts.rules]]
name = "replica lag"
kind = "replica_lag"
over = "500ms"
for = "300ms"
""")
        database = f"{project.name}_shop"
        await replica_cluster.create_database(database)
        primary_url, replica_url = replica_cluster.urls(database)
        monkeypatch.setenv("GATEHOUSE_DATABASES__SHOP__URL", primary_url)
        monkeypatch.setenv("REPLICA_URL", replica_url)
        monkeypatch.setenv("GATEHOUSE_DATABASES__SHOP__REPLICAS", '["env:REPLICA_URL"]')
        project = load_project(project.root)
        await prepare(project)
        await replica_cluster.caught_up(database)
        _, runtime = await serve_project(project)
        evaluator = await evaluator_of(runtime)
        await until(lambda: runtime.replicas.lags().get(("shop", "r1")) is not None, what="the replica's lag")
        await asyncio.sleep(0.5)
        assert receiver.received == []  # a replica within its bound says nothing
        await replica_cluster.pause_replay()
        try:
            await until(lambda: len(receiver.received) == 1, what="the firing")
            firing = receiver.bodies()[0]
            assert (firing["subject"], firing["labels"]) == ("shop/r1", {"database": "shop", "replica": "r1"})
            assert firing["value"] is None or firing["value"] > 0.5, firing
        finally:
            await replica_cluster.resume_replay()
        await until(lambda: len(receiver.received) == 2, what="the resolution")
        await asyncio.sleep(0.3)
        assert [b["status"] for b in receiver.bodies()] == ["firing", "resolved"]
        assert receiver.bodies()[1]["value"] is not None and receiver.bodies()[1]["value"] <= 0.5
        assert not evaluator.tracks
