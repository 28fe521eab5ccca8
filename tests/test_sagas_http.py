"""Sagas over HTTP (src/gatehouse/endpoints/sagas.py): ``POST /sagas/<name>`` and ``GET /sagas/<name>/<id>`` on
the in-process server, with the order placement of tests/test_sagas.py (two databases and a payment service).
Every test looks at what the databases (saga rows, stock, orders, audit) and the payment service hold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.errors import ProjectError
from gatehouse.project import Project
from test_sagas import (
    CONTRACTS,
    LOGIC,
    MIGRATIONS,
    Payments,
    assert_compensated,
    assert_completed,
    effects,
    new_order,
    payment_service,
)

TOML = """
[project]
name = "sagashttp"

[databases.orders]

[databases.catalog]

[apps.shop]
sagas = ["place_order"]
grants = [
  { contract = "stock", actions = ["read", "update"] },
  { contract = "holds", actions = ["read", "insert", "update"] },
  { contract = "orders", actions = ["read", "insert"] },
]

[apps.clerk]
sagas = ["place_order"]
grants = [{ contract = "stock", actions = ["read"] }]

[apps.guest]
grants = [{ contract = "stock", actions = ["read"] }]
"""
MISSING = "6f1c1f1e-0000-4000-8000-000000000000"
Served = tuple[Project, httpx.AsyncClient, dict[str, dict[str, str]], Payments]


@pytest.fixture
async def service(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Payments]:
    """tests/test_sagas.py's payment service (it applies each idempotency key once and counts requests)."""
    async with payment_service(monkeypatch) as payments:
        yield payments


@pytest.fixture
async def served(make_project: ProjectFactory, serve_project: Any, service: Payments) -> Served:
    project = make_project(toml=TOML, migrations=MIGRATIONS, contracts=CONTRACTS, files={"logic/orders.py": LOGIC})
    keys = await prepare(project)
    client, _ = await serve_project(project)
    return project, client, {app: {"apikey": key} for app, key in keys.items()}, service


async def saga_rows(project: Project) -> list[dict[str, Any]]:
    async with operations.owner_connection(project, "orders") as conn:  # the home database
        rows = await conn.fetch("SELECT id::text, app, idempotency_key, state, input FROM gatehouse.sagas "
                                "ORDER BY created_at")
    return [dict(r) for r in rows]


Audited = tuple[str, str, str, int]


async def audited(project: Project, *expected: Audited) -> list[Audited]:
    """The audit's rows (app, method, target, status) of saga requests, once every one ``expected`` is there
    (the writer sends them in batches, after the answers)."""
    async with asyncio.timeout(10), operations.owner_connection(project, "orders") as conn:
        while True:
            rows = [(r["app"], r["method"], r["target"], r["status"]) for r in await conn.fetch(
                "SELECT app, method, target, status FROM gatehouse.audit_log "
                "WHERE target LIKE 'saga:%' AND request_id NOT LIKE 'saga:%' ORDER BY at")]
            if all(row in rows for row in expected):
                return rows
            await asyncio.sleep(0.05)


async def follow(client: httpx.AsyncClient, location: str, headers: dict[str, str]) -> dict[str, Any]:
    async with asyncio.timeout(20):
        while True:
            answer = await client.get(location, headers=headers)
            assert answer.status_code in (200, 202), answer.text
            if answer.status_code == 200:
                body: dict[str, Any] = answer.json()
                return body
            await asyncio.sleep(0.05)


async def test_start_answers_202_with_a_location_to_poll_until_completed(served: Served) -> None:
    project, client, keys, payments = served
    order = await new_order(project)
    started = await client.post("/sagas/place_order", json=order, headers=keys["shop"])
    assert started.status_code == 202, started.text
    body = started.json()
    assert set(body) >= {"id", "name", "state", "steps_done", "steps_undone", "created_at"}
    assert (body["name"], started.headers["location"]) == ("place_order", f"/sagas/place_order/{body['id']}")
    assert body["state"] == "running" and "result" not in body and "error" not in body  # as inserted
    done = await follow(client, started.headers["location"], keys["shop"])
    assert (done["id"], done["state"], done["steps_done"], done["steps_undone"]) == (body["id"], "completed", 3, 0)
    assert "error" not in done
    async with operations.owner_connection(project, "orders") as conn:
        order_id = await conn.fetchval("SELECT id FROM orders WHERE customer = $1", order["customer"])
    assert done["result"]["order_id"] == order_id and done["result"]["charge_id"].startswith("ch_")
    assert_completed(await effects(project, payments, body["id"], order), order)
    [row] = await saga_rows(project)
    assert (row["id"], row["app"], row["idempotency_key"], row["state"]) == (body["id"], "shop", None, "completed")
    rows = await audited(project, ("shop", "GET", "saga:place_order", 200))  # as the app, the saga as target
    assert rows[0] == ("shop", "POST", "saga:place_order", 202)


