"""`migrate plan` gives the exact impact of pending migrations on released contracts (and who called them),
changes nothing, and `migrate apply` refuses a breaking migration unless forced."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from conftest import ProjectFactory, prepare, run_sync
from gatehouse import cli, operations
from gatehouse.contracts.lockfile import read_lock, update_lock, write_lock
from gatehouse.contracts.signature import project_signatures
from gatehouse.observe.usage import describe
from gatehouse.project import Project, load_project
from test_usage import call, write

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
    assert [(use.app, use.pinned, use.latest, use.calls) for use in broken["orders.v1"].callers] == [
        ("analytics", True, 2, 1)]
    assert broken["orders.v1"].would_break == ["analytics"]
    assert "status" in await _columns(project, "orders")  # the plan changed nothing

    def gatehouse(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gatehouse", "--project", str(shop.root), *args],
                              capture_output=True, text=True, timeout=180)

    refused = gatehouse("migrate", "apply")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "BREAKS orders.v1" in refused.stdout and "would break: analytics" in refused.stdout
    assert "analytics pinned to v2 · last call " in refused.stdout
    assert "status" in await _columns(project, "orders")
    planned = gatehouse("migrate", "plan")
    assert planned.returncode == 1 and "BREAKS customer_summary.v1" in planned.stdout
    forced = gatehouse("migrate", "apply", "--force")
    # contracts that would no longer compile cannot be forced through: the API would lose those versions
    assert forced.returncode == 1 and "not even --force ships that" in forced.stderr
    assert "customer_summary.v1, orders.v1 would no longer compile" in forced.stderr
    assert "applied V003" not in forced.stdout and "status" in await _columns(project, "orders")
    assert read_lock(shop.root) is not None


async def test_a_compatible_migration_plans_clean(shop: Project) -> None:
    await prepare(shop)
    lock, _ = update_lock(shop, await project_signatures(shop), None)
    write_lock(shop.root, lock)
    (shop.root / "migrations" / "V003__add_sku.sql").write_text("ALTER TABLE products ADD COLUMN sku text;")
    (plan,) = await operations.plan_all(load_project(shop.root))
    assert plan.pending == ["V003 add sku"] and plan.impacts == [] and plan.failure is None


# --- who would notice: apps pinned to a version apart from apps that moved on; --force in both spellings ----

TOML = """
[project]
name = "pinned"
default_version = 2

[databases.main]

[apps.legacy]
version = 1
grants = [{ contract = "things", actions = ["read"] }]

