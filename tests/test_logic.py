"""Business logic in Python: the demo's pricing rule, served as /rpc, tested without a server; and the promise
that a function acts only as its app and that one which raises writes nothing."""

from __future__ import annotations

from decimal import Decimal

import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.errors import ApiError
from gatehouse.project import Project
from gatehouse.testing import LogicHarness

SUBTOTALS = """
SELECT o.id, u.tier, sum(i.quantity * i.unit_price) AS subtotal
FROM orders o JOIN users u ON u.id = o.user_id JOIN order_items i ON i.order_id = o.id
GROUP BY o.id, u.tier ORDER BY o.id
"""


async def _orders(shop: Project) -> list[tuple[int, str, Decimal]]:
    async with operations.owner_connection(shop) as conn:
        return [(r["id"], r["tier"], r["subtotal"]) for r in await conn.fetch(SUBTOTALS)]


async def test_pricing_rule_without_a_server(shop: Project) -> None:
    await prepare(shop)
    orders = await _orders(shop)
    premium = next(o for o in orders if o[1] == "premium")
    large = next(o for o in orders if o[1] == "standard" and o[2] > 100)
    small = next(o for o in orders if o[1] == "standard" and o[2] <= 100)
    async with LogicHarness(shop) as harness:
        for (order_id, _, subtotal), percent in ((premium, 15), (large, 10), (small, 0)):
            result = await harness.call("order_total", app="analytics", order_id=order_id)
            assert result.discount_percent == percent
            assert result.subtotal == subtotal
            assert result.total == (subtotal * (100 - percent) / 100).quantize(Decimal("0.01"))
        with pytest.raises(ApiError) as missing:
            await harness.call("order_total", app="analytics", order_id=10**9)
        assert missing.value.status == 404


async def test_pricing_rule_over_http(shop: Project, serve_project: object) -> None:
    keys = await prepare(shop)
    client, _ = await serve_project(shop)  # type: ignore[operator]
    analytics = {"apikey": keys["analytics"]}
    posted = await client.post("/rpc/order_total", json={"order_id": 1}, headers=analytics)
    assert posted.status_code == 200, posted.text
    assert set(posted.json()) == {"order_id", "tier", "subtotal", "discount_percent", "total"}
    got = await client.get("/rpc/order_total?order_id=1", headers=analytics)  # read-only: GET works too
    assert got.json() == posted.json()
    # A value of the wrong type is the function's 400; argument names that no function takes find none (as in
    # PostgREST: 404, hinting the parameters)
    for body, status, code in [({"order_id": "seven"}, 400, "PGRST102"), ({}, 404, "PGRST202"),
                               ({"order_id": 1, "extra": 2}, 404, "PGRST202")]:
        response = await client.post("/rpc/order_total", json=body, headers=analytics)
        assert (response.status_code, response.json()["code"]) == (status, code), body
        if "extra" in body:  # (no hint for no arguments at all: "()" is too far from "(order_id)", as in PostgREST)
            assert response.json()["hint"] == "Perhaps you meant to call the function public.order_total(order_id)"
    not_granted = await client.post("/rpc/order_total", json={"order_id": 1}, headers={"apikey": keys["web"]})
    assert not_granted.status_code == 404 and not_granted.json()["code"] == "PGRST202"


TOML = """
[project]
name = "logic"

[databases.main]

[apps.clerk]
functions = ["transfer", "peek", "sneak"]
grants = [{ contract = "accounts", actions = ["read", "update"], filter = "owner=eq.{claims.sub}" }]
"""
MIGRATION = """
CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL CHECK (balance >= 0));
CREATE TABLE audit_secrets (id int);
INSERT INTO accounts VALUES (1, 'ann', 100), (2, 'ann', 0), (3, 'bob', 50);
"""
LOGIC = '''
import gatehouse
from gatehouse.logic.context import Context, LogicError


@gatehouse.rpc
async def transfer(ctx: Context, source: int, target: int, amount: float) -> dict[str, float]:
    """Move money between two of the caller's accounts."""
    src = await ctx.one("accounts", id=source)
    dst = await ctx.one("accounts", id=target)
    if src is None or dst is None:
        raise LogicError("unknown account", status=404)
    await ctx.update("accounts", {"balance": src["balance"] - amount}, id=source)
    if amount > 50:
        raise RuntimeError("limit exceeded after the first write")
    await ctx.update("accounts", {"balance": dst["balance"] + amount}, id=target)
    return {"source": src["balance"] - amount, "target": dst["balance"] + amount}


@gatehouse.rpc(read_only=True)
async def peek(ctx: Context) -> list[dict[str, object]]:
    return await ctx.read("accounts", "order=id")


@gatehouse.rpc
async def sneak(ctx: Context) -> None:
    await ctx.read("audit_secrets")
'''


@pytest.fixture
async def bank(make_project: ProjectFactory) -> Project:
    project = make_project(toml=TOML, migrations={"V001__a.sql": MIGRATION}, files={"logic/bank.py": LOGIC},
                           contracts={"accounts.v1.sql": "SELECT id, owner, balance FROM accounts"})
    await prepare(project)
    return project


async def _balances(project: Project) -> dict[int, Decimal]:
    async with operations.owner_connection(project) as conn:
        return {r["id"]: r["balance"] for r in await conn.fetch("SELECT id, balance FROM accounts")}


async def test_a_function_that_raises_writes_nothing(bank: Project) -> None:
    before = await _balances(bank)
    async with LogicHarness(bank) as harness:
        with pytest.raises(ApiError) as failed:
            await harness.call("transfer", app="clerk", claims={"sub": "ann"}, source=1, target=2, amount=60)
        assert failed.value.status == 500 and "Nothing was written" in str(failed.value.hint)
        assert await _balances(bank) == before
        done = await harness.call("transfer", app="clerk", claims={"sub": "ann"}, source=1, target=2, amount=30)
        assert done == {"source": 70.0, "target": 30.0}
    assert (await _balances(bank))[1] == 70


async def test_a_function_acts_only_as_its_app_and_user(bank: Project) -> None:
    async with LogicHarness(bank) as harness:
        mine = await harness.call("peek", app="clerk", claims={"sub": "ann"})
        assert [a["id"] for a in mine] == [1, 2]  # the row filter applies inside logic too
        with pytest.raises(ApiError) as hidden:  # bob's account does not exist for ann
            await harness.call("transfer", app="clerk", claims={"sub": "ann"}, source=1, target=3, amount=1)
        assert hidden.value.status == 404
        with pytest.raises(ApiError) as table:  # a table is not a contract
            await harness.call("sneak", app="clerk", claims={"sub": "ann"})
        assert table.value.status == 404
    assert (await _balances(bank))[3] == 50


async def test_functions_are_in_the_callers_openapi_document(shop: Project, serve_project: object) -> None:
    keys = await prepare(shop)
    client, _ = await serve_project(shop)  # type: ignore[operator]
    document = (await client.get("/", headers={"apikey": keys["analytics"]})).json()
    item = document["paths"]["/rpc/order_total"]
    assert item["post"]["requestBody"]["content"]["application/json"]["schema"]["required"] == ["order_id"]
    assert "get" in item  # read-only: GET documented too
    assert set(item["post"]["responses"]["200"]["content"]["application/json"]["schema"]["properties"]) == {
        "order_id", "tier", "subtotal", "discount_percent", "total"}
    web = (await client.get("/", headers={"apikey": keys["web"]})).json()
    assert "/rpc/order_total" not in web["paths"]  # not granted: not there
