"""The ``gatehouse`` command: one small function per command; the work is in :mod:`gatehouse.operations`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from gatehouse import __version__, operations
from gatehouse.db.targets import check_logins
from gatehouse.errors import DatabaseUnavailable, GatehouseError, ProjectError
from gatehouse.migrate.batch import BatchProgress
from gatehouse.migrate.plan import RECENT_DAYS, Impact, Plan
from gatehouse.project import Project, load_project
from gatehouse.server import run_in_loop

T = TypeVar("T")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    help="gatehouse: the API layer in front of your database. Versioned contracts, one identity and one "
         "database role per application, a PostgREST-compatible REST API.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
keys_app = typer.Typer(help="Create, list and revoke applications' API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


class State:
    project_path: Path = Path(".")


def _version(value: bool) -> None:
    if value:
        out.print(f"gatehouse {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    project: Annotated[Path, typer.Option("--project", "-p", envvar="GATEHOUSE_PROJECT",
                                          help="The project folder (holds gatehouse.toml).")] = Path("."),
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    State.project_path = project


def _project() -> Project:
    return _run_sync(lambda: load_project(State.project_path))


def _fail(message: str, *, hint: str | None = None) -> typer.Exit:
    """Print one error (and what to do) on stderr; the caller raises the returned exit."""
    err.print("[bold red]error:[/] ", end="", highlight=False, markup=True)
    err.print(message + (f"\n  hint: {hint}" if hint else ""), highlight=False, markup=False)
    return typer.Exit(1)


def _run_sync(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except GatehouseError as exc:
        raise _fail(str(exc)) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine; known errors become a clear message and exit code 1."""
    try:
        return run_in_loop(coro)
    except (ProjectError, DatabaseUnavailable) as exc:
        raise _fail(str(exc)) from None
    except asyncpg.PostgresError as exc:
        raise _fail(f"the database refused: {exc}") from None
    except (ConnectionError, TimeoutError, asyncpg.InterfaceError) as exc:  # a failed login is a DatabaseUnavailable
        raise _fail(f"the connection to the database broke: {str(exc) or type(exc).__name__}",
                    hint="check that the server is still running, then run the command again") from None
    except OSError as exc:
        raise _fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")) from None


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="Where to create the project.")] = Path("."),
) -> None:
    """Create a new project: gatehouse.toml, a migration, a contract and an app to start from."""
    from gatehouse.scaffold import init_project

    for path in _run_sync(lambda: init_project(folder)):
        out.print(f"created {path}")
    out.print(f"next: cd {folder} && gatehouse migrate && gatehouse apply && "
              "gatehouse keys create example && gatehouse serve")


migrate_app = typer.Typer(help="Versioned SQL migrations: migrations/V<NNN>__<desc>.sql and R__<desc>.sql.")
app.add_typer(migrate_app, name="migrate")


FORCE_HELP = "Apply even if released contract versions would break."


@migrate_app.callback(invoke_without_command=True)
def migrate(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option("--force", help=FORCE_HELP)] = False,
) -> None:
    """Apply pending migrations (the default: `migrate` is `migrate apply`), or: status, plan, repair."""
    if ctx.invoked_subcommand is None:
        _migrate(force=force, command="migrate")
    elif force and ctx.invoked_subcommand != "apply":
        raise _fail(f"--force is for applying migrations (`gatehouse migrate --force`), not for "
                    f"`migrate {ctx.invoked_subcommand}`")


