"""What every command shares: the consoles, the project folder, and turning known errors into one clear line."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import typer
from rich.console import Console

from gatehouse.errors import DatabaseUnavailable, GatehouseError, ProjectError
from gatehouse.event_loop import run_in_loop
from gatehouse.project import Project, load_project

T = TypeVar("T")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class State:
    project_path: Path = Path(".")
    """The project folder, from ``--project`` (or ``GATEHOUSE_PROJECT``)."""


def project_here() -> Project:
    return run_sync(lambda: load_project(State.project_path))


def fail(message: str, *, hint: str | None = None) -> typer.Exit:
    """Print one error (and what to do) on stderr; the caller raises the returned exit."""
    err.print("[bold red]error:[/] ", end="", highlight=False, markup=True)
    err.print(message + (f"\n  hint: {hint}" if hint else ""), highlight=False, markup=False)
    return typer.Exit(1)


def run_sync(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except GatehouseError as exc:
        raise fail(str(exc)) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine; known errors become a clear message and exit code 1."""
    try:
        return run_in_loop(coro)
    except (ProjectError, DatabaseUnavailable) as exc:
        raise fail(str(exc)) from None
    except asyncpg.PostgresError as exc:
        raise fail(f"the database refused: {exc}") from None
    except (ConnectionError, TimeoutError, asyncpg.InterfaceError) as exc:  # a failed login is a DatabaseUnavailable
        raise fail(f"the connection to the database broke: {str(exc) or type(exc).__name__}",
                    hint="check that the server is still running, then run the command again") from None
    except OSError as exc:
        raise fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")) from None



def moment(text: str, now: datetime, *, back: bool) -> datetime:
    """A time from the command line: a duration back from now (``90m``, ``12h``, ``7d``, ``2w``; when ``back``)
    or a date or moment (``2026-11-01``, ``2026-11-01T12:00``; UTC unless it says)."""
    match = re.fullmatch(r"(\d{1,5})([mhdw])", text.strip())
    if match and back:
        minutes = {"m": 1, "h": 60, "d": 1440, "w": 10080}[match[2]] * int(match[1])
        return now - timedelta(minutes=minutes)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ProjectError(f"cannot read the time {text!r}", hint="write 2026-11-01, 2026-11-01T12:00 or 12h") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
