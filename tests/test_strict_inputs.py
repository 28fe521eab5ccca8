"""What is ambiguous is refused, not guessed at, over the HTTP API: a body in another charset, a URL that is not
UTF-8, negative limits and offsets, two outputs of one name, junk after ``on_conflict``; every 405 says what is
allowed. And no PostgreSQL text reaches the client for the two requests that used to carry it: a JSON path on a
column that is not json, and a row filter's claim that cannot be a value of its column's type (403, decided
before the query). Every refused write leaves the table as it was, checked with SQL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import pytest_asyncio

from conftest import served_folder
from gatehouse.app import create_admin_app
from gatehouse.db.catalog import ViewShape
from gatehouse.errors import ApiError, ClaimDoesNotFit, JsonPathOnNonJsonColumn
from gatehouse.query.grammar import parse_query
from gatehouse.query.row_filters import bind_claims, parse_row_filter
from gatehouse.query.sql import ReadCompiler
from gatehouse.query.values import certainly_refused
from gatehouse.runtime import Runtime
from gatehouse.schema_cache import ApiSchema

IN_MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
"""The cases that use the module's server run in its event loop (the sync ones need none)."""

SECRET = "a-test-secret-that-is-long-enough-for-hs256!!"
FILTERED_APPS = {  # app → its row filter on notes, each comparing the token's "uid" with a column of another type
    "by_int": "user_id=eq.{claims.uid}",
    "by_uuid": "ref=eq.{claims.uid}",
    "by_flag": "flag=eq.{claims.uid}",
    "by_day": "created=eq.{claims.uid}",
    "by_list": "user_id=in.({claims.uid},0)",
    "by_feeling": "feeling=eq.{claims.uid}",  # an enum: judged by PostgreSQL, then mapped
}
ISSUER_APPS = ", ".join(f'"{app}" = "{app}"' for app in FILTERED_APPS)
FILTERED_GRANTS = "\n".join(
    f'[apps.{app}]\ngrants = [{{ contract = "notes", actions = ["read", "insert", "update", "delete"], '
    f'filter = "{row_filter}" }}]\n' for app, row_filter in FILTERED_APPS.items())
TOML = f"""
[project]
name = "strict"

[databases.main]

[auth.issuers.idp]
issuer = "https://idp.test/"
secret = "env:STRICT_JWT_SECRET"
algorithms = ["HS256"]
audience = "gatehouse"
app_claim = "azp"
apps = {{ {ISSUER_APPS} }}

[apps.admin]
functions = ["probe", "sneaky", "touch"]
grants = [
    {{ contract = "notes", actions = ["read", "insert", "update", "delete"] }},
    {{ contract = "comments", actions = ["read"] }},
    {{ contract = "note_stats", actions = ["read", "insert"] }},
]
{FILTERED_GRANTS}
"""
SCHEMA = """
CREATE TYPE feeling AS ENUM ('happy', 'sad');
CREATE TABLE notes (id serial PRIMARY KEY, user_id int NOT NULL, body text NOT NULL, data jsonb NOT NULL DEFAULT '{}',
                    ref uuid, flag boolean NOT NULL DEFAULT false, created date NOT NULL DEFAULT '2024-01-01',
                    feeling feeling NOT NULL DEFAULT 'happy');
CREATE TABLE comments (id serial PRIMARY KEY, note_id int NOT NULL REFERENCES notes (id), text text NOT NULL);
"""
SEED = """
INSERT INTO notes (user_id, body, data, ref, flag, created, feeling) VALUES
    (1, 'first', '{"a": {"b": 1}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, '2024-01-01', 'sad'),
    (2, 'second', '{"a": {"b": 2}}', NULL, false, '2025-06-01', 'happy');
INSERT INTO comments (note_id, text) VALUES (1, 'nice'), (1, 'again'), (2, 'meh');
"""
MIGRATION = SCHEMA + SEED

