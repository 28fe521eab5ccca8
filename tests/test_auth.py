"""Who is calling: every bad credential is a 401 in PostgREST's shape, before any database work."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from conftest import prepare
from gatehouse import operations
from gatehouse.project import Project
from gatehouse.runtime import Runtime

Served = tuple[httpx.AsyncClient, Runtime, dict[str, str]]


@pytest.fixture
async def served(shop: Project, serve_project: object) -> Served:
    keys = await prepare(shop)
    client, runtime = await serve_project(shop)  # type: ignore[operator]
    return client, runtime, keys


def _assert_401(response: httpx.Response, code: str = "PGRST301") -> None:
    assert response.status_code == 401, response.text
    assert response.json()["code"] == code
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"apikey": ""},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
async def test_missing_credentials(served: Served, headers: dict[str, str]) -> None:
    client, _, _ = served
    _assert_401(await client.get("/products", headers=headers), "PGRST302")


@pytest.mark.parametrize(
    "key",
    [
        "not-a-key",
        "gh_0000000000_" + "x" * 43,  # well formed, unknown id
        "gh_" + "a" * 10 + "_" + "b" * 42,  # malformed secret
        "' OR 1=1 --",
    ],
)
async def test_unknown_keys(served: Served, key: str) -> None:
    client, _, _ = served
    _assert_401(await client.get("/products", headers={"apikey": key}))


async def test_known_id_with_wrong_secret(served: Served) -> None:
    client, _, keys = served
    key_id = keys["web"].split("_")[1]
    _assert_401(await client.get("/products", headers={"apikey": f"gh_{key_id}_" + "A" * 43}))


async def test_bearer_and_apikey_both_work(served: Served) -> None:
    client, _, keys = served
    assert (await client.get("/products?limit=1", headers={"apikey": keys["web"]})).status_code == 200
    bearer = {"Authorization": f"Bearer {keys['web']}"}
    assert (await client.get("/products?limit=1", headers=bearer)).status_code == 200


async def test_key_in_query_string_is_refused(served: Served) -> None:
    client, _, keys = served
    response = await client.get(f"/products?apikey={keys['web']}", headers={"apikey": keys["web"]})
    assert response.status_code == 400
    assert keys["web"] not in response.text


async def test_revoked_key_is_refused_at_once(served: Served, shop: Project) -> None:
    client, _, keys = served
    headers = {"apikey": keys["mobile"]}
    assert (await client.get("/products?limit=1", headers=headers)).status_code == 200
    await operations.revoke_keys(shop, "mobile", keys["mobile"].split("_")[1])
    for _ in range(50):  # NOTIFY reaches the server in milliseconds; allow up to 5 s
        response = await client.get("/products?limit=1", headers=headers)
        if response.status_code == 401:
            break
        await asyncio.sleep(0.1)
    _assert_401(response)


async def test_a_revocation_is_heard_even_after_the_listening_connection_was_cut(served: Served,
                                                                                 shop: Project) -> None:
    # a database restart or a proxy cuts the LISTEN connection: without a new one, a revocation would wait for
    # the 30 s reload (REFRESH_S) and the revoked key would keep working meanwhile
    client, _, keys = served
    headers = {"apikey": keys["mobile"]}
    async with operations.owner_connection(shop) as conn:
        cut = await conn.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE application_name = 'gatehouse/keys' AND datname = current_database()")
    assert cut == 1
    await asyncio.sleep(1.5)  # RELISTEN_S: the key ring has opened another by now
    assert (await client.get("/products?limit=1", headers=headers)).status_code == 200
    await operations.revoke_keys(shop, "mobile", keys["mobile"].split("_")[1])
    for _ in range(30):  # well under the 30 s reload
        response = await client.get("/products?limit=1", headers=headers)
        if response.status_code == 401:
            break
        await asyncio.sleep(0.1)
    _assert_401(response)


async def test_expired_key_is_refused(served: Served, shop: Project) -> None:
    client, _, _ = served
    soon = await operations.create_key(shop, "web", expires_at=datetime.now(UTC) + timedelta(seconds=1.5))
    headers = {"apikey": soon.secret_key}
    for _ in range(50):
        if (await client.get("/products?limit=1", headers=headers)).status_code == 200:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the new key was never accepted")
    await asyncio.sleep(1.6)
    response = await client.get("/products?limit=1", headers=headers)
    _assert_401(response)
    assert response.json()["message"] == "API key expired"


async def test_failed_auth_uses_no_database_connection(served: Served) -> None:
    client, runtime, _ = served
    assert runtime.pools is not None
    pool = runtime.pools.pool("web", "shop")
    before = pool.in_use
    responses = await asyncio.gather(*(client.get("/products", headers={"apikey": "gh_0000000000_" + "y" * 43})
                                       for _ in range(200)))
    statuses = [r.status_code for r in responses]
    # 30 failures a minute per client address and per credential, then 429 instead of 401
    assert statuses.count(401) == 30 and statuses.count(429) == 170
    throttled = next(r for r in responses if r.status_code == 429)
    assert int(throttled.headers["retry-after"]) >= 1 and throttled.json()["code"] == "GH429"
    assert pool.in_use == before
    _, _, keys = served
    # a good key from the same address is never locked out (behind a proxy or NAT one address is many callers)
    assert (await client.get("/products?limit=1", headers={"apikey": keys["web"]})).status_code == 200
    # another wrong key from that address is throttled too: the address keeps failing
    other = await client.get("/products", headers={"apikey": "gh_1111111111_" + "z" * 43})
    assert other.status_code == 429


async def test_keys_are_stored_only_as_hashes(served: Served, shop: Project) -> None:
    _, _, keys = served
    async with operations.owner_connection(shop) as conn:
        stored = await conn.fetch("SELECT id, hash::text AS hash, description FROM gatehouse.keys")
    everything = " ".join(f"{r['id']} {r['hash']} {r['description']}" for r in stored)
    for key in keys.values():
        secret = key.split("_", 2)[2]
        assert secret not in everything
        assert key.split("_")[1] in everything  # the public id is stored


async def test_rotation_keeps_old_keys_for_the_overlap(served: Served, shop: Project) -> None:
    from datetime import timedelta

    client, _, keys = served
    new, ending = await operations.rotate_keys(shop, "web", overlap=timedelta(seconds=1.5))
    assert ending == [keys["web"].split("_")[1]]
    for _ in range(50):  # both work during the overlap
        old_ok = (await client.get("/products?limit=1", headers={"apikey": keys["web"]})).status_code == 200
        new_ok = (await client.get("/products?limit=1", headers={"apikey": new.secret_key})).status_code == 200
        if old_ok and new_ok:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the new key and the old key did not both work during the overlap")
    await asyncio.sleep(1.6)
    _assert_401(await client.get("/products?limit=1", headers={"apikey": keys["web"]}))
    assert (await client.get("/products?limit=1", headers={"apikey": new.secret_key})).status_code == 200
