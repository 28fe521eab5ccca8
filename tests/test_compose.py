"""Embeds across databases (src/gatehouse/query/compose.py), over HTTP against real PostgreSQL.

The same schema is built twice: split over two databases (``shop``: orders, items; ``billing``: users, payments,
products) with ``[[relations]]`` linking them, and whole in one database with the same contracts and relations.
Every question of a table is asked of both, and the answers must be the same, byte for byte: status, body,
Content-Range. The split one must also run a bounded number of queries (counted at the app's pools), keep the
row filters of both sides (checked against the databases), and refuse what it cannot compose with a clear 400.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from conftest import ProjectFactory, prepare, with_database
from gatehouse.check import run_check
from gatehouse.project import Project
from gatehouse.query import compose
from gatehouse.runtime import Runtime

SECRET = "a-test-secret-that-is-long-enough-for-hs256!!"
APPS = """
[auth.issuers.idp]
issuer = "https://idp.test/"
secret = "env:COMPOSE_JWT_SECRET"
algorithms = ["HS256"]
audience = "gatehouse"
app_claim = "azp"
apps = { "portal-web" = "portal" }

[apps.admin]
grants = [
    { contract = "orders", actions = ["read", "insert"] },
    { contract = "items", actions = ["read"] },
    { contract = "users", actions = ["read"] },
    { contract = "payments", actions = ["read"] },
    { contract = "products", actions = ["read"] },
]

[apps.portal]
require_user = true
grants = [
    { contract = "orders", actions = ["read"], filter = "tenant=eq.{claims.tenant}" },
    { contract = "users", actions = ["read"], filter = "tenant=eq.{claims.tenant}" },
    { contract = "items", actions = ["read"] },
]

[apps.narrow]
grants = [{ contract = "orders", actions = ["read"] }, { contract = "items", actions = ["read"] }]

[[relations]]
from = "orders.user_id"
to = "users.id"

[[relations]]
from = "items.sku"
to = "products.sku"
"""
SPLIT = '[project]\nname = "split"\n\n[databases.shop]\n\n[databases.billing]\n' + APPS
SINGLE = '[project]\nname = "single"\n\n[databases.main]\n' + APPS

SHOP_TABLES = """
CREATE TABLE orders (id int PRIMARY KEY, user_id int, tenant text NOT NULL, total numeric(12,2) NOT NULL,
                     placed date NOT NULL);
CREATE TABLE items (id int PRIMARY KEY, order_id int NOT NULL REFERENCES orders (id), sku text NOT NULL,
                    qty int NOT NULL);
