"""Writes through contract views: insert, bulk, upsert, PUT, PATCH, DELETE, every Prefer, and refusals that
change nothing."""

from __future__ import annotations

import httpx
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.project import Project

TOML = """
[project]
name = "writes"

[databases.main]

[apps.clerk]
grants = [
    { contract = "items", actions = ["read", "insert", "update", "delete"] },
    { contract = "item_stats", actions = ["read", "insert"] },
    { contract = "tags", actions = ["read", "insert", "update", "delete"] },
]

[apps.reader]
grants = [{ contract = "items", actions = ["read"] }]

[contracts.tags]
allow_unfiltered_writes = true
"""
MIGRATION = """
CREATE TABLE items (
    id serial PRIMARY KEY,
    sku text NOT NULL UNIQUE,
    name text NOT NULL,
    qty integer NOT NULL DEFAULT 1 CHECK (qty >= 0),
    note text,
    secret text DEFAULT 'internal'
);
CREATE TABLE tags (id serial PRIMARY KEY, item_id integer REFERENCES items (id), label text NOT NULL);
INSERT INTO items (sku, name, qty) VALUES ('a-1', 'anvil', 3), ('b-2', 'bell', 0);
"""
CONTRACTS = {
    "items.v1.sql": "SELECT id, sku, name, qty, note FROM items",
    "item_stats.v1.sql": "SELECT count(*) AS n, sum(qty) AS total FROM items",
    "tags.v1.sql": "SELECT id, item_id, label FROM tags",
}


@pytest.fixture
async def clerk(make_project: ProjectFactory, serve_project: object) -> tuple[httpx.AsyncClient, Project, dict[str, str]]:
    project = make_project(toml=TOML, migrations={"V001__items.sql": MIGRATION}, contracts=CONTRACTS)
    keys = await prepare(project)
    client, _ = await serve_project(project)  # type: ignore[operator]
    client.headers["apikey"] = keys["clerk"]
    return client, project, keys


async def _items(project: Project) -> list[dict[str, object]]:
    async with operations.owner_connection(project) as conn:
        rows = await conn.fetch("SELECT id, sku, name, qty, note, secret FROM items ORDER BY id")
    return [dict(r) for r in rows]


