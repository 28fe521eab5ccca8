"""The ``gatehouse`` command: one small function per command; the work is in :mod:`gatehouse.operations`.

Commands by concern: :mod:`.schema` (migrate, lock, check, apply), :mod:`.keys`, :mod:`.usage` (audit,
versions); here the app itself, ``init``, ``serve`` and ``demo``. :mod:`.common` holds what they share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gatehouse import __version__
from gatehouse.cli import access, alerts, doctor, keys, mirrors, pooler, relay, sagas, schema, usage
from gatehouse.cli.common import State, out, project_here, run, run_sync
from gatehouse.db.targets import check_logins

__all__ = ["app", "out"]

app = typer.Typer(
    help="gatehouse: the API layer in front of your database. Versioned contracts, one identity and one "
         "database role per application, a PostgREST-compatible REST API.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)


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


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="Where to create the project.")] = Path("."),
) -> None:
    """Create a new project: gatehouse.toml, a migration, a contract and an app to start from."""
    from gatehouse.scaffold import init_project

    for path in run_sync(lambda: init_project(folder)):
        out.print(f"created {path}")
    out.print(f"next: cd {folder} && gatehouse migrate && gatehouse apply && "
              "gatehouse keys create example && gatehouse serve")


def serve(
    host: Annotated[str | None, typer.Option(help="Data port address (default from gatehouse.toml).")] = None,
    port: Annotated[int | None, typer.Option(help="Data port (default 3000).")] = None,
    admin_port: Annotated[int | None, typer.Option(help="Admin port: /live /ready /metrics (default 3001).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the contracts over HTTP (data port) and health and metrics (admin port)."""
    from gatehouse.server.listen import check_ports

    project = project_here()
    server = project.config.server
    data_host, data_port = host or server.host, server.port if port is None else port
    admin = server.admin_port if admin_port is None else admin_port
    run_sync(lambda: check_ports(data_host, data_port, server.admin_host, admin))  # before any database starts

    from gatehouse.observe.logs import configure_logging  # (the server's libraries: only once the ports are free)
    from gatehouse.runtime import Runtime
    from gatehouse.server import serve as serve_forever

    run(check_logins(project))  # a wrong URL or password is said once, plainly, before anything listens
    configure_logging(log_level)
    run(serve_forever(Runtime(project), host=data_host, port=data_port, admin_host=server.admin_host,
                      admin_port=admin))


def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where to put the demo project.")] = Path("gatehouse-demo"),
    port: Annotated[int, typer.Option(help="Data port; a free one is picked if it is taken.")] = 3000,
    admin_port: Annotated[int, typer.Option(help="Admin port; a free one is picked if it is taken.")] = 3001,
    serve_: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve after set-up.")] = True,
) -> None:
    """Run the bundled shop example: embedded PostgreSQL, migrations, contracts, three apps, keys, serve."""
    from gatehouse.demo import run_demo

    run_sync(lambda: run_demo(directory, port=port, admin_port=admin_port, serve=serve_, console=out))


# The order of `gatehouse --help`: set up, change the schema, give out keys, serve, look back.
app.add_typer(schema.migrate_app, name="migrate")
app.command()(schema.lock)
app.command()(schema.check)
app.command()(schema.apply)
app.add_typer(keys.keys_app, name="keys")
app.add_typer(alerts.alerts_app, name="alerts")
app.add_typer(access.access_app, name="access")
app.add_typer(mirrors.mirrors_app, name="mirrors")
app.add_typer(sagas.sagas_app, name="sagas")
app.command()(serve)
app.command()(relay.relay)
app.command()(demo)
app.command()(usage.audit)
app.command()(usage.versions)
app.command()(doctor.doctor)
app.command()(pooler.pooler)
