"""Change events, captured in the writing transaction, and the HTTP feed, against real PostgreSQL.

Every change of the rows behind an evented contract (through gatehouse or straight in SQL, one row or many)
writes exactly its event, shaped as the contract version shows the row (a private column never appears), in
the same transaction (rolled back: no event). The feed pages by position and never skips the event of a
transaction that committed after a later one; a waiting request answers as soon as an event commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from conftest import ProjectFactory, prepare, with_database
from gatehouse import operations
from gatehouse.db.targets import resolve_targets
from gatehouse.errors import ProjectError
from gatehouse.project import Project, load_project
from gatehouse.runtime import Runtime

TOML = """
[project]
name = "evented"

[databases.main]

[apps.writer]
grants = [
    { contract = "orders", actions = ["read", "insert", "update", "delete", "events"] },
    { contract = "lines", actions = ["read", "insert", "update", "delete", "events"] },
    { contract = "customers", actions = ["read", "update", "events"] },
]

[apps.reader]
grants = [{ contract = "orders", actions = ["read"] }]

[apps.stranger]
grants = [{ contract = "customers", actions = ["read"] }]

[apps.tenant]
grants = [{ contract = "orders", actions = ["read", "events"], filter = "status=eq.placed" }]

[apps.listener]
grants = [{ contract = "orders", actions = ["events"] }]

[events.orders]
version = 1

[events.lines]
version = 1
"""
MIGRATION = """
CREATE TABLE customers (id bigserial PRIMARY KEY, name text NOT NULL, tier text NOT NULL DEFAULT 'basic');
CREATE TABLE orders (
    id           bigserial PRIMARY KEY,
    customer_id  bigint REFERENCES customers (id),
    status       text NOT NULL DEFAULT 'placed',
    total        numeric(10, 2) NOT NULL DEFAULT 0,
    secret       text NOT NULL DEFAULT 'private'
);
CREATE TABLE lines (
    order_id  bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    sku       text NOT NULL,
    qty       integer NOT NULL,
    PRIMARY KEY (order_id, sku)
);
INSERT INTO customers (name) VALUES ('ada'), ('bob');
"""
CONTRACTS = {
    "orders.v1.sql": "SELECT id, customer_id, status, total FROM orders WHERE status <> 'hidden'",
    "orders.v2.sql": "SELECT o.id, o.status, o.total, c.name AS customer\n"
                     "FROM orders AS o LEFT JOIN customers AS c ON c.id = o.customer_id\nWHERE o.status <> 'hidden'",
    "lines.v1.sql": "SELECT order_id, sku, qty FROM lines",
    "customers.v1.sql": "SELECT id, name FROM customers",
}
ORDERS_V1 = {"id", "customer_id", "status", "total"}
ORDERS_V2 = {"id", "status", "total", "customer"}


def build(make_project: ProjectFactory, toml: str = TOML) -> Project:
    return make_project(toml=toml, contracts=CONTRACTS, migrations={"V001__tables.sql": MIGRATION})


async def owner_dsn(project: Project) -> str:
    return str((await resolve_targets(project))[project.home_database].owner_dsn)


class Outbox:
    """The outbox as the database owner sees it: the events written since the last look."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.seen = 0

    async def new(self) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch("SELECT seq, aggregatetype, aggregateid, type, payload::text AS payload, "
                                    "contract_version, aggregate_version FROM gatehouse.outbox WHERE seq > $1 "
                                    "ORDER BY txid, seq", self.seen)
        finally:
            await conn.close()
        if rows:
            self.seen = max(r["seq"] for r in rows)
        return [{"contract": r["aggregatetype"], "key": r["aggregateid"], "type": r["type"],
                 "payload": orjson.loads(r["payload"]) if r["payload"] is not None else None,
                 "version": r["contract_version"], "n": r["aggregate_version"], "seq": r["seq"]} for r in rows]


def brief(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["contract"], e["key"], e["type"]) for e in events]


@dataclass
class Evented:
    project: Project
    keys: dict[str, str]
    client: httpx.AsyncClient
    runtime: Runtime
    outbox: Outbox


