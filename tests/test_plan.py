"""`migrate plan` gives the exact impact of pending migrations on released contracts (and who called them),
changes nothing, and `migrate apply` refuses a breaking migration unless forced."""

from __future__ import annotations

import subprocess
import sys

from conftest import prepare
from gatehouse import operations
from gatehouse.contracts.lockfile import read_lock, update_lock, write_lock
from gatehouse.contracts.signature import project_signatures
from gatehouse.project import Project, load_project

DROP_STATUS = "ALTER TABLE orders DROP COLUMN status CASCADE;"


async def _columns(project: Project, table: str) -> list[str]:
    async with operations.owner_connection(project) as conn:
        rows = await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = $1 "
                                "AND table_schema = 'public' ORDER BY ordinal_position", table)
    return [r["column_name"] for r in rows]


async def test_plan_names_the_broken_versions_and_their_callers(shop: Project, serve_project: object) -> None:
    keys = await prepare(shop)
    lock, report = update_lock(shop, await project_signatures(shop), None)
    assert report.ok
    write_lock(shop.root, lock)
    client, runtime = await serve_project(shop)  # type: ignore[operator]
    assert (await client.get("/orders?limit=1", headers={"apikey": keys["analytics"]})).status_code == 200
    await runtime.audit.stop()  # usage roll-ups written

    (shop.root / "migrations" / "V003__drop_order_status.sql").write_text(DROP_STATUS)
    project = load_project(shop.root)
    (plan,) = await operations.plan_all(project)
    assert plan.pending == ["V003 drop order status"]
    broken = {impact.label: impact for impact in plan.breaking}
    assert set(broken) == {"orders.v1", "customer_summary.v1"}  # customer_summary reads status in its JOIN
    assert broken["orders.v1"].api_versions == (1, 2)
    assert [app for app, _ in broken["orders.v1"].callers] == ["analytics"]
    assert "status" in await _columns(project, "orders")  # the plan changed nothing

    def gatehouse(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gatehouse", "--project", str(shop.root), *args],
                              capture_output=True, text=True, timeout=180)

    refused = gatehouse("migrate", "apply")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "BREAKS orders.v1" in refused.stdout and "called by analytics" in refused.stdout
    assert "status" in await _columns(project, "orders")
    planned = gatehouse("migrate", "plan")
    assert planned.returncode == 1 and "BREAKS customer_summary.v1" in planned.stdout
    forced = gatehouse("migrate", "apply", "--force")
    assert "applied V003 drop order status" in forced.stdout
    # forced through, the migration ran; the broken contracts now say so instead of being served wrong
    assert forced.returncode == 1 and "contract views cannot be re-created" in forced.stderr
    assert "status" not in await _columns(project, "orders")
    assert read_lock(shop.root) is not None


async def test_a_compatible_migration_plans_clean(shop: Project) -> None:
    await prepare(shop)
    lock, _ = update_lock(shop, await project_signatures(shop), None)
    write_lock(shop.root, lock)
    (shop.root / "migrations" / "V003__add_sku.sql").write_text("ALTER TABLE products ADD COLUMN sku text;")
    (plan,) = await operations.plan_all(load_project(shop.root))
    assert plan.pending == ["V003 add sku"] and plan.impacts == [] and plan.failure is None