CONTRACTS = {
    "notes.v1.sql": "SELECT id, user_id, body, data, ref, flag, created, feeling FROM notes",
    "comments.v1.sql": "SELECT id, note_id, text FROM comments",
    "note_stats.v1.sql": "SELECT user_id, count(*) AS n FROM notes GROUP BY user_id",
}
LOGIC = '''
import gatehouse
from gatehouse.logic.context import Context


@gatehouse.rpc(read_only=True)
async def probe(ctx: Context, query: str) -> list[dict[str, object]]:
    return await ctx.read("notes", query)


@gatehouse.rpc(read_only=True)
async def sneaky(ctx: Context) -> None:
    await ctx.insert("notes", {"user_id": 9, "body": "written by a read-only function"})


@gatehouse.rpc
async def touch(ctx: Context) -> None:
    return None
'''
POSTGRESQL_TEXT = ("invalid input", "syntax", "operator does not exist", "for type", "integer", "uuid", "boolean",
                   "violates", "relation", "SELECT", "_gh_", "api_v1", "$1")
"""Phrases of PostgreSQL's messages and of our SQL: none may reach a client with debug off."""


class World:
    def __init__(self, client: httpx.AsyncClient, database: asyncpg.Connection, runtime: Runtime, key: str) -> None:
        self.client, self.database, self.runtime, self.key = client, database, runtime, key

    @property
    def admin(self) -> dict[str, str]:
        return {"apikey": self.key}

    async def table(self, sql: str = "SELECT id, user_id, body FROM notes ORDER BY id") -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self.database.fetch(sql)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(server_uri: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    """One project and server for the module's cases (a project of its own costs each case half a second)."""
    files = {"gatehouse.toml": TOML, "migrations/V001__s.sql": MIGRATION, "logic/probe.py": LOGIC,
             **{f"contracts/{name}": sql for name, sql in CONTRACTS.items()}}
    root = tmp_path_factory.mktemp("strict_inputs") / "project"
    async with served_folder(server_uri, root, files, "strict", {"STRICT_JWT_SECRET": SECRET}) as folder:
        yield World(folder.client, folder.database, folder.runtime, folder.keys["admin"])


@pytest_asyncio.fixture(loop_scope="module")
async def world(served: World) -> World:
    """The module's server with its rows back to the seed, whatever the cases before it wrote."""
    await served.database.execute("DELETE FROM comments; DELETE FROM notes; "
                                  "ALTER SEQUENCE notes_id_seq RESTART; ALTER SEQUENCE comments_id_seq RESTART; "
                                  + SEED)
    return served


def user(app: str, uid: object) -> dict[str, str]:
    now = int(time.time())
    claims = {"iss": "https://idp.test/", "aud": "gatehouse", "azp": app, "sub": "u1", "uid": uid, "iat": now,
              "exp": now + 300}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


def no_postgresql_text(response: httpx.Response) -> None:
    assert set(response.json()) == {"code", "message", "details", "hint"}, response.text
    for phrase in POSTGRESQL_TEXT:
        assert phrase not in response.text, (phrase, response.text)


# --- 1. no PostgreSQL text: JSON paths and claims are decided before the query ------------------------------


@pytest.mark.parametrize("query", [
    "select=body->a", "select=id,body->>a", "select=x:body->a->>b", "body->>a=eq.1", "order=body->a",
    "or=(body->>a.eq.1,id.eq.1)", "select=id,comments(text->a)",
])
@IN_MODULE_LOOP
async def test_a_json_path_on_a_column_that_is_not_json_is_400(world: World, query: str) -> None:
    response = await world.client.get(f"/notes?{query}", headers=world.admin)
    assert response.status_code == 400 and response.json()["code"] == "GH400", response.text
    column = "text" if "comments" in query else "body"
    assert f"'{column}'" in response.json()["message"]
    assert "operator" not in response.text and "unknown" not in response.text


@IN_MODULE_LOOP
async def test_a_json_path_on_jsonb_still_works(world: World) -> None:
    response = await world.client.get("/notes?select=id,b:data->a->>b&data->a->>b=eq.2", headers=world.admin)
    assert response.status_code == 200 and response.json() == [{"id": 2, "b": "2"}]


def test_a_json_path_on_text_is_refused_by_the_compiler() -> None:
    shape = ViewShape("api_v1", "notes", {"id": "integer", "body": "text", "data": "jsonb"}, frozenset())
    schema = ApiSchema(1, {"notes": shape})
    with pytest.raises(JsonPathOnNonJsonColumn):
        ReadCompiler(schema, frozenset({"notes"}), 10).read("notes", parse_query("select=body->a"))


@pytest.mark.parametrize(("app", "fits", "misfits"), [
    ("by_int", 1, ["abc", "1.5", "99999999999", "0x", ""]),
    ("by_uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", ["abc", 42, "a0eebc99"]),
    ("by_flag", True, ["maybe", "2"]),
    ("by_day", "2024-01-01", ["abc", "soon"]),
    ("by_list", 1, ["abc"]),
    ("by_feeling", "sad", ["abc", "angry"]),
])
@IN_MODULE_LOOP
async def test_a_claim_that_does_not_fit_the_filter_column_is_403(world: World, app: str, fits: object,
                                                                   misfits: list[object]) -> None:
    good = await world.client.get("/notes?select=id", headers=user(app, fits))
    assert good.status_code == 200 and good.json() == [{"id": 1}], good.text
    before = await world.table()
    for sub in misfits:
        headers = user(app, sub)
        for method, url, body in [("GET", "/notes?select=id", None), ("HEAD", "/notes", None),
                                  ("GET", "/notes?select=id&id=gt.0&order=body", None),
                                  ("POST", "/notes", {"user_id": 1, "body": "x"}),
                                  ("PATCH", "/notes?id=eq.1", {"body": "changed"}),
                                  ("DELETE", "/notes?id=eq.1", None)]:
            response = await world.client.request(method, url, json=body, headers=headers)
            assert response.status_code == 403, (app, sub, method, response.text)
            assert response.headers["proxy-status"] == "PostgREST; error=GH403"
            if method != "HEAD":
                no_postgresql_text(response)
                assert response.json()["details"] == "claim uid cannot match the filtered column"
    assert await world.table() == before


def test_a_claim_that_cannot_fit_is_refused_before_any_sql() -> None:
    """For the common types the compiler decides: no statement is built, so none is sent."""
    shape = ViewShape("api_v1", "notes", {"id": "integer", "user_id": "integer", "ref": "uuid"}, frozenset())
    schema = ApiSchema(1, {"notes": shape})
    for row_filter, uid in [("user_id=eq.{claims.uid}", "abc"), ("ref=eq.{claims.uid}", "42"),
                            ("user_id=in.(0,{claims.uid})", "x"), ("or=(id.eq.1,user_id.gt.{claims.uid})", "1.5")]:
        filters = {"notes": bind_claims(parse_row_filter(row_filter), {"uid": uid})}
        with pytest.raises(ClaimDoesNotFit) as refused:
            ReadCompiler(schema, frozenset({"notes"}), 10, filters).read("notes", parse_query("select=id"))
        assert (refused.value.status, refused.value.code) == (403, "GH403")
    # the same text typed by the caller is the caller's own value: compiled, and PostgreSQL judges it
    ReadCompiler(schema, frozenset({"notes"}), 10).read("notes", parse_query("user_id=eq.abc"))


TYPED_VALUES = {
    "smallint": ["1", "32767", "32768", "-32768", "-32769", " 7 ", "+3", "1e2", "0x10", "1_0", "\u0663", "", "-", "1.0"],
    "integer": ["2147483647", "2147483648", "00042", "4 2", "0b101", "0o17", "_1", "1_", "1__0"],
    "bigint": ["9223372036854775807", "9223372036854775808", "-9223372036854775808", "\uff11\uff12"],
    "numeric": ["1.5", ".5", "5.", "1e5", "1e", "e1", "NaN", "nan", "inf", "-Infinity", "1.2.3", "--1", "0x1F",
                "1_000.5", "\u0661"],
    "numeric(5,2)": ["999.99", "999.995", "-999.994", "1000", "0.001", "1e2", "1e3", "NaN"],
    "double precision": ["1e308", "1e400", "-0", "Infinity", "inf", "x", "1,5"],
    "real": ["3.4e38", "1e39", "abc"],
    "uuid": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
             "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", "a0eebc999c0b4ef8bb6d6bb9bd380a11",
             "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", "-a0eebc999c0b4ef8bb6d6bb9bd380a11",
             "a0eebc999c0b4ef8bb6d6bb9bd380a11-", " a0eebc999c0b4ef8bb6d6bb9bd380a11", "g0eebc999c0b4ef8bb6d6bb9bd380a11"],
    "boolean": ["t", "TRUE", " yes ", "y", "n", "no", "on", "of", "off", "o", "1", "0", "01", "truth", "", "nope"],
    "date": ["2024-01-01", "today", "epoch", "infinity", "-infinity", "Jan 8 1999", "abc", "soon", "J2451187",
             "2024-13-01", "0001-01-01 BC"],
    "timestamp with time zone": ["now", "allballs", "2024-01-01 10:00+02", "tomorrow", "never", "1999-01-08 04:05:06 PST8PDT"],
    "timestamp without time zone": ["yesterday", "2024-02-30", "x", "1e5"],
    "text": ["anything", "", "a\x00b"],
    "character varying(3)": ["toolong", "ok"],
}