@pytest.fixture
async def evented(make_project: ProjectFactory, serve_project: Callable[..., Any]) -> Evented:
    project = build(make_project)
    keys = await prepare(project)
    client, runtime = await serve_project(project)
    return Evented(project, keys, client, runtime, Outbox(await owner_dsn(project)))


async def test_every_http_write_makes_exactly_its_event(evented: Evented) -> None:
    keys, client, outbox = evented.keys, evented.client, evented.outbox
    auth = {"apikey": keys["writer"], "Prefer": "return=representation"}

    one = await client.post("/v1/orders", json={"customer_id": 1, "total": 10}, headers=auth)
    assert one.status_code == 201, one.text
    first = one.json()[0]["id"]
    events = await outbox.new()
    assert brief(events) == [("orders", str(first), "created")]
    assert events[0]["payload"] == {"id": first, "customer_id": 1, "status": "placed", "total": 10.00}
    assert events[0]["version"] == 1 and events[0]["n"] == events[0]["seq"]  # an event's number is its seq
    created = events[0]["n"]

    bulk = await client.post("/v1/orders", json=[{"customer_id": 2, "total": 1}, {"customer_id": 2, "total": 2}],
                             headers=auth)
    ids = [row["id"] for row in bulk.json()]
    assert brief(await outbox.new()) == [("orders", str(i), "created") for i in ids]

    patched = await client.patch(f"/v1/orders?id=eq.{first}", json={"status": "paid"}, headers=auth)
    assert patched.status_code == 200, patched.text
    events = await outbox.new()
    assert brief(events) == [("orders", str(first), "updated")]
    assert events[0]["payload"]["status"] == "paid" and events[0]["n"] > created
    paid = events[0]["n"]

    upsert = await client.post("/v1/orders", json=[{"id": first, "customer_id": 1, "status": "shipped", "total": 10},
                                                   {"id": 9001, "customer_id": 1, "status": "placed", "total": 3}],
                               headers={**auth, "Prefer": "resolution=merge-duplicates,return=representation"})
    assert upsert.status_code == 201, upsert.text
    events = await outbox.new()
    assert brief(events) == [("orders", str(first), "updated"), ("orders", "9001", "created")]
    assert events[0]["n"] > paid and all(e["n"] == e["seq"] for e in events)

    lines = await client.post("/lines", json=[{"order_id": first, "sku": "a-1", "qty": 2}], headers=auth)
    assert lines.status_code == 201, lines.text
    events = await outbox.new()
    assert brief(events) == [("lines", f"[{first}, \"a-1\"]", "created")]  # a key of two columns: a JSON array
    assert events[0]["payload"] == {"order_id": first, "sku": "a-1", "qty": 2}

    deleted = await client.delete(f"/v1/orders?id=eq.{ids[0]}", headers=auth)
    assert deleted.status_code == 200, deleted.text
    events = await outbox.new()
    assert brief(events) == [("orders", str(ids[0]), "deleted")]
    assert events[0]["payload"] == {"id": ids[0], "customer_id": 2, "status": "placed", "total": 1.00}  # as it was

    rolled_back = await client.patch(f"/v1/orders?id=eq.{first}", json={"total": 1234},
                                     headers={**auth, "Prefer": "tx=rollback,return=representation"})
    assert rolled_back.status_code == 200 and rolled_back.json()[0]["total"] == 1234, rolled_back.text
    assert await outbox.new() == []  # a write rolled back leaves no event
    failed = await client.post("/lines", json=[{"order_id": first, "sku": "b", "qty": 1},
                                               {"order_id": 424242, "sku": "c", "qty": 1}], headers=auth)
    assert failed.status_code == 409, failed.text  # the second row's order does not exist: neither is written
    assert await outbox.new() == []
    assert all(set(e["payload"]) <= ORDERS_V1 for e in events)