def _print_plans(plans: list[Plan]) -> None:
    for plan in plans:
        if not plan.pending:
            out.print(f"[green]{plan.database}[/]: no pending migrations")
            continue
        out.print(f"[bold]{plan.database}[/]: pending {', '.join(plan.pending)}")
        if plan.skipped:
            out.print(f"  [yellow]not run in the plan (no-transaction, or a batched backfill checked on 0 rows):[/] "
                      f"{', '.join(plan.skipped)}")
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
    back, and say which contract versions would break and which apps called them recently. Exits 1 if any would."""
    project = _project()
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
    """Plan, lint with squawk, apply the pending migrations (each once, in order, under a lock), then re-sync the
    contract views. A migration that would break a released contract version is refused unless --force."""
    _migrate(force=force or bool(ctx.parent and ctx.parent.params.get("force")), command="migrate apply")


def _migrate(*, force: bool, command: str) -> None:
    project = _project()
    with out.status("planning..."):
        plans = run(operations.plan_all(project))
    if any(p.breaking for p in plans):
        _print_plans(plans)
        if not force:  # the advice names the command as typed, and where it works when that is not here
            here = State.project_path.resolve() == Path.cwd().resolve() or "GATEHOUSE_PROJECT" in os.environ
            raise _fail("these migrations would break released contract versions; follow expand → migrate → "
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

        results = run(operations.migrate_all(project, force=force, progress=progress, on_restored=restored))
    for database, done in results.items():
        if not done:
            out.print(f"[green]{database}[/]: up to date")
        for migration, seconds in done:
            out.print(f"[green]{database}[/]: applied {migration.label} ({seconds * 1000:.0f} ms)")
    if any(results.values()):  # the schema moved: make the contract views, roles and grants match again
        try:
            synced_reports = run_in_loop(operations.apply_all(project))
        except asyncpg.PostgresError as exc:
            raise _fail(f"the migrations were applied, but the contract views cannot be re-created: {exc}. "
                        "Update the contracts, then run `gatehouse apply`.") from None
        for synced in synced_reports:
            for change in synced.changes:
                out.print(f"[green]{synced.database}[/]: {change}")


@app.command()
def lock(force: Annotated[bool, typer.Option("--force", help="Re-lock released versions that changed.")] = False,
         ) -> None:
    """Write contracts.lock: the signature (columns, types, nullability, relations) and file checksum of every
    contract version, as compiled by the database. Released versions are never rewritten without --force."""
    from gatehouse.contracts.lockfile import read_lock, update_lock, write_lock
    from gatehouse.contracts.signature import project_signatures

    project = _project()
    existing = _run_sync(lambda: read_lock(project.root))
    new, report = update_lock(project, run(project_signatures(project)), existing, force=force)
    if report.ok:
        write_lock(project.root, new)
    for line in report.lines():
        out.print(line)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def check(output: Annotated[str, typer.Option("--format", help="table or json.")] = "table") -> None:
    """The CI gate: contracts.lock vs the contract files vs the migrated database. Exits 1 on any error finding."""
    from gatehouse.check import exit_code, render_findings, run_check

    findings = run(run_check(State.project_path))
    print(render_findings(findings, "json" if output == "json" else "table", color=out.is_terminal), end="")
    raise typer.Exit(exit_code(findings))


@migrate_app.command("status")
def migrate_status() -> None:
    """Every migration and its state: applied, pending, changed, failed or missing. Exits 1 on a problem."""
    project = _project()
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
    project = _project()
    for database, lines in run(operations.repair_all(project)).items():
        for line in lines or ["nothing to repair"]:
            out.print(f"[green]{database}[/]: {line}")


@app.command()
def apply() -> None:
    """Make the database match the project: api_vN views, app roles, grants. Safe to run again."""
    project = _project()
    with out.status("applying project..."):
        reports = run(operations.apply_all(project))
    for report in reports:
        if not report.changes:
            out.print(f"[green]{report.database}[/]: nothing to change")
        for change in report.changes:
            out.print(f"[green]{report.database}[/]: {change}")


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    match = re.fullmatch(r"(\d{1,5})([mhdw])", text.strip())
    if match:
        amount, unit = int(match[1]), match[2]
        minutes = {"m": 1, "h": 60, "d": 1440, "w": 10080}[unit] * amount
        return now + timedelta(minutes=minutes)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ProjectError(f"cannot read --expires {text!r}",
                           hint="write a duration (90m, 12h, 30d, 2w) or a date (2027-01-31)") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if moment <= now:
        raise ProjectError(f"--expires {text!r} is in the past")
    return moment


@keys_app.command("create")
def keys_create(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The application the key identifies.")],
    expires: Annotated[str | None, typer.Option(help="Expiry: a duration (30d, 12h) or a date.")] = None,
    description: Annotated[str, typer.Option(help="A note shown in `keys list`.")] = "",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the key.")] = False,
) -> None:
    """Create an API key. It is shown once: only its hash is stored."""
    project = _project()
    expires_at = _run_sync(lambda: parse_expiry(expires)) if expires else None
    key = run(operations.create_key(project, app_name, expires_at=expires_at, description=description))
    if quiet:
        print(key.secret_key)
        return
    out.print(f"API key for [bold]{app_name}[/] (id {key.id}"
              f"{', expires ' + key.expires_at.isoformat(timespec='minutes') if key.expires_at else ''}):")
    print(key.secret_key)
    out.print("[dim]Store it now: it cannot be shown again. Send it as the 'apikey' header.[/]")


@keys_app.command("rotate")
def keys_rotate(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    overlap: Annotated[str, typer.Option(help="How long the old keys keep working: 90m, 24h, 7d.")] = "24h",
    expires: Annotated[str | None, typer.Option(help="Expiry of the new key: a duration or a date.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the new key.")] = False,
) -> None:
    """Make a new key and let the app's other keys expire after an overlap, so callers switch without an outage."""
    project = _project()
    now = datetime.now(UTC)
    window = _run_sync(lambda: parse_expiry(overlap, now)) - now
    expires_at = _run_sync(lambda: parse_expiry(expires)) if expires else None
    key, ending = run(operations.rotate_keys(project, app_name, overlap=window, expires_at=expires_at))
    if quiet:
        print(key.secret_key)
        return
    out.print(f"new API key for [bold]{app_name}[/] (id {key.id}):")
    print(key.secret_key)
    until = (now + window).isoformat(timespec="minutes")
    out.print(f"{len(ending)} older key(s) keep working until {until}: {', '.join(ending) or 'none'}")