async def test_insert_single_and_representation(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, _ = clerk
    minimal = await client.post("/items", json={"sku": "c-3", "name": "cog"})
    assert minimal.status_code == 201 and minimal.content == b"" and minimal.headers["content-range"] == "*/*"
    full = await client.post("/items?select=id,name", json={"sku": "d-4", "name": "drum", "qty": 7},
                             headers={"Prefer": "return=representation"})
    assert full.status_code == 201 and full.json() == [{"id": 4, "name": "drum"}]
    assert full.headers["preference-applied"] == "return=representation"
    located = await client.post("/items", json={"sku": "e-5", "name": "eel"}, headers={"Prefer": "return=headers-only"})
    assert located.status_code == 201 and located.headers["location"] == "/items?id=eq.5"
    rows = await _items(project)
    assert [r["sku"] for r in rows] == ["a-1", "b-2", "c-3", "d-4", "e-5"]
    assert rows[2]["qty"] == 1 and rows[2]["secret"] == "internal"  # the table's defaults apply


async def test_bulk_columns_and_missing_default(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, _ = clerk
    bulk = await client.post('/items?columns="sku","name","qty"', json=[
        {"sku": "f", "name": "fig", "qty": 2}, {"sku": "g", "name": "gem", "extra": "ignored"}],
        headers={"Prefer": "return=representation,missing=default,count=exact"})
    assert bulk.status_code == 201, bulk.text
    assert [(r["sku"], r["qty"]) for r in bulk.json()] == [("f", 2), ("g", 1)]  # missing qty → DEFAULT 1
    assert bulk.headers["content-range"] == "*/2"
    assert bulk.headers["preference-applied"] == "missing=default, return=representation, count=exact"
    mismatch = await client.post("/items", json=[{"sku": "h", "name": "hat"}, {"sku": "i"}])
    assert mismatch.status_code == 400 and mismatch.json()["code"] == "PGRST102"
    assert len(await _items(project)) == 4


async def test_upserts(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, _ = clerk
    merged = await client.post("/items?on_conflict=sku", json=[{"sku": "a-1", "name": "ANVIL", "qty": 9}],
                               headers={"Prefer": "resolution=merge-duplicates,return=representation"})
    assert merged.status_code == 200, merged.text  # every row existed
    assert merged.json()[0]["name"] == "ANVIL"
    assert merged.headers["preference-applied"] == "resolution=merge-duplicates, return=representation"
    mixed = await client.post("/items?on_conflict=sku", json=[{"sku": "a-1", "name": "x"}, {"sku": "z", "name": "zip"}],
                              headers={"Prefer": "resolution=ignore-duplicates,return=representation"})
    assert mixed.status_code == 201 and [r["sku"] for r in mixed.json()] == ["z"]
    rows = {r["sku"]: r for r in await _items(project)}
    assert rows["a-1"]["name"] == "ANVIL" and rows["a-1"]["qty"] == 9 and "z" in rows


async def test_put_replaces_one_row_by_key(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, _ = clerk
    created = await client.put("/items?id=eq.10", json={"id": 10, "sku": "p", "name": "pan"},
                               headers={"Prefer": "return=representation"})
    assert created.status_code == 201, created.text
    updated = await client.put("/items?id=eq.10", json={"id": 10, "sku": "p", "name": "pot"},
                               headers={"Prefer": "return=representation"})
    assert updated.status_code == 200 and updated.json()[0]["name"] == "pot"
    quiet = await client.put("/items?id=eq.10", json={"id": 10, "sku": "p", "name": "pit"})
    assert quiet.status_code == 204
    for url, body, status, code in [
        ("/items?id=gt.1", {"id": 2, "sku": "q", "name": "q"}, 405, "PGRST105"),
        ("/items?sku=eq.q", {"id": 2, "sku": "q", "name": "q"}, 405, "PGRST105"),
        ("/items?id=eq.11", {"id": 12, "sku": "q", "name": "q"}, 400, "PGRST115"),
        ("/items?id=eq.11&limit=1", {"id": 11, "sku": "q", "name": "q"}, 400, "PGRST114"),
    ]:
        response = await client.put(url, json=body)
        assert (response.status_code, response.json()["code"]) == (status, code), url
    assert [r["name"] for r in await _items(project) if r["id"] == 10] == ["pit"]


async def test_patch_and_delete(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, _ = clerk
    patched = await client.patch("/items?qty=gt.0", json={"note": "stocked"})
    assert patched.status_code == 204 and patched.headers["content-range"] == "0-0/*"
    shown = await client.patch("/items?id=eq.2&select=id,note", json={"note": "empty"},
                               headers={"Prefer": "return=representation"})
    assert shown.status_code == 200 and shown.json() == [{"id": 2, "note": "empty"}]
    none = await client.patch("/items?id=eq.99", json={"note": "x"}, headers={"Prefer": "return=representation"})
    assert none.status_code == 200 and none.json() == [] and none.headers["content-range"] == "*/*"
    empty = await client.patch("/items?id=eq.1", json={})
    assert empty.status_code == 204
    deleted = await client.delete("/items?id=eq.2", headers={"Prefer": "return=representation,count=exact"})
    assert deleted.status_code == 200 and deleted.json()[0]["sku"] == "b-2" and deleted.headers["content-range"] == "*/1"
    assert [(r["id"], r["note"]) for r in await _items(project)] == [(1, "stocked")]


async def test_prefer_tx_rollback_max_affected_and_singular(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, _ = clerk
    before = await _items(project)
    rolled = await client.post("/items", json={"sku": "r", "name": "rug"},
                               headers={"Prefer": "tx=rollback,return=representation"})
    assert rolled.status_code == 201 and rolled.json()[0]["sku"] == "r"
    assert "tx=rollback" in rolled.headers["preference-applied"]
    capped = await client.patch("/items?id=gt.0", json={"note": "all"},
                                headers={"Prefer": "handling=strict,max-affected=1"})
    assert capped.status_code == 400 and capped.json()["code"] == "PGRST124"
    assert capped.json()["details"] == "The query affects 2 rows"
    single = await client.delete("/items?id=gt.0", headers={"Accept": "application/vnd.pgrst.object+json",
                                                              "Prefer": "return=representation"})
    assert single.status_code == 406 and single.json()["code"] == "PGRST116"
    one = await client.patch("/items?id=eq.1", json={"qty": 4}, headers={
        "Accept": "application/vnd.pgrst.object+json", "Prefer": "return=representation"})
    assert one.status_code == 200 and one.json()["qty"] == 4
    after = await _items(project)
    assert [(r["sku"], r["note"]) for r in after] == [(r["sku"], r["note"]) for r in before]  # nothing else stuck


REFUSED = [
    # (method, url, body, headers, status, code)
    ("POST", "/items", {"sku": "x", "name": "x", "secret": "s"}, {}, 400, "PGRST204"),  # not in the contract
    ("POST", "/items", {"sku": "a-1", "name": "dup"}, {}, 409, "23505"),
    ("POST", "/items", {"sku": "x", "name": "x", "qty": -1}, {}, 400, "23514"),
    ("POST", "/items", {"sku": "x", "name": "x", "qty": "many"}, {}, 400, "22P02"),
    ("POST", "/items", {"name": "no sku"}, {}, 400, "23502"),
    ("POST", "/tags", {"item_id": 999, "label": "x"}, {}, 409, "23503"),
    ("POST", "/item_stats", {"n": 1}, {}, 405, "GH405"),  # an aggregate cannot be written
    ("PATCH", "/items", {"note": "everything"}, {}, 400, "GH400"),  # no filter
    ("DELETE", "/items", None, {}, 400, "GH400"),
    ("POST", "/items", "not json", {"Content-Type": "application/json"}, 400, "PGRST102"),
    ("POST", "/items", "[1, 2]", {"Content-Type": "application/json"}, 400, "PGRST102"),
    ("POST", "/items", "<xml/>", {"Content-Type": "application/xml"}, 400, "PGRST102"),
    ("POST", "/items", "x" * 2_000_000, {"Content-Type": "application/json"}, 413, "GH413"),
    ("POST", "/items", "[" + ",".join(['{"sku":"s","name":"n"}'] * 1001) + "]", {"Content-Type": "application/json"},
     413, "GH413"),
    ("POST", "/items", '{"sku":"d","name":"n","note":' + "[" * 40 + "]" * 40 + "}", {"Content-Type": "application/json"},
     400, "PGRST102"),
    ("PATCH", "/items?id=eq.1", [{"note": "a"}, {"note": "b"}], {}, 400, "PGRST102"),
    ("POST", "/items", {"sku": "x", "name": "x"}, {"Prefer": "handling=strict,return=everything"}, 400, "PGRST122"),
]


async def test_refusals_change_nothing(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, keys = clerk
    before = await _items(project)
    for method, url, body, headers, status, code in REFUSED:
        if isinstance(body, str):
            response = await client.request(method, url, content=body.encode(), headers=headers)
        else:
            response = await client.request(method, url, json=body, headers=headers)
        assert response.status_code == status, (method, url, response.text)
        assert response.json()["code"] == code, (method, url, response.text)
    reader = {"apikey": keys["reader"]}
    for method in ("POST", "PATCH", "DELETE"):
        denied = await client.request(method, "/items?id=eq.1", json={"name": "x"}, headers=reader)
        assert denied.status_code == 403, denied.text  # a read-only grant: refused before any database work
    unknown = await client.post("/tags", json={"label": "x"}, headers=reader)
    assert unknown.status_code == 404  # not granted at all: does not exist for this app
    assert await _items(project) == before


async def test_unfiltered_write_when_the_contract_allows(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, _, _ = clerk
    await client.post("/tags", json=[{"item_id": 1, "label": "a"}, {"item_id": 2, "label": "b"}])
    everything = await client.delete("/tags", headers={"Prefer": "count=exact"})
    assert everything.status_code == 204 and everything.headers["content-range"] == "*/2"


async def test_csv_insert(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, _ = clerk
    response = await client.post("/items", content=b"sku,name,note\nk1,kite,NULL\nk2,kettle,hot",
                                 headers={"Content-Type": "text/csv"})
    assert response.status_code == 201, response.text
    rows = {r["sku"]: r for r in await _items(project)}
    assert rows["k1"]["note"] is None and rows["k2"]["note"] == "hot"


async def test_options_lists_what_the_app_may_do(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, _, keys = clerk
    assert (await client.options("/items")).headers["allow"] == "OPTIONS,GET,HEAD,POST,PUT,PATCH,DELETE"
    assert (await client.options("/items", headers={"apikey": keys["reader"]})).headers["allow"] == "OPTIONS,GET,HEAD"
    assert (await client.options("/item_stats")).headers["allow"] == "OPTIONS,GET,HEAD"  # read-only view


async def test_constraint_errors_name_nothing_private(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, _, _ = clerk
    duplicate = (await client.post("/items", json={"sku": "a-1", "name": "dup"})).json()
    assert duplicate["message"] == "A row with the same key already exists"
    # PostgreSQL itself withholds the key's value from a role that cannot read the table's columns
    assert duplicate["details"] is None
    missing = (await client.post("/items", json={"name": "no sku"})).json()
    assert missing["message"] == "A value is required for column 'sku'"
    dangling = (await client.post("/tags", json={"item_id": 999, "label": "x"})).json()
    for body in (duplicate, missing, dangling):
        text = str(body)
        assert "items_sku_key" not in text and "tags_item_id_fkey" not in text and "relation" not in text


async def test_lost_database_connection_is_503_then_recovers(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, _ = clerk
    assert (await client.get("/items?select=id")).status_code == 200
    async with operations.owner_connection(project) as conn:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                           project.authenticator_role)
    statuses: list[int] = []
    while len(statuses) < 20 and statuses[-1:] != [200]:
        statuses.append((await client.get("/items?select=id")).status_code)
    assert set(statuses) <= {200, 503}, statuses  # never a 500
    assert statuses[-1] == 200, statuses  # the pool replaces the dead connections


async def test_rpc_is_answered_in_postgrest_shape(clerk: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, _, _ = clerk
    response = await client.post("/rpc/nope", json={})
    assert response.status_code == 404 and response.json()["code"] == "PGRST202"
    assert (await client.post("/rpc/nope", json={}, headers={"apikey": "bad"})).status_code == 401