async def test_sql_writes_by_anyone_make_their_events_in_their_transaction(evented: Evented) -> None:
    outbox = evented.outbox
    conn = await asyncpg.connect(outbox.dsn)
    try:
        ids = [r["id"] for r in await conn.fetch(
            "INSERT INTO orders (customer_id, total) VALUES (1, 1), (2, 2), (1, 3) RETURNING id")]
        events = await outbox.new()
        assert brief(events) == [("orders", str(i), "created") for i in ids]
        assert all(set(e["payload"]) == ORDERS_V1 for e in events)  # never the private column

        await conn.execute("UPDATE orders SET secret = 'changed'")  # nothing the contract shows
        assert await outbox.new() == []
        await conn.execute("UPDATE orders SET total = total + 1 WHERE customer_id = 1")
        assert sorted(brief(await outbox.new())) == sorted(("orders", str(i), "updated") for i in (ids[0], ids[2]))

        async with conn.transaction():
            await conn.execute("UPDATE orders SET status = 'paid' WHERE id = $1", ids[1])
            with contextlib.suppress(RuntimeError):
                async with conn.transaction():  # a savepoint rolled back: its change and its event go together
                    await conn.execute("INSERT INTO orders (id, customer_id) VALUES (600, 2)")
                    raise RuntimeError
            await conn.execute("INSERT INTO orders (id, customer_id) VALUES (601, 2)")
        assert brief(await outbox.new()) == [("orders", str(ids[1]), "updated"), ("orders", "601", "created")]

        tx = conn.transaction()
        await tx.start()
        await conn.execute("UPDATE orders SET total = 99")
        await conn.execute("INSERT INTO orders (customer_id) VALUES (1)")
        await tx.rollback()
        assert await outbox.new() == []  # rolled back: no event

        await conn.execute("UPDATE orders SET status = 'hidden' WHERE id = $1", ids[0])  # leaves the view
        events = await outbox.new()
        assert brief(events) == [("orders", str(ids[0]), "deleted")]
        assert events[0]["payload"]["status"] == "placed"  # as the contract showed it last
        await conn.execute("UPDATE orders SET total = 5 WHERE id = $1", ids[0])  # not shown before or after
        assert await outbox.new() == []
        await conn.execute("UPDATE orders SET status = 'placed' WHERE id = $1", ids[0])  # comes back
        assert brief(await outbox.new()) == [("orders", str(ids[0]), "created")]
        await conn.execute("INSERT INTO orders (customer_id, status) VALUES (1, 'hidden')")  # never shown
        assert await outbox.new() == []

        await conn.execute("UPDATE orders SET id = 777 WHERE id = $1", ids[2])  # a new key: gone, then new
        assert brief(await outbox.new()) == [("orders", str(ids[2]), "deleted"), ("orders", "777", "created")]

        await conn.execute("INSERT INTO lines VALUES ($1, 'a', 1), ($1, 'b', 2)", ids[1])
        await outbox.new()
        await conn.execute("DELETE FROM orders WHERE id = $1", ids[1])  # its lines go by the cascade
        events = await outbox.new()
        assert sorted(brief(events)) == sorted([("orders", str(ids[1]), "deleted"),
                                                ("lines", f'[{ids[1]}, "a"]', "deleted"),
                                                ("lines", f'[{ids[1]}, "b"]', "deleted")])
        history = await conn.fetch("SELECT type, aggregate_version FROM gatehouse.outbox WHERE aggregatetype = "
                                   "'orders' AND aggregateid = $1 ORDER BY seq", str(ids[0]))
        assert [r["type"] for r in history] == ["created", "updated", "deleted", "created"]
        assert [r["aggregate_version"] for r in history] == sorted({r["aggregate_version"] for r in history})
        assert await conn.fetchval("SELECT gatehouse.ev_present('orders', $1)", str(ids[0])) is True
    finally:
        await conn.close()


