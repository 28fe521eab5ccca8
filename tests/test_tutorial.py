"""docs/safe-schema-changes.md, followed step by step on the demo shop: rename products.name to title without
breaking anyone (expand, with a batched backfill → migrate → contract), with `gatehouse check` agreeing at
every step and `migrate plan` naming whom a drop made too early would break.

The shop is the demo's whole project, its reviews service included (a second database, whose contract is in
every API version the tutorial touches), so the files go where a reader of the demo puts them: into
``migrations/shop/`` and ``contracts/shop/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from conftest import REPO, ProjectFactory, prepare
from gatehouse import operations
from gatehouse.check import run_check
from gatehouse.check_findings import exit_code
from gatehouse.contracts.lockfile import read_lock, update_lock, write_lock
from gatehouse.contracts.signature import project_signatures
from gatehouse.migrate.plan import Plan
from gatehouse.project import Project, load_project

TUTORIAL = REPO / "docs" / "tutorial"


def _edit(root: Path, old: str, new: str) -> None:
    path = root / "gatehouse.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


async def _check_clean(root: Path) -> None:
    findings = await run_check(root)
    assert exit_code(findings) == 0, [f"{f.code} {f.message}" for f in findings]


async def _lock(project: Project) -> list[str]:
    lock, report = update_lock(project, await project_signatures(project), read_lock(project.root))
    assert report.ok, report.lines()
    write_lock(project.root, lock)
    return report.lines()


async def _get(project: Project, serve: object, key: str, url: str, **headers: str) -> httpx.Response:
    client, runtime = await serve(project)  # type: ignore[operator]
    response: httpx.Response = await client.get(url, headers={"apikey": key, **headers})
    await runtime.stop()
    return response


def _copy(root: Path, *names: str) -> None:
    for name in names:
        shutil.copy(TUTORIAL / name, root / ("contracts" if name.startswith("products.") else "migrations") / "shop")


async def _plan(project: Project) -> Plan:
    """The shop database's plan (the tutorial changes only that one; the other services' have nothing pending)."""
    shop, *others = await operations.plan_all(project)
    assert shop.database == "shop" and [(p.database, p.pending) for p in others] == [("reviews", []),
                                                                                    ("payments", [])]
    return shop


async def test_rename_a_column_without_breaking_anyone(make_project: ProjectFactory, serve_project: object) -> None:
    shop = make_project(from_shop=True, services=True)
    root = shop.root
    keys = await prepare(shop)
    await _check_clean(root)  # step 0: the released shop, as locked in examples/shop/contracts.lock
    assert set((await _get(shop, serve_project, keys["analytics"], "/products?id=eq.1")).json()[0]) == {
        "id", "name", "price", "category", "stock"}  # analytics calls v2: it is pinned to it in step 2

    # Step 1, expand: a title column kept in sync with name and filled in batches, products.v3 shows it,
    # mobile moves to v3.
    _copy(root, "V003__add_product_title.sql", "V004__backfill_product_title.sql", "products.v3.sql")
    _edit(root, 'description = "The mobile app. Browses the catalogue only."',
          'description = "The mobile app. Browses the catalogue only."\nversion = 3')
    project = load_project(root)
    assert [f.code for f in await run_check(root)] == ["GHC040", "GHC041"]  # v3 needs the migration
    plan = await _plan(project)
    assert plan.pending == ["V003 add product title", "V004 backfill product title"]
    assert plan.skipped == ["V004 backfill product title"] and not plan.breaking and plan.failure is None
    # with V005 copied too, the plan stops at the backfill: V005 needs its rows, so it is listed as not run
    _copy(root, "V005__require_product_title.sql")
    plan = await _plan(load_project(root))
    assert plan.stopped_at == "V004 backfill product title" and plan.failure is None and not plan.breaking
    assert plan.skipped == ["V004 backfill product title", "V005 require product title"]
    (root / "migrations" / "shop" / "V005__require_product_title.sql").unlink()
    lints = await operations.lint_pending(project)
    assert [f.rule for f in lints["shop"].findings] == []  # the ALTER and the backfill are apart
    await operations.migrate_all(project)
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT count(*) FROM products WHERE title IS DISTINCT FROM name") == 0
    # title is filled but still nullable in the table, so v3's `-- not null: title` is not kept yet, and
    # lock refuses to release v3 with it
    assert [f.code for f in await run_check(root)] == ["GHC055"]
    _, refused = update_lock(project, await project_signatures(project), read_lock(root))
    assert [label for label, _ in refused.refused] == ["products.v3"] and "title" in refused.refused[0][1]
    _copy(root, "V005__require_product_title.sql")
    project = load_project(root)
    plan = await _plan(project)
    assert plan.pending == ["V005 require product title"] and not plan.breaking and plan.failure is None
    await operations.migrate_all(project)
    await operations.apply_all(project)
    assert "released products.v3" in await _lock(project)
    await _check_clean(root)
    web = await _get(project, serve_project, keys["web"], "/products?id=eq.1")
    mobile = await _get(project, serve_project, keys["mobile"], "/products?id=eq.1")
    assert set(web.json()[0]) == {"id", "name", "price"}  # web, still on v1, sees nothing change
    assert set(mobile.json()[0]) == {"id", "title", "price", "category", "stock"}
    assert web.json()[0]["name"] == mobile.json()[0]["title"]

    # Step 2, migrate: who still calls the old versions? web moves to v3; dropping name now would break
    # analytics, pinned to v2, while web has moved on from v1.
    usage = await operations.version_usage(project, 7)
    assert {(u["api_version"], u["app"]) for u in usage} >= {(1, "web"), (2, "analytics"), (3, "mobile")}
    _edit(root, "version = 1\n", "version = 3\n")
    project = load_project(root)
    moved = await _get(project, serve_project, keys["web"], "/products?id=eq.1")
    assert "title" in moved.json()[0]
    _copy(root, "V006__drop_product_name.sql")
    plan = await _plan(load_project(root))
    broken = {impact.label: impact for impact in plan.breaking}
    assert set(broken) == {"products.v1", "products.v2"}
    assert broken["products.v1"].would_break == [] and [u.app for u in broken["products.v1"].callers] == ["web"]
    assert broken["products.v2"].would_break == ["analytics"]
    assert all(impact.error for impact in plan.breaking)  # they would not compile: not even --force ships it
    (root / "migrations" / "shop" / "V006__drop_product_name.sql").unlink()
    _edit(root, "default_version = 2", "default_version = 3")
    project = load_project(root)
    await _check_clean(root)

    # Step 3, contract: retire v1 and v2 (their views go), then drop the old column.
    (root / "gatehouse.toml").write_text((root / "gatehouse.toml").read_text()
                                         + '\n[versions.v1]\nstatus = "retired"\n\n[versions.v2]\nstatus = "retired"\n')
    project = load_project(root)
    report = await operations.apply_all(project)
    assert "dropped schema api_v1 (no contract is served in it any more)" in report[0].changes
    gone = await _get(project, serve_project, keys["web"], "/products", **{"Accept-Profile": "v1"})
    assert gone.status_code == 410
    _copy(root, "V006__drop_product_name.sql")
    project = load_project(root)
    plan = await _plan(project)
    assert not plan.breaking and plan.failure is None, (plan.failure, plan.impacts)
    await operations.migrate_all(project)
    await operations.apply_all(project)
    await _check_clean(root)
    final = await _get(project, serve_project, keys["analytics"], "/products?id=eq.1")
    assert set(final.json()[0]) == {"id", "title", "price", "category", "stock"}
    async with operations.owner_connection(project) as conn:
        columns = await conn.fetch("SELECT column_name, is_nullable FROM information_schema.columns "
                                   "WHERE table_schema = 'public' AND table_name = 'products' "
                                   "AND column_name IN ('name', 'title')")
    assert [(c["column_name"], c["is_nullable"]) for c in columns] == [("title", "NO")]
