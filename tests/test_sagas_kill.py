"""Sagas on real ``gatehouse serve`` processes: through a ``kill -9`` (the process dies with sagas in flight, steps
inside their transactions, remote calls waiting for an answer; its connections drop, and PostgreSQL rolls back what
it had not committed; a second server takes the runs over once their leases expire and finishes every one), and
two servers at once sharing the runs. Each order is placed exactly once or fully undone, which the databases and
the payment service show.

The order placement is tests/test_sagas.py's (two databases and a payment service over HTTP, slowed down here so
that sagas are caught half-way).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import httpx
import pytest

from conftest import ProjectFactory
from gatehouse import operations
from gatehouse.project import Project
from served import serve_instance, stop_instance
from test_sagas import (
    Payments,
    assert_compensated,
    assert_completed,
    effects,
    new_order,
    payment_service,
    saga_project,
)

TOML = """
[project]
name = "sagaskill"

[databases.orders]

[databases.catalog]

[server]
saga_lease_s = 1

[apps.shop]
sagas = ["place_order"]
grants = [
  { contract = "stock", actions = ["read", "update"] },
  { contract = "holds", actions = ["read", "insert", "update"] },
  { contract = "orders", actions = ["read", "insert"] },
]
"""
ORDERS = 16


@pytest.fixture
async def payments(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Payments]:
    async with payment_service(monkeypatch, delay_s=0.3) as service:  # (the served process inherits its URL)
        yield service


async def placed_once_or_undone(project: Project, payments: Payments, ids: list[str], orders: list[dict[str, object]],
                                *, requests: tuple[int, int]) -> None:
    """Each order placed exactly once, or (a refused customer's) fully undone; its charge requested between
    ``requests[0]`` and ``requests[1]`` times."""
    for saga_id, order in zip(ids, orders, strict=True):
        seen = await effects(project, payments, saga_id, order)
        if str(order["customer"]).startswith("refused"):
            assert_compensated(seen)
        else:
            assert_completed(seen, order)
        assert requests[0] <= seen.charge_requests <= requests[1], (saga_id, seen.charge_requests)


async def states(project: Project, ids: list[str]) -> dict[str, str]:
    async with operations.owner_connection(project, project.home_database) as conn:
        rows = await conn.fetch("SELECT id::text, state FROM gatehouse.sagas WHERE id = ANY($1::uuid[])", ids)
    return {r["id"]: r["state"] for r in rows}


async def test_kill_9_mid_flight_then_another_server_finishes_every_saga_exactly_once(
        make_project: ProjectFactory, payments: Payments) -> None:
    project = await saga_project(make_project, TOML)
    keys = {app: (await operations.create_key(project, app)).secret_key for app in project.apps}
    orders = [await new_order(project, customer="refused" if i % 4 == 0 else "kim") for i in range(ORDERS)]
    first = await serve_instance(project.root)
    ids = []
    try:
        async with httpx.AsyncClient(base_url=first.base, headers={"apikey": keys["shop"]}) as client:
            for order in orders:
                started = await client.post("/sagas/place_order", json=order)
                assert started.status_code == 202, started.text
                ids.append(started.json()["id"])
        async with asyncio.timeout(30):  # the first charges are on their way: sagas are half-way
            while sum(payments.received.values()) < 3:
                await asyncio.sleep(0.01)
    finally:
        killed = await stop_instance(first, kill=True)
    assert killed == -signal.SIGKILL
    caught = await states(project, ids)
    assert sum(state == "running" for state in caught.values()) >= ORDERS // 2, caught  # many were in flight

    second = await serve_instance(project.root)
    try:
        async with asyncio.timeout(90):
            while set((await states(project, ids)).values()) - {"completed", "compensated"}:
                await asyncio.sleep(0.1)
    finally:
        await stop_instance(second)
    await placed_once_or_undone(project, payments, ids, orders, requests=(1, 2))  # (a resend: the same key)


def _finished(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("gatehouse_sagas_finished_total{"))


async def test_two_servers_at_once_share_the_runs_and_never_run_a_step_twice(
        make_project: ProjectFactory, payments: Payments) -> None:
    """Two ``gatehouse serve`` processes of one project run at the same time, each started half of the sagas:
    both take runs (their metrics say how many each finished), and every step ran once in all."""
    project = await saga_project(make_project, TOML)
    keys = {app: (await operations.create_key(project, app)).secret_key for app in project.apps}
    payments.delay_s = 0.05
    orders = [await new_order(project, customer="refused" if i % 4 == 0 else "lee") for i in range(ORDERS)]
    servers = [await serve_instance(project.root), await serve_instance(project.root)]
    try:
        async with httpx.AsyncClient(headers={"apikey": keys["shop"]}) as client:
            ids = []
            for i, order in enumerate(orders):
                started = await client.post(f"{servers[i % 2].base}/sagas/place_order", json=order)
                assert started.status_code == 202, started.text
                ids.append(started.json()["id"])
            async with asyncio.timeout(90):
                while set((await states(project, ids)).values()) - {"completed", "compensated"}:
                    await asyncio.sleep(0.1)
            finished = [_finished((await client.get(f"{s.admin}/metrics")).text) for s in servers]
    finally:
        for server in servers:
            await stop_instance(server)
    assert sum(finished) == ORDERS and all(count > 0 for count in finished), finished  # both took runs
    await placed_once_or_undone(project, payments, ids, orders, requests=(1, 1))  # sent by one server, once