async def test_a_new_contract_version_makes_events_of_that_version(make_project: ProjectFactory) -> None:
    project = build(make_project)
    await prepare(project)
    outbox = Outbox(await owner_dsn(project))
    conn = await asyncpg.connect(outbox.dsn)
    try:
        again = await operations.apply_all(project)
        assert again[0].changes == []  # applied twice: nothing changes the second time
        order = await conn.fetchval("INSERT INTO orders (customer_id, total) VALUES (1, 4) RETURNING id")
        assert [(e["version"], set(e["payload"])) for e in await outbox.new()] == [(1, ORDERS_V1)]

        root = Path(project.root)
        (root / "gatehouse.toml").write_text((root / "gatehouse.toml").read_text().replace(
            "[events.orders]\nversion = 1", "[events.orders]\nversion = 2"))
        v2 = load_project(root)
        report = (await operations.apply_all(v2))[0].changes
        assert any("now shaped as orders.v2 (was orders.v1)" in line and "public.customers" in line
                   for line in report), report
        await conn.execute("UPDATE orders SET total = 5 WHERE id = $1", order)
        events = await outbox.new()
        assert [(e["version"], e["payload"]) for e in events] == [
            (2, {"id": order, "status": "placed", "total": 5.00, "customer": "ada"})]

        await conn.execute("UPDATE customers SET name = 'ada lovelace' WHERE id = 1")  # a joined table
        events = await outbox.new()
        assert brief(events) == [("orders", str(order), "updated")]
        assert events[0]["payload"]["customer"] == "ada lovelace" and events[0]["n"] == events[0]["seq"]
        await conn.execute("UPDATE customers SET tier = 'gold'")  # a column no contract reads
        assert await outbox.new() == []

        (root / "gatehouse.toml").write_text((root / "gatehouse.toml").read_text().replace(
            "[events.orders]\nversion = 2\n", ""))
        report = (await operations.apply_all(load_project(root)))[0].changes
        assert any(line.startswith("events of orders: stopped capturing") for line in report), report
        await conn.execute("UPDATE orders SET total = 6")
        assert await outbox.new() == []
        triggers = await conn.fetch("SELECT tgrelid::regclass::text AS t FROM pg_trigger "
                                    "WHERE tgname LIKE 'gatehouse\\_event\\_%' ORDER BY 1")
        assert [r["t"] for r in triggers] == ["lines"]  # only the lines' capture is left
    finally:
        await conn.close()


async def feed(client: httpx.AsyncClient, key: str, contract: str = "orders", **params: Any) -> httpx.Response:
    return await client.get(f"/events/{contract}", params=params, headers={"apikey": key}, timeout=60)


