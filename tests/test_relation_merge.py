"""Identical relations are one relation, and `check` flags every embed that is ambiguous in a served version.

The scenario of a table split: a `[[relations]]` entry declared while no foreign key could say it, then the
key added by a migration. Both say the same thing, so embedding answers 200, not PostgREST's 300; two
*different* keys to the same table do make the embed ambiguous, and `check` says so before an app finds out.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.check import Finding, run_check
from gatehouse.contracts.lineage import column_sources
from gatehouse.contracts.lockfile import read_lock, update_lock, write_lock
from gatehouse.contracts.model import ContractVersion
from gatehouse.contracts.relations import DeclaredRelation, Relation, build_relations
from gatehouse.contracts.signature import project_signatures
from gatehouse.db.catalog import Constraint
from gatehouse.project import Project, load_project

# --- merging, without a database ------------------------------------------------------------------------


def _contract(name: str, sql: str) -> ContractVersion:
    return ContractVersion(name, 1, "main", sql, (), "", Path(f"contracts/{name}.v1.sql"))


ORDERS = _contract("orders", "SELECT id, customer_id FROM orders")
CUSTOMERS = _contract("customers", "SELECT id, name FROM customers")
LINEAGES = {c.label: column_sources(c.sql) for c in (ORDERS, CUSTOMERS)}
PRIMARY = [Constraint("customers_pkey", "p", "public", "customers", ("id",), None, None, ()),
           Constraint("orders_pkey", "p", "public", "orders", ("id",), None, None, ())]


def _fk(name: str, column: str = "customer_id") -> Constraint:
    return Constraint(name, "f", "public", "orders", (column,), "public", "customers", ("id",))


DECLARED = [DeclaredRelation("orders", "customer_id", "customers", "id")]


def test_a_declared_relation_repeating_a_foreign_key_is_one_relation() -> None:
    relations = build_relations([ORDERS, CUSTOMERS], LINEAGES, [*PRIMARY, _fk("orders_customer_id_fkey")], DECLARED)
    assert relations == {
        "orders": [Relation("orders", "customers", ("customer_id",), ("id",), True, "orders_customer_id_fkey",
                            ("declared",))],
        "customers": [Relation("customers", "orders", ("id",), ("customer_id",), False, "orders_customer_id_fkey",
                               ("declared",))],
    }
    assert relations["orders"][0].hints == ("orders_customer_id_fkey", "declared")


def test_two_identical_foreign_keys_are_one_relation_named_after_the_first() -> None:
    relations = build_relations([ORDERS, CUSTOMERS], LINEAGES, [*PRIMARY, _fk("a_fk"), _fk("b_fk")])
    assert [(r.name, r.aliases) for r in relations["orders"]] == [("a_fk", ("b_fk",))]
    assert [(r.name, r.aliases) for r in relations["customers"]] == [("a_fk", ("b_fk",))]


def test_different_relations_to_one_target_stay_apart() -> None:
    orders = _contract("orders", "SELECT id, billing_id, shipping_id FROM orders")
    lineages = {**LINEAGES, orders.label: column_sources(orders.sql)}
    relations = build_relations([orders, CUSTOMERS], lineages,
                                [*PRIMARY, _fk("billing_fk", "billing_id"), _fk("shipping_fk", "shipping_id")])
    assert [(r.name, r.source_columns) for r in relations["orders"]] == [
        ("billing_fk", ("billing_id",)), ("shipping_fk", ("shipping_id",))]


# --- served: the table split ----------------------------------------------------------------------------

SPLIT_TOML = """
[project]
name = "split"

[databases.main]

[apps.shop]
grants = [{ contract = "orders", actions = ["read"] }, { contract = "customers", actions = ["read"] }]

