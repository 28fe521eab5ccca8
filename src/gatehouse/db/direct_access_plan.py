"""Direct SQL access for BI tools, what an access role should be: its name, the views it reads, its settings,
the connection string's shape, and which access roles a database already holds.

``gatehouse access create analytics`` gives a tool that must speak SQL a door of its own, with the same
walls as the API: it reads views of the app's API version (never a table), and PostgreSQL itself enforces it.
The role itself is created, kept in step and dropped by :mod:`gatehouse.db.direct_access`; what it can reach
and how it is used is reported by :mod:`gatehouse.db.direct_access_report`.

Row filters are refused: gatehouse enforces a grant's ``filter`` in the SQL it writes, with the caller's
claims bound in; a SQL login has no claims and would read every row. Writes are never given: they go through
the API, where they are validated, audited and announced.

The role's settings (``ALTER ROLE ... SET``): ``search_path`` on its API version, ``statement_timeout`` from the
app's quota, ``idle_in_transaction_session_timeout`` (a BI session left in an open transaction would hold
locks that make the next migration, and every API request behind it, wait), and read-only transactions by
default (which also refuses temporary tables). PostgreSQL lets a session change these for itself; the
``CONNECTION LIMIT`` (the app's ``pool_size``, per server) it cannot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg

from gatehouse.access import choose_version
from gatehouse.contracts.versions import schema_name
from gatehouse.db.targets import DatabaseTarget
from gatehouse.errors import ProjectError
from gatehouse.project import App, Project
from gatehouse.secrets import resolve_secret

IDLE_IN_TRANSACTION_MS = 60_000
"""A BI session idle inside a transaction longer than this is ended by the server."""
MAX_ROLE_NAME = 63
"""PostgreSQL's identifier length (NAMEDATALEN - 1); a longer name would be cut silently."""
REPLICA_TIMEOUT_S = 3.0
"""How long a replica may take to answer when its sessions are counted or ended."""
DROPPED_URL_PARAMETERS = frozenset({"user", "password", "passfile", "sslcert", "sslkey", "sslpassword", "service",
                                    "options"})
"""Parameters of the owner's URL that are the owner's own, never handed to a BI tool (``options`` could carry
``-c statement_timeout=0`` past the role's own settings)."""
COMMENT = re.compile(r"^gatehouse direct SQL access: project (?P<project>\S+), app (?P<app>\S+), "
                     r"database (?P<database>\S+), created (?P<created>\S+)$")


def role_name(project: Project, app: str, database: str) -> str:
    """``gh_<project>_sql_<app>`` (``__<database>`` added when the project has several databases).

    Not ``gh_<project>_app_...``: ``apply`` drops roles with that prefix that are not an app's role."""
    name = f"{project.role_prefix}sql_{app}"
    return name + (f"__{database}" if len(project.config.databases) > 1 else "")


def comment_text(project: Project, app: str, database: str, created: datetime) -> str:
    return (f"gatehouse direct SQL access: project {project.name}, app {app}, database {database}, "
            f"created {created.isoformat(timespec='seconds')}")


@dataclass(frozen=True, slots=True)
class AccessPlan:
    """What one app's access role in one database should be."""

    app: str
    database: str
    role: str
    api_version: int
    views: tuple[str, ...]
    """The contracts (views of ``api_v<api_version>``) it may read, sorted."""
    connection_limit: int
    statement_timeout_ms: int

    @property
    def schema(self) -> str:
        return schema_name(self.api_version)

    def settings(self) -> dict[str, str]:
        return {"search_path": self.schema, "statement_timeout": str(self.statement_timeout_ms),
                "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS),
                "default_transaction_read_only": "on"}


def known_app(project: Project, app: str) -> App:
    if app not in project.apps:
        raise ProjectError(f"no application named {app!r}",
                           hint=f"applications in gatehouse.toml: {', '.join(project.apps) or 'none'}")
    return project.apps[app]