@IN_MODULE_LOOP
async def test_certainly_refused_is_never_wrong(server_uri: str) -> None:
    """Whatever ``certainly_refused`` refuses, PostgreSQL refuses too (the other way round is allowed: doubt)."""
    conn = await asyncpg.connect(server_uri)
    try:
        for column_type, values in TYPED_VALUES.items():
            for value in values:
                if not certainly_refused(value, column_type):
                    continue
                with pytest.raises(asyncpg.PostgresError):
                    await conn.fetchval(f"SELECT $1::text::{column_type}", value)
    finally:
        await conn.close()


# --- 2. what is ambiguous is refused -----------------------------------------------------------------------


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/json; charset=latin-1", '{"user_id": 5, "body": "caf\xe9"}'.encode("latin-1")),
    ("application/json;charset=ISO-8859-1", b'{"user_id": 5, "body": "x"}'),
    ("text/csv; charset=utf-16", "user_id,body\n5,x".encode("utf-16")),
    ('text/csv; charset="windows-1252"', b"user_id,body\n5,x"),
    ("application/x-www-form-urlencoded; charset=latin-1", b"user_id=5&body=x"),
])
@IN_MODULE_LOOP
async def test_a_body_in_another_charset_is_415(world: World, content_type: str, body: bytes) -> None:
    before = await world.table()
    response = await world.client.post("/notes", content=body, headers={**world.admin, "Content-Type": content_type})
    assert response.status_code == 415 and response.json()["code"] == "GH415", response.text
    assert await world.table() == before


