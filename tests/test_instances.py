"""Several ``gatehouse serve`` processes of one project, sharing PostgreSQL and Redis, behave as one (issue 22):
a key revoked through one is refused by all within a second; a rate limit is shared within its proven bound; a
write made anywhere ends the cached answers of every instance within the cache's bound; ``apply`` is picked up by
every instance without a restart. (Sagas shared by two servers at once: tests/test_sagas_kill.py.)

Three real processes on their own ports, started as an operator would (``gatehouse serve``, the database and
Redis URLs in the environment), and what each answers over HTTP; the revocation is also checked in the keys table.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.project import Project, load_project
from served import Instance, serve_instance, stop_instance

INSTANCES = 3
RATE, BURST = 20, 10
CACHE_POLL_S = 0.1
"""[cache] poll_ms as configured below: how stale another instance's cached answer may be after a write."""
LEASE_TTL_S = 0.2
"""The shared limiter's lease of tokens (limits/shared.py): the error bound of a limit shared through Redis."""


@pytest.fixture
async def shop(make_project: ProjectFactory, redis_url: str,
               monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Project, dict[str, str], list[Instance]]]:
    """The demo shop with the demo's own limit (mobile: 20/s, burst 10) and cache (products, 30 s), Redis shared,
    served by three processes."""
    project = make_project(from_shop=True)
    config = project.root / "gatehouse.toml"
    text = config.read_text().replace('quota = { pool_size = 4, max_rows = 50 }',
                                      f'quota = {{ pool_size = 4, max_rows = 50, rate = "{RATE}/s", burst = {BURST} }}')
    assert f'rate = "{RATE}/s"' in text
    text = text.replace("[contracts.products]\n", '[contracts.products]\ncache = "30s"\n', 1)
    config.write_text(text + f"\n[cache]\npoll_ms = {int(CACHE_POLL_S * 1000)}\n")
    monkeypatch.setenv("GATEHOUSE_REDIS__URL", redis_url)
    monkeypatch.setenv("GATEHOUSE_REDIS__KEY_PREFIX", f"t{uuid.uuid4().hex[:8]}:")
    project = load_project(project.root)
    keys = await prepare(project)
    instances = list(await asyncio.gather(*(serve_instance(project.root) for _ in range(INSTANCES))))
    try:
        yield project, keys, instances
    finally:
        for instance in instances:
            await stop_instance(instance)


async def test_a_key_revoked_through_one_is_refused_by_all_within_a_second(
        shop: tuple[Project, dict[str, str], list[Instance]]) -> None:
    project, keys, instances = shop
    extra = await operations.create_key(project, "web", description="to revoke")
    async with httpx.AsyncClient(headers={"apikey": extra.secret_key}) as client:

        async def statuses() -> list[int]:
            answers = await asyncio.gather(*(client.get(f"{i.base}/products?id=eq.1") for i in instances))
            return [a.status_code for a in answers]

        async with asyncio.timeout(10):  # a key made anywhere is known everywhere (LISTEN gatehouse_keys)
            while await statuses() != [200] * INSTANCES:
                await asyncio.sleep(0.05)
        revoked_at = time.monotonic()
        assert await operations.revoke_keys(project, "web", extra.id) == [extra.id]
        async with asyncio.timeout(5):
            while (seen := await statuses()) != [401] * INSTANCES:
                await asyncio.sleep(0.02)
        took = time.monotonic() - revoked_at
    assert took < 1.0, f"every instance refused the key only after {took:.2f} s ({seen})"
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT revoked_at IS NOT NULL FROM gatehouse.keys WHERE id = $1", extra.id)
    async with httpx.AsyncClient(headers={"apikey": keys["web"]}) as client:  # the app's other key: unaffected
        assert [(await client.get(f"{i.base}/products?id=eq.1")).status_code for i in instances] == [200] * 3


async def test_a_rate_limit_is_shared_within_its_bound(shop: tuple[Project, dict[str, str], list[Instance]]) -> None:
    _, keys, instances = shop
    seconds = 2.0
    admitted: list[float] = []
    async with httpx.AsyncClient(headers={"apikey": keys["mobile"]}) as client:
        start = time.monotonic()

        async def caller(instance: Instance) -> None:
            while time.monotonic() - start < seconds:
                answer = await client.get(f"{instance.base}/products?id=eq.1")
                if answer.status_code == 200:
                    admitted.append(time.monotonic() - start)
                else:
                    assert answer.status_code == 429 and "retry-after" in answer.headers, answer.text

        await asyncio.gather(*(caller(i) for i in instances for _ in range(2)))
    bound = BURST + RATE * (seconds + LEASE_TTL_S)  # what one limit admits, plus the leases' error bound
    assert RATE * seconds * 0.75 <= len(admitted) <= bound, (len(admitted), bound)  # not three times the limit


async def test_a_write_ends_the_cached_answers_of_every_instance_within_the_bound(
        shop: tuple[Project, dict[str, str], list[Instance]]) -> None:
    project, keys, instances = shop
    async with httpx.AsyncClient(headers={"apikey": keys["web"]}) as client:

        async def names() -> list[tuple[str, str]]:
            answers = await asyncio.gather(*(client.get(f"{i.base}/products?id=eq.7") for i in instances))
            return [(a.json()[0]["name"], a.headers.get("cache-status", "")) for a in answers]

        await names()
        cached = await names()
        assert all("; hit" in status for _, status in cached), cached  # each instance answers from its cache
        async with operations.owner_connection(project) as conn:  # a write in SQL, by someone else
            await conn.execute("UPDATE products SET name = 'renamed' WHERE id = 7")
        written = time.monotonic()
        async with asyncio.timeout(5):
            while [name for name, _ in await names()] != ["renamed"] * INSTANCES:
                await asyncio.sleep(0.01)
        took = time.monotonic() - written
    # the bound: a poll of the data versions (poll_ms) and one more, plus the time to ask three servers
    assert took < 2 * CACHE_POLL_S + 0.25, f"an old answer was served {took:.3f} s after the write"


async def test_apply_on_one_machine_is_picked_up_by_every_instance_without_a_restart(
        shop: tuple[Project, dict[str, str], list[Instance]]) -> None:
    """web is granted orders in gatehouse.toml and ``apply`` runs (its GRANT in the database, as from a deploy
    job on another machine): every instance serves web its orders, without a restart."""
    project, keys, instances = shop
    config = project.root / "gatehouse.toml"
    config.write_text(config.read_text().replace('{ contract = "products", actions = ["read"] },',
                                                 '{ contract = "products", actions = ["read"] },\n'
                                                 '    { contract = "orders", actions = ["read"] },', 1))
    async with httpx.AsyncClient(headers={"apikey": keys["web"]}) as client:
        assert [(await client.get(f"{i.base}/orders?id=eq.1")).status_code for i in instances] == [404] * INSTANCES
        await operations.apply_all(load_project(project.root))
        applied = time.monotonic()
        async with asyncio.timeout(10):
            while [(await client.get(f"{i.base}/orders?id=eq.1")).status_code for i in instances] != [200] * 3:
                await asyncio.sleep(0.05)
        took = time.monotonic() - applied
        answers = [(await client.get(f"{i.base}/orders?id=eq.1&select=id,user_id")).json() for i in instances]
    assert took < 2.0, took
    async with operations.owner_connection(project) as conn:
        user = await conn.fetchval("SELECT user_id FROM orders WHERE id = 1")
    assert answers == [[{"id": 1, "user_id": user}]] * INSTANCES
