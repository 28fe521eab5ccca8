"""Fair sharing between apps (limits/fair.py): work slots served by turns; a quiet app overtakes a noisy one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import ProjectFactory, prepare
from gatehouse.config import AppConfig
from gatehouse.errors import PoolTimeout, TooManyInFlight
from gatehouse.limits.fair import FairShare, default_max_active
from gatehouse.project import App

# --- the scheduler alone -------------------------------------------------------------------------------------


def _app(name: str, weight: int = 1) -> App:
    return App(name, AppConfig.model_validate({"quota": {"weight": weight}}), f"r_{name}")


def test_a_free_slot_is_taken_at_once_and_given_back() -> None:
    fair, app = FairShare(2), _app("a")
    first, second = fair.enter(app), fair.enter(app)
    assert first is not None and second is not None and fair.active == 2
    assert fair.enter(app) is None  # full, and the app holds all of its share
    first()
    assert fair.active == 1 and fair.enter(app) is not None


async def test_an_app_under_its_share_overtakes_the_queue() -> None:
    fair, noisy, quiet = FairShare(2), _app("noisy"), _app("quiet")
    held = [fair.enter(noisy), fair.enter(noisy)]
    queued = [asyncio.ensure_future(fair.wait(noisy)) for _ in range(3)]
    await asyncio.sleep(0)
    assert fair.queued == 3
    release = fair.enter(quiet)  # share 1 of 2, holds none: at once, one above max_active for a moment
    assert release is not None and fair.active == 3
    assert fair.enter(quiet) is None  # a second one would be above its share: it queues
    release()
    for slot in held:
        assert slot is not None
        slot()
    await asyncio.sleep(0)
    assert sum(task.done() for task in queued) == 2 and fair.active == 2  # back to max_active
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)


async def test_freed_slots_go_to_the_app_holding_fewest_per_weight() -> None:
    """Two apps that both queue end up holding slots in proportion to their weights, whatever the order they
    came in; and a slot freed by one goes to the other while it holds less than its share."""
    fair = FairShare(4)
    heavy, light = _app("heavy", weight=3), _app("light")
    holding: list[tuple[str, Callable[[], None]]] = []

    async def request(app: App) -> None:
        release = fair.enter(app) or await fair.wait(app)
        holding.append((app.name, release))

    tasks = [asyncio.ensure_future(request(light)) for _ in range(8)]
    await asyncio.sleep(0)
    tasks += [asyncio.ensure_future(request(heavy)) for _ in range(8)]
    await asyncio.sleep(0)
    assert [name for name, _ in holding] == ["light"] * 4 + ["heavy"] * 3  # heavy under its share of 3
    for _ in range(6):  # the oldest slot is answered, one at a time
        holding.pop(0)[1]()
        await asyncio.sleep(0)
    held = [name for name, _ in holding]
    assert sorted(held) == ["heavy", "heavy", "heavy", "light"]
    assert fair.active == 4 and fair.queued == 16 - 7 - 3  # 7 at once, then 3 slots handed over
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_round_robin_between_equals() -> None:
    fair = FairShare(1)
    apps = [_app(name) for name in "abc"]
    blocker = fair.enter(apps[0])
    assert blocker is not None
    order: list[str] = []

    async def request(app: App) -> None:
        release = await fair.wait(app)
        order.append(app.name)
        release()

    tasks = [asyncio.ensure_future(request(app)) for app in apps for _ in range(2)]  # a, a, b, b, c, c
    await asyncio.sleep(0)
    blocker()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "a", "b", "c"]  # by turns, not a, a, b, b, c, c as they came
    assert fair.active == 0 and fair.queued == 0


async def test_a_queue_is_bounded_in_length_and_in_time() -> None:
    fair, app = FairShare(1, wait_s=0.05, max_queued=2), _app("a")
    assert fair.enter(app) is not None
    waiting = [asyncio.ensure_future(fair.wait(app)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(TooManyInFlight) as refused:
        await fair.wait(app)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    started = time.monotonic()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, PoolTimeout) for o in outcomes) and time.monotonic() - started < 1
    assert fair.queued == 0 and fair.active == 1


async def test_a_slot_handed_to_a_cancelled_request_goes_to_the_next() -> None:
    fair, app = FairShare(1), _app("a")
    release = fair.enter(app)
    assert release is not None
    first, second = asyncio.ensure_future(fair.wait(app)), asyncio.ensure_future(fair.wait(app))
    await asyncio.sleep(0)
    release()  # the slot is first's...
    first.cancel()  # ...but its client went away before it ran
    await asyncio.gather(first, return_exceptions=True)
    assert (await second) is not None and fair.active == 1 and fair.queued == 0


def test_the_default_bound_is_the_largest_pool_and_a_statement_group(make_project: ProjectFactory) -> None:
    def bound(server_line: str) -> int:
        toml = TOML.replace("max_active = 1\n", server_line).replace(
            '[apps.quiet]\n', '[apps.quiet]\nquota = { pool_size = 7 }\n')
        project = make_project(toml=toml, migrations={"V001__items.sql": MIGRATION}, contracts=CONTRACTS)
        assert FairShare.for_project(project).max_active == default_max_active(project)
        return default_max_active(project)

    assert bound("") == 7 + 32  # room for a whole group waiting at the busy pool
    assert bound("group_statements = 1\n") == 14  # without groups, twice the pool: two busy apps get a pool each
    assert bound("group_statements = 4\n") == 14


def test_off_never_queues() -> None:
    fair, app = FairShare.off(), _app("a")
    assert all(fair.enter(app) is not None for _ in range(10_000))


# --- over HTTP -----------------------------------------------------------------------------------------------

TOML = """
[project]
name = "fair"

