"""Users inside an app, end to end over HTTP: a user's JWT (with the app's key, or alone) selects rows through the
grant's row filter; two tenants never see or change each other's rows through reads, embeds, updates, deletes
or logic; bad tokens are 401."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.project import Project

SECRET = "a-test-secret-that-is-long-enough-for-hs256!!"
TOML = """
[project]
name = "tenancy"

[databases.main]

[auth.issuers.idp]
issuer = "https://idp.test/"
secret = "env:TENANCY_JWT_SECRET"
algorithms = ["HS256"]
audience = "gatehouse"
app_claim = "azp"
apps = { "portal-web" = "portal" }

[apps.portal]
require_user = true
functions = ["my_note_count"]
grants = [
    { contract = "projects", actions = ["read"], filter = "tenant=eq.{claims.tenant}" },
    { contract = "tasks", actions = ["read", "insert", "update", "delete"], filter = "tenant=eq.{claims.tenant}" },
]
"""
MIGRATION = """
CREATE TABLE projects (id int PRIMARY KEY, tenant text NOT NULL, name text NOT NULL);
CREATE TABLE tasks (id serial PRIMARY KEY, project_id int NOT NULL REFERENCES projects (id), tenant text NOT NULL,
                    title text NOT NULL);
INSERT INTO projects VALUES (1, 'acme', 'rocket'), (2, 'globex', 'magnet');
INSERT INTO tasks (project_id, tenant, title) VALUES (1, 'acme', 'fuel'), (1, 'acme', 'launch'), (2, 'globex', 'wire');
"""
LOGIC = '''
import gatehouse
from gatehouse.logic.context import Context


@gatehouse.rpc(read_only=True)
async def my_note_count(ctx: Context) -> dict[str, object]:
    tasks = await ctx.read("tasks")
    return {"user": ctx.subject, "tasks": len(tasks)}
'''


def token(tenant: str, *, sub: str = "u1", azp: str | None = "portal-web", **changes: object) -> str:
    now = int(time.time())
    claims: dict[str, object] = {"iss": "https://idp.test/", "aud": "gatehouse", "sub": sub, "tenant": tenant,
                                 "iat": now, "exp": now + 300}
    if azp:
        claims["azp"] = azp
    claims.update(changes)
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def serve_portal(make_project: ProjectFactory, serve_project: object, monkeypatch: pytest.MonkeyPatch, *,
                       toml: str = TOML, logic: dict[str, str] | None = None) -> tuple[httpx.AsyncClient, Project, str]:
    """The portal project (``toml``, with ``logic`` files: path → source) served in-process: (client, project, key)."""
    monkeypatch.setenv("TENANCY_JWT_SECRET", SECRET)
    project = make_project(toml=toml, migrations={"V001__t.sql": MIGRATION},
                           files=logic if logic is not None else {"logic/counts.py": LOGIC},
                           contracts={"projects.v1.sql": "SELECT id, tenant, name FROM projects",
                                      "tasks.v1.sql": "SELECT id, project_id, tenant, title FROM tasks"})
    keys = await prepare(project)
    client, _ = await serve_project(project)  # type: ignore[operator]
    return client, project, keys["portal"]


@pytest.fixture
async def portal(make_project: ProjectFactory, serve_project: object,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[httpx.AsyncClient, Project, str]:
    return await serve_portal(make_project, serve_project, monkeypatch)


def as_user(key: str | None, tenant: str, **changes: object) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token(tenant, **changes)}"}
    return {**headers, "apikey": key} if key else headers


async def test_tenants_are_isolated_everywhere(portal: tuple[httpx.AsyncClient, Project, str]) -> None:
    client, project, key = portal
    acme, globex = as_user(key, "acme"), as_user(key, "globex")
    assert [t["title"] for t in (await client.get("/tasks?order=id", headers=acme)).json()] == ["fuel", "launch"]
    assert [t["title"] for t in (await client.get("/tasks", headers=globex)).json()] == ["wire"]
    # the same query shape for the other tenant: a plan cached for acme must not answer for globex
    assert [t["title"] for t in (await client.get("/tasks?order=id", headers=globex)).json()] == ["wire"]
    assert [t["title"] for t in (await client.get("/tasks?id=gt.0", headers=acme)).json()] == ["fuel", "launch"]
    assert [t["title"] for t in (await client.get("/tasks?id=gt.0", headers=globex)).json()] == ["wire"]
    embedded = (await client.get("/projects?select=name,tasks(title)", headers=globex)).json()
    assert embedded == [{"name": "magnet", "tasks": [{"title": "wire"}]}]
    reverse = (await client.get("/tasks?select=title,projects(name)&id=eq.3", headers=acme)).json()
    assert reverse == []
    assert (await client.patch("/tasks?id=eq.3", json={"title": "cut"}, headers=acme)).headers["content-range"] == "*/*"
    assert (await client.delete("/tasks?project_id=eq.2", headers={**acme, "Prefer": "count=exact"})
            ).headers["content-range"] == "*/0"
    planted = await client.post("/tasks", json={"project_id": 2, "tenant": "globex", "title": "spy"}, headers=acme)
    assert planted.status_code == 403
    assert (await client.get("/rpc/my_note_count", headers=acme)).json() == {"user": "u1", "tasks": 2}
    assert (await client.get("/rpc/my_note_count", headers=globex)).json() == {"user": "u1", "tasks": 1}
    async with operations.owner_connection(project) as conn:
        titles = sorted(r["title"] for r in await conn.fetch("SELECT title FROM tasks"))
    assert titles == ["fuel", "launch", "wire"]


async def test_a_token_alone_names_the_app(portal: tuple[httpx.AsyncClient, Project, str]) -> None:
    client, _, _ = portal
    response = await client.get("/tasks", headers=as_user(None, "acme"))
    assert response.status_code == 200 and len(response.json()) == 2
    nameless = await client.get("/tasks", headers=as_user(None, "acme", azp=None))
    assert nameless.status_code == 401 and nameless.json()["code"] == "PGRST303"


@pytest.mark.parametrize(("changes", "code"), [
    ({"exp": int(time.time()) - 600}, "PGRST303"),
    ({"aud": "someone-else"}, "PGRST303"),
    ({"iss": "https://evil.test/"}, "PGRST303"),
    ({"azp": "unknown-client"}, "PGRST303"),
])
async def test_bad_tokens_are_401(portal: tuple[httpx.AsyncClient, Project, str], changes: dict[str, object],
                                  code: str) -> None:
    client, _, key = portal
    response = await client.get("/tasks", headers=as_user(key, "acme", **changes))
    assert response.status_code == 401 and response.json()["code"] == code
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_forged_and_unsigned_tokens_are_401(portal: tuple[httpx.AsyncClient, Project, str]) -> None:
    client, _, key = portal
    forged = jwt.encode({"iss": "https://idp.test/", "aud": "gatehouse", "sub": "x", "tenant": "globex",
                         "azp": "portal-web", "exp": int(time.time()) + 60}, "not-the-secret-" * 4, algorithm="HS256")
    unsigned = jwt.encode({"iss": "https://idp.test/", "aud": "gatehouse", "sub": "x", "tenant": "globex",
                           "azp": "portal-web", "exp": int(time.time()) + 60}, None, algorithm="none")
    for bad in (forged, unsigned):
        response = await client.get("/tasks", headers={"apikey": key, "Authorization": f"Bearer {bad}"})
        assert response.status_code == 401, response.text


async def test_an_app_that_requires_a_user_refuses_its_key_alone(portal: tuple[httpx.AsyncClient, Project, str]) -> None:
    client, _, key = portal
    response = await client.get("/tasks", headers={"apikey": key})
    assert response.status_code == 401 and "requires a user token" in response.json()["message"]
