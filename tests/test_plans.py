"""Reads compiled once per query shape (query/plans.py): the shape itself, and that a cached plan answers
every later request of its shape exactly as a fresh compile would, for every app, version and tenant."""

from __future__ import annotations

import httpx
import orjson
import pytest

from conftest import prepare
from gatehouse import operations
from gatehouse.project import Project
from gatehouse.query.grammar import parse_pairs, query_pairs
from gatehouse.query.plans import PlanCache, ReadPlan, shape_of
from gatehouse.query.sql import CompiledQuery, ReadCompiler
from gatehouse.runtime import Runtime


def test_simple_comparisons_lose_their_values_and_nothing_else_does() -> None:
    one, other = shape_of("id=eq.17&select=id,name"), shape_of("id=eq.4711&select=id,name")
    assert one is not None and other is not None
    assert one.key == other.key and one.values == ("17",) and other.values == ("4711",)
    kept = shape_of("price=gte.10&order=id&limit=50&name=like.*mug*&id=in.(1,2)&or=(id.eq.1,id.eq.2)")
    assert kept is not None and kept.values == ("10",)
    assert ("limit", "50") in kept.key and ("name", "like.*mug*") in kept.key and ("id", "in.(1,2)") in kept.key
    # names that are not filters keep values that look like comparisons
    for query in ("order=eq.desc", "limit=eq.1", "select=eq.x", "order_items.order=eq.asc", "not.or=eq.1"):
        shape = shape_of(query)
        assert shape is not None and shape.values == (), query
    negated = shape_of("id=not.eq.5")
    assert negated is not None and negated.values == ()


def test_values_are_decoded_and_a_nul_anywhere_means_no_shape() -> None:
    shape = shape_of("name=eq.Green%20chair%20%2342&id=lt.9")
    assert shape is not None and shape.values == ("Green chair #42", "9")
    assert shape_of("name=eq.a%00b") is None
    assert shape_of("na%00me=eq.1") is None


def test_template_puts_one_marker_per_value() -> None:
    shape = shape_of("a=eq.1&b=gt.2&limit=3")
    assert shape is not None
    template = shape.template()
    assert [name for name, _ in template] == ["a", "b", "limit"]
    assert template[2] == ("limit", "3")
    assert template[0][1].startswith("eq.\x00") and template[1][1].startswith("gt.\x00")
    assert template[0][1] != template[1][1]


def test_a_plan_is_refused_when_its_markers_do_not_come_out_cleanly() -> None:
    shape = shape_of("a=eq.1")
    assert shape is not None
    marker = shape.template()[0][1][3:]
    assert ReadPlan.of(CompiledQuery("SELECT $1", [marker]), 1, offset=0, output_names=[], redacted_query="")
    assert ReadPlan.of(CompiledQuery("SELECT $1, $2", [marker, marker]), 1, offset=0, output_names=[],
                       redacted_query="") is None  # twice
    assert ReadPlan.of(CompiledQuery(f"SELECT '{marker}'", []), 1, offset=0, output_names=[],
                       redacted_query="") is None  # in the SQL text
    plan = ReadPlan.of(CompiledQuery("SELECT $1, $2", [5, marker]), 1, offset=0, output_names=[], redacted_query="")
    assert plan is not None and plan.bind(("x",)) == [5, "x"]


def test_the_cache_is_bounded_and_keeps_the_recently_used() -> None:
    cache = PlanCache(max_plans=2)
    plan = ReadPlan("SELECT 1", (), (), 0, (), "")
    cache.put("a", plan)
    cache.put("b", plan)
    assert cache.get("a") is plan  # a is now the most recent
    cache.put("c", plan)
    assert len(cache) == 2 and cache.get("b") is None and cache.get("a") is plan and cache.get("c") is plan


@pytest.fixture
async def served(shop: Project, serve_project: object) -> tuple[httpx.AsyncClient, Runtime, dict[str, str]]:
    keys = await prepare(shop)
    client, runtime = await serve_project(shop)  # type: ignore[operator]
    return client, runtime, keys


async def test_every_value_of_a_shape_gets_its_own_rows(
        served: tuple[httpx.AsyncClient, Runtime, dict[str, str]]) -> None:
    client, runtime, keys = served
    web = {"apikey": keys["web"]}
    first = await client.get("/products?id=eq.1&select=id,name", headers=web)
    assert first.status_code == 200
    misses = runtime.plans.misses
    for product in (2, 77, 4999, 5000, 5001):
        response = await client.get(f"/products?id=eq.{product}&select=id,name", headers=web)
        assert response.status_code == 200
        assert [row["id"] for row in response.json()] == ([product] if product <= 5000 else [])
    assert runtime.plans.misses == misses  # one compile for the shape, whatever the values
    cheap = await client.get("/products?price=lt.5&select=id,price&order=id", headers=web)
    dear = await client.get("/products?price=lt.50&select=id,price&order=id", headers=web)
    assert all(float(row["price"]) < 5 for row in cheap.json())
    assert len(dear.json()) > len(cheap.json())


