"""Sagas started by a user: the run keeps the user's subject and claims, and every step acts with them, under the
app's row filters, as the user's own request would. Over HTTP with real tokens (tests/test_tenancy.py's portal);
every test reads the tables afterwards."""

from __future__ import annotations

import httpx
import pytest

from conftest import ProjectFactory
from gatehouse import operations
from gatehouse.project import Project
from gatehouse.testing import LogicHarness
from test_tenancy import TOML, as_user, serve_portal

SAGA_TOML = TOML.replace('functions = ["my_note_count"]', 'sagas = ["retitle"]')
LOGIC = '''
from pydantic import BaseModel

import gatehouse
from gatehouse import Saga
from gatehouse.logic.context import Context


class Retitle(BaseModel):
    project_id: int
    title: str


@gatehouse.step(database="main")
async def add_task(ctx: Context, change: Retitle) -> int:
    [row] = await ctx.insert("tasks", {"project_id": change.project_id, "tenant": ctx.claims["tenant"],
                                       "title": "new"})
    return int(row["id"])


@gatehouse.step(database="main")
async def retitle_all(ctx: Context, title: str) -> list[int]:
    return sorted(row["id"] for row in await ctx.update("tasks", {"title": title}, "id=gt.0"))


@gatehouse.saga
async def retitle(s: Saga, change: Retitle) -> dict[str, object]:
    added = await s.step(add_task, change)
    return {"added": added, "retitled": await s.step(retitle_all, change.title)}
'''


@pytest.fixture
async def portal(make_project: ProjectFactory, serve_project: object,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[httpx.AsyncClient, Project, str]:
    return await serve_portal(make_project, serve_project, monkeypatch, toml=SAGA_TOML,
                              logic={"logic/sagas.py": LOGIC})


async def tasks(project: Project) -> list[tuple[int, str, str]]:
    async with operations.owner_connection(project) as conn:
        return [(r["id"], r["tenant"], r["title"]) for r in await conn.fetch("SELECT * FROM tasks ORDER BY id")]


async def test_a_users_saga_acts_with_their_claims_and_answers_only_to_them(
        portal: tuple[httpx.AsyncClient, Project, str]) -> None:
    client, project, key = portal
    acme = {**as_user(key, "acme", sub="ann"), "Prefer": "wait=20", "Idempotency-Key": "retitle-1"}
    started = await client.post("/sagas/retitle", json={"project_id": 1, "title": "done"}, headers=acme)
    assert started.status_code == 200, started.text
    run = started.json()
    assert run["state"] == "completed", run
    assert run["result"] == {"added": 4, "retitled": [1, 2, 4]}  # acme's tasks only
    assert await tasks(project) == [(1, "acme", "done"), (2, "acme", "done"), (3, "globex", "wire"),
                                    (4, "acme", "done")]
    async with operations.owner_connection(project) as conn:
        stored = await conn.fetchrow("SELECT subject, claims->>'tenant' AS tenant FROM gatehouse.sagas")
        audited = await conn.fetch("SELECT subject FROM gatehouse.audit_log WHERE method = 'SAGA'")
    assert (stored["subject"], stored["tenant"]) == ("ann", "acme")
    assert [r["subject"] for r in audited] == ["ann", "ann"]  # each step, in the audit as the user's

    location = f"/sagas/retitle/{run['id']}"
    assert (await client.get(location, headers=as_user(key, "acme", sub="ann"))).status_code == 200
    # another user of the same app: not their run (404), and not their key either (422, nothing started)
    assert (await client.get(location, headers=as_user(key, "acme", sub="bob"))).status_code == 404
    assert (await client.get(location, headers=as_user(key, "globex", sub="ann"))).status_code == 200  # same sub
    reused = await client.post("/sagas/retitle", json={"project_id": 1, "title": "done"},
                               headers={**as_user(key, "globex", sub="gil"), "Idempotency-Key": "retitle-1"})
    assert reused.status_code == 422 and reused.json()["code"] == "GH423", reused.text
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT count(*) FROM gatehouse.sagas") == 1


async def test_the_harness_runs_a_saga_as_a_user(portal: tuple[httpx.AsyncClient, Project, str]) -> None:
    _, project, _ = portal
    async with LogicHarness(project) as harness:
        run = await harness.run_saga("retitle", app="portal", data={"project_id": 2, "title": "x"},
                                     claims={"sub": "gil", "tenant": "globex"})
    assert (run.state, run.subject, run.result["retitled"]) == ("completed", "gil", [3, 4])
    assert [t for t in await tasks(project) if t[1] == "acme"] == [(1, "acme", "fuel"), (2, "acme", "launch")]