@keys_app.command("list")
def keys_list(
    app_name: Annotated[str | None, typer.Argument(metavar="[APP]", help="Only this application's keys.")] = None,
) -> None:
    """List keys (ids and status, never the keys themselves)."""
    project = _project()
    keys = run(operations.list_keys(project, app_name))
    now = datetime.now(UTC)
    table = Table("app", "key id", "status", "created", "expires", "description")
    for key in keys:
        table.add_row(key.app, key.id, key.status(now), key.created_at.isoformat(timespec="minutes"),
                      key.expires_at.isoformat(timespec="minutes") if key.expires_at else "never",
                      key.description)
    out.print(table if keys else "no keys")


@keys_app.command("revoke")
def keys_revoke(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    key_id: Annotated[str | None, typer.Argument(metavar="[KEY_ID]", help="The key's id (see keys list).")] = None,
    all_keys: Annotated[bool, typer.Option("--all", help="Revoke every key of the application.")] = False,
) -> None:
    """Revoke a key (or all keys of an app). Running servers refuse it at once."""
    if key_id is None and not all_keys:
        raise _fail("name the key to revoke (see `gatehouse keys list`), or pass --all")
    project = _project()
    revoked = run(operations.revoke_keys(project, app_name, key_id))
    if not revoked:
        which = f"no active key {key_id} of {app_name}" if key_id else f"no active key of {app_name}"
        raise _fail(f"{which} to revoke", hint="see `gatehouse keys list`")
    out.print(f"revoked {len(revoked)} key(s) of {app_name}: {', '.join(revoked)}")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Data port address (default from gatehouse.toml).")] = None,
    port: Annotated[int | None, typer.Option(help="Data port (default 3000).")] = None,
    admin_port: Annotated[int | None, typer.Option(help="Admin port: /live /ready /metrics (default 3001).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the contracts over HTTP (data port) and health and metrics (admin port)."""
    from gatehouse.observe.logs import configure_logging
    from gatehouse.runtime import Runtime
    from gatehouse.server import serve as serve_forever

    project = _project()
    server = project.config.server
    run(check_logins(project))  # a wrong URL or password is said once, plainly, before anything listens
    configure_logging(log_level)
    run(serve_forever(Runtime(project), host=host or server.host, port=server.port if port is None else port,
                      admin_host=server.admin_host,
                      admin_port=server.admin_port if admin_port is None else admin_port))


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where to put the demo project.")] = Path("gatehouse-demo"),
    port: Annotated[int, typer.Option(help="Data port; a free one is picked if it is taken.")] = 3000,
    admin_port: Annotated[int, typer.Option(help="Admin port; a free one is picked if it is taken.")] = 3001,
    serve_: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve after set-up.")] = True,
) -> None:
    """Run the bundled shop example: embedded PostgreSQL, migrations, contracts, three apps, keys, serve."""
    from gatehouse.demo import run_demo

    _run_sync(lambda: run_demo(directory, port=port, admin_port=admin_port, serve=serve_, console=out))


@app.command()
def audit(
    app_name: Annotated[str | None, typer.Option("--app", help="Only this application.")] = None,
    user: Annotated[str | None, typer.Option(help="Only this user (the token's subject).")] = None,
    contract: Annotated[str | None, typer.Option(help="Only this contract (or rpc:<name>).")] = None,
    status: Annotated[str | None, typer.Option(help="A status (404) or a class (4xx).")] = None,
    since: Annotated[str | None, typer.Option(help="From: a duration back (90m, 12h, 7d) or a date.")] = None,
    until: Annotated[str | None, typer.Option(help="Up to: a date.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many records.")] = 100,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Who did what: the audit records of every request, newest first."""
    import json

    from gatehouse.observe.audit_query import AUDIT_TABLE_HEADER, as_json, as_table_rows

    if output not in ("table", "json"):
        raise _fail("--format is table or json")
    project = _project()
    now = datetime.now(UTC)
    since_at = _run_sync(lambda: _moment(since, now, back=True)) if since else None
    until_at = _run_sync(lambda: _moment(until, now, back=False)) if until else None
    try:
        records = run(operations.audit_records(project, app=app_name, subject=user, target=contract, status=status,
                                               since=since_at, until=until_at, limit=limit))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if output == "json":
        print(json.dumps(as_json(records), indent=2))
        return
    table = Table(*AUDIT_TABLE_HEADER)
    for row in as_table_rows(records):
        table.add_row(*row)
    out.print(table if records else "no audit records match")


def _moment(text: str, now: datetime, *, back: bool) -> datetime:
    match = re.fullmatch(r"(\d{1,5})([mhdw])", text.strip())
    if match and back:
        minutes = {"m": 1, "h": 60, "d": 1440, "w": 10080}[match[2]] * int(match[1])
        return now - timedelta(minutes=minutes)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ProjectError(f"cannot read the time {text!r}", hint="write 2026-11-01, 2026-11-01T12:00 or 12h") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@app.command()
def versions(
    since: Annotated[str | None, typer.Option(
        help="The window: a duration back (12h, 7d) or a date (2026-11-01). Default: the last 30 days.")] = None,
    days: Annotated[int | None, typer.Option(min=1, max=3650, help="Same as --since <DAYS>d.")] = None,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Each API version and its status, and per app that called it in the window: pinned to it (its latest call
    to a contract used it) or moved to another version, its last call, its calls in the window and per day."""
    import json

    from gatehouse.observe.audit_query import VERSIONS_TABLE_HEADER, as_json, version_table_rows
    from gatehouse.observe.usage import when_text

    if output not in ("table", "json"):
        raise _fail("--format is table or json")
    if since is not None and days is not None:
        raise _fail("give --since or --days, not both", hint=f"--days {days} is --since {days}d")
    project = _project()
    now = datetime.now(UTC)
    start = _run_sync(lambda: _moment(since, now, back=True)) if since else now - timedelta(days=days or 30)
    if start >= now:
        raise _fail(f"--since {since} is in the future", hint="write a duration back (12h, 7d) or a past date")
    usage = run(operations.version_usage(project, since=start))

    def status(number: int) -> str:
        settings = project.config.version_settings(number)
        return settings.status + (f" (sunset {settings.sunset})" if settings.sunset else "")

    if output == "json":
        print(json.dumps([{**u, "status": status(u["api_version"])} for u in as_json(usage)], indent=2))
        return
    span = f"{(now - start).total_seconds() / 86_400:,.2f}".rstrip("0").rstrip(".")
    window = f"calls since {when_text(start)} ({span} days)"
    table = Table("status", *VERSIONS_TABLE_HEADER, title=window)
    served = list(project.versions.numbers) + sorted(project.versions.retired)
    for row in version_table_rows(usage, served=served):
        table.add_row(status(int(row[0][1:])), *row)
    out.print(table)