async def test_a_bad_value_is_still_a_400_and_caches_nothing_wrong(
        served: tuple[httpx.AsyncClient, Runtime, dict[str, str]]) -> None:
    client, _, keys = served
    web = {"apikey": keys["web"]}
    assert (await client.get("/products?id=eq.3", headers=web)).status_code == 200
    bad = await client.get("/products?id=eq.three", headers=web)
    assert bad.status_code == 400 and bad.json()["code"] == "22P02"
    assert [r["id"] for r in (await client.get("/products?id=eq.4", headers=web)).json()] == [4]


async def test_apps_and_versions_never_share_a_plan(served: tuple[httpx.AsyncClient, Runtime, dict[str, str]]) -> None:
    client, _, keys = served
    query = "/products?id=eq.10"
    web = (await client.get(query, headers={"apikey": keys["web"]})).json()
    analytics = (await client.get(query, headers={"apikey": keys["analytics"]})).json()
    assert web and analytics and set(web[0]) != set(analytics[0])  # web is pinned to v1: other columns
    v1 = (await client.get(query, headers={"apikey": keys["analytics"], "Accept-Profile": "v1"})).json()
    assert set(v1[0]) == set(web[0])


async def test_what_the_headers_decide_is_kept_per_distinct_headers(
        served: tuple[httpx.AsyncClient, Runtime, dict[str, str]]) -> None:
    """``Runtime.routes``: each set of the headers a read depends on gets its own route, answered as if worked out
    afresh; a request refused while working it out leaves nothing behind."""
    client, runtime, keys = served
    query, analytics = "/products?id=lt.4&order=id", {"apikey": keys["analytics"]}
    plain = await client.get(query, headers=analytics)
    counted = await client.get(query, headers={**analytics, "Prefer": "count=exact"})
    ranged = await client.get(query, headers={**analytics, "Range": "1-1"})
    single = await client.get("/products?id=eq.2", headers={**analytics, "Accept": "application/vnd.pgrst.object+json"})
    head = await client.head(query, headers={**analytics, "Range": "1-1"})
    old = await client.get(query, headers={**analytics, "Accept-Profile": "v1"})
    assert plain.headers["content-range"] == "0-2/*" and [r["id"] for r in plain.json()] == [1, 2, 3]
    assert counted.headers["content-range"] == "0-2/3" and counted.headers["preference-applied"] == "count=exact"
    assert ranged.headers["content-range"] == "1-1/*" and [r["id"] for r in ranged.json()] == [2]
    assert single.json()["id"] == 2
    assert head.status_code == 200 and head.content == b"" and head.headers["content-range"] == "0-2/*"  # no Range
    assert old.headers["content-profile"] == "v1" and set(old.json()[0]) == {"id", "name", "price"}
    assert plain.headers["content-profile"] == "v2" and "preference-applied" not in plain.headers
    routes = len(runtime.routes)
    for refused in ({"Accept-Profile": "v9"}, {"Accept": "text/plain"}):
        assert (await client.get(query, headers={**analytics, **refused})).status_code == 406
    assert (await client.get("/orders", headers={"apikey": keys["mobile"]})).status_code == 404
    assert len(runtime.routes) == routes
    again = await client.get(query, headers={**analytics, "Prefer": "count=exact"})
    assert again.headers["content-range"] == "0-2/3" and again.json() == counted.json()


async def test_a_page_keeps_postgresqls_generic_plan(
        served: tuple[httpx.AsyncClient, Runtime, dict[str, str]]) -> None:
    """A page's limit is written into its SQL (``ReadCompiler._limit``). Bound as a parameter, it made PostgreSQL
    judge the generic plan of a filtered list dearer than a custom one, and plan every execution again."""
    _, runtime, _ = served
    compiler = ReadCompiler(runtime.schemas[1], frozenset({"products"}), runtime.project.max_rows(
        runtime.project.apps["web"], "products"))
    sql = compiler.read("products", parse_pairs(query_pairs("select=id,name,price&price=gte.10&order=id&limit=50"))).sql
    assert " LIMIT 50)" in sql and "OFFSET" not in sql
    async with operations.owner_connection(runtime.project) as conn:
        statement = await conn.prepare(sql)
        for price in range(10, 30):
            page = orjson.loads((await statement.fetchrow(str(price)))[0])
            assert len(page) == 50 and all(float(row["price"]) >= price for row in page)
        plans = await conn.fetchrow("SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                                    "WHERE statement = $1", sql)
    assert plans is not None and plans["custom_plans"] <= 5 and plans["generic_plans"] >= 15, dict(plans or {})
