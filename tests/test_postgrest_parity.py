"""PostgREST's own expectations, held against gatehouse: cases ported from PostgREST's test suite
(``test/spec/Feature/**``, release 14-16, the wording current clients see) onto a small fixture of our own (clients,
projects, tasks, items...), each with PostgREST's status, headers and JSON body.

Every case names the spec it comes from. Cases of a feature gatehouse does not have at all (computed columns,
aggregates, spreads, RAISE with headers, custom media types, an anonymous role) are not ported; answers that
differ on purpose are in ``DIFFERENCES`` below, each asserting gatehouse's own answer and named in
docs/postgrest-differences.md. A case marked ``pending`` is a known gap, run as ``xfail(strict=True)`` so
it turns red the day it is fixed. Cases that write start from freshly seeded tables and check them afterwards.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import jwt
import orjson
import pytest
import pytest_asyncio

from conftest import served_folder
from gatehouse.db.faults import cannot_connect
from gatehouse.http.render import content_location
from gatehouse.query.suggest import close_columns, missing_column_hint
from gatehouse.suggestions import closest
from parity_calls import CALLS
from parity_cases import CASES, STRICT, Case, err, prefer

SECRET = "a-parity-secret-that-is-long-enough-for-hs256!"
TOML = """
[project]
name = "parity"

[databases.main]

[auth.issuers.idp]
issuer = "https://idp.test/"
secret = "env:PARITY_JWT_SECRET"
algorithms = ["HS256"]
audience = "gatehouse"
app_claim = "azp"
apps = { "parity-web" = "client" }

[apps.client]
functions = ["sayhello", "add_them", "add_item"]
grants = [
    { contract = "items", actions = ["read", "insert", "update", "delete"] },
    { contract = "clients", actions = ["read"] },
    { contract = "projects", actions = ["read", "insert", "update", "delete"] },
    { contract = "tasks", actions = ["read"] },
    { contract = "simple_pk", actions = ["read", "insert", "update", "delete"] },
    { contract = "no_pk", actions = ["read", "insert", "update", "delete"] },
    { contract = "tiobe_pls", actions = ["read", "insert", "update", "delete"] },
    { contract = "menagerie", actions = ["read"] },
]

[apps.outsider]
functions = ["sayhello"]
grants = [{ contract = "items", actions = ["read"] }]

