"""Sagas (src/gatehouse/sagas/): an order placed across two databases and a payment service, exactly once or
undone, through crashes at every boundary, two racing runners, reused idempotency keys and a saga whose code
changed under it. Every test checks what the databases and the payment service hold, not only return values.

The payment service is a real HTTP/1.1 server on a local socket (``asyncio.start_server``): it applies each
idempotency key once and counts every request it receives per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.errors import IdempotencyKeyReused
from gatehouse.project import Project
from gatehouse.sagas import store
from gatehouse.testing import LogicHarness

TOML = """
[project]
name = "sagas"

[databases.orders]

[databases.catalog]

[apps.shop]
grants = [
  { contract = "stock", actions = ["read", "update"] },
  { contract = "holds", actions = ["read", "insert", "update"] },
  { contract = "orders", actions = ["read", "insert"] },
]
"""
MIGRATIONS = {
    "catalog/V001__stock.sql": """
        CREATE TABLE stock (sku text PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0));
        CREATE TABLE holds (id serial PRIMARY KEY, sku text NOT NULL, qty int NOT NULL,
                            released boolean NOT NULL DEFAULT false);
    """,
    "orders/V001__orders.sql": """
        CREATE TABLE orders (id serial PRIMARY KEY, customer text NOT NULL, sku text NOT NULL, qty int NOT NULL,
                             charge_id text NOT NULL);
    """,
}
CONTRACTS = {
    "catalog/stock.v1.sql": "SELECT sku, qty FROM stock",
    "catalog/holds.v1.sql": "SELECT id, sku, qty, released FROM holds",
    "orders/orders.v1.sql": "SELECT id, customer, sku, qty, charge_id FROM orders",
}
LOGIC = '''
import asyncio
import os

from pydantic import BaseModel

import gatehouse
from gatehouse import RemoteCall, Saga
from gatehouse.logic.context import Context, LogicError


class NewOrder(BaseModel):
    customer: str
    sku: str
    qty: int
    amount: int


class Hold(BaseModel):
    id: int
    sku: str
    qty: int


class Charge(BaseModel):
    id: str
    amount: int


class Placed(BaseModel):
    order_id: int
    hold_id: int
    charge_id: str


@gatehouse.step(database="catalog")
async def reserve_stock(ctx: Context, sku: str, qty: int) -> Hold:
    row = await ctx.one("stock", sku=sku)
    if row is None or row["qty"] < qty:
        raise LogicError(f"not enough {sku} in stock", status=409)
    await ctx.update("stock", {"qty": row["qty"] - qty}, sku=sku)
    [hold] = await ctx.insert("holds", {"sku": sku, "qty": qty})
    return Hold(id=hold["id"], sku=sku, qty=qty)


@gatehouse.step(database="catalog")
async def release_stock(ctx: Context, hold: Hold) -> None:
    row = await ctx.one("stock", sku=hold.sku)
    assert row is not None
    await ctx.update("stock", {"qty": row["qty"] + hold.qty}, sku=hold.sku)
    await ctx.update("holds", {"released": True}, id=hold.id)


@gatehouse.step(remote=True, timeout_s=5, retries=3, backoff_s=0.02)
async def charge_card(call: RemoteCall, customer: str, amount: int) -> Charge:
    response = await call.http.post(os.environ["SAGA_TEST_PAYMENTS"] + "/charge",
                                    json={"customer": customer, "amount": amount},
                                    headers={"Idempotency-Key": call.idempotency_key})
    response.raise_for_status()
    return Charge(**response.json())


@gatehouse.step(remote=True, timeout_s=5, retries=3, backoff_s=0.02)
async def refund(call: RemoteCall, charge: Charge) -> None:
    response = await call.http.post(os.environ["SAGA_TEST_PAYMENTS"] + "/refund", json={"charge": charge.id},
                                    headers={"Idempotency-Key": call.idempotency_key})
    response.raise_for_status()


@gatehouse.step(database="orders")
async def create_order(ctx: Context, order: NewOrder, charge: Charge) -> int:
    if order.customer.startswith("refused"):
        raise LogicError("this customer may not order")
    [row] = await ctx.insert("orders", {"customer": order.customer, "sku": order.sku, "qty": order.qty,
                                        "charge_id": charge.id})
    return int(row["id"])


@gatehouse.saga(timeout_s=60)
async def place_order(s: Saga, order: NewOrder) -> Placed:
    hold = await s.step(reserve_stock, order.sku, order.qty).compensate_with(release_stock)
    charge = await s.step(charge_card, order.customer, order.amount).compensate_with(refund)
    order_id = await s.step(create_order, order, charge)
    return Placed(order_id=order_id, hold_id=hold.id, charge_id=charge.id)


GATES: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}
"""sku → (entered, release): slow_hold tells the test it is inside its transaction, and waits to be let go."""


@gatehouse.step(database="catalog")
async def slow_hold(ctx: Context, sku: str) -> int:
    [hold] = await ctx.insert("holds", {"sku": sku, "qty": 1})
    if sku in GATES:
        entered, release = GATES[sku]
        entered.set()
        await release.wait()
    return int(hold["id"])


@gatehouse.saga
async def held_twice(s: Saga, order: NewOrder) -> int:
    await s.step(reserve_stock, order.sku, order.qty).compensate_with(release_stock)
    return await s.step(slow_hold, order.sku)


@gatehouse.saga
async def wobbly(s: Saga, order: NewOrder) -> int:
    """Decides on something that is not recorded: the environment (never do this)."""
    if os.environ.get("SAGA_TEST_WOBBLE"):
        return await s.step(create_order, order, Charge(id="none", amount=0))
    hold = await s.step(reserve_stock, order.sku, order.qty).compensate_with(release_stock)
    return hold.id
'''


class Crash(BaseException):
    """kill -9, as the engine sees it: nothing after this point runs, no handler cleans up."""


@dataclass
class Payments:
    """A payment service that applies each idempotency key once, and counts what it receives."""

    url: str = ""
    received: Counter[str] = field(default_factory=Counter)
    charges: dict[str, dict[str, object]] = field(default_factory=dict)
    refunds: dict[str, str] = field(default_factory=dict)
    """idempotency key → charge refunded."""
    flaky: set[str] = field(default_factory=set)
    """Customers whose first charge request is answered 503."""
    delay_s: float = 0.0
    """How long each answer takes (a slow service keeps sagas in flight, for tests that kill their runner)."""

    def answer(self, path: str, key: str, body: dict[str, object]) -> tuple[int, object]:
        self.received[key] += 1
        if path == "/charge":
            if body["customer"] in self.flaky:
                self.flaky.discard(str(body["customer"]))
                return 503, {"error": "try again"}
            if key not in self.charges:
                self.charges[key] = {"id": f"ch_{len(self.charges) + 1}", "amount": body["amount"],
                                     "customer": body["customer"]}
            return 200, self.charges[key]
        if path == "/refund":
            self.refunds.setdefault(key, str(body["charge"]))
            return 200, {"refunded": self.refunds[key]}
        return 404, {}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))) or b"{}")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                status, answer = self.answer(path, headers.get("idempotency-key", ""), body)
                data = json.dumps(answer).encode()
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}"
                             f"\r\n\r\n".encode() + data)
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def payment_service(monkeypatch: pytest.MonkeyPatch, *, delay_s: float = 0.0) -> AsyncIterator[Payments]:
    """The payment service on a local port, its URL in ``SAGA_TEST_PAYMENTS`` (where the saga's steps, and a
    served process's, find it)."""
    service = Payments(delay_s=delay_s)
    server = await asyncio.start_server(service.serve, "127.0.0.1", 0)
    service.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    monkeypatch.setenv("SAGA_TEST_PAYMENTS", service.url)
    try:
        yield service
    finally:
        server.close()


async def saga_project(make_project: ProjectFactory, toml: str = TOML) -> Project:
    """The order placement's project (two databases, ``logic/orders.py``), migrated and applied."""
    made = make_project(toml=toml, migrations=MIGRATIONS, contracts=CONTRACTS, files={"logic/orders.py": LOGIC})
    await prepare(made)
    return made


@pytest.fixture
async def payments(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Payments]:
    async with payment_service(monkeypatch) as service:
        yield service


@pytest.fixture
async def project(make_project: ProjectFactory) -> Project:
    return await saga_project(make_project)


@pytest.fixture
async def harness(project: Project, payments: Payments) -> AsyncIterator[LogicHarness]:
    async with LogicHarness(project) as opened:
        yield opened


_skus = itertools.count(1)


async def new_order(project: Project, customer: str = "ann", qty: int = 2) -> dict[str, object]:
    sku = f"sku-{next(_skus)}"
    async with operations.owner_connection(project, "catalog") as conn:
        await conn.execute("INSERT INTO stock VALUES ($1, 10)", sku)
    return {"customer": f"{customer}-{sku}", "sku": sku, "qty": qty, "amount": 100}


@dataclass
class Effects:
    stock: int
    holds: list[bool]
    """released, per hold of the sku."""
    orders: int
    charges: int
    refunds: int
    charge_requests: int
    step_records: Counter[tuple[int, str]]


async def effects(project: Project, payments: Payments, saga_id: str, order: dict[str, object]) -> Effects:
    async with operations.owner_connection(project, "catalog") as conn:
        stock = await conn.fetchval("SELECT qty FROM stock WHERE sku = $1", order["sku"])
        holds = [r["released"] for r in await conn.fetch("SELECT released FROM holds WHERE sku = $1", order["sku"])]
        records = Counter((r["n"], r["kind"]) for r in await conn.fetch(
            "SELECT n, kind FROM gatehouse.saga_steps WHERE saga_id = $1::uuid AND status <> 'fenced'", saga_id))
    async with operations.owner_connection(project, "orders") as conn:
        orders = await conn.fetchval("SELECT count(*) FROM orders WHERE customer = $1", order["customer"])
        records.update((r["n"], r["kind"]) for r in await conn.fetch(
            "SELECT n, kind FROM gatehouse.saga_steps WHERE saga_id = $1::uuid AND status <> 'fenced'", saga_id))
    key = f"{saga_id}:2"
    return Effects(stock=stock, holds=holds, orders=orders, charges=int(key in payments.charges),
                   refunds=int(f"{key}:undo" in payments.refunds), charge_requests=payments.received[key],
                   step_records=records)


def assert_completed(seen: Effects, order: dict[str, object]) -> None:
    assert seen.stock == 10 - int(str(order["qty"])) and seen.holds == [False] and seen.orders == 1
    assert seen.charges == 1 and seen.refunds == 0
    assert seen.step_records == Counter({(1, "forward"): 1, (2, "forward"): 1, (3, "forward"): 1})


def assert_compensated(seen: Effects) -> None:
    assert seen.stock == 10 and seen.orders == 0
    assert seen.holds in ([], [True])  # never reserved, or reserved and released
    assert seen.refunds == seen.charges  # charged → refunded (once: the service applies a key once)
    for (n, kind), count in seen.step_records.items():
        assert count == 1, (n, kind)
    forward = {n for n, kind in seen.step_records if kind == "forward"}
    undone = {n for n, kind in seen.step_records if kind == "compensation"}
    assert undone == forward & {1, 2}  # every done step that has a compensation was compensated


async def test_happy_path(harness: LogicHarness, project: Project, payments: Payments) -> None:
    order = await new_order(project)
    run = await harness.run_saga("place_order", app="shop", data=order)
    assert run.state == "completed", run.error
    assert set(run.result) == {"order_id", "hold_id", "charge_id"} and run.result["charge_id"].startswith("ch_")
    seen = await effects(project, payments, run.id, order)
    assert_completed(seen, order)
    assert seen.charge_requests == 1
    async with operations.owner_connection(project, "catalog") as conn:  # every step is in the audit
        audited = await conn.fetch("SELECT method, target, app FROM gatehouse.audit_log WHERE request_id = $1",
                                   f"saga:{run.id}")
    assert [(r["method"], r["target"], r["app"]) for r in audited] == [("SAGA", "saga:place_order.reserve_stock",
                                                                        "shop")]
    async with operations.owner_connection(project, "orders") as conn:
        targets = sorted(r["target"] for r in await conn.fetch(
            "SELECT target FROM gatehouse.audit_log WHERE request_id = $1", f"saga:{run.id}"))
    assert targets == ["saga:place_order.charge_card", "saga:place_order.create_order"]


async def test_a_failing_last_step_is_compensated_in_reverse(harness: LogicHarness, project: Project,
                                                             payments: Payments) -> None:
    order = await new_order(project, customer="refused")
    order_of_undo: list[tuple[str, int]] = []
    engine = harness.saga_engine(hook=lambda point, _, n: order_of_undo.append((point, n))
                                 if point == "before_compensation" else None)
    run = await harness.run_saga("place_order", app="shop", data=order, engine=engine)
    assert run.state == "compensated"
    assert run.error == "step 3 (create_order) failed: this customer may not order"
    assert order_of_undo == [("before_compensation", 2), ("before_compensation", 1)]
    seen = await effects(project, payments, run.id, order)
    assert_compensated(seen)
    assert seen.holds == [True] and seen.charges == seen.refunds == 1


async def test_a_transient_failure_is_retried(harness: LogicHarness, project: Project, payments: Payments) -> None:
    order = await new_order(project, customer="flaky")
    payments.flaky.add(str(order["customer"]))
    run = await harness.run_saga("place_order", app="shop", data=order)
    assert (run.state, run.error) == ("completed", None)  # the 503 was told while it waited, not after
    seen = await effects(project, payments, run.id, order)
    assert_completed(seen, order)
    assert seen.charge_requests == 2  # the 503, then the charge
    async with operations.owner_connection(project, "orders") as conn:
        attempts = await conn.fetchval("SELECT attempts FROM gatehouse.saga_steps WHERE saga_id = $1::uuid "
                                       "AND n = 2", run.id)
    assert attempts == 2


async def test_out_of_stock_fails_at_once_and_undoes_nothing(harness: LogicHarness, project: Project,
                                                             payments: Payments) -> None:
    order = await new_order(project, qty=11)
    run = await harness.run_saga("place_order", app="shop", data=order)
    assert (run.state, run.error) == ("compensated", "step 1 (reserve_stock) failed: not enough "
                                                     f"{order['sku']} in stock")
    seen = await effects(project, payments, run.id, order)
    assert seen.stock == 10 and seen.holds == [] and not seen.step_records and seen.charge_requests == 0


FORWARD = [("before_step", 1), ("before_commit", 1), ("after_commit", 1), ("before_step", 2), ("after_call", 2),
           ("after_record", 2), ("before_step", 3), ("before_commit", 3), ("after_commit", 3), ("before_settle", 0)]
"""Every boundary a run that completes crosses: (point, step). Step 3 of a refused order fails before its commit."""
UNDO = [("after_fence", 3), ("before_compensation", 2), ("compensation_after_call", 2), ("after_compensation", 2),
        ("before_compensation", 1), ("compensation_before_commit", 1), ("after_compensation", 1)]
"""And those of its compensation (step 2's remote refund, then step 1's local release)."""
BOUNDARIES = [(False, point, n) for point, n in FORWARD] + [
    (True, point, n) for point, n in FORWARD[:7] + UNDO + [("before_settle", 0)]]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(boundary=st.sampled_from(BOUNDARIES))
async def test_a_crash_anywhere_resumes_to_exactly_once_or_fully_undone(
        harness: LogicHarness, project: Project, payments: Payments, boundary: tuple[bool, str, int]) -> None:
    """kill -9 at a boundary drawn from all of them (inside a step: after its effect, before its commit), then
    another instance takes the run over once the dead one's lease expires: the end state is exact."""
    refused, point, at = boundary
    order = await new_order(project, customer="refused" if refused else "bob")
    crashed: list[str] = []

    def crash(where: str, saga_id: str, n: int) -> None:
        if (where, n) == (point, at) and not crashed:
            crashed.append(where)
            raise Crash(where)

    dying = harness.saga_engine(lease_s=0.3, hook=crash)
    run = await dying.start("shop", "place_order", order)
    with contextlib.suppress(Crash):
        await harness.settle_saga(run.id, engine=dying, timeout_s=20)
    assert crashed, (point, at)  # every boundary drawn is one the run crosses
    survivor = harness.saga_engine(lease_s=5)  # another instance: takes the run once the dead one's lease expires
    final = await harness.settle_saga(run.id, engine=survivor, timeout_s=20)
    seen = await effects(project, payments, run.id, order)
    if refused:
        assert final.state == "compensated", (point, at, final.error)
        assert_compensated(seen)
    else:
        assert final.state == "completed", (point, at, final.error)
        assert_completed(seen, order)
    # a resend after a crash between the call and its record carries the same key, and the service applied it once
    assert seen.charge_requests <= 2 and seen.charges <= 1


async def test_two_runners_never_run_the_same_step(harness: LogicHarness, project: Project,
                                                   payments: Payments) -> None:
    orders = [await new_order(project, customer="refused" if i % 3 == 0 else "cat") for i in range(12)]
    first, second = harness.saga_engine(owner="a"), harness.saga_engine(owner="b")
    runs = [await first.start("shop", "place_order", order) for order in orders]

    async def drive(engine: object) -> None:
        assert hasattr(engine, "run_due")
        while True:
            states = {(await first.get(r.id)).state for r in runs}
            if states <= {"completed", "compensated"}:
                return
            if not await engine.run_due(limit=3):
                await asyncio.sleep(0.01)

    async with asyncio.timeout(40):
        await asyncio.gather(drive(first), drive(second))
    for run, order in zip(runs, orders, strict=True):
        seen = await effects(project, payments, run.id, order)
        if str(order["customer"]).startswith("refused"):
            assert_compensated(seen)
        else:
            assert_completed(seen, order)
        assert seen.charge_requests == 1  # sent by one runner only, once
        assert payments.received[f"{run.id}:2:undo"] == seen.refunds
    async with operations.owner_connection(project, "catalog") as conn:  # one audit row per local step run
        counts = await conn.fetch("SELECT request_id, target, count(*) FROM gatehouse.audit_log "
                                  "WHERE request_id LIKE 'saga:%' GROUP BY 1, 2 HAVING count(*) > 1")
    assert counts == []


async def test_idempotency_key(harness: LogicHarness, project: Project, payments: Payments) -> None:
    order = await new_order(project)
    first = await harness.sagas.start("shop", "place_order", order, idempotency_key="k-1")
    again = await harness.sagas.start("shop", "place_order", dict(order), idempotency_key="k-1")
    assert again.id == first.id
    with pytest.raises(IdempotencyKeyReused) as reused:
        await harness.sagas.start("shop", "place_order", {**order, "qty": 3}, idempotency_key="k-1")
    assert reused.value.status == 422
    done = await harness.settle_saga(first.id)
    assert done.state == "completed"
    assert (await harness.sagas.start("shop", "place_order", order, idempotency_key="k-1")).result == done.result
    other = await harness.sagas.start("shop", "place_order", order)  # no key: a new run every time
    assert other.id != first.id
    async with operations.owner_connection(project, "orders") as conn:
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.sagas WHERE idempotency_key = 'k-1'") == 1


async def test_a_non_deterministic_saga_is_stopped_with_a_clear_message(
        harness: LogicHarness, project: Project, payments: Payments, monkeypatch: pytest.MonkeyPatch) -> None:
    order = await new_order(project)

    def crash(where: str, saga_id: str, n: int) -> None:
        if where == "after_commit":
            raise Crash(where)

    dying = harness.saga_engine(lease_s=0.2, hook=crash)
    run = await dying.start("shop", "wobbly", order)
    with pytest.raises(Crash):
        await harness.settle_saga(run.id, engine=dying)
    monkeypatch.setenv("SAGA_TEST_WOBBLE", "1")  # the saga now takes another path on replay
    final = await harness.settle_saga(run.id, engine=harness.saga_engine())
    assert final.state == "failed" and final.failed_in == "running"
    assert final.error is not None and "step 1 was recorded as 'reserve_stock' but the saga now calls " \
        "'create_order'" in final.error
    seen = await effects(project, payments, run.id, order)
    assert seen.orders == 0 and seen.holds == [False]  # left as it was, for a person to look at
    monkeypatch.delenv("SAGA_TEST_WOBBLE")  # the code is fixed: retry goes on from where it stopped
    await harness.sagas.retry(run.id)
    fixed = await harness.settle_saga(run.id)
    assert fixed.state == "completed" and fixed.result == (await effects_hold_id(project, order))


async def effects_hold_id(project: Project, order: dict[str, object]) -> int:
    async with operations.owner_connection(project, "catalog") as conn:
        return int(await conn.fetchval("SELECT id FROM holds WHERE sku = $1", order["sku"]))


async def test_cancel_compensates_a_running_saga(harness: LogicHarness, project: Project,
                                                 payments: Payments) -> None:
    order = await new_order(project)

    def stop_after_charge(where: str, saga_id: str, n: int) -> None:
        if where == "after_record" and n == 2:
            raise Crash(where)

    dying = harness.saga_engine(lease_s=0.2, hook=stop_after_charge)
    run = await dying.start("shop", "place_order", order)
    with pytest.raises(Crash):
        await harness.settle_saga(run.id, engine=dying)
    cancelled = await harness.sagas.cancel(run.id)
    assert cancelled.state == "compensating"
    final = await harness.settle_saga(run.id)
    assert (final.state, final.error) == ("compensated", "cancelled")
    assert_compensated(await effects(project, payments, run.id, order))


async def test_a_cancel_while_a_runner_advances_the_run_is_never_overwritten(harness: LogicHarness, project: Project,
                                                                           payments: Payments) -> None:
    """The cancel lands while a runner is inside step 1 (from another thread and connection, as from the CLI of
    another machine): it takes the lease away, so that runner's later transitions write nothing; the run ends
    compensated with the error ``cancelled``, never ``completed``, and every recorded step with a compensation is
    undone once."""
    order = await new_order(project)
    cancelled: list[str] = []

    async def cancel(saga_id: str) -> None:
        async with operations.owner_connection(project, project.home_database) as conn:
            assert await store.reopen(conn, saga_id, state="compensating", error="cancelled",
                                      only_from=("running",)) is not None

    def cancel_meanwhile(where: str, saga_id: str, n: int) -> None:
        if where == "before_commit" and n == 1 and not cancelled:
            cancelled.append(saga_id)
            thread = threading.Thread(target=lambda: asyncio.run(cancel(saga_id)))
            thread.start()
            thread.join()

    engine = harness.saga_engine(lease_s=0.3, hook=cancel_meanwhile)
    run = await engine.start("shop", "place_order", order)
    final = await harness.settle_saga(run.id, engine=engine)
    assert cancelled == [run.id]
    assert (final.state, final.error) == ("compensated", "cancelled")
    seen = await effects(project, payments, run.id, order)
    assert seen.stock == 10 and seen.holds == [True] and seen.refunds == seen.charges
    for (n, kind), count in seen.step_records.items():
        assert count == 1, (n, kind)
    forward = {n for n, kind in seen.step_records if kind == "forward"}
    assert {n for n, kind in seen.step_records if kind == "compensation"} == forward & {1, 2}


async def test_a_runner_frozen_past_its_lease_cannot_record_a_step_once_compensation_began(
        harness: LogicHarness, project: Project, payments: Payments, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner stalls inside step 2 (its effect written, not committed) until its lease is long gone, without
    noticing: its renewal is stopped, as in a process frozen by the machine. Meanwhile the run is cancelled and
    another instance compensates it. When the stalled runner goes on, its lease check passes (it never learnt),
    but its record of step 2 meets the fence compensation put at that key: it writes nothing, its effect is rolled
    back and it stops. Without the fence, step 2 would commit after the compensation read the records, and its
    hold would stay, never undone."""
    order = await new_order(project)
    logic = harness.runtime.project.sagas.steps["slow_hold"].function.__globals__
    entered, release = logic["GATES"][order["sku"]] = (asyncio.Event(), asyncio.Event())
    stalled = harness.saga_engine(lease_s=0.3, owner="stalled")

    async def never_renews() -> None:
        await asyncio.Event().wait()
    monkeypatch.setattr(stalled, "_renew", never_renews)
    run = await stalled.start("shop", "held_twice", order)
    stalled_run = asyncio.create_task(stalled.run_due())
    async with asyncio.timeout(20):
        await entered.wait()
    await asyncio.sleep(0.5)  # its lease has expired
    other = harness.saga_engine(owner="other")
    await other.cancel(run.id)
    final = await harness.settle_saga(run.id, engine=other)
    assert (final.state, final.error) == ("compensated", "cancelled")
    release.set()
    async with asyncio.timeout(20):
        await stalled_run
    assert (await other.get(run.id)).state == "compensated"  # the stalled runner wrote nothing of the run
    seen = await effects(project, payments, run.id, order)
    assert seen.stock == 10 and seen.holds == [True]  # step 1's hold, released; step 2's rolled back
    assert seen.step_records == Counter({(1, "forward"): 1, (1, "compensation"): 1})  # (fences left out)
    async with operations.owner_connection(project, "catalog") as conn:
        assert await conn.fetchval("SELECT status FROM gatehouse.saga_steps WHERE saga_id = $1::uuid AND n = 2",
                                   run.id) == "fenced"
    listed = await harness.sagas.get(run.id)
    assert (listed.state, listed.error) == ("compensated", "cancelled")


async def test_apply_adds_the_columns_a_sagas_table_made_before_them_lacks(project: Project,
                                                                          payments: Payments) -> None:
    async with operations.owner_connection(project, project.home_database) as conn:
        await conn.execute("ALTER TABLE gatehouse.sagas DROP COLUMN subject, DROP COLUMN claims")
        await conn.execute("DROP INDEX gatehouse.sagas_failed_idx")
    reports = await operations.apply_all(project)
    assert [c for r in reports for c in r.changes if "saga" in c] == [
        "added column gatehouse.sagas.subject", "added column gatehouse.sagas.claims",
        "created index gatehouse.sagas_failed_idx"]
    async with LogicHarness(project) as harness:
        run = await harness.run_saga("place_order", app="shop", data=await new_order(project), claims={"sub": "u"})
    assert (run.state, run.subject) == ("completed", "u")


async def test_apply_again_leaves_the_saga_tables_as_they_are(project: Project) -> None:
    reports = await operations.apply_all(project)
    assert not [change for report in reports for change in report.changes if "saga" in change]
    for database in ("orders", "catalog"):
        async with operations.owner_connection(project, database) as conn:
            assert await conn.fetchval("SELECT to_regclass('gatehouse.saga_steps') IS NOT NULL")


async def test_the_server_runs_sagas_in_the_background(project: Project, payments: Payments,
                                                       serve_project: object) -> None:
    _, runtime = await serve_project(project)  # type: ignore[operator]
    assert runtime.sagas is not None
    order = await new_order(project)
    run = await runtime.sagas.start("shop", "place_order", order)
    async with asyncio.timeout(15):
        while not (run := await runtime.sagas.get(run.id)).finished:
            await asyncio.sleep(0.05)
    assert run.state == "completed", run.error
    assert_completed(await effects(project, payments, run.id, order), order)
