"""The demo's order placement (examples/shop/logic/checkout.py): a saga across the shop's three databases.

Stock is held in ``shop``, the customer charged in ``payments``, the order written in ``shop``. Every test
reads what the databases hold afterwards: the product's stock, the customer's balance, the charges and the
orders, and the step records. The tour's own curl commands run against ``gatehouse serve`` in
tests/test_cli.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.project import Project
from gatehouse.testing import LogicHarness
from test_sagas import Crash

APP = "checkout"
NO_USER = 5000
"""Customers from here on have a payment account (made by the test) but are not users of the shop: their
charge goes through and the order is refused (orders.user_id references users), so the charge is refunded."""


@pytest.fixture
async def shop(make_project: ProjectFactory) -> tuple[Project, dict[str, str]]:
    project = make_project(from_shop=True, services=True)
    return project, await prepare(project)


@dataclass(frozen=True)
class State:
    stock: int
    price: Decimal
    balance: Decimal | None
    charges: list[tuple[Decimal, str]]
    """(amount, status) of the customer's charges, oldest first."""
    orders: list[list[tuple[int, int, Decimal]]]
    """Per order of the customer placed by a saga (status paid, newest demo data excluded): its items."""


async def state(project: Project, customer: int, product: int) -> State:
    async with operations.owner_connection(project, "shop") as conn:
        row = await conn.fetchrow("SELECT stock, price FROM products WHERE id = $1", product)
        assert row is not None
        items = await conn.fetch(
            "SELECT o.id, i.product_id, i.quantity, i.unit_price FROM orders o JOIN order_items i ON i.order_id = o.id "
            "WHERE o.user_id = $1 AND o.id > 3000 ORDER BY o.id, i.product_id", customer)  # (3,000 demo orders)
    async with operations.owner_connection(project, "payments") as conn:
        balance = await conn.fetchval("SELECT balance FROM accounts WHERE customer_id = $1", customer)
        charges = await conn.fetch("SELECT amount, status FROM charges WHERE customer_id = $1 ORDER BY id", customer)
    by_order: dict[int, list[tuple[int, int, Decimal]]] = {}
    for item in items:
        by_order.setdefault(item["id"], []).append((item["product_id"], item["quantity"], item["unit_price"]))
    return State(row["stock"], row["price"], balance, [(c["amount"], c["status"]) for c in charges],
                 list(by_order.values()))


async def step_records(project: Project, saga_id: str) -> Counter[tuple[str, int, str]]:
    found: Counter[tuple[str, int, str]] = Counter()
    for database in ("shop", "payments"):
        async with operations.owner_connection(project, database) as conn:
            found.update((database, r["n"], r["kind"]) for r in await conn.fetch(
                "SELECT n, kind FROM gatehouse.saga_steps WHERE saga_id = $1::uuid AND status <> 'fenced'", saga_id))
    return found


def order(customer: int, product: int, quantity: int = 2) -> dict[str, Any]:
    return {"customer_id": customer, "items": [{"product_id": product, "quantity": quantity}]}


async def open_account(project: Project, customer: int, balance: int = 1000) -> None:
    async with operations.owner_connection(project, "payments") as conn:
        await conn.execute("INSERT INTO accounts VALUES ($1, $2)", customer, balance)


def assert_placed(before: State, after: State, quantity: int = 2) -> None:
    amount = before.price * quantity
    assert after.stock == before.stock - quantity
    assert before.balance is not None and after.balance == before.balance - amount
    assert after.charges == [*before.charges, (amount, "captured")]
    assert after.orders == [*before.orders, [(after.orders[-1][0][0], quantity, before.price)]]


def assert_undone(before: State, after: State) -> None:
    assert (after.stock, after.balance, after.orders) == (before.stock, before.balance, before.orders)
    assert all(status == "refunded" for _, status in after.charges[len(before.charges):])


async def test_an_order_is_placed_across_the_services_or_undone_over_http(
        shop: tuple[Project, dict[str, str]], serve_project: Any) -> None:
    project, keys = shop
    client, _ = await serve_project(project)
    headers = {"apikey": keys[APP], "Prefer": "wait=20"}

    before = await state(project, 3, 5)
    placed = await client.post("/sagas/place_order", json=order(3, 5), headers={**headers, "Idempotency-Key": "o-1"})
    assert placed.status_code == 200, placed.text
    run = placed.json()
    assert run["state"] == "completed" and run["steps_done"] == 3, run
    after = await state(project, 3, 5)
    assert_placed(before, after)
    assert Decimal(run["result"]["amount"]) == before.price * 2
    assert await step_records(project, run["id"]) == Counter(
        {("shop", 1, "forward"): 1, ("payments", 2, "forward"): 1, ("shop", 3, "forward"): 1})
    # the same key again: the same run, no second order or charge
    again = await client.post("/sagas/place_order", json=order(3, 5), headers={**headers, "Idempotency-Key": "o-1"})
    assert again.json()["id"] == run["id"] and await state(project, 3, 5) == after

    # customer 10 has nothing to spend: declined at the charge, the stock put back
    before = await state(project, 10, 5)
    assert before.balance == 0
    declined = (await client.post("/sagas/place_order", json=order(10, 5), headers=headers)).json()
    assert declined["state"] == "compensated" and (declined["steps_done"], declined["steps_undone"]) == (1, 1)
    assert declined["error"] == (f"step 2 (charge) failed: payment declined: customer 10's balance does not "
                                 f"cover {before.price * 2}")
    assert await state(project, 10, 5) == before

    # charged, then the order is refused (not a customer of the shop): refunded and put back
    await open_account(project, NO_USER)
    before = await state(project, NO_USER, 5)
    refused = (await client.post("/sagas/place_order", json=order(NO_USER, 5), headers=headers)).json()
    assert refused["state"] == "compensated" and (refused["steps_done"], refused["steps_undone"]) == (2, 2), refused
    after = await state(project, NO_USER, 5)
    assert_undone(before, after)
    assert after.charges == [(before.price * 2, "refunded")]

    # more than the stock: refused at the first step, nothing to undo; an unknown product likewise
    for items, message in (([{"product_id": 5, "quantity": 100}], "the stock of product 5: "),
                           ([{"product_id": 999999, "quantity": 1}], "there is no product 999999")):
        before = await state(project, 4, 5)
        short = (await client.post("/sagas/place_order", json={"customer_id": 4, "items": items},
                                   headers=headers)).json()
        assert short["state"] == "compensated" and short["steps_done"] == 0, short
        assert short["error"].startswith(f"step 1 (reserve_stock) failed: {message}"), short
        assert await state(project, 4, 5) == before

    # input that is not an order: 400 naming the field, and no run
    bad = await client.post("/sagas/place_order", json={"customer_id": 4, "items": []}, headers=headers)
    assert bad.status_code == 400 and "items" in bad.text
    # the other apps may not place orders: as if the saga did not exist
    assert (await client.post("/sagas/place_order", json=order(3, 5),
                              headers={"apikey": keys["mobile"]})).status_code == 404


