"""The schema's lifecycle: ``migrate`` (plan, apply, status, repair), ``lock``, ``check`` and ``apply``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import asyncpg
import typer
from rich.table import Table

from gatehouse import operations
from gatehouse.cli.common import State, fail, out, project_here, run, run_sync
from gatehouse.event_loop import run_in_loop
from gatehouse.migrate.batch import BatchProgress
from gatehouse.migrate.files import Migration
from gatehouse.migrate.plan import RECENT_DAYS, Impact, Plan

migrate_app = typer.Typer(help="Versioned SQL migrations: migrations/V<NNN>__<desc>.sql and R__<desc>.sql (first "
                               "line `-- gatehouse: no-transaction`, or `-- gatehouse: batch 1000` for a backfill).")


FORCE_HELP = ("Apply even if released contract versions would break (a narrowing, a column that may now be null); "
              "never a change after which a served contract no longer compiles.")


@migrate_app.callback(invoke_without_command=True)
def migrate(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
) -> None:
    """Apply pending migrations (the default: `migrate` is `migrate apply`), or: status, plan, repair."""
    if ctx.invoked_subcommand is None:
        _migrate(force=force, command="migrate")
    elif force and ctx.invoked_subcommand != "apply":
        raise fail(f"--force is for applying migrations (`gatehouse migrate --force`), not for "
                    f"`migrate {ctx.invoked_subcommand}`")


def _print_plans(plans: list[Plan]) -> None:
    for plan in plans:
        if not plan.pending:
            out.print(f"[green]{plan.database}[/]: no pending migrations")
            continue
        out.print(f"[bold]{plan.database}[/]: pending {', '.join(plan.pending)}")
        if plan.skipped:
            out.print(f"  [yellow]not run in the plan:[/] {', '.join(plan.skipped)}", highlight=False)
            why = [f"{', '.join(plan.no_transaction)}: no-transaction, so not inside the plan's transaction"
                   ] if plan.no_transaction else []
            if plan.stopped_at:
                later = plan.skipped[plan.skipped.index(plan.stopped_at) + 1:]
                why.append(f"{plan.stopped_at} is a batched backfill, checked on 0 rows" + (
                    ", and what follows it may need its rows; `migrate` still refuses any migration after which "
                    "a contract view cannot be created again" if later else ""))
            out.print(f"    ({'; '.join(why)})", highlight=False)
        if plan.failure:
            out.print(f"  [red]would fail:[/] {plan.failure}")
        for impact in plan.impacts:
            versions = ", ".join(f"v{n}" for n in impact.api_versions) or "no live API version"
            kind = "[red]BREAKS[/]" if impact.breaking else "[green]compatible[/]"
            out.print(f"  {kind} {impact.label} (served in {versions})")
            if impact.error:
                out.print(f"    no longer compiles: {impact.error}")
            for change in impact.changes:
                out.print(f"    {'breaking' if change.breaking else 'compatible'}: {change.detail}")
            _print_callers(impact)
        if not plan.impacts and not plan.failure:
            out.print("  no released contract version changes")


def _print_callers(impact: Impact) -> None:
    """The apps pinned to a changed contract version apart from those that called it lately but moved on."""
    from gatehouse.observe.usage import describe

    pinned = [use for use in impact.callers if use.pinned]
    moved = [use for use in impact.callers if not use.pinned]
    if impact.would_break:
        out.print(f"    [red]would break:[/] {', '.join(impact.would_break)}", highlight=False)
    if pinned:
        out.print("    pinned to it:")
    for use in pinned:
        out.print(f"      {describe(use)}", highlight=False, markup=False)
    if moved:
        out.print(f"    called it in the last {RECENT_DAYS} days, since moved on:")
    for use in moved:
        out.print(f"      {describe(use)}", highlight=False, markup=False)
    if impact.breaking and not pinned:
        out.print("    no app is pinned to it: " + ("each app that called it lately has moved on" if moved else
                                                      f"no app called it in the last {RECENT_DAYS} days"))


@migrate_app.command("plan")
def migrate_plan() -> None:
    """Run the pending migrations in a transaction, compare every released contract with contracts.lock, roll
    back, and say which contract versions would break and which apps are pinned to them. Exits 1 if any would."""
    project = project_here()
    with out.status("planning (migrations run in a transaction that is rolled back)..."):
        plans = run(operations.plan_all(project))
    _print_plans(plans)
    if any(p.breaking or p.failure for p in plans):
        raise typer.Exit(1)


@migrate_app.command("apply")
def migrate_apply(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
) -> None:
    """Plan, lint, apply the pending migrations (each once, in order, under a lock; contract views a migration
    touches are re-created in its own transaction), then re-sync the views, roles and grants. Running servers
    reload on their own. A migration that would break a released contract version is refused unless --force."""
    _migrate(force=force or bool(ctx.parent and ctx.parent.params.get("force")), command="migrate apply")


def _migrate(*, force: bool, command: str) -> None:
    project = project_here()
    with out.status("planning..."):
        plans = run(operations.plan_all(project))
    breaking = [impact for plan in plans for impact in plan.breaking]
    if breaking:
        _print_plans(plans)
        gone = sorted({impact.label for impact in breaking if impact.error})
        if gone:  # no view could be made for them: forcing would take them off the API
            them = "them" if len(gone) > 1 else "it"
            raise fail(f"after these migrations {', '.join(gone)} would no longer compile, so the API would lose "
                       f"{them}: not even --force ships that",
                       hint="keep what they read, or first retire the API versions that serve them ([versions.vN] "
                            'status = "retired" in gatehouse.toml, then `gatehouse apply`); see '
                            "docs/safe-schema-changes.md")
        if not force:  # the advice names the command as typed, and where it works when that is not here
            here = State.project_path.resolve() == Path.cwd().resolve() or "GATEHOUSE_PROJECT" in os.environ
            raise fail("these migrations would break contract versions the API serves; follow expand → migrate → "
                       f"contract (docs/safe-schema-changes.md), or run `gatehouse {command} --force`"
                       + ("" if here else f" in {State.project_path.resolve()}"))
    with out.status("linting pending migrations..."):
        reports = run(operations.lint_pending(project))
    for database, report in reports.items():
        for finding in report.findings:
            out.print(f"[yellow]{finding.level}[/] {database}: {finding}", highlight=False)
        if report.notice:
            out.print(f"[dim]{database}: {report.notice}[/]")
    with out.status("applying migrations...") as status:
        def progress(at: BatchProgress) -> None:
            status.update(f"{at.migration.label}: {at.rows:,} rows in {at.batches} batches "
                          f"(the table had {at.table_rows:,})")

        def restored(database: str, label: str, views: list[str]) -> None:
            out.print(f"[green]{database}[/]: {label} needed {len(views)} contract view(s) dropped; created "
                      f"again in its transaction, so no app saw them missing: {', '.join(views)}")

        def applied(database: str, migration: Migration, seconds: float) -> None:  # as each commits
            out.print(f"[green]{database}[/]: applied {migration.label} ({seconds * 1000:.0f} ms)")

        results = run(operations.migrate_all(project, progress=progress, on_restored=restored, on_applied=applied))
    for database, done in results.items():
        if not done:
            out.print(f"[green]{database}[/]: up to date")
    if any(results.values()):  # the schema moved: make the contract views, roles and grants match again
        try:
            synced_reports = run_in_loop(operations.apply_all(project))
        except asyncpg.PostgresError as exc:
            raise fail(f"the migrations were applied, but the contract views cannot be re-created: {exc}. "
                        "Update the contracts, then run `gatehouse apply`.") from None
        for synced in synced_reports:
            for change in synced.changes:
                out.print(f"[green]{synced.database}[/]: {change}")


def lock(force: Annotated[bool, typer.Option("--force", help="Re-lock released versions that changed.")] = False,
         ) -> None:
    """Write contracts.lock: the signature (columns, types, nullability, relations) and file checksum of every
    contract version, as compiled by the database. Released versions are never rewritten without --force."""
    from gatehouse.contracts.lockfile import read_lock, update_lock, write_lock
    from gatehouse.contracts.signature import project_signatures

    project = project_here()
    existing = run_sync(lambda: read_lock(project.root))
    new, report = update_lock(project, run(project_signatures(project)), existing, force=force)
    if report.ok:
        write_lock(project.root, new)
    for line in report.lines():
        out.print(line)
    if not report.ok:
        raise typer.Exit(1)


def check(output: Annotated[str, typer.Option("--format", help="table or json.")] = "table") -> None:
    """The CI gate: contracts.lock vs the contract files vs the migrated database. Exits 1 on any error finding."""
    from gatehouse.check import run_check
    from gatehouse.check_findings import exit_code, render_findings

    findings = run(run_check(State.project_path))
    print(render_findings(findings, "json" if output == "json" else "table", color=out.is_terminal), end="")
    raise typer.Exit(exit_code(findings))


@migrate_app.command("status")
def migrate_status() -> None:
    """Every migration and its state: applied, pending, changed, failed or missing. Exits 1 on a problem."""
    project = project_here()
    results = run(operations.migration_status(project))
    table = Table("database", "migration", "kind", "state", "applied", "by", "ms", "note")
    troubled = False
    for database, rows in results.items():
        for row in rows:
            troubled |= row.state in ("failed", "changed", "missing")
            color = {"applied": "green", "pending": "cyan"}.get(row.state, "red")
            table.add_row(database, row.label, row.kind, f"[{color}]{row.state}[/]",
                          row.applied_at.isoformat(timespec="seconds") if row.applied_at else "",
                          row.applied_by or "", "" if row.duration_ms is None else str(row.duration_ms), row.note)
    out.print(table)
    if troubled:
        raise typer.Exit(1)


@migrate_app.command("repair")
def migrate_repair() -> None:
    """Forget failed attempts and re-record the checksums of applied files that were edited on purpose."""
    project = project_here()
    for database, lines in run(operations.repair_all(project)).items():
        for line in lines or ["nothing to repair"]:
            out.print(f"[green]{database}[/]: {line}")


def apply() -> None:
    """Make the database match the project: api_vN views, app roles, grants. Safe to run again."""
    project = project_here()
    with out.status("applying project..."):
        reports = run(operations.apply_all(project))
    for report in reports:
        if not report.changes:
            out.print(f"[green]{report.database}[/]: nothing to change")
        for change in report.changes:
            out.print(f"[green]{report.database}[/]: {change}")