[databases.main]

[server]
max_active = 1
max_queued = 3

[apps.noisy]
grants = [{ contract = "items", actions = ["read"] }, { contract = "sleepy", actions = ["read"] }]

[apps.quiet]
grants = [{ contract = "items", actions = ["read"] }]
"""
MIGRATION = "CREATE TABLE items (id serial PRIMARY KEY, label text NOT NULL); INSERT INTO items (label) VALUES ('a');"
CONTRACTS = {"items.v1.sql": "SELECT id, label FROM items",
             "sleepy.v1.sql": "SELECT pg_sleep(0.5) IS NOT NULL AS slept"}


async def _served(make_project: ProjectFactory, serve_project: Any) -> tuple[Any, Any, dict[str, str]]:
    project = make_project(toml=TOML, migrations={"V001__items.sql": MIGRATION}, contracts=CONTRACTS)
    keys = await prepare(project)
    client, runtime = await serve_project(project)
    return client, runtime, keys


async def test_a_quiet_app_overtakes_a_queued_noisy_app(make_project: ProjectFactory, serve_project: Any) -> None:
    client, runtime, keys = await _served(make_project, serve_project)
    noisy, quiet = {"apikey": keys["noisy"]}, {"apikey": keys["quiet"]}
    started = time.monotonic()
    flood = [asyncio.create_task(client.get("/sleepy", headers=noisy)) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert runtime.fair.holding("noisy") == 1 and runtime.fair.queued == 2  # one at a time, the rest queued
    scraped = runtime.metrics.render().decode()
    assert "gatehouse_work_active 1.0" in scraped and "gatehouse_work_queued 2.0" in scraped
    answer = await client.get("/items", headers=quiet)
    assert answer.status_code == 200 and time.monotonic() - started < 0.45  # before the first sleepy is done
    assert not any(task.done() for task in flood)
    statuses = [(await task).status_code for task in flood]
    assert statuses == [200, 200, 200]  # queued, never refused
    assert time.monotonic() - started >= 1.45  # one after the other
    assert runtime.fair.active == 0


async def test_slots_come_back_after_errors_and_clients_that_leave(make_project: ProjectFactory,
                                                                   serve_project: Any) -> None:
    client, runtime, keys = await _served(make_project, serve_project)
    noisy = {"apikey": keys["noisy"]}
    for path in ("/nothing", "/items?id=eq.oops", "/items?nope=eq.1"):  # 404 / 400, after the slot was taken
        assert (await client.get(path, headers=noisy)).status_code in (400, 404)
    assert runtime.fair.active == 0
    leaving = [asyncio.create_task(client.get("/sleepy", headers=noisy)) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert runtime.fair.active == 1 and runtime.fair.queued == 2
    for task in leaving:  # one mid-statement, two queued
        task.cancel()
    await asyncio.gather(*leaving, return_exceptions=True)
    assert runtime.fair.active == 0 and runtime.fair.queued == 0
    assert (await client.get("/items", headers=noisy)).status_code == 200


async def test_an_app_with_a_full_queue_gets_429(make_project: ProjectFactory, serve_project: Any) -> None:
    client, _, keys = await _served(make_project, serve_project)
    noisy = {"apikey": keys["noisy"]}
    flood = [asyncio.create_task(client.get("/sleepy", headers=noisy)) for _ in range(4)]  # 1 answered, 3 queued
    await asyncio.sleep(0.1)
    refused = await client.get("/items", headers=noisy)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "3 waiting" in refused.json()["message"]
    assert [(await task).status_code for task in flood] == [200] * 4
