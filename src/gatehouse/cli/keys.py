"""``gatehouse keys``: create, rotate, list and revoke applications' API keys."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from gatehouse import operations
from gatehouse.cli.common import fail, out, project_here, run, run_sync
from gatehouse.errors import ProjectError

keys_app = typer.Typer(help="Create, list and revoke applications' API keys.", no_args_is_help=True)


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
    project = project_here()
    expires_at = run_sync(lambda: parse_expiry(expires)) if expires else None
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
    project = project_here()
    now = datetime.now(UTC)
    window = run_sync(lambda: parse_expiry(overlap, now)) - now
    expires_at = run_sync(lambda: parse_expiry(expires)) if expires else None
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
    project = project_here()
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
        raise fail("name the key to revoke (see `gatehouse keys list`), or pass --all")
    project = project_here()
    revoked = run(operations.revoke_keys(project, app_name, key_id))
    if not revoked:
        which = f"no active key {key_id} of {app_name}" if key_id else f"no active key of {app_name}"
        raise fail(f"{which} to revoke", hint="see `gatehouse keys list`")
    out.print(f"revoked {len(revoked)} key(s) of {app_name}: {', '.join(revoked)}")
