"""Who did what, and who uses which version: ``gatehouse audit`` and ``gatehouse versions``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from gatehouse import operations
from gatehouse.cli.common import fail, moment, out, project_here, run, run_sync


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
        raise fail("--format is table or json")
    project = project_here()
    now = datetime.now(UTC)
    since_at = run_sync(lambda: moment(since, now, back=True)) if since else None
    until_at = run_sync(lambda: moment(until, now, back=False)) if until else None
    try:
        records = run(operations.audit_records(project, app=app_name, subject=user, target=contract, status=status,
                                               since=since_at, until=until_at, limit=limit))
    except ValueError as exc:
        raise fail(str(exc)) from None
    if output == "json":
        print(json.dumps(as_json(records), indent=2))
        return
    table = Table(*AUDIT_TABLE_HEADER)
    for row in as_table_rows(records):
        table.add_row(*row)
    out.print(table if records else "no audit records match")


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
        raise fail("--format is table or json")
    if since is not None and days is not None:
        raise fail("give --since or --days, not both", hint=f"--days {days} is --since {days}d")
    project = project_here()
    now = datetime.now(UTC)
    start = run_sync(lambda: moment(since, now, back=True)) if since else now - timedelta(days=days or 30)
    if start >= now:
        raise fail(f"--since {since} is in the future", hint="write a duration back (12h, 7d) or a past date")
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
    from gatehouse.cli.access import print_direct_access

    print_direct_access(project)  # BI's direct SQL roles (docs/direct-access.md): their version and use
