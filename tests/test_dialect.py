"""The PostgREST dialect against the demo shop, table-driven: each request's rows must equal what the same
question asked of the tables directly returns (compared as JSON values, order kept), or the error PostgREST
gives."""

from __future__ import annotations

import httpx
import orjson
import pytest

from conftest import prepare
from gatehouse import operations
from gatehouse.project import Project

ROWS = [
    # filters
    ("/products?select=id&id=gt.10&id=lte.13&order=id", "SELECT id FROM products WHERE id > 10 AND id <= 13 ORDER BY id"),
    ("/products?select=id&id=in.(5,3,9)&order=id.desc", "SELECT id FROM products WHERE id IN (3,5,9) ORDER BY id DESC"),
    ("/products?select=id&id=not.in.(1,2)&id=lt.5&order=id", "SELECT id FROM products WHERE id IN (3,4) ORDER BY id"),
    ("/products?select=id&name=match.^Red.*%2310$&order=id",
     "SELECT id FROM products WHERE name ~ '^Red.*#10$' ORDER BY id"),
    ("/products?select=id&name=imatch.^red+mug&order=id&limit=3",
     "SELECT id FROM products WHERE name ~* '^red mug' ORDER BY id LIMIT 3"),
    ("/products?select=id&name=like(any).{Red*,Blue*}&id=lt.20&order=id",
     "SELECT id FROM products WHERE (name LIKE 'Red%' OR name LIKE 'Blue%') AND id < 20 ORDER BY id"),
    ("/products?select=id&id=gt(all).{3,7}&id=lt.10&order=id", "SELECT id FROM products WHERE id > 7 AND id < 10 ORDER BY id"),
    ("/products?select=id&id=isdistinct.2&id=lt.4&order=id", "SELECT id FROM products WHERE id IN (1,3) ORDER BY id"),
    ("/products?select=id&category=eq.books&price=lt.10&order=price,id",
     "SELECT p.id FROM products p JOIN categories c ON c.id = p.category_id WHERE c.name = 'books' AND p.price < 10 "
     "ORDER BY p.price, p.id"),
    ("/products?select=id&name=wfts(english).mug+-red&id=lt.40&order=id",
     "SELECT id FROM products WHERE to_tsvector('english', name) @@ websearch_to_tsquery('english', 'mug -red') "
     "AND id < 40 ORDER BY id"),
    ("/products?select=id&name=plfts.classic+tent&id=lt.200&order=id",
     "SELECT id FROM products WHERE to_tsvector(name) @@ plainto_tsquery('classic tent') AND id < 200 ORDER BY id"),
    # logic trees
    ("/products?select=id&or=(id.eq.3,id.eq.8)&order=id", "SELECT id FROM products WHERE id IN (3, 8) ORDER BY id"),
    ("/products?select=id&id=lt.10&not.or=(id.lt.3,id.gt.6)&order=id",
     "SELECT id FROM products WHERE id BETWEEN 3 AND 6 ORDER BY id"),
    ("/products?select=id&or=(id.eq.1,and(id.gte.5,id.lte.6),not.and(id.gt.2,id.lt.4000))&id=lt.4003&order=id",
     "SELECT id FROM products WHERE id IN (1, 2, 5, 6, 4000, 4001, 4002) ORDER BY id"),
    ('/products?select=id&or=(name.eq."Blue mug %231",id.in.(2,3))&order=id',
     "SELECT id FROM products WHERE id IN (1, 2, 3) ORDER BY id"),
    # select shaping
    ("/products?select=ident:id,price::text&id=eq.5", "SELECT id AS ident, price::text AS price FROM products WHERE id = 5"),
    ("/products?select=id,name&order=price.desc,id&limit=3&offset=2",
     "SELECT id, name FROM products ORDER BY price DESC, id LIMIT 3 OFFSET 2"),
    ("/orders?select=id,status&status=eq.paid&order=created_at.desc.nullslast&limit=2",
     "SELECT id, status FROM orders WHERE status = 'paid' ORDER BY created_at DESC NULLS LAST LIMIT 2"),
    # embedding: to-one object, to-many array, nested, filtered, inner, ordered by a to-one column
    ("/orders?select=id,customer_summary(name)&id=lt.3&order=id",
     "SELECT o.id, json_build_object('name', u.name) AS customer_summary FROM orders o JOIN users u ON u.id = o.user_id "
     "WHERE o.id < 3 ORDER BY o.id"),
    ("/orders?select=id,items:order_items(product_id)&id=eq.7&items.order=product_id.desc",
     "SELECT o.id, (SELECT json_agg(json_build_object('product_id', product_id) ORDER BY product_id DESC) "
     "FROM order_items WHERE order_id = o.id) AS items FROM orders o WHERE o.id = 7"),
    ("/orders?select=id,order_items(quantity)&order_items.quantity=gt.3&id=lt.4&order=id",
     "SELECT o.id, coalesce((SELECT json_agg(json_build_object('quantity', quantity)) FROM order_items "
     "WHERE order_id = o.id AND quantity > 3), '[]') AS order_items FROM orders o WHERE o.id < 4 ORDER BY o.id"),
    ("/orders?select=id,order_items!inner(quantity)&order_items.quantity=eq.1&id=lt.10&order=id",
     "SELECT o.id, json_agg(json_build_object('quantity', i.quantity)) AS order_items FROM orders o "
     "JOIN order_items i ON i.order_id = o.id AND i.quantity = 1 WHERE o.id < 10 GROUP BY o.id ORDER BY o.id"),
    ("/order_items?select=order_id,products(name,category)&order_id=eq.2&order=product_id",
     "SELECT i.order_id, json_build_object('name', p.name, 'category', c.name) AS products FROM order_items i "
     "JOIN products p ON p.id = i.product_id JOIN categories c ON c.id = p.category_id WHERE i.order_id = 2 "
     "ORDER BY i.product_id"),
    ("/customer_summary?select=customer_id,orders(id,order_items(product_id))&customer_id=eq.3&orders.order=id"
     "&orders.limit=1&orders.order_items.order=product_id&orders.order_items.limit=1",
     "SELECT u.id AS customer_id, (SELECT json_agg(json_build_object('id', o.id, 'order_items', "
     "(SELECT json_agg(json_build_object('product_id', x.product_id)) FROM (SELECT product_id FROM order_items "
     "WHERE order_id = o.id ORDER BY product_id LIMIT 1) x))) FROM (SELECT id FROM orders WHERE user_id = u.id "
     "ORDER BY id LIMIT 1) o) AS orders FROM users u WHERE u.id = 3"),
    ("/orders?select=id,customer_summary(name)&order=customer_summary(name).desc,id&limit=3",
     "SELECT o.id, json_build_object('name', u.name) AS customer_summary FROM orders o JOIN users u ON "
     "u.id = o.user_id ORDER BY u.name DESC, o.id LIMIT 3"),
    ("/orders?select=id,order_items()&order_items=is.null&limit=3", "SELECT id FROM orders WHERE false"),
]


