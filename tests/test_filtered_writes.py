"""A grant's row filter holds for every write: insert, bulk insert, both kinds of upsert, PUT, PATCH, DELETE
and a logic function's insert, update and delete. Each case is run by two apps, one whose filter names the
caller's user (``user_id=eq.{claims.sub}``, from an HS256 token) and one with a fixed filter
(``tenant=eq.acme``), on a row inside the filter, a row outside it, and a request straddling both, and each
checks the table afterwards with SQL.

The rule, as PostgreSQL applies it under row-level security: an upsert or PUT that meets a row outside the
filter is refused whole (403, code 42501) and writes nothing; ``ignore-duplicates`` skips such a row exactly
like one inside; PATCH and DELETE change only the rows inside.

One project serves the whole module (its rows are put back before each case), so the table stays quick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import pytest_asyncio

from conftest import served_folder

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "a-test-secret-that-is-long-enough-for-hs256!!"
FUNCTIONS = '["add_orders", "set_status", "move_orders", "remove_orders", "add_quietly", "move_quietly"]'
TOML = f"""
[project]
name = "filtered"

[databases.main]

[auth.issuers.idp]
issuer = "https://idp.test/"
secret = "env:FILTERED_WRITES_JWT_SECRET"
algorithms = ["HS256"]
audience = "gatehouse"
app_claim = "azp"
apps = {{ "shop-web" = "web" }}

[apps.web]
require_user = true
functions = {FUNCTIONS}
grants = [{{ contract = "orders", actions = ["read", "insert", "update", "delete"], filter = "user_id=eq.{{claims.sub}}" }}]

[apps.acme]
functions = {FUNCTIONS}
grants = [{{ contract = "orders", actions = ["read", "insert", "update", "delete"], filter = "tenant=eq.acme" }}]
"""
MIGRATION = """
CREATE TABLE purchases (id integer PRIMARY KEY, ref text NOT NULL UNIQUE, tenant text NOT NULL,
                        user_id text NOT NULL, status text NOT NULL DEFAULT 'new');
"""
CONTRACT = "SELECT id, ref, tenant, user_id, status FROM purchases"
LOGIC = '''
from typing import Any

import gatehouse
from gatehouse.errors import ApiError
from gatehouse.logic.context import Context


def _ids(ids: list[int]) -> str:
    return f"id=in.({','.join(str(i) for i in ids)})"


@gatehouse.rpc
async def add_orders(ctx: Context, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return await ctx.insert("orders", rows)


@gatehouse.rpc
async def set_status(ctx: Context, ids: list[int], status: str) -> list[dict[str, Any]]:
    return await ctx.update("orders", {"status": status}, _ids(ids))


@gatehouse.rpc
async def move_orders(ctx: Context, ids: list[int], tenant: str, user_id: str) -> list[dict[str, Any]]:
    return await ctx.update("orders", {"tenant": tenant, "user_id": user_id}, _ids(ids))


@gatehouse.rpc
async def remove_orders(ctx: Context, ids: list[int]) -> list[dict[str, Any]]:
    return await ctx.delete("orders", _ids(ids))


@gatehouse.rpc
async def add_quietly(ctx: Context, rows: list[dict[str, Any]]) -> int:
    """Swallows the refusal and commits: the refused insert must still have left nothing."""
    try:
        await ctx.insert("orders", rows)
    except ApiError as exc:
        return exc.status
    return 0


@gatehouse.rpc
async def move_quietly(ctx: Context, ids: list[int], tenant: str, user_id: str) -> int:
    try:
        await ctx.update("orders", {"tenant": tenant, "user_id": user_id}, _ids(ids))
    except ApiError as exc:
        return exc.status
    return 0
'''

Row = dict[str, Any]


def order(id: int, ref: str, tenant: str, user_id: str, status: str = "new") -> Row:
    return {"id": id, "ref": ref, "tenant": tenant, "user_id": user_id, "status": status}


# Row 1 is inside both apps' filters, row 4 outside both; 2 and 3 are inside one of them each, so the two
# filters really differ. Every case below names only rows 1 and 4 (and new ones), so it holds for both apps.
SEED = [order(1, "r1", "acme", "alice"), order(2, "r2", "acme", "bob"), order(3, "r3", "globex", "alice"),
        order(4, "r4", "globex", "bob")]
NEW5 = order(5, "r5", "acme", "alice")  # a new row inside both filters
NEW7 = order(7, "r7", "acme", "alice")
NEW6 = order(6, "r6", "globex", "bob")  # a new row outside both
PAID1 = order(1, "r1", "acme", "alice", "paid")  # row 1, changed, still inside
TAKEOVER4 = order(4, "r4", "acme", "alice", "paid")  # row 4's key with values inside: the takeover attempt
MOVED1 = order(1, "r1", "globex", "bob")  # row 1 moved outside both filters


@dataclass(frozen=True)
class World:
    client: httpx.AsyncClient
    keys: dict[str, str]
    url: str
    database: asyncpg.Connection  # the project's database, as its superuser: the SQL check of each case

    def headers(self, app: str) -> dict[str, str]:
        if app == "acme":
            return {"apikey": self.keys["acme"]}
        now = int(time.time())  # the web app is called with a user's token alone: its azp names the app
        claims = {"iss": "https://idp.test/", "aud": "gatehouse", "azp": "shop-web", "sub": "alice", "iat": now,
                  "exp": now + 300}
        return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}

    async def table(self) -> dict[int, Row]:
        rows = await self.database.fetch("SELECT id, ref, tenant, user_id, status FROM purchases")
        return {r["id"]: dict(r) for r in rows}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(server_uri: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    files = {"gatehouse.toml": TOML, "migrations/V001__purchases.sql": MIGRATION,
             "contracts/orders.v1.sql": CONTRACT, "logic/orders.py": LOGIC}
    root = tmp_path_factory.mktemp("filtered_writes") / "project"
    async with served_folder(server_uri, root, files, "filtered", {"FILTERED_WRITES_JWT_SECRET": SECRET}) as served:
        client, keys, url, database, _ = served
        yield World(client, keys, url, database)


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def seeded(world: World) -> None:
    """Every case starts from the same rows (DELETE, not TRUNCATE: the data-version triggers see it)."""
    await world.database.execute("DELETE FROM purchases")
    await world.database.executemany("INSERT INTO purchases VALUES ($1, $2, $3, $4, $5)",
                                     [tuple(r.values()) for r in SEED])


def expected(changes: dict[int, Row | None]) -> dict[int, Row]:
    """The seeded table with ``changes`` applied: a row's new values, or None for a deleted row."""
    table: dict[int, Row] = {r["id"]: r for r in SEED}
    for id, row in changes.items():
        if row is None:
            table.pop(id)
        else:
            table[id] = row
    return table


