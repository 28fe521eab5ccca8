"""Each app's queries run under its own role, even under heavy interleaving.

A ``whoami`` contract reports PostgreSQL's ``current_user`` as seen inside the view, i.e. the role the
statement really ran under. Thousands of concurrent requests from several apps must each see their own.
"""

from __future__ import annotations

import asyncio
import random

import httpx

from conftest import ProjectFactory, prepare

TOML = """
[project]
name = "iso"

[databases.main]

[apps.alpha]
quota = { pool_size = 3 }
grants = [{ contract = "whoami", actions = ["read"] }]

[apps.beta]
quota = { pool_size = 2 }
grants = [{ contract = "whoami", actions = ["read"] }]

[apps.gamma]
quota = { pool_size = 1 }
grants = [{ contract = "whoami", actions = ["read"] }]
"""


async def test_no_query_ever_runs_under_another_apps_role(make_project: ProjectFactory, serve_project: object) -> None:
    project = make_project(
        toml=TOML,
        migrations={"V001__numbers.sql": "CREATE TABLE numbers AS SELECT g AS n FROM generate_series(1, 100) g;"},
        contracts={"whoami.v1.sql": "-- Which role runs this query\nSELECT n, current_user::text AS db_role, "
                                    "current_setting('application_name') AS app_name FROM numbers"},
    )
    keys = await prepare(project)
    client, _ = await serve_project(project)  # type: ignore[operator]
    rng = random.Random(7)
    plan = [rng.choice(sorted(keys)) for _ in range(3000)]
    semaphore = asyncio.Semaphore(64)

    async def call(app: str) -> tuple[str, httpx.Response]:
        async with semaphore:
            n = rng.randint(1, 100)
            return app, await client.get(f"/whoami?n=eq.{n}", headers={"apikey": keys[app]})

    results = await asyncio.gather(*(call(app) for app in plan))
    seen: dict[str, set[str]] = {}
    for app, response in results:
        assert response.status_code == 200, response.text
        (row,) = response.json()
        seen.setdefault(app, set()).add(row["db_role"])
        assert row["db_role"] == project.apps[app].role
        assert row["app_name"] == f"gatehouse/{app}"
    assert set(seen) == {"alpha", "beta", "gamma"}
    assert all(len(roles) == 1 for roles in seen.values())
