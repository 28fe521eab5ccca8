"""Apps' connections through a transaction pooler (PgBouncer in ``pool_mode = transaction``).

A transaction pooler hands each transaction whichever server connection is free, so nothing set on a session
survives: PgBouncer refuses the ``role`` startup parameter that gatehouse's pools normally log in with, and
a ``SET ROLE`` sent by gatehouse would land on one server connection and be gone for the next transaction.
What does work is to let the pooler set the role when it opens a server connection: one pooler database per
(database, app), all logging in to the same server as the authenticator, each with a ``connect_query`` of
``SET ROLE <app role>`` (and the app's ``statement_timeout``). Every server connection of that pooler database
then runs as the app, whichever gatehouse instance's transaction it serves, at no cost per request.

The alternative, ``BEGIN; SET LOCAL ROLE ...; <statement>; COMMIT`` on every request, works with any pooler
but costs two more round trips per request, and asyncpg cannot nest the transactions gatehouse's writes and
``/rpc`` open inside one it did not start itself; ``bench/pooler.py`` measures both.

Because a pooler database without the ``connect_query`` would silently run as the authenticator, every
connection an app's pool opens through the pooler is checked once (``current_user``) and refused if it is
not the app's role. :func:`pgbouncer_databases` writes the ``[databases]`` section for a project.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from gatehouse.db import Connection
from gatehouse.db.targets import DatabaseTarget, pooler_database
from gatehouse.errors import PoolerMisconfigured
from gatehouse.project import App, Project
from gatehouse.secrets import resolve_secret

log = logging.getLogger(__name__)


def quoted_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def connect_query(app: App) -> str:
    """What the pooler runs on each server connection it opens for ``app``."""
    return (f"SET ROLE {quoted_identifier(app.role)}; "
            f"SET statement_timeout = {app.config.quota.statement_timeout_ms}")


async def check_role(conn: Connection, target: DatabaseTarget, app: App) -> None:
    """Refuse a pooled connection that does not run as ``app``'s role (a pooler database set up wrong)."""
    current = await conn.fetchval("SELECT current_user")
    if current == app.role:
        return
    database = pooler_database(target.name, app.name)
    message = (f"[databases.{target.name}] pooler_url: the pooler's database {database} runs as {current}, "
               f"not as app {app.name}'s role {app.role}; give it connect_query='{connect_query(app)}' "
               f"(`gatehouse pooler` prints every database the pooler needs)")
    log.error("%s", message)
    raise PoolerMisconfigured(message)


def pgbouncer_databases(project: Project) -> list[str]:
    """The lines of PgBouncer's ``[databases]`` section for every (database with a ``pooler_url``, app) pair:
    each logs in to the database's server (its ``url``) as the authenticator and sets the app's role, with the
    app's ``quota.pool_size`` as its pool: the app's server connections are then bounded across every
    gatehouse instance, not per instance. Passwords are not written: PgBouncer takes the authenticator's from
    its ``auth_file`` (or ``auth_query``)."""
    lines: list[str] = []
    databases_of_apps = project.databases_of_apps()
    for name, config in project.config.databases.items():
        if config.pooler_url is None:
            continue
        url = resolve_secret(config.url, what=f"[databases.{name}] url")
        server = urlsplit(url or "")
        host, port = server.hostname or "127.0.0.1", server.port or 5432
        dbname = server.path.lstrip("/") or name
        lines.append(f"; database {name}: the apps' pools (gatehouse's own connections go to {host}:{port})")
        for app in sorted(project.apps.values(), key=lambda a: a.name):
            if name in databases_of_apps.get(app.name, ()):
                lines.append(f"{pooler_database(name, app.name)} = host={host} port={port} dbname={dbname} "
                             f"user={project.authenticator_role} pool_size={app.config.quota.pool_size} "
                             f"connect_query='{connect_query(app)}'")
    return lines
