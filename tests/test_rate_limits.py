"""Rate limits per app and per grant (GCRA), their RateLimit headers, and an app's requests in flight."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SHOP, SHOP_MOBILE_RATE, ProjectFactory, prepare
from gatehouse import operations
from gatehouse.errors import ProjectError
from gatehouse.limits.gcra import LocalGcra, Rate

# --- the algorithm -------------------------------------------------------------------------------------


def _run(rate: Rate, times: list[float]) -> list[bool]:
    store = LocalGcra()
    return [store.check([("k", rate)], at)[0].allowed for at in times]


@pytest.mark.parametrize(("case", "rate", "times", "admitted"), [
    ("a burst, then the sustained rate", Rate(2, 1, 3), [0, 0, 0, 0, 0.5, 0.5, 1.0],
     [True, True, True, False, True, False, True]),
    ("burst of one: exactly one per interval", Rate(10, 1, 1), [0, 0.05, 0.1, 0.15, 0.2],
     [True, False, True, False, True]),
    ("a quiet spell refills the burst, never beyond it", Rate(1, 1, 2), [0, 10, 10, 10],
     [True, True, True, False]),
    ("per minute", Rate(60, 60, 1), [0, 0.5, 1.0, 1.5], [True, False, True, False]),
])
def test_gcra(case: str, rate: Rate, times: list[float], admitted: list[bool]) -> None:
    assert _run(rate, times) == admitted, case


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 50), burst=st.integers(1, 20), step=st.floats(0.0001, 0.2), n=st.integers(1, 400))
def test_a_client_above_the_rate_is_admitted_at_exactly_the_rate(count: int, burst: int, step: float,
                                                                   n: int) -> None:
    """Refusals use nothing: over any span, admitted <= burst + span * rate, and a client that keeps calling
    faster than the rate gets all of it (no lock-out)."""
    rate = Rate(count, 1, burst)
    times = [i * step for i in range(n)]
    admitted = sum(_run(rate, times))
    span = times[-1]
    assert admitted <= burst + span * count + 1e-6
    if step < 1 / count:  # calling faster than the rate: admitted again and again, never locked out
        assert admitted >= min(n, burst + int(span / (1 / count + step)))


def test_several_limits_admit_together_or_not_at_all() -> None:
    store = LocalGcra()
    loose, tight = Rate(100, 1, 100), Rate(1, 60, 1)
    assert [d.allowed for d in store.check([("a", loose), ("b", tight)], 0)] == [True, True]
    refused = store.check([("a", loose), ("b", tight)], 1)
    assert [d.allowed for d in refused] == [True, False] and refused[1].retry_after == pytest.approx(59)
    assert refused[0].remaining == 100  # rested by now, and it gave nothing to the refused request
    assert store.check([("a", loose)], 1)[0].remaining == 99


@pytest.mark.parametrize(("text", "parsed"), [("50/s", Rate(50, 1, 50)), ("3000/min", Rate(3000, 60, 3000)),
                                              ("100000/h", Rate(100000, 3600, 100000)), (" 7 / day ", Rate(7, 86400, 7))])
def test_rates_are_read(text: str, parsed: Rate) -> None:
    assert Rate.parse(text) == parsed


@pytest.mark.parametrize("text", ["fast", "0/s", "10/week", "-1/s", "1.5/s", ""])
def test_a_rate_that_cannot_be_read_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\."):
        Rate.parse(text)


# --- over HTTP -----------------------------------------------------------------------------------------

TOML = """
[project]
name = "limits"

[databases.main]

[server]
admission_wait_ms = 50

[apps.mobile]
quota = { rate = "2/min", burst = 3 }
grants = [{ contract = "items", actions = ["read"] }]

[apps.writer]
grants = [{ contract = "items", actions = ["read", "insert"], rate = "1/min" }]

[apps.free]
grants = [{ contract = "items", actions = ["read"] }]