FORWARD = [(point, n) for n in (1, 2, 3) for point in ("before_step", "before_commit", "after_commit")]
UNDO = [("after_fence", 3)] + [(point, n) for n in (2, 1) for point in (
    "before_compensation", "compensation_before_commit", "after_compensation")]
BOUNDARIES = ([(False, point, n) for point, n in [*FORWARD, ("before_settle", 0)]]
              + [(True, point, n) for point, n in [*FORWARD[:7], *UNDO, ("before_settle", 0)]])
"""Every boundary a placed order crosses, and every one of an order refused at step 3 (its insert fails before
step 3's commit) and undone: (refused, point, step)."""
_customers, _products = itertools.count(NO_USER + 1), itertools.count(100)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(boundary=st.sampled_from(BOUNDARIES))
async def test_a_crash_at_any_boundary_ends_placed_exactly_once_or_fully_undone(
        shop: tuple[Project, dict[str, str]], boundary: tuple[bool, str, int]) -> None:
    project, _ = shop
    refused, point, at = boundary
    product = next(_products)
    customer = next(_customers) if refused else 1 + product % 9  # (9 customers with money: 1..9)
    if refused:
        await open_account(project, customer)
    else:  # enough for this order whatever the earlier examples charged (a balance of 500 covers one or two)
        async with operations.owner_connection(project, "payments") as conn:
            await conn.execute("UPDATE accounts SET balance = greatest(balance, 1000) WHERE customer_id = $1",
                               customer)
    before = await state(project, customer, product)
    crashed: list[str] = []

    def crash(where: str, saga_id: str, n: int) -> None:
        if (where, n) == (point, at) and not crashed:
            crashed.append(where)
            raise Crash(where)

    async with LogicHarness(project) as harness:
        dying = harness.saga_engine(lease_s=0.3, hook=crash)
        run = await dying.start(APP, "place_order", order(customer, product))
        with contextlib.suppress(Crash):
            await harness.settle_saga(run.id, engine=dying, timeout_s=20)
        assert crashed, (point, at)
        final = await harness.settle_saga(run.id, engine=harness.saga_engine(lease_s=5), timeout_s=20)
    after = await state(project, customer, product)
    records = await step_records(project, run.id)
    assert all(count == 1 for count in records.values()), records  # no step and no compensation twice
    if refused:
        assert final.state == "compensated", (point, at, final.error)
        assert_undone(before, after)
        assert after.charges == [(before.price * 2, "refunded")]
        assert {(n, kind) for _, n, kind in records} == {(1, "forward"), (2, "forward"), (1, "compensation"),
                                                         (2, "compensation")}
    else:
        assert final.state == "completed", (point, at, final.error)
        assert_placed(before, after)


async def test_concurrent_orders_of_one_product_never_oversell(shop: tuple[Project, dict[str, str]]) -> None:
    """Twelve orders of 3 against a stock of 20, run by two instances at once: six are placed, the others are
    refused for want of stock, and the stock ends at 2: the compare-and-set of the steps loses no update."""
    project, _ = shop
    async with operations.owner_connection(project, "shop") as conn:
        await conn.execute("UPDATE products SET stock = 20 WHERE id = 42")
    customers = [c for c in range(21, 60) if c % 10][:12]
    async with LogicHarness(project) as harness:
        first, second = harness.saga_engine(owner="a"), harness.saga_engine(owner="b")
        runs = [await first.start(APP, "place_order", order(c, 42, quantity=3)) for c in customers]

        async def drive(engine: Any) -> None:
            while {(await first.get(r.id)).state for r in runs} - {"completed", "compensated"}:
                if not await engine.run_due(limit=4):
                    await asyncio.sleep(0.01)

        async with asyncio.timeout(60):
            await asyncio.gather(drive(first), drive(second))
        finals = [await first.get(r.id) for r in runs]
    states = Counter(f.state for f in finals)
    assert states == Counter({"completed": 6, "compensated": 6}), [(f.state, f.error) for f in finals]
    assert all("the stock of product 42: " in (f.error or "") for f in finals if f.state == "compensated")
    async with operations.owner_connection(project, "shop") as conn:
        assert await conn.fetchval("SELECT stock FROM products WHERE id = 42") == 2
        assert await conn.fetchval("SELECT sum(quantity) FROM order_items WHERE product_id = 42 AND order_id > 3000") == 18
    async with operations.owner_connection(project, "payments") as conn:
        assert await conn.fetchval("SELECT count(*) FROM charges WHERE status = 'captured'") == 6

