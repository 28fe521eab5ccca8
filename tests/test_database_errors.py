"""PostgreSQL's errors reach a client as messages of our own: with ``debug`` off no PostgreSQL message, detail,
hint, constraint, table or type name is shown, whatever the caller sent; with ``debug`` on, PostgreSQL's message
is added as ``details`` (for development only)."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from conftest import ProjectFactory, prepare
from gatehouse.db.sqlstate import api_error_from_postgres
from gatehouse.errors import DatabaseError

TOML = """
[project]
name = "dberrors"

[databases.main]

[apps.clerk]
grants = [{ contract = "items", actions = ["read", "insert", "update"] }]
"""
MIGRATION = """
CREATE TYPE size AS ENUM ('small', 'large');
CREATE TABLE items (id serial PRIMARY KEY, sku varchar(5) NOT NULL UNIQUE, qty smallint NOT NULL CHECK (qty >= 0),
                    made date NOT NULL DEFAULT '2024-01-01', size size NOT NULL DEFAULT 'small', body text);
INSERT INTO items (sku, qty, body) VALUES ('a-1', 1, 'hello');
"""
REQUESTS: list[tuple[str, str, object]] = [
    ("GET", "/items?id=eq.abc", None),
    ("GET", "/items?qty=gt.99999", None),
    ("GET", "/items?made=eq.2024-13-45", None),
    ("GET", "/items?made=eq.2024-02-30", None),
    ("GET", "/items?size=eq.huge", None),
    ("GET", "/items?body=match.(", None),
    ("GET", "/items?body=fts(klingon).word", None),
    ("GET", "/items?qty=eq(any).{1,x}", None),
    ("GET", "/items?id=in.(1,zz)", None),
    ("GET", "/items?body=like.%5C", None),
    ("POST", "/items", {"sku": "toolong", "qty": 1}),
    ("POST", "/items", {"sku": "b-1", "qty": 70000}),
    ("POST", "/items", {"sku": "b-1", "qty": "many"}),
    ("POST", "/items", {"sku": "a-1", "qty": 1}),
    ("POST", "/items", {"sku": "b-2", "qty": -1}),
    ("POST", "/items", {"qty": 1}),
    ("POST", "/items", {"sku": "b-3", "qty": 1, "size": "huge"}),
    ("POST", "/items", {"sku": "b-4", "qty": 1, "body": "nul\u0000"}),
    ("PATCH", "/items?id=eq.1", {"made": "someday"}),
]
POSTGRESQL_TEXT = ("invalid input", "syntax", "operator", "for type", "violates", "constraint", "relation",
                   "items_", "character varying", "smallint", "enum", "Failing row", "out of range for type",
                   "klingon", "0x00", "parentheses", "Key (")


async def _serve(make_project: ProjectFactory, serve_project: Any) -> tuple[httpx.AsyncClient, str]:
    project = make_project(toml=TOML, migrations={"V001__i.sql": MIGRATION},
                           contracts={"items.v1.sql": "SELECT id, sku, qty, made, size, body FROM items"})
    keys = await prepare(project)
    client, _ = await serve_project(project)
    return client, keys["clerk"]


async def test_no_postgresql_text_reaches_a_client(make_project: ProjectFactory, serve_project: Any) -> None:
    client, key = await _serve(make_project, serve_project)
    for method, url, body in REQUESTS:
        response = await client.request(method, url, json=body, headers={"apikey": key})
        assert 400 <= response.status_code < 500, (url, body, response.text)
        assert set(response.json()) == {"code", "message", "details", "hint"}
        for phrase in POSTGRESQL_TEXT:
            assert phrase not in response.text, (url, body, phrase, response.text)


async def test_debug_adds_postgresql_text_as_details(make_project: ProjectFactory, serve_project: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEHOUSE_SERVER__DEBUG", "true")
    client, key = await _serve(make_project, serve_project)
    response = await client.get("/items?id=eq.abc", headers={"apikey": key})
    assert response.status_code == 400 and response.json()["code"] == "22P02"
    assert response.json()["message"] == "A value in the request is not valid for its column's type"
    assert "PostgreSQL said: invalid input syntax for type integer" in response.json()["details"]


@pytest.mark.parametrize(("fields", "status"), [
    ({"C": "22P02", "M": 'invalid input syntax for type integer: "abc"', "H": "a hint from PostgreSQL"}, 400),
    ({"C": "22003", "M": 'value "99999" is out of range for type smallint'}, 400),
    ({"C": "42883", "M": "operator does not exist: text -> unknown", "H": "No operator matches ... casts."}, 404),
    ({"C": "42704", "M": 'text search configuration "klingon" does not exist'}, 400),
    ({"C": "22023", "M": "invalid parameter", "D": "private detail"}, 400),
    ({"C": "2202E", "M": "array subscript out of range"}, 400),
    ({"C": "23505", "M": 'duplicate key value violates unique constraint "items_sku_key"',
      "D": "Key (sku)=(a-1) already exists.", "n": "items_sku_key", "t": "items"}, 409),
    ({"C": "P0001", "M": "raised by a trigger on private_table", "D": "secret", "H": "secret hint"}, 400),
    ({"C": "42P01", "M": 'relation "private_table" does not exist'}, 404),
])
def test_every_mapping_writes_its_own_words(fields: dict[str, str], status: int) -> None:
    exc = asyncpg.PostgresError.new({"S": "ERROR", **fields})
    error = api_error_from_postgres(exc, columns=("sku",))
    assert isinstance(error, DatabaseError) and (error.status, error.code) == (status, fields["C"])
    shown = str(error.body())
    for value in (v for k, v in fields.items() if k != "C"):
        assert value not in shown, (value, shown)
    if fields["C"] == "23505":
        assert error.details == "Key columns: sku"  # the contract's own column, never the value
    debugged = api_error_from_postgres(exc, columns=("sku",), debug=True)
    assert debugged.message == error.message and fields["M"] in str(debugged.details)