[contracts.no_pk]
allow_unfiltered_writes = true
"""
MIGRATION = """
CREATE TABLE items (id bigint PRIMARY KEY);
CREATE TABLE clients (id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE projects (id integer PRIMARY KEY, name text NOT NULL, client_id integer REFERENCES clients (id));
CREATE TABLE tasks (id integer PRIMARY KEY, name text NOT NULL, project_id integer REFERENCES projects (id));
CREATE TABLE simple_pk (k text PRIMARY KEY, extra text NOT NULL);
CREATE TABLE no_pk (a text, b text);
CREATE TABLE tiobe_pls (name text PRIMARY KEY, rank integer);
CREATE TABLE menagerie (id integer PRIMARY KEY, name text);
"""
SEED = """
DELETE FROM tasks; DELETE FROM projects; DELETE FROM clients; DELETE FROM items; DELETE FROM simple_pk;
DELETE FROM no_pk; DELETE FROM tiobe_pls; DELETE FROM menagerie;
INSERT INTO items SELECT generate_series(1, 15);
INSERT INTO clients VALUES (1, 'Microsoft'), (2, 'Apple');
INSERT INTO projects VALUES (1, 'Windows 7', 1), (2, 'Windows 10', 1), (3, 'IOS', 2), (4, 'OSX', 2), (5, 'Orphan', NULL);
INSERT INTO tasks VALUES (1, 'Design w7', 1), (2, 'Code w7', 1), (3, 'Design w10', 2), (4, 'Code w10', 2),
    (5, 'Design IOS', 3), (6, 'Code IOS', 3), (7, 'Design OSX', 4), (8, 'Code OSX', 4);
INSERT INTO simple_pk VALUES ('xyyx', 'u'), ('xYYx', 'v');
INSERT INTO no_pk VALUES ('1', '0'), ('2', '0');
INSERT INTO tiobe_pls VALUES ('Java', 1), ('C', 2), ('Python', 3);
"""
CONTRACTS = {
    "items.v1.sql": "SELECT id FROM items",
    "clients.v1.sql": "SELECT id, name FROM clients",
    "projects.v1.sql": "SELECT id, name, client_id FROM projects",
    "projects.v2.sql": "SELECT id, name, client_id FROM projects",  # so that v1 is a version of its own
    "tasks.v1.sql": "SELECT id, name, project_id FROM tasks",
    "simple_pk.v1.sql": "SELECT k, extra FROM simple_pk",
    "no_pk.v1.sql": "SELECT a, b FROM no_pk",
    "tiobe_pls.v1.sql": "SELECT name, rank FROM tiobe_pls",
    "menagerie.v1.sql": "SELECT id, name FROM menagerie",
}
LOGIC = '''
import gatehouse
from gatehouse.logic.context import Context


@gatehouse.rpc(read_only=True)
async def sayhello(ctx: Context, name: str) -> str:
    return f"Hello, {name}"


@gatehouse.rpc(read_only=True)
async def add_them(ctx: Context, a: int, b: int) -> int:
    return a + b


@gatehouse.rpc
async def add_item(ctx: Context, id: int) -> None:
    await ctx.insert("items", {"id": id})
'''


# What gatehouse answers where it differs from PostgREST on purpose (docs/postgrest-differences.md).
DIFFERENCES = [
    Case("differs", "HttpHeaderSpec: Vary names the credentials and the profile too", "GET", "/projects?id=eq.1", 200,
         [{"id": 1, "name": "Windows 7", "client_id": 1}],
         {"vary": "Accept, Accept-Profile, Prefer, Range, Authorization, apikey"}),
    Case("differs", "UpdateSpec: a PATCH without a filter is refused (unless the contract allows it)", "PATCH",
         "/items", 400, err("GH400", "PATCH without a filter would change every row of 'items'", hint=(
             "Add a filter (e.g. ?id=eq.5), or set allow_unfiltered_writes for the contract in gatehouse.toml.")),
         payload={"id": 1}, after=("SELECT count(*) FROM items", 15)),
    Case("differs", "RangeSpec: a negative offset is refused, not ignored", "GET", "/items?select=id&offset=-4", 400,
         err("PGRST100", '"failed to parse offset" (-4)', "offset must be a whole number, 0 or more")),
    Case("differs", "UpdateSpec: a PATCH of several objects is refused (which one a row gets is undefined)", "PATCH",
         "/projects?id=eq.1", 400, err("PGRST102", "PATCH takes one JSON object"),
         payload=[{"name": "a"}, {"name": "b"}], after=("SELECT name FROM projects WHERE id = 1", "Windows 7")),
    Case("differs", "AuthSpec: a token without exp is refused", "GET", "/items", 401,
         err("PGRST303", "JWT has no expiry", hint="Tokens must carry an 'exp' claim."), who="no exp"),
    Case("differs", "InsertSpec: a JSON scalar body is refused, not an empty insert", "POST", "/items", 400,
         err("PGRST102", "Empty or invalid json"), raw=b"5"),
    Case("differs", "TimezoneSpec: the timezone preference is not served", "GET", "/items", 400,
         err("PGRST122", STRICT, "Invalid preferences: timezone=America/Los_Angeles"),
         send=prefer("handling=strict, timezone=America/Los_Angeles")),
    Case("differs", "QuerySpec: a cast to an unknown type is refused by the grammar", "GET",
         "/items?select=id::fakecolumntype", 400,
         err("PGRST100", '"failed to parse select (id::fakecolumntype)"',
             "'fakecolumntype' is not a type a column can be cast to",
             "Cast to a plain data type: text, integer, numeric, date, jsonb, ...")),
    Case("differs", "InsertSpec: PostgreSQL's text stays out of a constraint error", "POST", "/simple_pk", 400,
         err("23502", "A value is required for column 'k'"), payload={"extra": "foo"},
         after=("SELECT count(*) FROM simple_pk", 2)),
    Case("differs", "RpcSpec: a value of the wrong type is the function's 400", "GET", "/rpc/add_them?a=x&b=2", 400,
         err("PGRST102", "The function's arguments are not valid",
             "a: Input should be a valid integer, unable to parse string as an integer")),
    Case("differs", "RpcSpec: GET on a function that writes is refused before it runs", "GET", "/rpc/add_item?id=99",
         405, err("PGRST101", "Cannot use the GET method on RPC", hint="This function changes data: call it with POST."),
         {"allow": "POST"}, after=("SELECT count(*) FROM items WHERE id = 99", 0)),
]


def token(secret: str = SECRET, **overrides: Any) -> str:
    """A user's token for the client app (``overrides`` None removes a claim), signed HS256."""
    now = int(time.time())
    claims = {"iss": "https://idp.test/", "aud": "gatehouse", "azp": "parity-web", "sub": "u1", "iat": now,
              "exp": now + 300, **overrides}
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, secret, algorithm="HS256")