async def test_prefer_wait_answers_the_result(served: Served) -> None:
    project, client, keys, payments = served
    order = await new_order(project)
    answer = await client.post("/sagas/place_order", json=order, headers={**keys["shop"], "Prefer": "wait=20"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["preference-applied"] == "wait=20"
    body = answer.json()
    assert body["state"] == "completed" and answer.headers["location"] == f"/sagas/place_order/{body['id']}"
    assert_completed(await effects(project, payments, body["id"], order), order)
    assert body["result"]["charge_id"] == payments.charges[f"{body['id']}:2"]["id"]
    capped = await client.post("/sagas/place_order", json=await new_order(project),
                               headers={**keys["shop"], "Prefer": "respond-async, wait=999"})
    assert capped.status_code == 200 and capped.headers["preference-applied"] == "wait=30"  # [server] bound


async def test_the_same_key_and_body_is_the_same_run_and_another_body_is_422(served: Served) -> None:
    project, client, keys, payments = served
    order = await new_order(project)
    keyed = {**keys["shop"], "Idempotency-Key": "order-7781"}
    first = await client.post("/sagas/place_order", json=order, headers=keyed)
    assert first.status_code == 202
    again = await client.post("/sagas/place_order", json=dict(reversed(order.items())),
                              headers={**keyed, "Prefer": "wait=20"})  # the same input, keys in another order
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    replay = await client.post("/sagas/place_order", json=order, headers=keyed)
    assert replay.status_code == 200 and replay.json() == again.json()  # finished: the same result, at once
    before = await saga_rows(project)
    stock = (await effects(project, payments, first.json()["id"], order)).stock
    other = await client.post("/sagas/place_order", json={**order, "qty": 3}, headers=keyed)
    assert other.status_code == 422
    assert other.json() == {"code": "GH423", "message": "This Idempotency-Key was already used for a different "
                            "request", "details": None, "hint": "Send a new key for a new request; repeat a key "
                            "only with the same saga and input."}
    assert await saga_rows(project) == before  # nothing new started
    seen = await effects(project, payments, first.json()["id"], order)
    assert_completed(seen, order)
    assert seen.stock == stock and seen.charge_requests == 1  # one run, one set of effects
    assert [(r["app"], r["idempotency_key"]) for r in before] == [("shop", "order-7781")]
    clerk = await client.post("/sagas/place_order", json=order, headers={**keys["clerk"],
                                                                        "Idempotency-Key": "order-7781"})
    assert clerk.status_code == 202 and clerk.json()["id"] != first.json()["id"]  # keys are per app
    for bad in (b"", b"x" * 256, b"two words", "caf\u00e9".encode()):
        refused = await client.post("/sagas/place_order", json=order,
                                    headers=[(b"apikey", keys["shop"]["apikey"].encode()), (b"Idempotency-Key", bad)])
        assert (refused.status_code, refused.json()["code"]) == (400, "GH400"), bad
    assert len(await saga_rows(project)) == 2


async def test_not_granted_or_unknown_is_404_and_bad_input_400_with_no_run(served: Served) -> None:
    project, client, keys, _ = served
    order = await new_order(project)
    ungranted = await client.post("/sagas/place_order", json=order, headers=keys["guest"])
    unknown = await client.post("/sagas/no_such_saga", json=order, headers=keys["shop"])
    assert ungranted.status_code == unknown.status_code == 404
    assert {k: v for k, v in ungranted.json().items() if k != "message"} == \
        {k: v for k, v in unknown.json().items() if k != "message"}
    assert ungranted.json()["message"] == "Could not find the saga 'place_order'"
    assert (await client.post("/sagas/place_order", json=order)).status_code == 401
    assert (await client.get("/sagas/place_order", headers=keys["shop"])).status_code == 405
    for body in (b"", b"{not json", b'{"customer": "ann"}', b'{"customer": "a", "sku": "b", "qty": "many", '
                 b'"amount": 1}', b"[1, 2]"):
        refused = await client.post("/sagas/place_order", content=body, headers=keys["shop"])
        assert refused.status_code == 400, (body, refused.text)
        assert refused.json()["code"] == "PGRST102" and "Traceback" not in refused.text
    missing = await client.post("/sagas/place_order", content=b'{"customer": "ann"}', headers=keys["shop"])
    assert "sku: Field required" in missing.json()["details"]
    assert await saga_rows(project) == []
    async with operations.owner_connection(project, "catalog") as conn:
        assert await conn.fetchval("SELECT qty FROM stock WHERE sku = $1", order["sku"]) == 10
    openapi = (await client.get("/", headers=keys["shop"])).json()
    OpenAPIV31SpecValidator(openapi).validate()  # the models' $refs resolve from the document's root
    operation = openapi["paths"]["/sagas/place_order"]["post"]
    assert set(operation["requestBody"]["content"]["application/json"]["schema"]["properties"]) == \
        {"customer", "sku", "qty", "amount"}
    assert {"200", "202", "422"} <= set(operation["responses"])
    assert "get" in openapi["paths"]["/sagas/place_order/{id}"]
    assert not any(path.startswith("/sagas/") for path in (await client.get("/", headers=keys["guest"])).json()["paths"])


async def test_only_the_app_that_started_a_run_sees_it(served: Served) -> None:
    project, client, keys, _ = served
    started = await client.post("/sagas/place_order", json=await new_order(project),
                                headers={**keys["shop"], "Prefer": "wait=20"})
    run_id = started.json()["id"]
    own = await client.get(f"/sagas/place_order/{run_id}", headers=keys["shop"])
    assert own.status_code == 200 and own.json() == started.json()
    other = await client.get(f"/sagas/place_order/{run_id}", headers=keys["clerk"])  # granted the saga, not the run
    nobody = await client.get(f"/sagas/place_order/{MISSING}", headers=keys["shop"])
    assert other.status_code == nobody.status_code == 404 and other.json()["code"] == nobody.json()["code"]
    assert (await client.get("/sagas/place_order/not-a-uuid", headers=keys["shop"])).status_code == 404
    assert (await client.get(f"/sagas/wobbly/{run_id}", headers=keys["shop"])).status_code == 404  # another name
    assert (await client.get(f"/sagas/place_order/{run_id}", headers=keys["guest"])).status_code == 404
    assert other.json() == {**nobody.json(), "message": nobody.json()["message"].replace(MISSING, run_id)}
    rows = await audited(project, ("shop", "GET", "saga:place_order", 200))  # a refused read names no saga
    assert rows == [("shop", "POST", "saga:place_order", 200), ("shop", "GET", "saga:place_order", 200)]


async def test_a_compensated_saga_shows_its_state_and_message(served: Served) -> None:
    project, client, keys, payments = served
    order = await new_order(project, customer="refused")
    answer = await client.post("/sagas/place_order", json=order, headers={**keys["shop"], "Prefer": "wait=20"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["state"], body["error"], body["steps_done"], body["steps_undone"]) == (
        "compensated", "step 3 (create_order) failed: this customer may not order", 2, 2)
    assert "result" not in body
    assert (await client.get(answer.headers["location"], headers=keys["shop"])).json() == body
    seen = await effects(project, payments, body["id"], order)
    assert_compensated(seen)
    assert seen.holds == [True] and seen.charges == seen.refunds == 1
    [row] = await saga_rows(project)
    assert row["state"] == "compensated"


def test_granting_an_unknown_saga_is_a_project_error(make_project: ProjectFactory) -> None:
    with pytest.raises(ProjectError) as refused:
        make_project(toml=TOML.replace('sagas = ["place_order"]\ngrants = [{ contract = "stock"',
                                       'sagas = ["place_ordr"]\ngrants = [{ contract = "stock"'),
                     migrations=MIGRATIONS, contracts=CONTRACTS, files={"logic/orders.py": LOGIC})
    assert "apps.clerk.sagas: 'place_ordr' is not declared by any logic/*.py" in str(refused.value)
    assert "place_order, wobbly" in str(refused.value.hint)
