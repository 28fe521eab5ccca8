"""``gatehouse doctor``: is everything healthy? The checks are :mod:`gatehouse.observe.doctor_plan`'s."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.text import Text

from gatehouse.cli.common import State, fail, out, run
from gatehouse.config import parse_duration
from gatehouse.observe.doctor import Options, Result, Status, result_lines

STYLE: dict[Status, str] = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def _seconds(option: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise fail(f"{option}: {exc}") from None


def doctor(
    output: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    instances: Annotated[int, typer.Option(min=1, max=100_000, help="How many gatehouse instances run against "
                                                                     "these databases (for the headroom).")] = 1,
    timeout: Annotated[str, typer.Option(help="Time limit of each check: 5s, 500ms.")] = "5s",
    max_lag: Annotated[str, typer.Option(help="A replica further behind than this is a warning.")] = "10s",
    fail_lag: Annotated[str, typer.Option(help="A replica further behind than this is a failure.")] = "60s",
    long: Annotated[str, typer.Option(help="A transaction open longer than this is a warning (a lock wait "
                                           "this long, a failure).")] = "60s",
    slow: Annotated[str, typer.Option(help="A statement running longer than this is reported.")] = "1s",
    database: Annotated[list[str] | None, typer.Option("--database", "-d",
                                                       help="Only this database (may be given again).")] = None,
) -> None:
    """Is everything healthy? Reachability, TLS, logins, the project applied, connection headroom, replicas,
    disk, long transactions, lock waits, slow statements and pools, each ok / warn / fail with what to do.
    Exit code 1 when a check fails (warnings alone: 0)."""
    from gatehouse.observe.doctor_plan import diagnose_folder

    if output not in ("table", "json"):
        raise fail("--format is table or json")
    options = Options(timeout_s=_seconds("--timeout", timeout), instances=instances,
                      max_lag_s=_seconds("--max-lag", max_lag), fail_lag_s=_seconds("--fail-lag", fail_lag),
                      long_s=_seconds("--long", long), slow_s=_seconds("--slow", slow),
                      databases=tuple(database or ()))
    if options.fail_lag_s < options.max_lag_s:
        raise fail(f"--fail-lag ({fail_lag}) is shorter than --max-lag ({max_lag})",
                   hint="--max-lag warns, --fail-lag fails: give the longer time to --fail-lag")
    shown: list[Result] = []

    def show(result: Result) -> None:  # as each check ends: a hung server shows where it hangs
        for status, line in result_lines(result, previous=shown[-1] if shown else None):
            out.print(Text(line, style=STYLE[status] if line and status != "ok" else ""))
        shown.append(result)

    report = run(diagnose_folder(State.project_path, options, on_result=show if output == "table" else None))
    if output == "json":
        print(json.dumps(report.as_json(), indent=2, default=str))
    else:
        if not shown:  # the project did not load: one result, not streamed
            for result in report.results:
                show(result)
        out.print()
        out.print(Text(report.summary(), style=STYLE[report.status] if report.status != "ok" else "green"))
    raise typer.Exit(report.exit_code)