async def collect(client: httpx.AsyncClient, key: str, after: str | None, count: int, contract: str = "orders",
                  limit: int = 100) -> tuple[list[dict[str, Any]], str | None]:
    """Pages of the feed until ``count`` events came (waiting for them: a writing transaction anywhere on the
    server holds back what is readable, see gatehouse.events.outbox), and the position after them."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(seen) < count and time.monotonic() < deadline:
        answer = await feed(client, key, contract, limit=limit, wait=10, **({"after": after} if after else {}))
        assert answer.status_code == 200, answer.text
        page = answer.json()
        assert len(page) <= limit
        if page:
            assert answer.headers["gatehouse-next"] == page[-1]["position"]
            assert 'rel="next"' in answer.headers["link"]
        after = answer.headers["gatehouse-next"]
        seen.extend(page)
    return seen, after


async def test_the_feed_pages_by_position(evented: Evented) -> None:
    keys, client, outbox = evented.keys, evented.client, evented.outbox
    conn = await asyncpg.connect(outbox.dsn)
    try:
        for n in range(5):
            await conn.execute("INSERT INTO orders (customer_id, total) VALUES (1, $1)", n)
        await conn.execute("INSERT INTO lines VALUES (1, 'x', 1)")
    finally:
        await conn.close()
    seen, after = await collect(client, keys["writer"], None, 5, limit=2)
    assert [e["aggregateid"] for e in seen] == [str(n) for n in range(1, 6)]  # only orders' events, in order
    assert {e["type"] for e in seen} == {"created"} and all(e["version"] == 1 for e in seen)
    assert set(seen[0]) >= {"id", "aggregatetype", "aggregateid", "type", "payload", "position", "aggregate_version"}
    assert [e["position"] for e in seen] == sorted({e["position"] for e in seen},
                                                   key=lambda p: tuple(map(int, p.split("-"))))
    last = await feed(client, keys["writer"], after=after)
    assert last.json() == [] and last.headers["gatehouse-next"] == after  # nothing new: the same position again

    now = await feed(client, keys["writer"], after="now")
    assert now.json() == []
    conn = await asyncpg.connect(outbox.dsn)
    try:
        await conn.execute("UPDATE orders SET total = 100 WHERE id = 2")
    finally:
        await conn.close()
    fresh, _ = await collect(client, keys["writer"], now.headers["gatehouse-next"], 1)
    assert [(e["aggregateid"], e["type"]) for e in fresh] == [("2", "updated")]


async def test_the_feed_never_skips_a_transaction_that_commits_late(evented: Evented) -> None:
    keys, client, outbox = evented.keys, evented.client, evented.outbox
    early, late = await asyncpg.connect(outbox.dsn), await asyncpg.connect(outbox.dsn)
    try:
        position = (await feed(client, keys["writer"], after="now")).headers["gatehouse-next"]
        slow = early.transaction()
        await slow.start()  # takes the lower transaction id, and commits second
        await early.execute("INSERT INTO orders (id, customer_id) VALUES (501, 1)")
        await late.execute("INSERT INTO orders (id, customer_id) VALUES (502, 1)")  # committed at once
        held = await feed(client, keys["writer"], after=position, wait="0.5")
        assert held.json() == [] and held.headers["gatehouse-next"] == position  # 502 waits for 501's transaction
        await slow.commit()
        both, _ = await collect(client, keys["writer"], position, 2)
        assert [e["aggregateid"] for e in both] == ["501", "502"]
    finally:
        await early.close()
        await late.close()


async def test_a_waiting_request_answers_as_soon_as_an_event_commits(evented: Evented) -> None:
    keys, client, outbox = evented.keys, evented.client, evented.outbox
    start = (await feed(client, keys["writer"], after="now")).headers["gatehouse-next"]

    began = time.monotonic()
    quiet = await feed(client, keys["writer"], after=start, wait="0.5")
    assert quiet.json() == [] and 0.5 <= time.monotonic() - began < 3

    waiting = [asyncio.create_task(feed(client, keys["writer"], after=start, wait=20)) for _ in range(3)]
    other = asyncio.create_task(feed(client, keys["writer"], "lines", after=start, wait=2))
    await asyncio.sleep(0.5)
    assert not any(task.done() for task in waiting)
    conn = await asyncpg.connect(outbox.dsn)
    try:
        began = time.monotonic()
        await conn.execute("INSERT INTO orders (customer_id) VALUES (2)")
    finally:
        await conn.close()
    answers = await asyncio.gather(*waiting)
    assert time.monotonic() - began < 5  # woken by the commit (polled every 100 ms), not after the 20 s
    assert all([e["type"] for e in answer.json()] == ["created"] for answer in answers)
    assert (await other).json() == []  # a waiter of another contract is not woken by it


async def test_the_feed_is_granted_like_a_contract(evented: Evented) -> None:
    keys, client = evented.keys, evented.client
    assert (await feed(client, keys["writer"])).status_code == 200
    for app, contract, status, code in [
        ("writer", "customers", 404, "PGRST205"),  # granted, but not evented
        ("writer", "nothing", 404, "PGRST205"),
        ("stranger", "orders", 404, "PGRST205"),  # evented, not granted: as if it did not exist
        ("reader", "orders", 403, "42501"),  # granted without "events"
        ("tenant", "orders", 403, "42501"),  # a row filter: events are not filtered by row
    ]:
        answer = await feed(client, keys[app], contract)
        assert (answer.status_code, answer.json()["code"]) == (status, code), (app, contract, answer.text)
    assert (await client.get("/events/orders")).status_code == 401
    assert (await client.post("/events/orders", headers={"apikey": keys["writer"]})).status_code == 405
    reads = await client.get("/v1/orders", headers={"apikey": keys["reader"]})
    assert reads.status_code == 200  # ("events" is no privilege of the database role)

    # A grant of the feed alone: the events, not the rows, and no path in its OpenAPI document.
    assert (await feed(client, keys["listener"])).status_code == 200
    refused = await client.get("/v1/orders", headers={"apikey": keys["listener"]})
    assert (refused.status_code, refused.json()["code"]) == (403, "42501"), refused.text
    document = (await client.get("/", headers={"apikey": keys["listener"]})).json()
    assert "/orders" not in document["paths"]


BAD_FEED_QUERIES = [
    "after=banana", "after=1-", "after=-1-2", "after=12345678901234567890123-1", "limit=0", "limit=-1",
    "limit=abc", "limit=1001", "wait=31", "wait=-1", "wait=soon", "limit=1&limit=2", "select=id", "after=1-1&x=y",
]


async def test_bad_feed_input_is_refused_and_changes_nothing(evented: Evented) -> None:
    keys, client, outbox = evented.keys, evented.client, evented.outbox
    conn = await asyncpg.connect(outbox.dsn)
    try:
        for query in BAD_FEED_QUERIES:  # (one project for all: each case writes, then checks nothing else moved)
            await conn.execute("INSERT INTO orders (customer_id) VALUES (1)")
            before = await conn.fetch("SELECT seq, type FROM gatehouse.outbox ORDER BY seq")
            answer = await client.get(f"/events/orders?{query}", headers={"apikey": keys["writer"]})
            assert (answer.status_code, answer.json()["code"]) == (400, "GH400"), (query, answer.text)
            assert await conn.fetch("SELECT seq, type FROM gatehouse.outbox ORDER BY seq") == before, query
    finally:
        await conn.close()


async def test_feed_requests_are_measured_and_audited(evented: Evented) -> None:
    keys, client, outbox = evented.keys, evented.client, evented.outbox
    runtime = evented.runtime
    assert (await feed(client, keys["writer"])).status_code == 200
    assert (await feed(client, keys["writer"], after="x")).status_code == 400
    conn = await asyncpg.connect(outbox.dsn)
    try:
        for _ in range(100):  # the audit of reads is written in batches, off the request's path
            rows = await conn.fetch("SELECT app, status, \"rows\" FROM gatehouse.audit_log WHERE target = 'events:orders' "
                                    "ORDER BY status")
            if len(rows) == 2:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert [(r["app"], r["status"]) for r in rows] == [("writer", 200), ("writer", 400)]
    metrics = runtime.metrics.render().decode()
    assert 'contract="events:orders"' in metrics


async def test_versions_follow_commits_where_positions_do_not(evented: Evented) -> None:
    """A transaction that wrote something first has the lower id, so its event of a row comes first in the feed
    even when it changed that row after another transaction committed its change: the aggregate's version says
    which came last."""
    keys, client, outbox = evented.keys, evented.client, evented.outbox
    setup = await asyncpg.connect(outbox.dsn)
    first, second = await asyncpg.connect(outbox.dsn), await asyncpg.connect(outbox.dsn)
    try:
        await setup.execute("INSERT INTO orders (id, customer_id) VALUES (700, 1), (701, 1)")
        start, _ = await collect(client, keys["writer"], None, 2)
        position = start[-1]["position"]
        early = first.transaction()
        await early.start()
        await first.execute("UPDATE orders SET total = 1 WHERE id = 701")  # takes its transaction id first
        await second.execute("UPDATE orders SET total = 2 WHERE id = 700")  # commits first
        await first.execute("UPDATE orders SET total = 3 WHERE id = 700")  # after that commit: version 3
        await early.commit()
        events, _ = await collect(client, keys["writer"], position, 3)
        assert [(e["aggregateid"], e["payload"]["total"]) for e in events] == [
            ("701", 1.0), ("700", 3.0), ("700", 2.0)]  # the feed's order (by transaction id) ...
        assert events[1]["aggregate_version"] > events[2]["aggregate_version"]  # ... and 700's in commit order
    finally:
        for conn in (setup, first, second):
            await conn.close()


async def test_outbox_backlog_and_age_in_metrics(evented: Evented) -> None:
    from gatehouse.events.outbox_metrics import OutboxCollector

    outbox, runtime = evented.outbox, evented.runtime
    collector = OutboxCollector(runtime._internal)
    runtime.metrics.registry.register(collector)
    conn = await asyncpg.connect(outbox.dsn)
    try:
        await conn.execute("INSERT INTO orders (customer_id) VALUES (1), (2), (1)")
        await conn.execute("UPDATE gatehouse.outbox SET created_at = now() - interval '90 seconds' "
                           "WHERE seq = (SELECT min(seq) FROM gatehouse.outbox)")
    finally:
        await conn.close()
    await collector.refresh()
    text = runtime.metrics.render().decode()
    assert 'gatehouse_outbox_events{database="main"} 3.0' in text
    age = next(line for line in text.splitlines() if line.startswith("gatehouse_outbox_oldest_event_age_seconds{"))
    assert 90 <= float(age.split()[-1]) < 120


async def as_deployer(project: Project, server_uri: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """Make a login (``<prefix>deployer``, dropped with the project's roles) the owner of the project's database,
    point the project at it, and migrate as it: its tables are then the deployer's. Returns (login, database)."""
    database = (await owner_dsn(project)).rsplit("/", 1)[1]
    login = f"{project.role_prefix}deployer"
    admin = await asyncpg.connect(server_uri)
    try:
        await admin.execute(f'CREATE ROLE "{login}" LOGIN CREATEROLE')
        await admin.execute(f'ALTER DATABASE "{database}" OWNER TO "{login}"')
    finally:
        await admin.close()
    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL",
                       with_database(server_uri.replace("postgres@", f"{login}@", 1), database))
    await operations.migrate_all(project)
    return login, database


