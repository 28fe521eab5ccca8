"""``gatehouse mirrors``: local read copies of other services' contracts (``[mirrors.<name>]``, docs/mirrors.md).

``status`` shows each mirror's rows, last event, lag and snapshot; ``sync`` brings them up to date once (``serve``
keeps them up to date by itself).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gatehouse.cli.common import fail, out, project_here, run
from gatehouse.events.mirror_status import MirrorStatus

mirrors_app = typer.Typer(help="Local read copies of evented contracts: status, sync.", no_args_is_help=True)


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 60:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min" if value < 3600 else f"{value / 3600:.1f} h"


def _lines(status: MirrorStatus) -> list[str]:
    """One mirror as a few labelled lines (a table of nine columns does not fit a terminal)."""
    lines = [f"[bold]{status.mirror}[/]: {status.source} ({status.source_database}) -> {status.table} "
             f"({status.database})"]
    if status.rows is not None:
        deleted = f" (+{status.tombstones:,} deleted, kept as tombstones)" if status.tombstones else ""
        lines.append(f"  rows        {status.rows:,}{deleted}")
    snapshot = status.snapshot + (f" at {status.snapshot_at:%Y-%m-%d %H:%M:%S %Z}" if status.snapshot_at else "")
    lines.append(f"  snapshot    {snapshot}")
    if status.last_event_id and status.last_event_at:
        lines.append(f"  last event  {status.last_event_id} of {status.last_event_at:%Y-%m-%d %H:%M:%S %Z} "
                     f"(lag {_seconds(status.lag_s)}), {status.applied:,} applied since the snapshot")
    elif status.snapshot == "done":
        lines.append("  last event  none since the snapshot")
    if status.waiting is not None:
        oldest = f" (the oldest {_seconds(status.behind_s)} old)" if status.waiting and status.behind_s is not None \
            else ""
        lines.append(f"  waiting     {status.waiting:,} event(s){oldest}")
    if status.problem:
        lines.append(f"  [red]problem[/]     {status.problem}")
    return lines


@mirrors_app.command("status")
def mirrors_status(
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Per mirror: rows, last event applied, lag (now - that event's time) and events waiting, snapshot."""
    from gatehouse.events.mirror_status import mirror_status

    if output not in ("table", "json"):
        raise fail("--format is table or json")
    project = project_here()
    found = run(mirror_status(project))
    if output == "json":
        print(json.dumps([s.as_json() for s in found], indent=2))
        return
    if not found:
        out.print("no mirrors: add [mirrors.<name>] to gatehouse.toml (docs/mirrors.md)")
        return
    for status in found:
        for line in _lines(status):
            out.print(line, highlight=False)


@mirrors_app.command("sync")
def mirrors_sync(
    name: Annotated[str | None, typer.Argument(metavar="[MIRROR]", help="Only this mirror.")] = None,
) -> None:
    """Bring the mirrors up to date once: the snapshot when one is due, then every event waiting."""
    from gatehouse.events.mirror_runner import sync_mirrors_once

    project = project_here()
    if name is not None and name not in project.config.mirrors:
        raise fail(f"no mirror named {name!r}", hint=f"mirrors in gatehouse.toml: "
                                                     f"{', '.join(project.config.mirrors) or 'none'}")
    reports = run(sync_mirrors_once(project, name))
    if not reports:
        out.print("no mirrors: add [mirrors.<name>] to gatehouse.toml (docs/mirrors.md)")
    for report in reports:
        if report.busy:
            out.print(f"{report.mirror}: another process is moving it (a running server): nothing done")
            continue
        parts = [f"snapshot of {report.snapshot_rows:,} rows"] if report.snapshot_rows is not None else []
        parts.append(f"{report.events:,} event(s) applied")
        if report.held_back:
            out.print(f"{report.mirror}: {', '.join(parts)}; {report.held_back:,} more committed event(s) wait for "
                      f"an older transaction still running at the source (position {report.position.text()})")
            continue
        out.print(f"{report.mirror}: {', '.join(parts)}; up to date at position {report.position.text()}")