@IN_MODULE_LOOP
async def test_utf8_bodies_are_taken_and_bad_bytes_refused(world: World) -> None:
    for index, content_type in enumerate(["application/json; charset=utf-8", 'application/json; charset="UTF-8"',
                                          "application/json;charset=utf8"]):
        body = f'{{"user_id": 5, "body": "café {index}"}}'.encode()
        response = await world.client.post("/notes", content=body, headers={**world.admin, "Content-Type": content_type})
        assert response.status_code == 201, response.text
    before = await world.table()
    for content_type, body in [("application/json", b'{"user_id": 5, "body": "caf\xe9"}'),
                               ("text/csv", b"user_id,body\n5,caf\xe9"),
                               ("application/x-www-form-urlencoded", b"user_id=5&body=caf%E9"),
                               ("application/x-www-form-urlencoded", b"user_id=5&body=caf\xe9")]:
        response = await world.client.post("/notes", content=body, headers={**world.admin, "Content-Type": content_type})
        assert response.status_code == 400 and response.json()["code"] == "PGRST102", (content_type, response.text)
    assert await world.table() == before


@pytest.mark.parametrize("url", [
    "/notes?body=eq.caf%E9", "/notes?select=%FF", "/notes?or=(body.eq.%C3)", "/not%FFes", "/v1/notes%C3?select=id",
    "/rpc/probe?query=%FF",
])
@IN_MODULE_LOOP
async def test_a_url_that_is_not_utf8_is_400(world: World, url: str) -> None:
    response = await world.client.get(url, headers=world.admin)
    assert response.status_code == 400 and response.json()["code"] == "GH400", response.text
    assert "UTF-8" in response.json()["message"]


