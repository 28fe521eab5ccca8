"""``gatehouse pooler``: the databases a transaction pooler (PgBouncer) needs in front of this project."""

from __future__ import annotations

import typer

from gatehouse.cli.common import fail, out, project_here
from gatehouse.errors import GatehouseError

PGBOUNCER_SETTINGS = """\
[pgbouncer]
pool_mode = transaction
; the authenticator logs in to PgBouncer with its password from auth_file (or auth_query), e.g.
;   auth_file = /etc/pgbouncer/userlist.txt   holding   "{authenticator}" "<its password or SCRAM secret>"
; PgBouncer 1.21+: max_prepared_statements = 200 lets gatehouse prepare each statement once
;   (then set pooler_prepared_statements = true in gatehouse.toml)"""


def pooler() -> None:
    """Print PgBouncer's [databases] section for every database with a pooler_url: one pooler database per
    app, which sets the app's role (a transaction pooler cannot take it as a login parameter) and bounds
    its connections to the app's quota.pool_size across every instance. Run again after adding an app or
    changing a quota."""
    from gatehouse.db.pooler import pgbouncer_databases

    project = project_here()
    try:
        lines = pgbouncer_databases(project)
    except GatehouseError as exc:
        raise fail(str(exc)) from None
    if not lines:
        raise fail("no database has a pooler_url",
                   hint="add pooler_url = \"postgresql://<pooler host>:6432/<database>\" under [databases.<name>] "
                        "in gatehouse.toml")
    typer.echo("[databases]")
    for line in lines:
        typer.echo(line)
    typer.echo()
    typer.echo(PGBOUNCER_SETTINGS.format(authenticator=project.authenticator_role))
    out.print(f"; gatehouse's apps connect to <pooler_url's host and port>/<database>__<app> as "
              f"{project.authenticator_role}", style="dim", highlight=False)