[[relations]]
from = "orders.customer_id"
to = "customers.id"
"""
BEFORE_SPLIT = """
CREATE TABLE orders (id integer PRIMARY KEY, customer_id integer NOT NULL, customer_name text NOT NULL);
INSERT INTO orders VALUES (1, 10, 'Ada'), (2, 10, 'Ada'), (3, 11, 'Grace');
"""
SPLIT = """
CREATE TABLE customers (id integer PRIMARY KEY, name text NOT NULL);
INSERT INTO customers SELECT DISTINCT customer_id, customer_name FROM orders;
ALTER TABLE orders ADD CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES customers (id);
"""


async def _lock(project: Project) -> None:
    lock, report = update_lock(project, await project_signatures(project), read_lock(project.root))
    assert report.ok, report.lines()
    write_lock(project.root, lock)


async def _get(client: httpx.AsyncClient, key: str, url: str) -> tuple[int, object]:
    response = await client.get(url, headers={"apikey": key})
    return response.status_code, orjson.loads(response.content)


async def test_a_declared_relation_after_a_table_split_still_embeds(make_project: ProjectFactory,
                                                                    serve_project: object) -> None:
    project = make_project(toml=SPLIT_TOML, migrations={"V001__orders.sql": BEFORE_SPLIT, "V002__split.sql": SPLIT},
                           contracts={"orders.v1.sql": "SELECT id, customer_id FROM orders",
                                      "customers.v1.sql": "SELECT id, name FROM customers"})
    keys = await prepare(project)
    await _lock(project)
    async with operations.owner_connection(project) as conn:  # both sources of the relation are there
        assert await conn.fetchval("SELECT count(*) FROM pg_constraint WHERE conname = 'orders_customer_id_fkey'") == 1
    client, _ = await serve_project(project)  # type: ignore[operator]
    key = keys["shop"]
    expected = [{"id": 3, "customer_id": 11, "customers": {"id": 11, "name": "Grace"}}]
    for hint in ("", "!orders_customer_id_fkey", "!declared", "!customer_id"):
        assert await _get(client, key, f"/orders?id=eq.3&select=*,customers{hint}(*)") == (200, expected), hint
    status, body = await _get(client, key, "/customers?id=eq.10&select=id,orders(id)&orders.order=id")
    assert (status, body) == (200, [{"id": 10, "orders": [{"id": 1}, {"id": 2}]}])
    assert [f.code for f in await run_check(project.root)] == []


# --- check: ambiguous embeds ----------------------------------------------------------------------------

TWO_KEYS_TOML = """
[project]
name = "twokeys"

[databases.main]

[apps.shop]
grants = [{ contract = "orders", actions = ["read"] }, { contract = "customers", actions = ["read"] }]
"""
ONE_KEY = """
CREATE TABLE customers (id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id integer PRIMARY KEY, billing_id integer NOT NULL REFERENCES customers (id),
                     shipping_id integer NOT NULL);
INSERT INTO customers VALUES (1, 'Ada'), (2, 'Grace');
INSERT INTO orders VALUES (1, 1, 2);
"""
SECOND_KEY = "ALTER TABLE orders ADD FOREIGN KEY (shipping_id) REFERENCES customers (id);"


def _ambiguous(findings: list[Finding]) -> dict[str, Finding]:
    return {f.contract or "": f for f in findings if f.code == "GHC056"}


async def test_a_second_key_to_the_same_target_is_an_ambiguous_embed(make_project: ProjectFactory,
                                                                      serve_project: object) -> None:
    project = make_project(toml=TWO_KEYS_TOML, migrations={"V001__tables.sql": ONE_KEY},
                           contracts={"orders.v1.sql": "SELECT id, billing_id, shipping_id FROM orders",
                                      "customers.v1.sql": "SELECT id, name FROM customers"})
    keys = await prepare(project)
    await _lock(project)  # released with one relation between orders and customers
    assert _ambiguous(await run_check(project.root)) == {}

    (project.root / "migrations" / "V002__shipping_key.sql").write_text(SECOND_KEY)
    project = load_project(project.root)
    await operations.migrate_all(project)
    findings = await run_check(project.root)
    ambiguous = _ambiguous(findings)
    assert set(ambiguous) == {"orders.v1", "customers.v1"}
    orders = ambiguous["orders.v1"]
    assert orders.severity == "error" and orders.file == "contracts/orders.v1.sql"
    assert orders.message == ("orders.v1: embedding customers is ambiguous in API v1: 2 relations lead there "
                              "(orders_billing_id_fkey: billing_id → customers(id); "
                              "orders_shipping_id_fkey: shipping_id → customers(id))")
    assert orders.hint is not None and "answers 300" in orders.hint
    assert "customers!orders_billing_id_fkey(...), customers!orders_shipping_id_fkey(...)" in orders.hint
    assert ambiguous["customers.v1"].severity == "error"

    # what check says is what the server answers
    client, _ = await serve_project(project)  # type: ignore[operator]
    key = keys["shop"]
    status, body = await _get(client, key, "/orders?select=id,customers(name)")
    assert status == 300 and isinstance(body, dict) and body["code"] == "PGRST201"
    assert await _get(client, key, "/orders?select=id,customers!orders_shipping_id_fkey(name)") == (
        200, [{"id": 1, "customers": {"name": "Grace"}}])

    # not released: the same ambiguity is a warning (no app's query broke; new ones must pick a relation)
    (project.root / "contracts.lock").unlink()
    warned = _ambiguous(await run_check(project.root))
    assert {label: f.severity for label, f in warned.items()} == {"orders.v1": "warning", "customers.v1": "warning"}
