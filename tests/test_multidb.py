"""A project with two databases: each contract is served from its own database, under the app's role there."""

from __future__ import annotations

from conftest import ProjectFactory, prepare

TOML = """
[project]
name = "multi"

[databases.shop]

[databases.billing]

[apps.finance]
grants = [
    { contract = "products", actions = ["read"] },
    { contract = "invoices", actions = ["read"] },
]

[apps.store]
grants = [{ contract = "products", actions = ["read"] }]
"""


async def test_two_databases_served_side_by_side(make_project: ProjectFactory, serve_project: object) -> None:
    project = make_project(
        toml=TOML,
        migrations={
            "shop/V001__products.sql": "CREATE TABLE products (id int PRIMARY KEY, name text);"
                                       "INSERT INTO products VALUES (1, 'lamp'), (2, 'mug');",
            "billing/V001__invoices.sql": "CREATE TABLE invoices (id int PRIMARY KEY, total numeric);"
                                          "INSERT INTO invoices VALUES (10, 99.5);",
        },
        contracts={
            "shop/products.v1.sql": "SELECT id, name FROM products",
            "billing/invoices.v1.sql": "SELECT id, total, current_database() AS db FROM invoices",
        },
    )
    keys = await prepare(project)
    client, runtime = await serve_project(project)  # type: ignore[operator]
    finance = {"apikey": keys["finance"]}
    invoices = (await client.get("/invoices", headers=finance)).json()
    assert invoices == [{"id": 10, "total": 99.5, "db": f"{project.name}_billing"}]
    products = (await client.get("/products?order=id", headers=finance)).json()
    assert [p["name"] for p in products] == ["lamp", "mug"]
    store = await client.get("/invoices", headers={"apikey": keys["store"]})
    assert store.status_code == 404
    # the store app has a pool only where it has grants
    assert runtime.pools is not None
    runtime.pools.pool("store", "shop")
    try:
        runtime.pools.pool("store", "billing")
        raise AssertionError("store should have no pool on billing")
    except KeyError:
        pass