def assert_refused(response: httpx.Response) -> None:
    """403, code 42501, naming the contract; never the table, nor a value of a row the app may not see."""
    assert response.status_code == 403, response.text
    error = response.json()
    assert error["code"] == "42501" and "'orders'" in error["message"], error
    assert "purchases" not in response.text and "globex" not in response.text and "bob" not in response.text


APPS = ["web", "acme"]
MERGE, IGNORE = "resolution=merge-duplicates", "resolution=ignore-duplicates"
SHOWN = "return=representation"


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    url: str
    body: Row | list[Row] | None
    prefer: str
    status: int
    changes: dict[int, Row | None] = field(default_factory=dict)
    """How the table differs from the seed afterwards (nothing: unchanged)."""
    shown: list[int] | None = None
    """With ``return=representation``: the ids of the rows in the answer."""


CASES = [
    # POST, one row
    Case("post inside", "POST", "/orders", NEW5, "", 201, {5: NEW5}),
    Case("post outside", "POST", "/orders", NEW6, "", 403),
    # bulk POST
    Case("bulk inside", "POST", "/orders", [NEW5, NEW7], "", 201, {5: NEW5, 7: NEW7}),
    Case("bulk straddling", "POST", "/orders", [NEW5, NEW6], SHOWN, 403),
    # upsert, merge-duplicates: a conflicting row outside refuses the whole statement
    Case("merge inside", "POST", "/orders?on_conflict=id", [PAID1], f"{MERGE},{SHOWN}", 200, {1: PAID1}, [1]),
    Case("merge inserting inside", "POST", "/orders?on_conflict=id", [PAID1, NEW5], MERGE, 201,
         {1: PAID1, 5: NEW5}),
    Case("merge outside", "POST", "/orders?on_conflict=id", [TAKEOVER4], MERGE, 403),
    Case("merge outside, one object, asking for it back", "POST", "/orders", TAKEOVER4, f"{MERGE},{SHOWN}", 403),
    Case("merge straddling", "POST", "/orders?on_conflict=id", [PAID1, TAKEOVER4, NEW5], MERGE, 403),
    Case("merge straddling, missing=default", "POST", "/orders?on_conflict=id&columns=id,ref,tenant,user_id,status",
         [PAID1, {k: v for k, v in TAKEOVER4.items() if k != "status"}, NEW5], f"{MERGE},missing=default", 403),
    Case("merge on a unique column, inside", "POST", "/orders?on_conflict=ref", [PAID1], MERGE, 200, {1: PAID1}),
    Case("merge on a unique column, outside", "POST", "/orders?on_conflict=ref", [{**TAKEOVER4, "id": 40}],
         MERGE, 403),
    Case("merge moving a row outside", "POST", "/orders?on_conflict=id", [MOVED1], MERGE, 403),
    Case("merge inside, tx=rollback", "POST", "/orders?on_conflict=id", [PAID1], f"{MERGE},tx=rollback", 200),
    Case("merge outside, tx=rollback", "POST", "/orders?on_conflict=id", [TAKEOVER4], f"{MERGE},tx=rollback", 403),
    # upsert, ignore-duplicates: a conflicting row outside is skipped like one inside
    Case("ignore inside", "POST", "/orders?on_conflict=id", [PAID1], f"{IGNORE},{SHOWN}", 201, {}, []),
    Case("ignore outside", "POST", "/orders?on_conflict=id", [TAKEOVER4], f"{IGNORE},{SHOWN}", 201, {}, []),
    Case("ignore straddling", "POST", "/orders?on_conflict=id", [PAID1, TAKEOVER4, NEW5], f"{IGNORE},{SHOWN}", 201,
         {5: NEW5}, [5]),
    Case("ignore with a new row outside", "POST", "/orders?on_conflict=id", [NEW5, NEW6], IGNORE, 403),
    # PUT
    Case("put inside", "PUT", "/orders?id=eq.1", PAID1, "", 204, {1: PAID1}),
    Case("put inside, asking for it back", "PUT", "/orders?id=eq.1", PAID1, SHOWN, 200, {1: PAID1}, [1]),
    Case("put outside", "PUT", "/orders?id=eq.4", TAKEOVER4, "", 403),
    Case("put outside, asking for it back", "PUT", "/orders?id=eq.4", TAKEOVER4, SHOWN, 403),
    Case("put a new row inside", "PUT", "/orders?id=eq.5", NEW5, SHOWN, 201, {5: NEW5}, [5]),
    Case("put a new row outside", "PUT", "/orders?id=eq.6", NEW6, "", 403),
    Case("put moving a row outside", "PUT", "/orders?id=eq.1", MOVED1, "", 403),
    # PATCH: only rows inside change
    Case("patch inside", "PATCH", "/orders?id=eq.1", {"status": "paid"}, SHOWN, 200, {1: PAID1}, [1]),
    Case("patch outside", "PATCH", "/orders?id=eq.4", {"status": "paid"}, SHOWN, 200, {}, []),
    Case("patch straddling", "PATCH", "/orders?id=in.(1,4)", {"status": "paid"}, SHOWN, 200, {1: PAID1}, [1]),
    Case("patch moving a row outside", "PATCH", "/orders?id=eq.1", {"tenant": "globex", "user_id": "bob"}, "", 403),
    # DELETE: only rows inside go
    Case("delete inside", "DELETE", "/orders?id=eq.1", None, "", 204, {1: None}),
    Case("delete outside", "DELETE", "/orders?id=eq.4", None, SHOWN, 200, {}, []),
    Case("delete straddling", "DELETE", "/orders?id=in.(1,4)", None, SHOWN, 200, {1: None}, [1]),
]


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_http_writes_stay_inside_the_filter(world: World, app: str, case: Case) -> None:
    headers = world.headers(app) | ({"Prefer": case.prefer} if case.prefer else {})
    response = await world.client.request(case.method, case.url, json=case.body, headers=headers)
    if case.status == 403:
        assert_refused(response)
    else:
        assert response.status_code == case.status, response.text
    if case.shown is not None:
        assert sorted(r["id"] for r in response.json()) == case.shown
    assert await world.table() == expected(case.changes)