@pytest.fixture
async def analytics(shop: Project, serve_project: object) -> httpx.AsyncClient:
    keys = await prepare(shop)
    client, _ = await serve_project(shop)  # type: ignore[operator]
    client.headers["apikey"] = keys["analytics"]
    return client


def _normalise(value: object) -> object:
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))


async def test_rows_equal_the_tables_answer(analytics: httpx.AsyncClient, shop: Project) -> None:
    async with operations.owner_connection(shop) as conn:
        for url, sql in ROWS:
            expected = orjson.loads(await conn.fetchval(f"SELECT coalesce(json_agg(q), '[]')::text FROM ({sql}) q"))
            response = await analytics.get(url)
            assert response.status_code == 200, (url, response.text)
            got = response.json()
            # numeric values: json from the view and from the query agree exactly; compare as JSON values
            assert _normalise(got) == _normalise(expected), url


ERRORS = [
    ("/orders?select=id,nothing(id)", {}, 400, "PGRST200"),
    ("/products?select=id,customer_summary(name)", {}, 400, "PGRST200"),  # no key links them, nor a junction
    ("/orders?select=id&order_items.limit=1", {}, 400, "PGRST108"),
    ("/orders?select=id,order_items(quantity)&order_items=eq.3", {}, 400, "PGRST120"),
    ("/customer_summary?select=customer_id,orders(id)&order=orders(id)", {}, 400, "PGRST118"),
    ("/products?select=id&id=eq.1", {"Accept": "application/vnd.pgrst.object+json", "Range": "0-0"}, 200, None),
    ("/products?select=id&id=lt.3", {"Accept": "application/vnd.pgrst.object+json"}, 406, "PGRST116"),
    ("/products?select=id&id=eq.0", {"Accept": "application/vnd.pgrst.object+json"}, 406, "PGRST116"),
    ("/products", {"Accept": "text/unknowntype"}, 406, "PGRST107"),
    ("/products", {"Range": "5-2"}, 416, "PGRST103"),
    ("/products?offset=9000", {"Prefer": "count=exact"}, 416, "PGRST103"),
    ("/products?select=id::nosuchtype&limit=1", {}, 400, "PGRST100"),  # casts: plain data types only
    ("/products?select=x:id::regclass&limit=1", {}, 400, "PGRST100"),  # no catalog lookups
    ("/products?id=cs.{1}", {}, 404, "42883"),  # no @> for bigint, as in PostgREST
    ("/products", {"Prefer": "handling=strict, count=sometimes"}, 400, "PGRST122"),
]


