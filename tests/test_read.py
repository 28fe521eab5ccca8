"""Reading contracts over HTTP: PostgREST's dialect, answers per app and version, errors in its shape."""

from __future__ import annotations

from decimal import Decimal

import httpx
import orjson
import pytest

from conftest import prepare
from gatehouse.project import Project

# (case, app, url, headers) → (status, check on the JSON body)
CASES: list[tuple[str, str, str, dict[str, str], int, object]] = [
    ("web is pinned to v1", "web", "/products?id=eq.7", {}, 200, [{"id": 7, "name": "Quiet drill #7", "price": None}]),
    ("analytics gets v2 by default", "analytics", "/products?id=eq.7&select=id,category,stock", {}, 200,
     [{"id": 7, "category": "tools", "stock": None}]),
    ("profile header", "web", "/products?id=eq.7&select=id,stock", {"Accept-Profile": "v2"}, 200,
     [{"id": 7, "stock": None}]),
    ("public is the app's default", "web", "/products?id=eq.7", {"Accept-Profile": "public"}, 200,
     [{"id": 7, "name": "Quiet drill #7", "price": None}]),
    ("path prefix", "web", "/v2/products?id=eq.7&select=id,stock", {}, 200, [{"id": 7, "stock": None}]),
    ("alias", "web", "/products?id=eq.7&select=ident:id", {}, 200, [{"ident": 7}]),
    ("in + order desc", "web", "/products?id=in.(3,1,2)&select=id&order=id.desc", {}, 200,
     [{"id": 3}, {"id": 2}, {"id": 1}]),
    ("not.in", "web", "/products?id=not.in.(1,2)&id=lte.4&select=id&order=id", {}, 200, [{"id": 3}, {"id": 4}]),
    ("range filters", "web", "/products?id=gt.10&id=lte.12&select=id&order=id", {}, 200, [{"id": 11}, {"id": 12}]),
    ("neq + limit", "web", "/products?id=neq.1&select=id&order=id&limit=2", {}, 200, [{"id": 2}, {"id": 3}]),
    ("offset", "web", "/products?select=id&order=id&limit=2&offset=10", {}, 200, [{"id": 11}, {"id": 12}]),
    ("like with *", "web", "/products?name=like.*%231*&id=lt.14&select=id&order=id", {}, 200,
     [{"id": 1}, {"id": 10}, {"id": 11}, {"id": 12}, {"id": 13}]),
    ("ilike", "web", "/products?name=ilike.QUIET+DRILL+%237&select=id", {}, 200, [{"id": 7}]),
    ("is null", "analytics", "/products?category=is.null&select=id", {}, 200, []),
    ("not.is.null", "analytics", "/products?category=not.is.null&select=id&limit=1&order=id", {}, 200, [{"id": 1}]),
    ("empty result", "web", "/products?id=eq.999999", {}, 200, []),
    ("eq on text", "analytics", "/orders?status=eq.cancelled&select=id&order=id&limit=2", {}, 200,
     [{"id": 3}, {"id": 7}]),
    ("bad value for type", "web", "/products?id=eq.abc", {}, 400, "22P02"),
    ("bad operator", "web", "/products?id=xx.1", {}, 400, "PGRST100"),
    ("unknown column", "web", "/products?stock=eq.1", {}, 400, "42703"),
    ("unknown select column", "web", "/products?select=cost", {}, 400, "42703"),
    ("private table name", "web", "/categories", {}, 404, "PGRST205"),
    ("not granted looks unknown", "mobile", "/orders", {}, 404, "PGRST205"),
    ("unknown contract", "mobile", "/nothing", {}, 404, "PGRST205"),
    ("unknown profile", "web", "/products", {"Accept-Profile": "v3"}, 406, "PGRST106"),
    ("unknown path version", "web", "/v9/products", {}, 406, "PGRST106"),
    ("negative limit", "web", "/products?limit=-1", {}, 416, "PGRST103"),
    ("deep path", "web", "/a/b/c", {}, 404, "PGRST125"),
    ("unsupported method", "web", "/products", {"X-Method": "TRACE"}, 405, "PGRST117"),
    ("write without the grant", "web", "/products?id=eq.1", {"X-Method": "DELETE"}, 403, "42501"),
]