@pytest.mark.parametrize("app", APPS)
async def test_ignore_duplicates_answers_the_same_for_a_row_inside_and_outside(world: World, app: str) -> None:
    """Skipping a conflicting row outside the filter reveals nothing a conflicting row inside would not."""
    headers = world.headers(app) | {"Prefer": f"{IGNORE},{SHOWN},count=exact"}
    inside = await world.client.post("/orders?on_conflict=id", json=[{**PAID1, "status": "x"}], headers=headers)
    outside = await world.client.post("/orders?on_conflict=id", json=[{**TAKEOVER4, "status": "x"}], headers=headers)
    assert (inside.status_code, inside.content) == (outside.status_code, outside.content) == (201, b"[]")
    same = ("content-range", "content-type", "preference-applied", "content-profile")
    assert {h: inside.headers.get(h) for h in same} == {h: outside.headers.get(h) for h in same}
    assert await world.table() == expected({})


@pytest.mark.parametrize("app", APPS)
async def test_a_refused_upsert_leaves_no_trace_for_a_later_one(world: World, app: str) -> None:
    """The refusal rolled back the rows of the statement that were inside, so the same request without the
    outside row then inserts them (no duplicate key from a half-kept attempt)."""
    headers = world.headers(app) | {"Prefer": MERGE}
    refused = await world.client.post("/orders?on_conflict=id", json=[NEW5, TAKEOVER4, NEW7], headers=headers)
    assert_refused(refused)
    assert await world.table() == expected({})
    allowed = await world.client.post("/orders", json=[NEW5, NEW7], headers=world.headers(app))
    assert allowed.status_code == 201, allowed.text
    assert await world.table() == expected({5: NEW5, 7: NEW7})