def plan_access(project: Project, app_name: str, database: str) -> AccessPlan:
    """The access role of ``app_name`` in ``database``; refused (ProjectError) when the app's grants there have
    row filters, or it reads nothing there."""
    app = known_app(project, app_name)
    version = choose_version(project, app, None, None)
    served = project.versions.served.get(version, {})
    views = tuple(sorted(name for name, contract in served.items()
                         if contract.database == database and "read" in app.grant_for(name)))
    filtered = [(index, grant) for index, grant in enumerate(app.config.grants)
                if grant.filter is not None and grant.contract in views]
    if filtered:
        named = "; ".join(f"apps.{app_name}.grants[{i}] on {g.contract!r} (filter = {g.filter!r})" for i, g in filtered)
        raise ProjectError(
            f"direct SQL access for {app_name!r} is refused: its grants have row filters, which gatehouse applies "
            f"in the SQL it writes for each request; a SQL login would read every row of those views: {named}",
            hint=f"give the BI tool an app of its own whose grants have no filter (e.g. [apps.{app_name}_bi] with "
                 "the contracts it may read in full), or a contract whose SQL selects only the rows it may see")
    if not views:
        raise ProjectError(f"{app_name!r} may read no contract of database {database!r} in API v{version}: "
                           "there is nothing to give direct access to",
                           hint=f"add a read grant to [apps.{app_name}] in gatehouse.toml")
    role = role_name(project, app_name, database)
    if len(role.encode()) > MAX_ROLE_NAME:
        raise ProjectError(f"the role name {role!r} is longer than PostgreSQL's {MAX_ROLE_NAME} characters",
                           hint="use a shorter project or app name")
    clash = [other for other in project.apps for db in project.config.databases
             if (other, db) != (app_name, database) and role_name(project, other, db) == role]
    if clash:
        raise ProjectError(f"the role name {role!r} would also be app {clash[0]!r}'s in another database",
                           hint="rename one of the apps or databases")
    quota = app.config.quota
    return AccessPlan(app=app_name, database=database, role=role, api_version=version, views=views,
                      connection_limit=quota.pool_size, statement_timeout_ms=quota.statement_timeout_ms)


def login_url(base: str, role: str, password: str) -> str:
    """``base`` (the owner's or a replica's URL) with the role's login instead of the owner's: the same host,
    port or socket, database and TLS settings."""
    parts = urlsplit(base)
    host = parts.netloc.rpartition("@")[2]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if k not in DROPPED_URL_PARAMETERS], safe="/")
    netloc = f"{quote(role, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(("postgresql", netloc, parts.path, query, ""))


def replica_urls(project: Project, database: str) -> dict[str, str]:
    """``r1``, ``r2``... → URL, as ``[databases.<db>] replicas`` lists them."""
    config = project.config.databases[database]
    urls: dict[str, str] = {}
    for index, reference in enumerate(config.replicas, start=1):
        url = resolve_secret(reference, what=f"[databases.{database}] replicas[{index - 1}]")
        if url is not None:
            urls[f"r{index}"] = url
    return urls


def login_server(project: Project, app: App, target: DatabaseTarget, replica: str | None,
                 primary: bool) -> tuple[str, str]:
    """(``primary`` or a replica's name, its URL): where the app's direct access should connect."""
    replicas = replica_urls(project, target.name)
    if replica is not None:
        if replica not in replicas:
            raise ProjectError(f"database {target.name!r} has no replica {replica!r}",
                               hint=f"its replicas: {', '.join(replicas) or 'none'} ([databases.{target.name}] "
                                    "replicas, named r1, r2... in order)")
        return replica, replicas[replica]
    if primary or app.config.reads.source == "primary" or not replicas:
        return "primary", target.owner_dsn
    name = next(iter(replicas))
    return name, replicas[name]


# --- the database side -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExistingRole:
    role: str
    app: str
    database: str
    created: datetime | None
    connection_limit: int
    settings: dict[str, str]


async def existing_roles(conn: asyncpg.Connection, project: Project, database: str) -> list[ExistingRole]:
    """This project's access roles for ``database`` (by name and by the comment that marks them)."""
    found: list[ExistingRole] = []
    for row in await conn.fetch(
        "SELECT r.rolname, r.rolconnlimit, shobj_description(r.oid, 'pg_authid') AS comment, s.setconfig "
        "FROM pg_roles r LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid AND s.setdatabase = 0 "
        "WHERE r.rolname LIKE $1 ORDER BY r.rolname", f"{project.role_prefix}sql_".replace("_", r"\_") + "%",
    ):
        match = COMMENT.match(row["comment"] or "")
        if match is None or match["project"] != project.name or match["database"] != database:
            continue
        try:
            created: datetime | None = datetime.fromisoformat(match["created"])
        except ValueError:
            created = None
        settings = dict(item.partition("=")[::2] for item in row["setconfig"] or ())
        found.append(ExistingRole(row["rolname"], match["app"], database, created, row["rolconnlimit"], settings))
    return found