@IN_MODULE_LOOP
async def test_a_logic_read_refuses_a_query_that_is_not_utf8(world: World) -> None:
    response = await world.client.post("/rpc/probe", json={"query": "body=eq.caf%E9"}, headers=world.admin)
    assert response.status_code == 400 and response.json()["code"] == "GH400", response.text
    fine = await world.client.post("/rpc/probe", json={"query": "body=eq.first&select=id"}, headers=world.admin)
    assert fine.status_code == 200 and fine.json() == [{"id": 1}]


@pytest.mark.parametrize(("query", "headers"), [
    ("offset=-1", {}), ("limit=-0", {}), ("offset=%2D1", {}), ("limit=1.5", {}),
    ("select=id,comments(text)&comments.offset=-1", {}), ("select=id,comments(text)&comments.limit=-2", {}),
    ("", {"Range": "items=-5-3"}), ("", {"Range": "-5-3"}), ("", {"Range": "items=-5"}), ("", {"Range": "items=a-b"}),
    ("", {"Range": "items=0-99999999999999999999"}),
])
@IN_MODULE_LOOP
async def test_negative_limits_offsets_and_ranges_are_400(world: World, query: str, headers: dict[str, str]) -> None:
    response = await world.client.get(f"/notes?{query}", headers={**world.admin, **headers})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == ("GH400" if headers else "PGRST100")


@IN_MODULE_LOOP
async def test_well_formed_ranges_still_work(world: World) -> None:
    ranged = await world.client.get("/notes?select=id&order=id", headers={**world.admin, "Range": "items=1-1"})
    assert ranged.json() == [{"id": 2}] and ranged.headers["content-range"] == "1-1/*"
    other_unit = await world.client.get("/notes?select=id&order=id", headers={**world.admin, "Range": "bytes=0-0"})
    assert other_unit.status_code == 200 and len(other_unit.json()) == 2  # a range of bytes is not ours: ignored
    backwards = await world.client.get("/notes", headers={**world.admin, "Range": "items=3-1"})
    assert backwards.status_code == 416


@pytest.mark.parametrize("select", [
    "id,id", "a:id,a:body", "*,id", "id,data->a,a:body", "body,body:id", "data->a->b,data->>b",
    "id,comments(id,id)", "id,comments(*,text)", "comments:id,comments(text)", "id,x:comments(id),x:body",
])
@IN_MODULE_LOOP
async def test_two_outputs_of_one_name_are_400(world: World, select: str) -> None:
    response = await world.client.get(f"/notes?select={select}", headers=world.admin)
    assert response.status_code == 400 and response.json()["code"] == "GH400", response.text
    assert "twice" in response.json()["message"]