@pytest.fixture
async def client(shop: Project, serve_project: object) -> tuple[httpx.AsyncClient, dict[str, str]]:
    keys = await prepare(shop)
    client, _ = await serve_project(shop)  # type: ignore[operator]
    return client, keys


async def test_cases(client: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    http, keys = client
    for case, app, url, headers, status, expected in CASES:
        method = headers.pop("X-Method", "GET")
        response = await http.request(method, url, headers={"apikey": keys[app], **headers})
        assert response.status_code == status, (case, response.text)
        body = orjson.loads(response.content)
        if isinstance(expected, str):
            assert set(body) == {"code", "message", "details", "hint"}, case
            assert body["code"] == expected, (case, body)
            assert response.headers["proxy-status"].endswith(f"error={expected}"), case
            continue
        assert isinstance(expected, list)
        assert len(body) == len(expected), (case, body)
        for got, want in zip(body, expected, strict=True):
            for key, value in want.items():
                if value is not None:  # None: present, value not checked
                    assert got[key] == value, (case, key, got)
            assert set(got) == set(want), (case, got)


async def test_values_match_the_database(client: tuple[httpx.AsyncClient, dict[str, str]], shop: Project) -> None:
    http, keys = client
    response = await http.get("/products?id=eq.42", headers={"apikey": keys["analytics"]})
    (row,) = response.json()
    assert Decimal(str(row["price"])) > 0 and isinstance(row["stock"], int)
    assert row["category"] in {"books", "garden", "kitchen", "toys", "music", "sports", "office", "tools",
                               "games", "outdoor", "health", "pets"}


async def test_content_range_and_headers(client: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    http, keys = client
    headers = {"apikey": keys["web"]}
    response = await http.get("/products?select=id&order=id&limit=5&offset=10", headers=headers)
    assert response.headers["content-range"] == "10-14/*"
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["content-profile"] == "v1"
    second = await http.get("/products?select=id&limit=1", headers={**headers, "X-Request-Id": "trace-42"})
    assert response.headers["x-request-id"] and response.headers["x-request-id"] != "trace-42"
    assert second.headers["x-request-id"] == "trace-42"  # a caller's id is kept, for tracing across services
    empty = await http.get("/products?id=eq.0", headers=headers)
    assert empty.headers["content-range"] == "*/*"
    assert empty.content == b"[]"
    head = await http.head("/products?select=id&limit=3", headers=headers)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-range"] == "0-2/*"


async def test_max_rows_caps_every_response(client: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    http, keys = client
    web = await http.get("/products?select=id", headers={"apikey": keys["web"]})  # quota max_rows = 100
    assert len(web.json()) == 100 and web.headers["content-range"] == "0-99/*"
    mobile = await http.get("/products?select=id&limit=500", headers={"apikey": keys["mobile"]})  # 50
    assert len(mobile.json()) == 50
    analytics = await http.get("/products?select=id&limit=20", headers={"apikey": keys["analytics"]})
    assert len(analytics.json()) == 20


async def test_errors_never_show_sql_or_private_names(client: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    http, keys = client
    for url in ["/products?id=eq.1'%20OR%201=1--", "/products?price=gt.abc", "/products?id=in.(1,x)",
                "/products?name=eq.%00", "/customer_summary?total_spent=lt.NaNx"]:
        response = await http.get(url, headers={"apikey": keys["analytics"]})
        assert 400 <= response.status_code < 500, (url, response.text)
        text = response.text.lower()
        for leak in ("select ", "api_v", "public.", "_gh_row", "traceback", "categories", "users"):
            assert leak not in text, (url, text)