"""
BILLING_TABLES = """
CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, tenant text NOT NULL, country text);
CREATE TABLE payments (id int PRIMARY KEY, user_id int NOT NULL REFERENCES users (id), amount numeric(12,2) NOT NULL);
CREATE TABLE products (sku text PRIMARY KEY, title text NOT NULL, price numeric(30,2));
"""
CONTRACTS = {
    "shop": {"orders": "SELECT id, user_id, tenant, total, placed FROM orders",
             "items": "SELECT id, order_id, sku, qty FROM items"},
    "billing": {"users": "SELECT id, name, tenant, country FROM users",
                "payments": "SELECT id, user_id, amount FROM payments",
                "products": "SELECT sku, title, price FROM products"},
}
SKUS = ["lamp", "mug", 'odd "sku" \\ with: colon', "café ☕", "12", ""]
"""Keys that must survive being text in JSON: quotes, a backslash, a colon, non-ASCII, digits, empty."""


def _literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def _inserts(table: str, rows: Sequence[Sequence[object]]) -> str:
    return f"INSERT INTO {table} VALUES " + ", ".join("(" + ", ".join(map(_literal, r)) + ")" for r in rows) + ";\n"


def _data() -> tuple[str, str]:
    """Seeded rows: users of two tenants, orders (some without a user, one of a user that does not exist, some of
    another tenant's user), 0-4 items each (some of unknown products), 0-3 payments per user."""
    rnd = random.Random(17)
    countries = ["FR", "DE", None, "FR", "IT"]
    users = [(u, f"user {u}", "acme" if u % 3 else "globex", countries[u % 5]) for u in range(1, 15)]
    payments, pid = [], 1
    for user in users:
        for _ in range(rnd.randint(0, 3)):
            payments.append((pid, user[0], f"{rnd.randint(1, 9999) / 100:.2f}"))
            pid += 1
    products = [(sku, f"the {sku}", "12345678901234567890.25" if sku == "lamp" else f"{i + 1}.50")
                for i, sku in enumerate(SKUS[:-1])]  # the empty sku has no product
    orders, items, iid = [], [], 1
    for o in range(1, 61):
        user = rnd.choice([None, 99, *range(1, 15)])
        tenant = rnd.choice(["acme", "globex"])
        orders.append((o, user, tenant, f"{rnd.randint(100, 99999) / 100:.2f}", f"2024-{1 + o % 12:02d}-0{1 + o % 9}"))
        for _ in range(rnd.randint(0, 4)):
            items.append((iid, o, rnd.choice(SKUS), rnd.randint(1, 5)))
            iid += 1
    shop = _inserts("orders", orders) + _inserts("items", items)
    billing = _inserts("users", users) + _inserts("payments", payments) + _inserts("products", products)
    return shop, billing


def token(tenant: str) -> str:
    now = int(time.time())
    return jwt.encode({"iss": "https://idp.test/", "aud": "gatehouse", "sub": "u1", "tenant": tenant, "azp": "portal-web",
                       "iat": now, "exp": now + 300}, SECRET, algorithm="HS256")


Served = tuple[httpx.AsyncClient, Runtime, Project, dict[str, str]]


async def _split(make_project: ProjectFactory, serve_project: Any) -> Served:
    shop, billing = _data()
    project = make_project(
        toml=SPLIT, folder="split",
        migrations={"shop/V001__shop.sql": SHOP_TABLES + shop, "billing/V001__billing.sql": BILLING_TABLES + billing},
        contracts={f"{db}/{name}.v1.sql": sql for db, found in CONTRACTS.items() for name, sql in found.items()})
    keys = await prepare(project)
    client, runtime = await serve_project(project)
    return client, runtime, project, keys


async def _single(make_project: ProjectFactory, serve_project: Any, monkeypatch: pytest.MonkeyPatch) -> Served:
    """(After :func:`_split` is served: its databases' URLs leave the environment, or they would join this one.)"""
    for database in ("SHOP", "BILLING"):
        monkeypatch.delenv(f"GATEHOUSE_DATABASES__{database}__URL")
    shop, billing = _data()
    project = make_project(
        toml=SINGLE, folder="single", migrations={"V001__all.sql": SHOP_TABLES + BILLING_TABLES + shop + billing},
        contracts={f"{name}.v1.sql": sql for found in CONTRACTS.values() for name, sql in found.items()})
    keys = await prepare(project)
    client, runtime = await serve_project(project)
    return client, runtime, project, keys


@pytest.fixture
def jwt_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPOSE_JWT_SECRET", SECRET)


@pytest.fixture
async def split(make_project: ProjectFactory, serve_project: Any, jwt_secret: None) -> Served:
    return await _split(make_project, serve_project)


class QueryCounter:
    """Counts the statements a runtime's app pools run, per database (wraps ``runtime.pools.read_row``)."""

    def __init__(self, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
        assert runtime.pools is not None
        self.counts: Counter[str] = Counter()
        original = runtime.pools.read_row

        def counted(app: str, database: str, sql: str, params: Sequence[object]) -> Any:
            self.counts[database] += 1
            return original(app, database, sql, params)

        monkeypatch.setattr(runtime.pools, "read_row", counted)

    def take(self) -> dict[str, int]:
        found = dict(self.counts)
        self.counts.clear()
        return found


# --- the same answers as one database ----------------------------------------------------------------------------

ADMIN = "admin"
PORTAL_ACME, PORTAL_GLOBEX, NARROW = "portal:acme", "portal:globex", "narrow"
CSV = {"Accept": "text/csv"}
OBJECT = {"Accept": "application/vnd.pgrst.object+json"}
EXACT = {"Prefer": "count=exact"}
CASES: list[tuple[str, str, str, dict[str, str]]] = [
    # (who, path, query, headers)
    (ADMIN, "/orders", "select=id,user:users(name)&order=id", {}),
    (ADMIN, "/orders", "select=id,users(id,name,country)&order=id&limit=10&offset=5", {}),
    (ADMIN, "/orders", "select=*,users(*)&order=total.desc", {}),
    (ADMIN, "/users", "select=id,name,orders(id,total)&order=id", {}),
    (ADMIN, "/users", "select=id,orders(id,total)&orders.order=total.desc,id&orders.limit=2&order=id", {}),
    (ADMIN, "/users", "select=id,orders(id)&orders.offset=1&orders.limit=1&order=id", {}),
    (ADMIN, "/users", "select=id,buys:orders(id,placed)&buys.placed=gte.2024-06-01&buys.order=placed&order=id", {}),
    (ADMIN, "/users", "select=id,buys:orders(id,placed)&buys.placed=gte.2024-10-01&buys.order=placed&order=id", {}),
    (ADMIN, "/users", "select=id,buys:orders(id,placed)&buys.placed=gte.2024-10-01&buys.order=placed&id=lt.5", {}),
    (ADMIN, "/orders", "select=id,user:users(name,payments(amount))&user.payments.order=amount&order=id", {}),
    (ADMIN, "/orders", "select=id,items(sku,qty,product:products(title,price))&items.order=id&order=id", {}),
    (ADMIN, "/users", "select=id,orders(id,user:users(name,orders(id)))&order=id&orders.order=id"
                      "&orders.user.orders.order=id", {}),
    (ADMIN, "/products", "select=sku,items(qty,orders(id,users(name)))&order=sku&items.order=id", {}),
    (ADMIN, "/orders", "select=id,users!inner(name)&order=id", {}),
    (ADMIN, "/orders", "select=id,users!inner(name)&users.country=eq.FR&order=id&limit=5&offset=2", EXACT),
    (ADMIN, "/orders", "select=id,users!inner(name)&users.country=eq.DE&order=id&limit=5&offset=2", EXACT),
    (ADMIN, "/users", "select=id,orders!inner(id)&orders.total=gt.500&order=id", EXACT),
    (ADMIN, "/orders", "select=id,users(name)&users.country=eq.FR&order=id", {}),
    (ADMIN, "/orders", "select=id,users()&users=not.is.null&order=id", {}),
    (ADMIN, "/orders", "select=id,user:users(name)&user=is.null&order=id", EXACT),
    (ADMIN, "/orders", "select=id,users(name)&or=(total.gt.500,users.not.is.null)&order=id", {}),
    (ADMIN, "/orders", "select=id,items(sku,products!inner(title))&order=id&items.order=id", {}),
    (ADMIN, "/orders", "select=id,items!inner(sku,products!inner(title))&order=id&items.order=id", {}),
    (ADMIN, "/orders", "select=id,users!inner(name,payments!inner(amount))&users.payments.amount=gt.50&order=id",
     {}),
    (ADMIN, "/orders", "select=id,users(name)&users.limit=1&order=id&limit=7", EXACT),
    (ADMIN, "/orders", "select=id,user:users(name)&order=id&limit=5", CSV),
    (ADMIN, "/users", "select=id,orders(id,total)&order=id&limit=4", CSV),
    (ADMIN, "/orders", "select=id,user:users(name)&id=eq.3", OBJECT),
    (ADMIN, "/orders", "select=id,user:users(name)&id=eq.4", OBJECT),
    (ADMIN, "/orders", "select=id,user:users(name,country)&order=id&limit=9",
     {"Accept": "application/vnd.pgrst.array+json;nulls=stripped"}),
    (ADMIN, "/orders", "select=id,user:users(name)&id=gt.3", OBJECT),
    (ADMIN, "/orders", "select=id,user:users(name)&order=id", {"Range": "3-8", **EXACT}),
    (ADMIN, "/orders", "select=id,users(nope)", {}),
    (ADMIN, "/orders", "select=id,users(name)&users.nope=eq.1", {}),
    (ADMIN, "/orders", "select=id,user:users(name)&nothere.limit=1", {}),
    (ADMIN, "/orders", "select=id,user:users(name),user:users(id)", {}),
    (ADMIN, "/orders", "select=id,users(name)&users.name=eq.user 4&order=id", {}),
    (ADMIN, "/orders", "select=id,users(id)&users.id=in.(1,2,3)&order=id", {}),
    (ADMIN, "/orders", "select=id,users(id)&users.id=eq.abc&order=id", {}),
    (ADMIN, "/orders", "select=id,users!inner(id)&users.id=eq.abc&order=id", {}),
    (PORTAL_ACME, "/orders", "select=id,tenant,user:users(id,tenant)&order=id", {}),
    (PORTAL_ACME, "/users", "select=id,orders(id,tenant)&order=id", EXACT),
    (PORTAL_GLOBEX, "/orders", "select=id,users!inner(id,tenant)&order=id", EXACT),
    (NARROW, "/orders", "select=id,users(name)", {}),
    (NARROW, "/orders", "select=id,items(products(title))", {}),
]


def _headers(who: str, keys: dict[str, str]) -> dict[str, str]:
    if who.startswith("portal:"):
        return {"Authorization": f"Bearer {token(who.partition(':')[2])}"}
    return {"apikey": keys[who]}


async def test_a_composed_read_answers_as_one_database_does(make_project: ProjectFactory, serve_project: Any,
                                                           jwt_secret: None, monkeypatch: pytest.MonkeyPatch) -> None:
    split_client, _, _, split_keys = await _split(make_project, serve_project)
    single_client, _, _, single_keys = await _single(make_project, serve_project, monkeypatch)
    differences = []
    statuses = Counter[int]()
    for who, path, query, headers in CASES:
        url = f"{path}?{query}"
        got = await split_client.get(url, headers={**_headers(who, split_keys), **headers})
        want = await single_client.get(url, headers={**_headers(who, single_keys), **headers})
        statuses[want.status_code] += 1
        seen = (got.status_code, got.headers.get("content-range"), got.headers.get("content-type"), got.text)
        expected = (want.status_code, want.headers.get("content-range"), want.headers.get("content-type"), want.text)
        if seen != expected:
            differences.append(f"{who} {url} {headers}\n  split:  {seen}\n  single: {expected}")
    assert not differences, "\n".join(differences)
    assert statuses[200] + statuses[206] >= 25 and statuses[400] >= 5  # the table asks real questions


# --- a bounded number of queries -------------------------------------------------------------------------------


async def test_one_query_per_database_per_level(split: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    client, runtime, _, keys = split
    counter = QueryCounter(runtime, monkeypatch)
    admin = {"apikey": keys["admin"]}
    page = await client.get("/orders?select=id,user:users(name)&order=id&limit=50", headers=admin)
    assert page.status_code == 200 and len(page.json()) == 50
    assert counter.take() == {"shop": 1, "billing": 1}  # 50 parents, their keys in one statement
    nested = await client.get("/users?select=id,orders(id,user:users(name,orders(id)))", headers=admin)
    assert nested.status_code == 200
    assert counter.take() == {"billing": 2, "shop": 2}  # one per level: billing, shop, billing, shop
    local_then_remote = await client.get("/orders?select=id,items(sku,products(title))", headers=admin)
    assert local_then_remote.status_code == 200
    assert counter.take() == {"shop": 1, "billing": 1}  # keys gathered from every order's items
    inner = await client.get("/orders?select=id,users!inner(name)&users.country=eq.FR", headers=admin)
    assert inner.status_code == 200 and inner.json()
    assert counter.take() == {"billing": 2, "shop": 1}  # the matching keys first, then the page, then the embed
    none = await client.get("/orders?select=id,users(name)&user_id=is.null", headers=admin)
    assert none.status_code == 200 and all(o["users"] is None for o in none.json())
    assert counter.take() == {"shop": 1}  # no key: nothing to ask the other database


async def test_a_plan_is_kept_per_shape_and_takes_each_requests_values(split: Served) -> None:
    client, runtime, _, keys = split
    admin = {"apikey": keys["admin"]}
    plans = runtime.composed
    answers = {}
    for country in ("FR", "DE", "IT", "FR"):
        found = await client.get(f"/orders?select=id,users!inner(country)&users.country=eq.{country}&total=gt.10",
                                 headers=admin)
        answers[country] = {o["users"]["country"] for o in found.json()}
    assert answers == {"FR": {"FR"}, "DE": {"DE"}, "IT": {"IT"}}
    assert len(plans) == 1 and plans.hits == 3  # one plan, its values put in by each request


async def test_many_keys_are_split_into_batches(split: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    client, runtime, _, keys = split
    admin = {"apikey": keys["admin"]}
    whole = (await client.get("/orders?select=id,user:users(name)&order=id", headers=admin)).json()
    counter = QueryCounter(runtime, monkeypatch)
    monkeypatch.setattr(compose, "MAX_KEYS_PER_BATCH", 4)
    batched = await client.get("/orders?select=id,user:users(name)&order=id", headers=admin)
    assert batched.json() == whole
    distinct = len({o["user_id"] for o in (await client.get("/orders", headers=admin)).json()} - {None})
    assert counter.take() == {"shop": 2, "billing": -(-distinct // 4)}


async def test_fan_out_is_bounded(split: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    client, runtime, _, keys = split
    admin = {"apikey": keys["admin"]}
    counter = QueryCounter(runtime, monkeypatch)
    deep = await client.get("/orders?select=id,users(orders(users(orders(id))))", headers=admin)
    assert deep.status_code == 400 and deep.json()["code"] == "GH400"
    assert "at most 3 levels" in deep.json()["details"]
    assert counter.take() == {}  # refused while compiling, before any query
    monkeypatch.setattr(compose, "MAX_KEYS_PER_EMBED", 5)
    wide = await client.get("/orders?select=id,users(name)", headers=admin)
    assert wide.status_code == 400 and "keys" in wide.json()["message"]
    assert (await client.get("/orders?select=id,users(name)&limit=3", headers=admin)).status_code == 200
    monkeypatch.setattr(compose, "MAX_INNER_KEYS", 3)
    inner = await client.get("/orders?select=id,users!inner(name)", headers=admin)
    assert inner.status_code == 400 and "!inner" in inner.json()["details"]
    narrowed = await client.get("/orders?select=id,users!inner(name)&users.id=in.(1,2)", headers=admin)
    assert narrowed.status_code == 200 and {o["users"]["name"] for o in narrowed.json()} <= {"user 1", "user 2"}


# --- grants and row filters on both sides -----------------------------------------------------------------------


async def _rows(project: Project, server_uri: str, database: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(with_database(server_uri, f"{project.name}_{database}"))
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_row_filters_hold_on_the_embedded_side(split: Served, server_uri: str) -> None:
    client, _, project, _ = split
    users = {r["id"]: r["tenant"] for r in await _rows(project, server_uri, "billing", "SELECT id, tenant FROM users")}
    orders = await _rows(project, server_uri, "shop", "SELECT id, user_id, tenant FROM orders ORDER BY id")
    for tenant in ("acme", "globex"):
        bearer = {"Authorization": f"Bearer {token(tenant)}"}
        got = (await client.get("/orders?select=id,tenant,user:users(id,tenant)&order=id", headers=bearer)).json()
        expected = [{"id": o["id"], "tenant": tenant,
                     "user": {"id": o["user_id"], "tenant": tenant} if users.get(o["user_id"]) == tenant else None}
                    for o in orders if o["tenant"] == tenant]
        assert got == expected
        assert any(o["user_id"] in users and users[o["user_id"]] != tenant for o in orders if o["tenant"] == tenant)
        back = (await client.get("/users?select=id,orders(id,tenant)&order=id", headers=bearer)).json()
        assert {u["id"] for u in back} == {i for i, t in users.items() if t == tenant}
        for user in back:
            assert [o["id"] for o in user["orders"]] == [o["id"] for o in orders
                                                         if o["user_id"] == user["id"] and o["tenant"] == tenant]
        inner = (await client.get("/orders?select=id,users!inner(tenant)", headers=bearer)).json()
        assert {o["id"] for o in inner} == {o["id"] for o in orders
                                            if o["tenant"] == tenant and users.get(o["user_id"]) == tenant}


async def test_an_ungranted_embed_is_refused_as_in_one_database(split: Served) -> None:
    client, _, _, keys = split
    narrow = {"apikey": keys["narrow"]}
    refused = await client.get("/orders?select=id,users(name)", headers=narrow)
    assert refused.status_code == 400 and refused.json()["code"] == "PGRST200"
    assert "'orders' and 'users'" in refused.json()["message"]
    assert "in the schema 'public'" in refused.json()["details"]  # as PGRST205 and PGRST202 name it
    inner = await client.get("/orders?select=id,users!inner()", headers=narrow)
    assert inner.status_code == 400 and inner.json()["code"] == "PGRST200"


# --- what cannot be composed is refused clearly --------------------------------------------------------------


async def test_what_cannot_be_composed_is_refused(split: Served, server_uri: str) -> None:
    client, _, project, keys = split
    admin = {"apikey": keys["admin"]}
    ordered = await client.get("/orders?select=id,users(name)&order=users(name)", headers=admin)
    assert ordered.status_code == 400 and ordered.json()["code"] == "GH400"
    assert "another database" in ordered.json()["details"]
    unselected = await client.get("/orders?select=id&order=users(name)", headers=admin)
    assert unselected.status_code == 400 and unselected.json()["code"] == "GH400"
    written = await client.post("/orders?select=id,users(name)", headers={**admin, "Prefer": "return=representation"},
                                json={"id": 1000, "user_id": 1, "tenant": "acme", "total": 1, "placed": "2024-01-01"})
    assert written.status_code == 400 and written.json()["code"] == "GH400"
    assert not await _rows(project, server_uri, "shop", "SELECT 1 FROM orders WHERE id = 1000")
    estimated = await client.get("/orders?select=id,users!inner(name)&limit=2",
                                 headers={**admin, "Prefer": "count=estimated"})
    assert estimated.status_code == 206 and estimated.headers["content-range"].startswith("0-1/")


async def test_relations_across_databases_load_and_are_served(split: Served) -> None:
    _, runtime, project, _ = split
    schema = runtime.schemas[1]
    assert schema.crosses and schema.databases["orders"] == "shop" and schema.databases["users"] == "billing"
    across = [(r.source, r.target, r.to_one) for r in schema.relations_from("orders") if r.target == "users"]
    assert across == [("orders", "users", True)]
    assert [(r.target, r.to_one) for r in schema.relations_from("users") if r.target == "orders"] == [("orders", False)]
    assert compose.crosses_databases(schema, "orders", "select=id,users(name)")
    assert compose.crosses_databases(schema, "orders", "select=id,items(products(title))")
    assert not compose.crosses_databases(schema, "orders", "select=id,items(sku)")
    assert not compose.crosses_databases(schema, "orders", "id=eq.1")
    assert len(project.config.relations) == 2
    findings = await run_check(project)
    assert not [f for f in findings if "relation" in f.message], findings  # `gatehouse check` takes them too