async def _until_blocked(database: asyncpg.Connection) -> None:
    """Wait until some session of this database waits for a row lock."""
    for _ in range(500):
        if await database.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND wait_event_type = 'Lock'"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the upsert never waited for the row lock")


@pytest.mark.parametrize("app", APPS)
async def test_a_row_that_leaves_the_filter_while_an_upsert_waits_is_not_overwritten(world: World, app: str) -> None:
    """The filter is PostgreSQL's own condition on the row an upsert would overwrite, tested on that row as it
    is when the upsert locks it, not as the upsert's snapshot saw it: a check made before the statement (or on
    its snapshot) would let this one through."""
    other = await asyncpg.connect(world.url)
    try:
        async with other.transaction():  # row 1 leaves both filters, but this is not committed yet
            await other.execute("UPDATE purchases SET tenant = 'globex', user_id = 'bob' WHERE id = 1")
            upsert = asyncio.create_task(world.client.post("/orders?on_conflict=id", json=[PAID1],
                                                           headers=world.headers(app) | {"Prefer": MERGE}))
            await _until_blocked(world.database)
        response = await upsert
    finally:
        await other.close()
    assert_refused(response)
    assert await world.table() == expected({1: MOVED1})


@dataclass(frozen=True)
class Call:
    id: str
    function: str
    arguments: dict[str, Any]
    status: int
    changes: dict[int, Row | None] = field(default_factory=dict)
    result: Any = None
    """What the function returned (a list of rows: their ids)."""


CALLS = [
    Call("insert inside", "add_orders", {"rows": [NEW5]}, 200, {5: NEW5}, [5]),
    Call("insert outside", "add_orders", {"rows": [NEW6]}, 403),
    Call("insert straddling", "add_orders", {"rows": [NEW5, NEW6]}, 403),
    Call("update inside", "set_status", {"ids": [1], "status": "paid"}, 200, {1: PAID1}, [1]),
    Call("update outside", "set_status", {"ids": [4], "status": "paid"}, 200, {}, []),
    Call("update straddling", "set_status", {"ids": [1, 4], "status": "paid"}, 200, {1: PAID1}, [1]),
    Call("update moving a row outside", "move_orders", {"ids": [1], "tenant": "globex", "user_id": "bob"}, 403),
    Call("update moving rows straddling", "move_orders", {"ids": [1, 4], "tenant": "globex", "user_id": "bob"}, 403),
    Call("delete inside", "remove_orders", {"ids": [1]}, 200, {1: None}, [1]),
    Call("delete outside", "remove_orders", {"ids": [4]}, 200, {}, []),
    Call("delete straddling", "remove_orders", {"ids": [1, 4]}, 200, {1: None}, [1]),
    # the function catches the refusal and returns, so its transaction commits: the refused write is gone anyway
    Call("insert straddling, refusal swallowed", "add_quietly", {"rows": [NEW5, NEW6]}, 200, {}, 403),
    Call("insert inside, nothing to swallow", "add_quietly", {"rows": [NEW5]}, 200, {5: NEW5}, 0),
    Call("update moving a row outside, refusal swallowed", "move_quietly",
         {"ids": [1], "tenant": "globex", "user_id": "bob"}, 200, {}, 403),
]


@pytest.mark.parametrize("app", APPS)
@pytest.mark.parametrize("call", CALLS, ids=[c.id for c in CALLS])
async def test_logic_writes_stay_inside_the_filter(world: World, app: str, call: Call) -> None:
    response = await world.client.post(f"/rpc/{call.function}", json=call.arguments, headers=world.headers(app))
    if call.status == 403:
        assert_refused(response)
    else:
        assert response.status_code == call.status, response.text
        result = response.json()
        assert (sorted(r["id"] for r in result) if isinstance(result, list) else result) == call.result
    assert await world.table() == expected(call.changes)
