"""The demo shop as three services: the shop's database, the reviews service's (linked by ``[[relations]]``)
and the payments service's (charged by the checkout saga, tests/test_demo_checkout.py).

What ``gatehouse demo`` shows must hold: the whole shop (all databases) loads, is locked as shipped and passes
``gatehouse check``; its products embed their reviews from the other database, and the reviews their product,
with the rows the two databases hold. The tests' usual copy of the shop leaves the other services out
(``copy_shop(services=False)``), and that copy must be a coherent project of one database. (The demo's printed
curl commands are run against a real ``gatehouse serve`` on the embedded PostgreSQL in ``tests/test_cli.py``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.check import run_check
from gatehouse.contracts.lockfile import dumps_lock, read_lock, update_lock
from gatehouse.contracts.signature import project_signatures
from gatehouse.demo import bundled_example, copy_shop, tour, without_services
from gatehouse.project import load_project


def test_the_shop_is_three_databases_and_the_copy_without_services_is_one(tmp_path: Path) -> None:
    whole = load_project(bundled_example())
    assert list(whole.config.databases) == ["shop", "reviews", "payments"] and whole.home_database == "shop"
    assert whole.database_of("reviews") == "reviews" and whole.database_of("products") == "shop"
    assert whole.database_of("charges") == "payments" and whole.database_of("stock") == "shop"
    assert [(r.source, r.target) for r in whole.config.relations] == [("reviews.product_id", "products.id")]
    assert {a for a, app in whole.apps.items() if app.grant_for("reviews")} == {"web", "mobile"}
    assert {a for a, app in whole.apps.items() if "place_order" in app.config.sagas} == {"checkout"}

    copy_shop(tmp_path / "one", services=False)
    one = load_project(tmp_path / "one")
    assert list(one.config.databases) == ["shop"] and not one.config.relations
    assert sorted(c.label for c in one.contracts) == sorted(c.label for c in whole.contracts
                                                            if c.database == "shop" and c.label != "stock.v1")
    assert not (tmp_path / "one" / "contracts" / "shop").exists() and (tmp_path / "one" / "migrations" / "V001__"
                                                                      "create_shop_tables.sql").exists()
    lock = read_lock(tmp_path / "one")
    assert lock is not None and lock.labels == {c.label for c in one.contracts}
    assert all((tmp_path / "one" / entry.file).exists() for entry in lock.entries)
    assert not (tmp_path / "one" / "logic" / "checkout.py").exists()
    assert list(one.apps) == ["web", "mobile", "analytics"]
    assert all(r.target in {c.name for c in one.contracts} for e in lock.entries for r in e.signature.relations)
    text = (tmp_path / "one" / "gatehouse.toml").read_text()
    assert "reviews" not in text.split("[apps.web]", 1)[1] and without_services(text) == text  # idempotent

    copy_shop(tmp_path / "two")  # the demo's own copy: as shipped
    assert (tmp_path / "two" / "contracts" / "reviews" / "reviews.v1.sql").exists()
    assert load_project(tmp_path / "two").config.relations == whole.config.relations


async def test_the_whole_shop_is_locked_as_shipped_and_checks_clean(make_project: ProjectFactory) -> None:
    shop = make_project(from_shop=True, services=True)
    await prepare(shop)
    shipped = read_lock(shop.root)
    signatures = await project_signatures(shop)
    _, report = update_lock(shop, signatures, shipped)
    assert report.ok and report.lines()[0].startswith("nothing to change"), report.lines()
    fresh, _ = update_lock(shop, signatures, None)  # locking from nothing writes the very same file
    assert dumps_lock(fresh) == (shop.root / "contracts.lock").read_text()
    assert await run_check(shop.root) == []


async def _expected(shop: Any, products: list[int]) -> dict[int, tuple[str, list[tuple[int, str]]]]:
    """Product id → (name, its reviews' (stars, body) in id order), read straight from the two databases."""
    async with operations.owner_connection(shop, "shop") as conn:
        names = {r["id"]: r["name"] for r in await conn.fetch("SELECT id, name FROM products WHERE id = ANY($1)",
                                                              products)}
    async with operations.owner_connection(shop, "reviews") as conn:
        rows = await conn.fetch("SELECT product_id, stars, body FROM reviews WHERE product_id = ANY($1) ORDER BY id",
                                products)
    return {p: (names[p], [(r["stars"], r["body"]) for r in rows if r["product_id"] == p]) for p in products}


async def test_products_embed_their_reviews_from_the_other_database(make_project: ProjectFactory,
                                                                     serve_project: Any) -> None:
    shop = make_project(from_shop=True, services=True)
    keys = await prepare(shop)
    client, _ = await serve_project(shop)
    expected = await _expected(shop, [1, 2, 3])
    assert [len(reviews) for _, reviews in expected.values()] == [1, 2, 0]  # the demo data: product N has N % 3

    # the tour's request, as mobile (API v2) and web (pinned to v1: reviews.v1 is in both)
    command = next(c for caption, c in tour({"web": "W", "mobile": "M", "analytics": "A", "checkout": "C"}, "", "") if "reviews" in c)
    path = command.split("'")[1]
    assert path == "/products?select=id,name,reviews(stars,body)&id=lte.3"
    for app in ("mobile", "web"):
        response = await client.get(path + "&reviews.order=id", headers={"apikey": keys[app]})
        assert response.status_code == 200, response.text
        assert [(row["id"], row["name"], [(r["stars"], r["body"]) for r in row["reviews"]])
                for row in response.json()] == [(p, name, reviews) for p, (name, reviews) in expected.items()]

    # the other way: each review with its product as one object
    response = await client.get("/reviews?select=product_id,stars,product:products(id,name)&product_id=lte.3"
                                "&order=id", headers={"apikey": keys["mobile"]})
    assert response.status_code == 200, response.text
    assert [(r["stars"], r["product"]) for r in response.json()] == [
        (stars, {"id": p, "name": name}) for p, (name, reviews) in expected.items() for stars, _ in reviews]

    # analytics has no grant on reviews: the same answer as for a relation that does not exist
    refused = await client.get(path, headers={"apikey": keys["analytics"]})
    assert refused.status_code == 400 and refused.json()["code"] == "PGRST200", refused.text