async def test_errors(analytics: httpx.AsyncClient) -> None:
    for url, headers, status, code in ERRORS:
        response = await analytics.get(url, headers=headers)
        assert response.status_code == status, (url, response.text)
        if code:
            assert response.json()["code"] == code, (url, response.text)


async def test_singular_csv_range_and_counts(analytics: httpx.AsyncClient) -> None:
    one = await analytics.get("/products?select=id,name&id=eq.3", headers={"Accept": "application/vnd.pgrst.object+json"})
    assert one.json() == {"id": 3, "name": one.json()["name"]}
    assert one.headers["content-type"] == "application/vnd.pgrst.object+json; charset=utf-8"

    csv = await analytics.get("/products?select=id,name,category&id=lt.3&order=id", headers={"Accept": "text/csv"})
    lines = csv.text.split("\n")
    assert csv.headers["content-type"] == "text/csv; charset=utf-8"
    assert lines[0] == "id,name,category" and lines[1].startswith("1,") and len(lines) == 3  # no trailing newline

    ranged = await analytics.get("/products?select=id&order=id&limit=3", headers={"Range": "1-5"})
    assert [r["id"] for r in ranged.json()] == [2, 3] and ranged.headers["content-range"] == "1-2/*"

    exact = await analytics.get("/products?select=id&limit=10", headers={"Prefer": "count=exact"})
    assert exact.status_code == 206 and exact.headers["content-range"] == "0-9/5000"
    assert exact.headers["preference-applied"] == "count=exact"
    whole = await analytics.get("/products?select=id&id=lte.4", headers={"Prefer": "count=exact"})
    assert whole.status_code == 200 and whole.headers["content-range"] == "0-3/4"
    planned = await analytics.get("/orders?select=id&limit=1", headers={"Prefer": "count=planned"})
    total = int(planned.headers["content-range"].split("/")[1])
    assert 1000 <= total <= 10000  # the planner's estimate of 3000
    estimated = await analytics.get("/products?select=id&id=lte.4", headers={"Prefer": "count=estimated"})
    assert estimated.headers["content-range"] == "0-3/4"  # small: exact
    empty = await analytics.get("/products?select=id&id=eq.0", headers={"Prefer": "count=exact"})
    assert empty.headers["content-range"] == "*/0"
    head = await analytics.head("/products?select=id&limit=2", headers={"Prefer": "count=exact"})
    assert head.status_code == 206 and head.content == b"" and head.headers["content-range"] == "0-1/5000"


async def test_embedding_reaches_only_readable_contracts(shop: Project, serve_project: object) -> None:
    keys = await prepare(shop)
    client, _ = await serve_project(shop)  # type: ignore[operator]
    # mobile may read products but not order_items: the relation does not exist for it
    response = await client.get("/v2/products?select=id,order_items(quantity)&limit=1",
                                headers={"apikey": keys["mobile"]})
    assert response.status_code == 400 and response.json()["code"] == "PGRST200"