@IN_MODULE_LOOP
async def test_distinct_names_at_different_levels_are_fine(world: World) -> None:
    response = await world.client.get("/notes?select=id,comments(id,text)&id=eq.2", headers=world.admin)
    assert response.status_code == 200 and response.json() == [{"id": 2, "comments": [{"id": 3, "text": "meh"}]}]


@IN_MODULE_LOOP
async def test_a_write_whose_representation_repeats_a_name_changes_nothing(world: World) -> None:
    before = await world.table()
    response = await world.client.post("/notes?select=id,id", json={"user_id": 5, "body": "x"},
                                       headers={**world.admin, "Prefer": "return=representation"})
    assert response.status_code == 400 and response.json()["code"] == "GH400", response.text
    assert await world.table() == before


@pytest.mark.parametrize("on_conflict", ["id)junk", "id;drop", 'id"x"', "id,", ",id", "id id2,"])
@IN_MODULE_LOOP
async def test_junk_after_the_on_conflict_columns_is_400(world: World, on_conflict: str) -> None:
    before = await world.table()
    response = await world.client.post(f"/notes?on_conflict={on_conflict}", json={"id": 1, "user_id": 1, "body": "x"},
                                       headers={**world.admin, "Prefer": "resolution=merge-duplicates"})
    assert response.status_code == 400, response.text
    assert await world.table() == before
    merged = await world.client.post("/notes?on_conflict=id", json={"id": 1, "user_id": 1, "body": "merged"},
                                     headers={**world.admin, "Prefer": "resolution=merge-duplicates"})
    assert merged.status_code == 200, merged.text


@IN_MODULE_LOOP
async def test_every_405_says_what_is_allowed(world: World) -> None:
    key = world.admin
    row = {"user_id": 1, "n": 1}
    cases: list[tuple[str, str, object, str]] = [
        ("TRACE", "/notes", None, "OPTIONS, GET, HEAD, POST, PUT, PATCH, DELETE"),
        ("PUT", "/", None, "OPTIONS, GET, HEAD"),
        ("OPTIONS", "/docs", None, "GET, HEAD"),
        ("PUT", "/rpc/probe", None, "OPTIONS, GET, HEAD, POST"),  # PGRST101, before the function is looked up
        ("GET", "/rpc/touch", None, "POST"),  # a function that may write takes POST only
        ("POST", "/rpc/sneaky", {}, "GET, HEAD, POST"),  # 25006 from PostgreSQL: it wrote in a read-only function
        ("POST", "/note_stats", row, "OPTIONS, GET, HEAD"),  # GH405: the view cannot take writes
        ("PUT", "/notes?body=eq.x", row, "OPTIONS, GET, HEAD, POST, PATCH, DELETE"),  # PGRST105: not by key
    ]
    before = await world.table()
    for method, url, body, allow in cases:
        response = await world.client.request(method, url, headers=key, json=body)
        assert response.status_code == 405, (method, url, response.text)
        assert response.headers["allow"] == allow, (method, url, response.headers)
    assert await world.table() == before
    static = await world.client.post("/docs/static/swagger-ui.css", headers=key)
    assert static.status_code in (404, 405)
    if static.status_code == 405:
        assert static.headers["allow"] == "GET, HEAD"
    admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_admin_app(world.runtime)),
                              base_url="http://admin.test")
    async with admin:
        refused = await admin.put("/live")
        assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"


def test_every_405_class_demands_its_allow() -> None:
    from gatehouse.errors import ContractNotWritable, MethodNotAllowed, PutFilterNotKey, RpcMethodNotAllowed

    for kind in (MethodNotAllowed, RpcMethodNotAllowed, PutFilterNotKey, ContractNotWritable):
        with pytest.raises(TypeError):
            kind("no allow")  # type: ignore[call-arg]
        assert kind("x", allow=("GET", "HEAD")).headers["Allow"] == "GET, HEAD"
        assert isinstance(kind("x", allow=()), ApiError)
