"""``gatehouse access``: direct SQL access for BI tools (create, list, revoke); the work is in
:mod:`gatehouse.db.direct_access` (and its ``_plan`` and ``_report`` modules)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from gatehouse.cli.common import fail, out, project_here, run
from gatehouse.db import direct_access, direct_access_plan, direct_access_report
from gatehouse.project import Project

access_app = typer.Typer(
    help="Direct SQL access for BI tools that must speak SQL: a LOGIN role per app that reads the app's views "
         "of its API version (never a table, never a write), with the app's connection limit and statement "
         "timeout. See docs/direct-access.md.",
    no_args_is_help=True,
)


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else "-"


def _table(*columns: str, title: str | None = None) -> Table:
    """Names are long (gh_<project>_sql_<app>): fold them rather than cut them in a narrow terminal."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


@access_app.command("create")
def access_create(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The application whose views the role reads.")],
    database: Annotated[str | None, typer.Option(
        help="Only this database (default: every database the app reads from; one role each).")] = None,
    replica: Annotated[str | None, typer.Option(
        help="Point the connection string at this replica (r1, r2...: [databases.<db>] replicas, in order).")] = None,
    primary: Annotated[bool, typer.Option(
        "--primary", help="Point it at the primary even when the app reads from replicas.")] = False,
    rotate: Annotated[bool, typer.Option(
        "--rotate", help="The app already has direct access: give it a new password (the old one stops working).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the connection string(s).")] = False,
) -> None:
    """Create a LOGIN role for APP and print its connection string once (the password is not kept anywhere).

    The role reads exactly the views APP may read in its API version (search_path is set to it), with APP's
    pool_size as CONNECTION LIMIT and its statement_timeout; transactions are read-only by default. Refused
    when APP's grants have row filters (a SQL login would read every row)."""
    if replica is not None and primary:
        raise fail("give --replica or --primary, not both")
    project = project_here()
    made = run(direct_access.create_access(project, app_name, database=database, replica=replica,
                                           primary=primary, rotate=rotate))
    for access in made:
        if quiet:
            print(access.url)
            continue
        plan = access.plan
        out.print(f"direct SQL access for [bold]{plan.app}[/] on database [bold]{plan.database}[/] "
                  f"(API v{plan.api_version}, {'new password' if rotate else 'new role'} {plan.role}):")
        out.print(f"  reads           {', '.join(f'{plan.schema}.{v}' for v in plan.views)}", highlight=False)
        out.print(f"  limits          {plan.connection_limit} connection(s), statement_timeout "
                  f"{plan.statement_timeout_ms} ms, idle in transaction "
                  f"{direct_access_plan.IDLE_IN_TRANSACTION_MS // 1000} s, read-only", highlight=False)
        out.print(f"  connects to     {access.server}", highlight=False)
        print(access.url)
        for note in access.notes:
            out.print(f"  [yellow]note:[/] {note}", highlight=False)
    if not quiet:
        out.print("[dim]Store it now: the password cannot be shown again (the database keeps only a SCRAM hash).[/]")


def _rows(roles: list[direct_access_report.AccessRole]) -> list[dict[str, Any]]:
    return [{"app": r.app, "database": r.database, "role": r.role,
             "created": r.created.isoformat(timespec="seconds") if r.created else None,
             "connection_limit": r.connection_limit, "connections": r.connections,
             "last_activity": r.last_activity.isoformat(timespec="seconds") if r.last_activity else None,
             "statement_timeout_ms": r.statement_timeout_ms, "search_path": r.search_path,
             "statements": r.statements, "unreachable_replicas": list(r.unreachable)} for r in roles]


@access_app.command("list")
def access_list(
    app_name: Annotated[str | None, typer.Argument(metavar="[APP]", help="Only this application's roles.")] = None,
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """List direct-access roles: app, database, created, connection limit, connections now, last activity.

    Last activity is that of a session open now: PostgreSQL (before 17) keeps no history of logins."""
    if output not in ("table", "json"):
        raise fail("--format is table or json")
    project = project_here()
    roles = run(direct_access_report.list_access(project, app_name))
    if output == "json":
        print(json.dumps(_rows(roles), indent=2))
        return
    table = _table("app", "database", "role", "created", "connection limit", "connections now", "last activity")
    for role in roles:
        now = f"{role.connections}" + (f" ({', '.join(role.unreachable)} not answering)" if role.unreachable else "")
        table.add_row(role.app, role.database, role.role, _when(role.created), str(role.connection_limit), now,
                      _when(role.last_activity))
    out.print(table if roles else "no direct SQL access (create one with `gatehouse access create APP`)")


@access_app.command("revoke")
def access_revoke(
    app_name: Annotated[str, typer.Argument(metavar="APP", help="The application (also one removed from "
                                                                "gatehouse.toml).")],
    database: Annotated[str | None, typer.Option(help="Only this database's role.")] = None,
) -> None:
    """End the app's direct SQL sessions and drop its role(s): no new login from the moment this runs."""
    project = project_here()
    revoked = run(direct_access.revoke_access(project, app_name, database=database))
    if not revoked:
        raise fail(f"{app_name!r} has no direct SQL access to revoke", hint="see `gatehouse access list`")
    for role, notes in revoked:
        out.print(f"revoked direct SQL access of {app_name}: ended its sessions and dropped role {role}",
                  highlight=False)
        for note in notes:
            out.print(f"  [yellow]note:[/] {note}", highlight=False)


def print_direct_access(project: Project) -> None:
    """``gatehouse versions``' short section: each access role, its API version and its use (nothing when there
    is no access role)."""
    roles = run(direct_access_report.list_access(project))
    if not roles:
        return
    table = _table("app", "database", "role", "search path", "connections now", "last activity", "statements",
                   title="direct SQL access")
    for role in roles:
        table.add_row(role.app, role.database, role.role, role.search_path or "-", str(role.connections),
                      _when(role.last_activity),
                      "-" if role.statements is None else f"{role.statements:,}")
    out.print(table)