[apps.single]
quota = { max_in_flight = 1 }
grants = [{ contract = "items", actions = ["read"] }, { contract = "sleepy", actions = ["read"] }]
"""
MIGRATION = "CREATE TABLE items (id serial PRIMARY KEY, label text NOT NULL); INSERT INTO items (label) VALUES ('a');"
CONTRACTS = {"items.v1.sql": "SELECT id, label FROM items",
             "sleepy.v1.sql": "SELECT pg_sleep(0.5) IS NOT NULL AS slept"}


async def _served(make_project: ProjectFactory, serve_project: Any) -> tuple[Any, Any, dict[str, str]]:
    project = make_project(toml=TOML, migrations={"V001__items.sql": MIGRATION}, contracts=CONTRACTS)
    keys = await prepare(project)
    client, _ = await serve_project(project)
    return project, client, keys


async def test_an_app_over_its_rate_gets_429_with_the_ratelimit_fields(make_project: ProjectFactory,
                                                                        serve_project: Any) -> None:
    project, client, keys = await _served(make_project, serve_project)
    headers = {"apikey": keys["mobile"]}
    answers = [await client.get("/items", headers=headers) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert all(a.headers["RateLimit-Policy"] == '"app";q=2;w=60' for a in answers)
    assert [a.headers["RateLimit"].split(";r=")[1].split(";")[0] for a in answers] == ["2", "1", "0", "0"]
    refused = answers[3]
    assert refused.json()["code"] == "GH429" and "2/minute" in refused.json()["message"]
    wait = int(refused.headers["Retry-After"])
    assert 25 <= wait <= 30 and refused.headers["RateLimit"] == f'"app";r=0;t={wait}'
    other = await client.get("/items", headers={"apikey": keys["free"]})  # another app is not limited by it
    assert other.status_code == 200 and "RateLimit" not in other.headers
    unknown = await client.get("/nothing", headers=headers)  # refused before the contract is even looked up
    assert unknown.status_code == 429

    async def audited() -> list[int]:
        async with operations.owner_connection(project) as conn:
            rows = await conn.fetch("SELECT status FROM gatehouse.audit_log WHERE app = 'mobile' ORDER BY at")
        return [r["status"] for r in rows]

    for _ in range(50):
        if len(await audited()) == 5:
            break
        await asyncio.sleep(0.05)
    assert await audited() == [200, 200, 200, 429, 429]


async def test_a_grant_limit_refuses_the_write_before_the_database(make_project: ProjectFactory,
                                                                    serve_project: Any) -> None:
    project, client, keys = await _served(make_project, serve_project)
    headers = {"apikey": keys["writer"], "Prefer": "return=minimal"}
    first = await client.post("/items", json={"label": "b"}, headers=headers)
    second = await client.post("/items", json={"label": "c"}, headers=headers)
    assert (first.status_code, second.status_code) == (201, 429)
    assert first.headers["RateLimit-Policy"] == '"items:read+insert";q=1;w=60'
    read = await client.get("/items", headers={"apikey": keys["writer"]})  # reads share the grant's limit
    assert read.status_code == 429
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT array_agg(label ORDER BY id) FROM items") == ["a", "b"]


async def test_requests_in_flight_wait_briefly_then_get_429(make_project: ProjectFactory,
                                                             serve_project: Any) -> None:
    _, client, keys = await _served(make_project, serve_project)
    headers = {"apikey": keys["single"]}
    slow = asyncio.create_task(client.get("/sleepy", headers=headers))
    await asyncio.sleep(0.15)
    crowded = await client.get("/items", headers=headers)
    assert crowded.status_code == 429 and crowded.headers["Retry-After"] == "1"
    assert "1 at once" in crowded.json()["message"]
    assert (await slow).status_code == 200
    assert (await client.get("/items", headers=headers)).status_code == 200  # the slot came back


def test_a_rate_that_cannot_be_read_names_the_key(make_project: ProjectFactory) -> None:
    with pytest.raises(ProjectError) as refused:
        make_project(toml=TOML.replace('rate = "2/min"', 'rate = "lots"'), migrations={"V001__items.sql": MIGRATION},
                     contracts=CONTRACTS)
    assert "apps.mobile.quota.rate" in str(refused.value) and "3000/min" in str(refused.value)


async def test_the_demo_limits_mobile_to_20_a_second(make_project: ProjectFactory, serve_project: Any) -> None:
    assert SHOP_MOBILE_RATE in (SHOP / "gatehouse.toml").read_text()  # what the demo runs with
    project = make_project(from_shop=True)  # the tests' copy leaves the rate out: put it back
    toml = project.root / "gatehouse.toml"
    toml.write_text(toml.read_text().replace("max_rows = 50 }", f"max_rows = 50{SHOP_MOBILE_RATE} }}"))
    from gatehouse.project import load_project

    project = load_project(project.root)
    keys = await prepare(project)
    client, _ = await serve_project(project)
    statuses = [(await client.get("/products?limit=1", headers={"apikey": keys["mobile"]})).status_code
                for _ in range(25)]
    assert statuses[:20] == [200] * 20 and 429 in statuses[20:]