async def test_apply_says_which_tables_it_could_not_capture(make_project: ProjectFactory, server_uri: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """apply running as a login that does not own a table cannot place its trigger: it says so and goes on."""
    project = build(make_project)
    login, database = await as_deployer(project, server_uri, monkeypatch)
    owned = await asyncpg.connect(with_database(server_uri, database))
    try:  # someone else's table, which the deployer may read and write but not put a trigger on
        await owned.execute(f'ALTER TABLE lines OWNER TO postgres; GRANT SELECT, INSERT, UPDATE, DELETE ON lines TO "{login}"')
    finally:
        await owned.close()
    report = (await operations.apply_all(project))[0].changes
    assert "could not capture the changes of public.lines for the events of lines: only its owner may place " \
           "a trigger on it; run `gatehouse apply` as that owner (its events are missing until then)" in report
    assert "events of orders.v1: capturing the changes of public.orders" in report
    outbox = Outbox(await owner_dsn(project))
    conn = await asyncpg.connect(outbox.dsn)
    try:
        await conn.execute("INSERT INTO orders (id, customer_id) VALUES (1, 1)")
        await conn.execute("INSERT INTO lines VALUES (1, 'a', 1)")
        assert brief(await outbox.new()) == [("orders", "1", "created")]
    finally:
        await conn.close()

    monkeypatch.setenv("GATEHOUSE_DATABASES__MAIN__URL", with_database(server_uri, database))  # as the owner
    report = (await operations.apply_all(project))[0].changes
    assert report == ["events of lines.v1: capturing the changes of public.lines"]


async def test_apply_with_nothing_to_change_does_not_wait_for_writers(evented: Evented) -> None:
    writer = await asyncpg.connect(evented.outbox.dsn)
    try:
        open_write = writer.transaction()
        await open_write.start()
        await writer.execute("INSERT INTO orders (customer_id) VALUES (1)")  # holds the outbox until it ends
        report = await asyncio.wait_for(operations.apply_all(evented.project), 10)
        assert report[0].changes == []
        await open_write.rollback()
    finally:
        await writer.close()


@pytest.mark.parametrize(("events", "contracts", "message"), [
    ("[events.totals]\nversion = 1\n", {"totals.v1.sql": "SELECT status, count(*) AS n FROM orders GROUP BY status"},
     "[events.totals]: totals.v1 has no key"),
    ("[events.nothing]\nversion = 1\n", {}, "[events.nothing] names no contract"),
    ("[events.orders]\nversion = 3\n", {}, "[events.orders] version = 3: orders has no such version"),
])
async def test_apply_refuses_events_it_cannot_capture(make_project: ProjectFactory, events: str,
                                                      contracts: dict[str, str], message: str) -> None:
    toml = TOML.replace("[events.orders]\nversion = 1\n", "") + events
    project = make_project(toml=toml, contracts={**CONTRACTS, **contracts},
                           migrations={"V001__tables.sql": MIGRATION})
    await operations.migrate_all(project)
    with pytest.raises(ProjectError) as refused:
        await operations.apply_all(project)
    assert message in str(refused.value)
    conn = await asyncpg.connect(await owner_dsn(project))
    try:  # nothing of that apply is kept
        assert await conn.fetchval("SELECT to_regclass('gatehouse.outbox')") is None
    finally:
        await conn.close()
