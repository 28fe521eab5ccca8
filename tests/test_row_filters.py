"""Row filters on grants: an app sees and changes only its rows, through reads, embeds, updates, deletes and
inserts; a hidden row looks exactly like a missing one."""

from __future__ import annotations

import httpx
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.errors import ProjectError
from gatehouse.project import Project

TOML = """
[project]
name = "tenants"

[databases.main]

[apps.acme]
grants = [
    { contract = "accounts", actions = ["read"], filter = "tenant=eq.acme" },
    { contract = "notes", actions = ["read", "insert", "update", "delete"], filter = "tenant=eq.acme" },
]

[apps.globex]
grants = [
    { contract = "accounts", actions = ["read"], filter = "tenant=eq.globex" },
    { contract = "notes", actions = ["read", "insert", "update", "delete"], filter = "or=(tenant.eq.globex,shared.is.true)" },
]

[apps.per_user]
grants = [{ contract = "notes", actions = ["read"], filter = "tenant=eq.{claims.tenant}" }]
"""
MIGRATION = """
CREATE TABLE accounts (id serial PRIMARY KEY, tenant text NOT NULL, name text NOT NULL);
CREATE TABLE notes (id serial PRIMARY KEY, account_id int NOT NULL REFERENCES accounts (id), tenant text NOT NULL,
                    body text NOT NULL, shared boolean NOT NULL DEFAULT false);
INSERT INTO accounts (tenant, name) VALUES ('acme', 'Acme HQ'), ('globex', 'Globex HQ');
INSERT INTO notes (account_id, tenant, body, shared) VALUES (1, 'acme', 'acme secret', false),
    (2, 'globex', 'globex secret', false), (1, 'acme', 'acme public', true);
"""
CONTRACTS = {
    "accounts.v1.sql": "SELECT id, tenant, name FROM accounts",
    "notes.v1.sql": "SELECT id, account_id, tenant, body, shared FROM notes",
}


@pytest.fixture
async def tenants(make_project: ProjectFactory, serve_project: object) -> tuple[httpx.AsyncClient, Project, dict[str, str]]:
    project = make_project(toml=TOML, migrations={"V001__t.sql": MIGRATION}, contracts=CONTRACTS)
    keys = await prepare(project)
    client, _ = await serve_project(project)  # type: ignore[operator]
    return client, project, keys


async def test_reads_and_embeds_see_only_own_rows(tenants: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, _, keys = tenants
    acme, globex = {"apikey": keys["acme"]}, {"apikey": keys["globex"]}
    assert [n["body"] for n in (await client.get("/notes?order=id", headers=acme)).json()] == ["acme secret", "acme public"]
    assert [n["body"] for n in (await client.get("/notes?order=id", headers=globex)).json()] == ["globex secret", "acme public"]
    # a hidden row is indistinguishable from a missing one, even when asked for by id
    assert (await client.get("/notes?id=eq.2", headers=acme)).json() == []
    assert (await client.get("/notes?or=(id.eq.2,tenant.eq.globex)", headers=acme)).json() == []
    counted = await client.get("/notes?select=id", headers={**acme, "Prefer": "count=exact"})
    assert counted.headers["content-range"] == "0-1/2"
    # embedded resources are filtered too: globex sees acme's shared note but not acme's account
    embedded = (await client.get("/notes?select=body,accounts(name)&shared=is.true", headers=globex)).json()
    assert embedded == [{"body": "acme public", "accounts": None}]
    reverse = (await client.get("/accounts?select=name,notes(body)", headers=acme)).json()
    assert reverse == [{"name": "Acme HQ", "notes": [{"body": "acme secret"}, {"body": "acme public"}]}]


async def test_writes_stay_inside_the_filter(tenants: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, keys = tenants
    acme = {"apikey": keys["acme"]}
    hidden_patch = await client.patch("/notes?id=eq.2", json={"body": "pwned"}, headers=acme)
    assert hidden_patch.status_code == 204 and hidden_patch.headers["content-range"] == "*/*"  # matched nothing
    hidden_delete = await client.delete("/notes?id=eq.2", headers={**acme, "Prefer": "count=exact"})
    assert hidden_delete.headers["content-range"] == "*/0"
    foreign_insert = await client.post("/notes", json={"account_id": 2, "tenant": "globex", "body": "planted"},
                                       headers=acme)
    assert foreign_insert.status_code == 403, foreign_insert.text
    escape = await client.patch("/notes?id=eq.1", json={"tenant": "globex"}, headers=acme)
    assert escape.status_code == 403  # the row would leave acme's filter
    own = await client.post("/notes", json={"account_id": 1, "tenant": "acme", "body": "fine"}, headers=acme)
    assert own.status_code == 201
    async with operations.owner_connection(project) as conn:
        rows = {r["body"]: r["tenant"] for r in await conn.fetch("SELECT body, tenant FROM notes")}
    assert rows == {"acme secret": "acme", "globex secret": "globex", "acme public": "acme", "fine": "acme"}


async def test_a_filter_needing_a_claim_refuses_callers_without_it(
        tenants: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, _, keys = tenants
    response = await client.get("/notes", headers={"apikey": keys["per_user"]})  # a key carries no claims
    assert response.status_code == 403 and response.json()["details"] == "missing claim: tenant"


@pytest.mark.parametrize(("row_filter", "message"), [
    ("nope=eq.1", "not a column of notes.v1"),
    ("tenant=xx.1", "cannot be read"),
    ("order=id", "only filters"),
    ("", "empty"),
])
def test_bad_filters_are_refused_at_load(make_project: ProjectFactory, row_filter: str, message: str) -> None:
    toml = TOML.replace('filter = "tenant=eq.{claims.tenant}"', f'filter = "{row_filter}"')
    with pytest.raises(ProjectError, match=message):
        make_project(toml=toml, migrations={"V001__t.sql": MIGRATION}, contracts=CONTRACTS)


def test_claims_are_bound_as_values_never_spliced() -> None:
    from gatehouse.query.row_filters import bind_claims, parse_row_filter
    from gatehouse.query.tree import Field, Filter, Logic

    conditions = parse_row_filter("tenant=eq.{claims.org.id}&or=(owner.eq.{claims.sub},shared.is.true)")
    bound = bind_claims(conditions, {"org": {"id": "x' OR 1=1 --"}, "sub": 42})
    assert bound[0] == Filter(Field("tenant"), "eq", "x' OR 1=1 --")
    assert isinstance(bound[1], Logic) and bound[1].children[0] == Filter(Field("owner"), "eq", "42")