CREDENTIALS: dict[str, Callable[[dict[str, str]], list[tuple[str, str]]]] = {
    "client": lambda keys: [("apikey", keys["client"])],
    "outsider": lambda keys: [("apikey", keys["outsider"])],
    "nobody": lambda keys: [],
    "user": lambda keys: [("Authorization", f"Bearer {token()}")],
    "user, lower-case scheme": lambda keys: [("Authorization", f"bearer {token()}")],
    "expired 35 s ago": lambda keys: [("Authorization", f"Bearer {token(exp=int(time.time()) - 35)}")],
    "valid in 35 s": lambda keys: [("Authorization", f"Bearer {token(nbf=int(time.time()) + 35)}")],
    "issued in 35 s": lambda keys: [("Authorization", f"Bearer {token(iat=int(time.time()) + 35)}")],
    "another audience": lambda keys: [("Authorization", f"Bearer {token(aud='not set')}")],
    "exp not a number": lambda keys: [("Authorization", f"Bearer {token(exp='invalid')}")],
    "nbf not a number": lambda keys: [("Authorization", f"Bearer {token(nbf='invalid')}")],
    "iat not a number": lambda keys: [("Authorization", f"Bearer {token(iat='invalid')}")],
    "aud an object": lambda keys: [("Authorization", f"Bearer {token(aud={'invalid': 'value'})}")],
    "aud a list with an object": lambda keys: [("Authorization", f"Bearer {token(aud=[{'invalid': 'v'}, 'gatehouse'])}")],
    "wrong secret": lambda keys: [("Authorization", f"Bearer {token('another-secret-long-enough-for-hs256-xxxxx')}")],
    "no exp": lambda keys: [("Authorization", f"Bearer {token(exp=None)}")],
}