[apps.mobile]
grants = [{ contract = "things", actions = ["read"] }]
"""
THINGS = {"migrations": {"V001__things.sql": "CREATE TABLE things (id serial PRIMARY KEY, val integer, label text);"},
          "contracts": {"things.v1.sql": "SELECT id, val FROM things", "things.v2.sql": "SELECT id, label FROM things"}}
VAL_AS_TEXT = "ALTER TABLE things ALTER COLUMN val TYPE text;"  # JSON numbers become strings: breaks things.v1


def _released(make_project: ProjectFactory) -> Project:
    project = make_project(toml=TOML, **THINGS)
    run_sync(prepare(project))
    lock, report = update_lock(project, run_sync(project_signatures(project)), None)
    assert report.ok
    write_lock(project.root, lock)
    return project


def _cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    monkeypatch.delenv("GATEHOUSE_PROJECT", raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(cli.app, list(args))


def test_plan_names_the_pinned_apps_apart_from_those_that_moved_on(make_project: ProjectFactory, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    project = _released(make_project)
    day = timedelta(days=1)
    run_sync(write(project, [call("legacy", 1, day, n=i) for i in range(90)] + [
        call("mobile", 1, 3 * day), call("mobile", 2, day),  # moved on to v2
        call("fresh", 2, day),  # never used v1
        call("gone", 1, 40 * day),  # pinned, but not in the last 30 days
    ], tmp_path / "spool.jsonl"))
    (project.root / "migrations" / "V002__val_as_text.sql").write_text(VAL_AS_TEXT)

    (plan,) = run_sync(operations.plan_all(load_project(project.root)))
    (impact,) = plan.impacts
    assert impact.label == "things.v1" and impact.breaking and impact.api_versions == (1,)
    assert [(u.app, u.pinned, u.latest, u.calls) for u in impact.callers] == [("legacy", True, 1, 90),
                                                                               ("mobile", False, 2, 1)]
    assert impact.would_break == ["legacy"]
    gatehouse = _cli(monkeypatch)
    planned = gatehouse("--project", str(project.root), "migrate", "plan")
    assert planned.exit_code == 1, planned.output
    lines = planned.stdout.splitlines()
    start = lines.index("  BREAKS things.v1 (served in v1)")
    assert lines[start + 2:] == [
        "    would break: legacy",
        "    pinned to it:",
        f"      {describe(impact.callers[0])}",
        "    called it in the last 30 days, since moved on:",
        f"      {describe(impact.callers[1])}",
    ]
    assert describe(impact.callers[0]).startswith("legacy pinned to v1 · last call ")
    assert describe(impact.callers[0]).endswith(" · 90 calls/day")  # 90 calls since its first, a day ago

    run_sync(write(project, [call("legacy", 2, timedelta(minutes=5))], tmp_path / "spool.jsonl"))  # legacy moves
    replanned = gatehouse("--project", str(project.root), "migrate", "plan")
    lines = replanned.stdout.splitlines()
    assert lines[lines.index("  BREAKS things.v1 (served in v1)") + 2:] == [
        "    called it in the last 30 days, since moved on:",
        f"      {describe(impact.callers[0]).replace('pinned to v1 · last call', 'moved to v2 · last call to v1')}",
        f"      {describe(impact.callers[1])}",
        "    no app is pinned to it: each app that called it lately has moved on",
    ]


async def _applied(project: Project) -> list[int]:
    async with operations.owner_connection(project) as conn:
        rows = await conn.fetch("SELECT version FROM gatehouse.migrations WHERE success ORDER BY id")
    return [r["version"] for r in rows]


def test_force_works_in_both_spellings_and_the_refusal_names_a_command_that_works(
        make_project: ProjectFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    project = _released(make_project)
    root = project.root
    gatehouse = _cli(monkeypatch)
    (root / "migrations" / "V002__val_as_text.sql").write_text(VAL_AS_TEXT)

    elsewhere = gatehouse("--project", str(root), "migrate")  # run from another folder: the advice says where
    assert elsewhere.exit_code == 1 and "BREAKS things.v1" in elsewhere.stdout
    assert f"or run `gatehouse migrate --force` in {root.resolve()}" in elsewhere.stderr
    monkeypatch.chdir(root)  # from the project folder, as the advice says
    refused = gatehouse("migrate", "apply")
    assert refused.exit_code == 1 and refused.stderr.rstrip().endswith("or run `gatehouse migrate apply --force`")
    wrong = gatehouse("migrate", "--force", "plan")
    assert wrong.exit_code == 1 and "--force is for applying migrations" in wrong.stderr
    assert run_sync(_applied(project)) == [1]

    forced = gatehouse("migrate", "apply", "--force")
    assert forced.exit_code == 0 and "applied V002 val as text" in forced.stdout, forced.output
    # things.v1 now differs from contracts.lock, so every later migration is refused unless forced too
    (root / "migrations" / "V003__add_note.sql").write_text("ALTER TABLE things ADD COLUMN note text;")
    assert gatehouse("migrate").exit_code == 1
    forced = gatehouse("migrate", "--force")
    assert forced.exit_code == 0 and "applied V003 add note" in forced.stdout, forced.output
    (root / "migrations" / "V004__add_size.sql").write_text("ALTER TABLE things ADD COLUMN size integer;")
    forced = gatehouse("migrate", "--force", "apply")
    assert forced.exit_code == 0 and "applied V004 add size" in forced.stdout, forced.output
    assert run_sync(_applied(project)) == [1, 2, 3, 4]
