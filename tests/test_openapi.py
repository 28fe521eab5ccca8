"""The OpenAPI document at ``/`` (one per app and API version), the /docs page, and a schemathesis run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import SHOP, prepare, run_sync
from gatehouse.app import create_app
from gatehouse.config import AppConfig, Grant
from gatehouse.endpoints.docs import swagger_ui_dir
from gatehouse.endpoints.openapi import build_openapi, column_schema
from gatehouse.project import App, Project, load_project
from gatehouse.runtime import Runtime


@pytest.fixture
async def api(shop: Project, serve_project: Any) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    keys = await prepare(shop)
    _, runtime = await serve_project(shop)
    transport = httpx.ASGITransport(app=create_app(runtime, manage_runtime=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://gatehouse.test") as client:
        yield client, keys


async def document(http: httpx.AsyncClient, key: str, **headers: str) -> dict[str, Any]:
    response = await http.get("/", headers={"apikey": key, **headers})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/openapi+json; charset=utf-8"
    doc: dict[str, Any] = orjson.loads(response.content)
    OpenAPIV31SpecValidator(doc).validate()  # raises with the path of the first problem
    return doc


def columns(doc: dict[str, Any], contract: str) -> list[str]:
    return list(doc["components"]["schemas"][contract]["properties"])


async def test_web_sees_products_v1_only(api: tuple[httpx.AsyncClient, dict[str, str]], shop: Project) -> None:
    http, keys = api
    doc = await document(http, keys["web"])
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == f"{shop.name} API v1" and doc["info"]["version"] == "v1"
    assert "web" in doc["info"]["description"]
    assert doc["servers"] == [{"url": "http://gatehouse.test"}]
    assert list(doc["paths"]) == ["/products"]
    assert set(doc["paths"]["/products"]) == {"get", "head"}  # read is all web was granted
    assert set(doc["components"]["schemas"]) == {"products", "Error"}
    products = doc["components"]["schemas"]["products"]
    assert columns(doc, "products") == ["id", "name", "price"]
    assert products["description"] == "Products as the storefront first saw them: name and price."
    assert products["properties"]["id"] == {"type": ["integer", "null"], "format": "int64"}
    assert products["properties"]["price"] == {"type": ["number", "null"]}
    filters = [p["name"] for p in doc["paths"]["/products"]["get"]["parameters"] if "name" in p]
    assert filters == ["id", "name", "price"]
    assert set(doc["components"]["securitySchemes"]) == {"apiKey", "bearer"}
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "apiKey", "in": "header", "name": "apikey",
        "description": doc["components"]["securitySchemes"]["apiKey"]["description"]}
    assert doc["security"] == [{"apiKey": []}, {"bearer": []}]


async def test_each_app_sees_its_own_contracts(api: tuple[httpx.AsyncClient, dict[str, str]], shop: Project) -> None:
    http, keys = api
    analytics = await document(http, keys["analytics"])
    assert analytics["info"]["version"] == "v2"
    granted = sorted(f"/{grant.contract}" for grant in shop.apps["analytics"].config.grants)
    assert list(analytics["paths"]) == [*granted, "/rpc/order_total"]  # sorted, exactly what was granted
    assert {"/customer_summary", "/orders", "/products"} <= set(granted)
    assert columns(analytics, "products") == ["id", "name", "price", "category", "stock"]
    assert columns(analytics, "orders") == ["id", "user_id", "status", "created_at"]
    orders = analytics["components"]["schemas"]["orders"]["properties"]
    assert orders["created_at"] == {"type": ["string", "null"], "format": "date-time"}
    summary = analytics["components"]["schemas"]["customer_summary"]
    assert summary["description"].startswith("One row per customer")
    assert summary["properties"]["order_count"]["format"] == "int64"

    mobile = await document(http, keys["mobile"])
    assert list(mobile["paths"]) == ["/products"]
    assert set(mobile["components"]["schemas"]) == {"products", "Error"}
    text = orjson.dumps(mobile).decode()
    assert "orders" not in text and "customer_summary" not in text


async def test_accept_profile_chooses_the_version(api: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    http, keys = api
    doc = await document(http, keys["analytics"], **{"Accept-Profile": "v1"})
    assert doc["info"]["version"] == "v1"
    assert columns(doc, "products") == ["id", "name", "price"]
    web_v2 = await document(http, keys["web"], **{"Accept-Profile": "v2"})
    assert columns(web_v2, "products") == ["id", "name", "price", "category", "stock"]
    unknown = await http.get("/", headers={"apikey": keys["web"], "Accept-Profile": "v9"})
    assert unknown.status_code == 406 and unknown.json()["code"] == "PGRST106"
    csv = await http.get("/", headers={"apikey": keys["web"], "Accept": "text/csv"})
    assert csv.status_code == 406 and csv.json()["code"] == "PGRST107"
    openapi = await http.get("/", headers={"apikey": keys["web"], "Accept": "application/openapi+json"})
    assert openapi.status_code == 200


async def test_a_key_is_needed(api: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    http, keys = api
    missing = await http.get("/")
    assert missing.status_code == 401 and missing.json()["code"] == "PGRST302"
    assert set(missing.json()) == {"code", "message", "details", "hint"}
    wrong = await http.get("/", headers={"apikey": keys["web"][:-2] + "xx"})
    assert wrong.status_code == 401 and wrong.json()["code"] == "PGRST301"
    bearer = await http.get("/", headers={"Authorization": f"Bearer {keys['web']}"})
    assert bearer.status_code == 200
    head = await http.head("/", headers={"apikey": keys["web"]})
    assert head.status_code == 200 and head.content == b"" and head.headers["content-profile"] == "v1"


async def test_the_document_is_deterministic(api: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    http, keys = api
    first = await http.get("/", headers={"apikey": keys["analytics"], "Accept": "application/json"})
    second = await http.get("/", headers={"apikey": keys["analytics"]})
    assert first.status_code == 200 and first.content == second.content


async def test_docs_page(api: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    http, _ = api
    page = await http.get("/docs")  # no key: the page asks for one
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'const specUrl = "/";' in page.text and "SwaggerUIBundle(" in page.text
    assert 'preauthorizeApiKey("apiKey"' in page.text
    if swagger_ui_dir() is None:
        pytest.skip("swagger-ui-bundle-v2 is not installed: the page uses the CDN")
    assert 'src="/docs/static/swagger-ui-bundle.js"' in page.text
    script = await http.get("/docs/static/swagger-ui-bundle.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    css = await http.get("/docs/static/swagger-ui.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    missing = await http.get("/docs/static/nothing.js")
    assert missing.status_code == 404 and missing.json()["code"] == "PGRST125"


# --- without a database ------------------------------------------------------------------------------


@pytest.mark.parametrize(("pg_type", "expected"), [
    ("smallint", {"type": ["integer", "null"], "format": "int16"}),
    ("integer", {"type": ["integer", "null"], "format": "int32"}),
    ("numeric(10,2)", {"type": ["number", "null"]}),
    ("double precision", {"type": ["number", "null"], "format": "double"}),
    ("boolean", {"type": ["boolean", "null"]}),
    ("text", {"type": ["string", "null"]}),
    ("character varying(40)", {"type": ["string", "null"], "maxLength": 40}),
    ("character(3)", {"type": ["string", "null"], "maxLength": 3}),
    ("timestamp(3) with time zone", {"type": ["string", "null"], "format": "date-time"}),
    ("timestamp without time zone", {"type": ["string", "null"], "description": "ISO 8601 date and time, no offset"}),
    ("date", {"type": ["string", "null"], "format": "date"}),
    ("uuid", {"type": ["string", "null"], "format": "uuid"}),
    ("jsonb", {}),
    ("integer[]", {"type": ["array", "null"], "items": {"type": ["integer", "null"], "format": "int32"}}),
    ("character varying(5)[]", {"type": ["array", "null"], "items": {"type": ["string", "null"], "maxLength": 5}}),
    ("money", {"type": ["string", "null"]}),
    ('"Mood"', {"type": ["string", "null"]}),
])
def test_column_types(pg_type: str, expected: dict[str, Any]) -> None:
    assert column_schema(pg_type) == expected


def test_writes_are_documented_when_granted() -> None:
    project = load_project(SHOP)
    grants = (Grant(contract="orders", actions=("read", "insert", "update", "delete")),
              Grant(contract="customer_summary", actions=("insert",)))
    ops = App(name="ops", config=AppConfig(grants=grants), role="unused")
    doc = build_openapi(project, ops, 2, {}, "https://api.example")
    OpenAPIV31SpecValidator(doc).validate()
    assert set(doc["paths"]["/orders"]) == {"get", "head", "post", "patch", "delete"}
    assert set(doc["paths"]["/customer_summary"]) == {"post"}
    assert "/products" not in doc["paths"]
    for method, operation in doc["paths"]["/orders"].items():
        assert "401" in operation["responses"], method
    post = doc["paths"]["/orders"]["post"]
    assert {"$ref": "#/components/parameters/contentProfile"} in post["parameters"]  # writes: Content-Profile
    assert "201" in post["responses"] and "requestBody" in post
    # Without the schema cache, the columns still come from the contract.
    assert columns(doc, "orders") == ["id", "user_id", "status", "created_at"]


# --- schemathesis --------------------------------------------------------------------------------------

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def test_schemathesis_get_operations(shop: Project) -> None:
    """Generated requests for every GET the analytics app has: no 5xx, and every answer as documented.

    schemathesis runs the app on an event loop of its own, so the app's lifespan opens the runtime there (its
    pytest plugin ends the lifespan when the test ends). ``schemathesis.pytest.from_fixture`` would be the
    natural fit, but it fails on pytest 9.2 (it reads ``request.node._nodeid``), hence one @given per operation.
    """
    key = run_sync(prepare(shop))["analytics"]
    app = create_app(Runtime(shop), manage_runtime=True)
    schema = schemathesis.openapi.from_asgi("/", app, headers={"apikey": key}).include(method="GET")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/customer_summary", "/orders", "/products"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def holds_up(case: Any) -> None:
            case.call_and_validate(headers={"apikey": key}, checks=CHECKS)

        holds_up()