@dataclass(frozen=True)
class World:
    client: httpx.AsyncClient
    keys: dict[str, str]
    database: asyncpg.Connection
    """The project's database as its owner: seeds every case and checks what a write left."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(server_uri: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    files = {"gatehouse.toml": TOML, "migrations/V001__parity.sql": MIGRATION, "logic/fns.py": LOGIC,
             **{f"contracts/{file}": sql for file, sql in CONTRACTS.items()}}
    root = tmp_path_factory.mktemp("parity") / "project"
    async with served_folder(server_uri, root, files, "parity", {"PARITY_JWT_SECRET": SECRET}) as served:
        client, keys, _, database, _ = served
        yield World(client, keys, database)


async def answer(world: World, case: Case) -> httpx.Response:
    await world.database.execute(SEED)
    headers = [*CREDENTIALS[case.who](world.keys), *case.send]
    content = case.raw if case.raw is not None else None if case.payload is None else orjson.dumps(case.payload)
    if content is not None and not any(name.lower() == "content-type" for name, _ in headers):
        headers.append(("Content-Type", "application/json"))
    return await world.client.request(case.method, case.url, headers=headers, content=content)


async def check(world: World, case: Case) -> None:
    response = await answer(world, case)
    shown = f"{case.method} {case.url} -> {response.status_code} {dict(response.headers)} {response.text}"
    assert response.status_code == case.status, shown
    if case.body is not None:
        got = response.json() if response.content else None
        assert got == case.body, shown
    for name, value in case.headers.items():
        assert response.headers.get(name) == value, (name, shown)
    if case.after is not None:
        sql, expected = case.after
        assert await world.database.fetchval(sql) == expected, (sql, shown)


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.pending)] if case.pending else []
    return pytest.param(case, id=f"{case.area}: {case.spec}", marks=marks)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", [_param(c) for c in (*CASES, *CALLS)])
async def test_answers_as_postgrest_does(world: World, case: Case) -> None:
    await check(world, case)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.area}: {c.spec}") for c in DIFFERENCES])
async def test_deliberate_differences(world: World, case: Case) -> None:
    """What gatehouse answers where it differs from PostgREST on purpose (docs/postgrest-differences.md)."""
    await check(world, case)



def test_content_location_is_the_canonical_query() -> None:
    """PostgREST's canonical form: names sorted (stable), a repeated name's values joined by commas in the order
    sent, everything but letters, digits and ``-_.~`` percent-encoded (as UTF-8), ``+`` read as a space."""
    assert content_location("/items", "b=2&a=1&a=0&c") == "/items?a=1,0&b=2&c="
    assert content_location("/items", "select=id,name&x=a+b%2c") == "/items?select=id%2Cname&x=a%20b%2C"
    assert content_location("/items", "n=%C3%A9t%C3%A9&m=été") == "/items?m=%C3%A9t%C3%A9&n=%C3%A9t%C3%A9"
    assert content_location("/v1/items", "") == content_location("/v1/items", "&") == "/v1/items"


def test_hints_are_bounded() -> None:
    """A name too long to score cheaply gets no hint, at once; a short one is scored as PostgREST scores it."""
    started = time.perf_counter()
    assert closest("projects" * 1000, [f"projects{i}" for i in range(500)]) is None
    assert time.perf_counter() - started < 0.05
    assert closest("projecxx", ["projects", "clients"]) == "projects"  # 1 - 2/8 = 0.75: just enough
    assert closest("projxxxx", ["projects", "clients"]) is None


# (columns of a table, a name that is not one of them): PostgreSQL's rule at its edges (distance at most 3 and at
# most half the name's length, the closest wins, two at one distance are both named, a third names none).
MISSING_COLUMNS = [
    (("id", "name", "client_id"), "nam"),
    (("id", "name", "client_id"), "banana"),
    (("id", "name", "client_id"), "NAME"),
    (("ax", "ay"), "ab"),
    (("ax", "ay", "az"), "ab"),
    (("abxy", "abyx", "abzz", "abcx"), "abcd"),
    (("abxy", "abyx", "abzz"), "abcd"),
    (("abcdefgh", "abcdxxxx"), "abcdefxx"),
    (("sku", "skus"), "sk"),
    (("été", "ete"), "etè"),
]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("columns", "typed"), MISSING_COLUMNS)
async def test_a_missing_columns_hint_is_postgresqls(world: World, columns: tuple[str, ...], typed: str) -> None:
    """The 42703 hint is computed without asking the database, by its rule: held against PostgreSQL itself."""
    table = "hint_probe"
    listed = ", ".join(f'"{c}" int' for c in columns)
    async with world.database.transaction():
        await world.database.execute(f"CREATE TEMP TABLE {table} ({listed}) ON COMMIT DROP")
        with pytest.raises(asyncpg.UndefinedColumnError) as refused:
            await world.database.execute(f'SELECT {table}."{typed}" FROM {table}')
    assert missing_column_hint(table, typed, columns) == refused.value.hint
    assert refused.value.hint is None or close_columns(typed, columns)


def test_a_database_that_cannot_be_reached_is_pgrst000_in_postgrests_words() -> None:
    """PostgREST 14.13 and later: "Database connection error." (no "Retrying the connection." any more)."""
    refused = cannot_connect(2.5)
    assert (refused.status, refused.code, refused.message) == (503, "PGRST000", "Database connection error.")
    assert refused.headers == {"Retry-After": "3"}
