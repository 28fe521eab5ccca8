"""Direct SQL access for BI tools: one LOGIN role per app and database that reads the app's views, nothing else.

``gatehouse access create analytics`` gives a tool that must speak SQL a door of its own, with the same
walls as the API: it reads views of the app's API version (never a table), and PostgreSQL itself enforces it.

How the role gets its privileges, and why not by membership of the app role: the app role also holds what
gatehouse's own paths need (INSERT on ``gatehouse.audit`` for a write's audit record, USAGE on the sequences
behind insertable views, the app's insert/update/delete grants, every API version the app may ask for). A
member would inherit all of that, so a BI user could forge audit records or write through views. So the
access role is a member of nothing (NOINHERIT too, so a membership granted by hand later is not picked up
silently) and holds its own privileges: USAGE on the app's ``api_vN`` schema and SELECT on exactly the views
the app may read there. ``gatehouse apply`` keeps them in step with the project (:func:`sync_direct_access`):
a grant removed from the app is revoked from its access role, a view re-created is granted again, and an app
removed from the project (or given a row filter) loses its direct access, its sessions ended.

Row filters are refused: gatehouse enforces a grant's ``filter`` in the SQL it writes, with the caller's
claims bound in; a SQL login has no claims and would read every row. Writes are never given: they go through
the API, where they are validated, audited and announced.

The role's settings (``ALTER ROLE ... SET``): ``search_path`` on its API version, ``statement_timeout`` from the
app's quota, ``idle_in_transaction_session_timeout`` (a BI session left in an open transaction would hold
locks that make the next migration, and every API request behind it, wait), and read-only transactions by
default (which also refuses temporary tables). PostgreSQL lets a session change these for itself; the
``CONNECTION LIMIT`` (the app's ``pool_size``, per server) it cannot.

The password is random, shown once, and sent to the server only as a SCRAM-SHA-256 verifier computed here, so
the clear text never reaches the server's statement log or ``pg_stat_statements``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg

from gatehouse.access import choose_version
from gatehouse.contracts.versions import schema_name
from gatehouse.db import quote_ident
from gatehouse.db.targets import DatabaseTarget, resolve_targets
from gatehouse.errors import ProjectError
from gatehouse.project import App, Project
from gatehouse.secrets import resolve_secret

IDLE_IN_TRANSACTION_MS = 60_000
"""A BI session idle inside a transaction longer than this is ended by the server."""
MAX_ROLE_NAME = 63
"""PostgreSQL's identifier length (NAMEDATALEN - 1); a longer name would be cut silently."""
REPLICA_TIMEOUT_S = 3.0
"""How long a replica may take to answer when its sessions are counted or ended."""
REPLAY_WAIT_S = 5.0
"""How long ``revoke`` waits for a replica to replay the NOLOGIN before ending its sessions there."""
DROPPED_URL_PARAMETERS = frozenset({"user", "password", "passfile", "sslcert", "sslkey", "sslpassword", "service",
                                    "options"})
"""Parameters of the owner's URL that are the owner's own, never handed to a BI tool (``options`` could carry
``-c statement_timeout=0`` past the role's own settings)."""
REPLAYED = "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, true)"
"""On a replica: has it replayed the WAL up to ``$1`` (a primary's ``pg_current_wal_lsn()``)?"""
COMMENT = re.compile(r"^gatehouse direct SQL access: project (?P<project>\S+), app (?P<app>\S+), "
                     r"database (?P<database>\S+), created (?P<created>\S+)$")


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 secret PostgreSQL stores for ``password`` (RFC 5802/7677), in its own text form;
    given as the role's PASSWORD, it is stored as it is. The password must be ASCII (SASLprep then changes
    nothing): :func:`new_password` makes such passwords."""
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("ascii"), salt, iterations)
    stored_key = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def new_password() -> str:
    """32 random bytes, URL-safe (no character needs escaping in a connection string)."""
    return secrets.token_urlsafe(32)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def _apply_lock(conn: asyncpg.Connection) -> None:
    """``apply``'s lock, for this transaction: an access role is never created or dropped halfway through an
    ``apply`` of the same database (imported here: db/sync.py imports this module)."""
    from gatehouse.db.sync import APPLY_LOCK_KEY

    await conn.execute("SELECT pg_advisory_xact_lock($1)", APPLY_LOCK_KEY)


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


def _known_app(project: Project, app: str) -> App:
    if app not in project.apps:
        raise ProjectError(f"no application named {app!r}",
                           hint=f"applications in gatehouse.toml: {', '.join(project.apps) or 'none'}")
    return project.apps[app]


def plan_access(project: Project, app_name: str, database: str) -> AccessPlan:
    """The access role of ``app_name`` in ``database``; refused (ProjectError) when the app's grants there have
    row filters, or it reads nothing there."""
    app = _known_app(project, app_name)
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


async def _roles(conn: asyncpg.Connection, project: Project, database: str) -> list[ExistingRole]:
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


async def _acl_of(conn: asyncpg.Connection, role: str) -> tuple[set[tuple[str, str, str]], set[tuple[str, str]]]:
    """What ``role`` was granted in this database: (schema, relation, privilege) and (schema, privilege)."""
    relations = {(r["schema"], r["name"], r["privilege"]) for r in await conn.fetch(
        "SELECT n.nspname AS schema, c.relname AS name, a.privilege_type AS privilege FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace CROSS JOIN LATERAL aclexplode(c.relacl) a "
        "JOIN pg_roles g ON g.oid = a.grantee WHERE g.rolname = $1", role)}
    schemas = {(r["nspname"], r["privilege_type"]) for r in await conn.fetch(
        "SELECT n.nspname, a.privilege_type FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a "
        "JOIN pg_roles g ON g.oid = a.grantee WHERE g.rolname = $1", role)}
    return relations, schemas


async def converge(conn: asyncpg.Connection, plan: AccessPlan, current: ExistingRole | None = None) -> list[str]:
    """Make an existing access role match ``plan``: limit, settings, no membership, exactly its privileges."""
    changes: list[str] = []
    role = quote_ident(plan.role)
    if current is None or current.connection_limit != plan.connection_limit:
        await conn.execute(f"ALTER ROLE {role} CONNECTION LIMIT {int(plan.connection_limit)}")
        if current is not None:
            changes.append(f"set connection limit {plan.connection_limit} on {plan.role}")
    for key, value in plan.settings().items():
        if current is None or current.settings.get(key) != value:
            await conn.execute(f"ALTER ROLE {role} SET {key} = {_literal(value)}")
            if current is not None:
                changes.append(f"set {key} = {value} on {plan.role}")
    for row in await conn.fetch("SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
                                "JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = $1", plan.role):
        await conn.execute(f"REVOKE {quote_ident(row['rolname'])} FROM {role}")
        changes.append(f"revoked membership of {row['rolname']} from {plan.role} (an access role holds no role)")
    relations, schemas = await _acl_of(conn, plan.role)
    wanted = {(plan.schema, view, "SELECT") for view in plan.views}
    for schema, name, privilege in sorted(relations - wanted):
        await conn.execute(f"REVOKE {privilege} ON {quote_ident(schema)}.{quote_ident(name)} FROM {role}")
        changes.append(f"revoked {privilege} on {schema}.{name} from {plan.role}")
    for schema, privilege in sorted(schemas - {(plan.schema, "USAGE")}):
        await conn.execute(f"REVOKE {privilege} ON SCHEMA {quote_ident(schema)} FROM {role}")
        changes.append(f"revoked {privilege} on schema {schema} from {plan.role}")
    if (plan.schema, "USAGE") not in schemas:
        await conn.execute(f"GRANT USAGE ON SCHEMA {quote_ident(plan.schema)} TO {role}")
        if current is not None:
            changes.append(f"granted USAGE on schema {plan.schema} to {plan.role}")
    for schema, name, privilege in sorted(wanted - relations):
        await conn.execute(f"GRANT {privilege} ON {quote_ident(schema)}.{quote_ident(name)} TO {role}")
        changes.append(f"granted {privilege} on {schema}.{name} to {plan.role}")
    if not await conn.fetchval("SELECT has_database_privilege($1, current_database(), 'CONNECT')", plan.role):
        await conn.execute(f"GRANT CONNECT ON DATABASE {quote_ident(await conn.fetchval('SELECT current_database()'))}"
                           f" TO {role}")
    return changes


async def end_sessions(conn: asyncpg.Connection, role: str) -> int:
    """End every session of ``role`` on this server (waiting for each to exit); the number still left."""
    for _ in range(3):
        ended = await conn.fetch("SELECT pg_terminate_backend(pid, 5000) AS ok FROM pg_stat_activity "
                                 "WHERE usename = $1 AND pid <> pg_backend_pid()", role)
        if not ended:
            return 0
    left: int = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role)
    return left


async def _drop_role(conn: asyncpg.Connection, role: str) -> None:
    await conn.execute(f"DROP OWNED BY {quote_ident(role)}")  # its privileges here and on the database
    await conn.execute(f"DROP ROLE {quote_ident(role)}")


async def _on_replicas(project: Project, database: str, role: str, lsn: str | None) -> list[str]:
    """End ``role``'s sessions on each replica, once it has replayed ``lsn`` (the revocation) if given."""
    notes: list[str] = []
    for name, url in replica_urls(project, database).items():
        try:
            conn = await asyncpg.connect(url, timeout=REPLICA_TIMEOUT_S)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            notes.append(f"replica {name} did not answer: end {role}'s sessions there when it is back "
                         "(they hold no privileges any more once it replays the revocation)")
            continue
        try:
            caught_up = lsn is None
            for _ in range(int(REPLAY_WAIT_S / 0.1)):
                if caught_up or await conn.fetchval(REPLAYED, lsn):
                    caught_up = True
                    break
                await asyncio.sleep(0.1)
            left = await end_sessions(conn, role)
            if not caught_up:
                notes.append(f"replica {name} has not replayed the revocation yet (it lags): it refuses {role}'s "
                             "logins once it has")
            if left:
                notes.append(f"{left} session(s) of {role} could not be ended on replica {name}")
        except asyncpg.PostgresError as exc:
            notes.append(f"could not end {role}'s sessions on replica {name}: {exc}")
        finally:
            await conn.close()
    return notes


async def sync_direct_access(conn: asyncpg.Connection, project: Project, database: str) -> list[str]:
    """``apply``'s step for access roles (run in its transaction, after the views and privileges): each access
    role of this database follows its app's grants, version and quota; one whose app was removed from the
    project, or may no longer have direct access (a row filter, nothing left to read), is dropped and its
    sessions ended. Returns the changes, one line each."""
    changes: list[str] = []
    for current in await _roles(conn, project, database):
        reason: str | None = None
        if current.app not in project.apps:
            reason = "app removed from the project"
        else:
            try:
                plan = plan_access(project, current.app, database)
            except ProjectError as exc:
                reason = str(exc.args[0])
        if reason is None:
            changes += await converge(conn, plan, current)
            continue
        left = 0
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                left = await end_sessions(conn, current.role)
        await _drop_role(conn, current.role)
        changes.append(f"REVOKED direct SQL access of {current.app} (role {current.role} dropped, its sessions "
                       f"ended): {reason}" + (f"; {left} session(s) could not be ended" if left else ""))
        changes += await _on_replicas(project, database, current.role, None)
    return changes


# --- what the commands do ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewAccess:
    plan: AccessPlan
    server: str
    """``primary`` or the replica's name (r1...) the connection string points at."""
    url: str
    """The connection string, with the password: shown once."""
    embedded: bool
    notes: list[str] = field(default_factory=list)


async def _check_owner(conn: asyncpg.Connection, database: str) -> None:
    row = await conn.fetchrow("SELECT current_user AS name, rolsuper OR rolcreaterole AS able FROM pg_roles "
                              "WHERE rolname = current_user")
    if row is None or not row["able"]:
        name = row["name"] if row else "?"
        raise ProjectError(f"database {database!r}: the URL's user {name!r} cannot create roles",
                           hint=f"run as a user with CREATEROLE (ALTER ROLE {name} CREATEROLE), as `apply` does")


async def _missing_views(conn: asyncpg.Connection, plan: AccessPlan) -> list[str]:
    names = [f"{quote_ident(plan.schema)}.{quote_ident(view)}" for view in plan.views]
    rows = await conn.fetch("SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL", names)
    return [row["name"].replace('"', "") for row in rows]


EXPOSURE = {
    "relations": r"""
        SELECT n.nspname || '.' || c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\_toast%' AND has_schema_privilege($1, n.oid, 'USAGE')
          AND (has_any_column_privilege($1, c.oid, 'SELECT') OR has_table_privilege($1, c.oid, 'INSERT, UPDATE, DELETE')
               OR (c.relkind = 'S' AND has_sequence_privilege($1, c.oid, 'USAGE')))
        ORDER BY 1""",
    "creatable": """
        SELECT nspname AS name FROM pg_namespace WHERE has_schema_privilege($1, oid, 'CREATE') ORDER BY 1""",
    "definers": r"""
        SELECT p.oid::regprocedure::text AS name FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND has_schema_privilege($1, n.oid, 'USAGE') AND has_function_privilege($1, p.oid, 'EXECUTE')
        ORDER BY 1""",
    "databases": """
        SELECT datname AS name FROM pg_database WHERE datallowconn AND datname <> current_database()
          AND has_database_privilege($1, oid, 'CONNECT') ORDER BY 1""",
}


async def exposure(conn: asyncpg.Connection, role: str) -> dict[str, list[str]]:
    """What ``role`` can reach in this database and server, by kind (from PostgreSQL's own privilege checks):
    ``relations`` it can read or write, schemas it can create in, SECURITY DEFINER functions it can call, other
    databases it can connect to."""
    return {kind: [row["name"] for row in await conn.fetch(sql, role)] for kind, sql in EXPOSURE.items()}


def exposure_notes(plan: AccessPlan, found: dict[str, list[str]]) -> list[str]:
    """Warnings for anything the role can reach beyond its views (held through PUBLIC, which gatehouse leaves to
    the database's owner), each with the fix."""
    notes: list[str] = []
    extra = [name for name in found["relations"] if name not in {f"{plan.schema}.{v}" for v in plan.views}]
    if extra:
        notes.append(f"it can also reach {', '.join(extra[:5])}{' and more' if len(extra) > 5 else ''}, through "
                     "privileges granted to PUBLIC: REVOKE them from PUBLIC if BI should not see them")
    if found["creatable"]:
        notes.append(f"it can create objects in schema {', '.join(found['creatable'])} (PUBLIC holds CREATE): "
                     f"REVOKE CREATE ON SCHEMA {found['creatable'][0]} FROM PUBLIC")
    if found["definers"]:
        notes.append(f"it can call SECURITY DEFINER function(s) {', '.join(found['definers'][:5])} (EXECUTE is "
                     "PUBLIC's): REVOKE EXECUTE ... FROM PUBLIC unless every role may run them")
    if found["databases"]:
        shown = ", ".join(found["databases"][:3]) + (" ..." if len(found["databases"]) > 3 else "")
        notes.append(f"it can log in to {len(found['databases'])} other database(s) of this server ({shown}), "
                     "where it holds only what PUBLIC holds: REVOKE CONNECT ON DATABASE ... FROM PUBLIC there, or "
                     "a pg_hba.conf line, to close that")
    return notes


async def create_access(project: Project, app_name: str, *, database: str | None = None,
                        replica: str | None = None, primary: bool = False,
                        rotate: bool = False) -> list[NewAccess]:
    """Create the app's access role in each database it reads from (or the one named), or with ``rotate`` give
    existing ones a new password; returns the connection strings, each shown once."""
    app = _known_app(project, app_name)
    if database is not None and database not in project.config.databases:
        raise ProjectError(f"no database named {database!r}",
                           hint=f"databases in gatehouse.toml: {', '.join(project.config.databases)}")
    names = [database] if database is not None else list(project.config.databases)
    plans: list[AccessPlan] = []
    for name in names:
        try:
            plans.append(plan_access(project, app_name, name))
        except ProjectError as exc:
            if database is not None or "there is nothing to give" not in str(exc.args[0]):
                raise
    if not plans:
        raise ProjectError(f"{app_name!r} may read no contract in API v{choose_version(project, app, None, None)}: "
                           "there is nothing to give direct access to",
                           hint=f"add a read grant to [apps.{app_name}] in gatehouse.toml")
    targets = await resolve_targets(project)
    created: list[NewAccess] = []
    for plan in plans:
        target = targets[plan.database]
        server, base = login_server(project, app, target, replica, primary)
        password = new_password()
        conn = await target.connect_owner()
        try:
            await _check_owner(conn, plan.database)
            missing = await _missing_views(conn, plan)
            if missing:
                raise ProjectError(f"database {plan.database!r} has no view {', '.join(missing)} yet",
                                   hint="run `gatehouse apply` first")
            current = next((r for r in await _roles(conn, project, plan.database) if r.role == plan.role), None)
            taken = current is None and await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", plan.role)
            if taken:
                raise ProjectError(f"a role named {plan.role!r} exists and is not gatehouse's direct access",
                                   hint="drop or rename it, then run the command again")
            if current is not None and not rotate:
                raise ProjectError(f"{app_name!r} already has direct SQL access in database {plan.database!r} "
                                   f"(role {plan.role})",
                                   hint=f"`gatehouse access create {app_name} --rotate` gives it a new password; "
                                        f"`gatehouse access revoke {app_name}` removes it")
            role = quote_ident(plan.role)
            async with conn.transaction():
                await _apply_lock(conn)
                if current is None:
                    await conn.execute(f"CREATE ROLE {role} LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE "
                                       f"NOREPLICATION NOBYPASSRLS PASSWORD {_literal(scram_verifier(password))}")
                    comment = comment_text(project, app_name, plan.database, datetime.now(UTC))
                    await conn.execute(f"COMMENT ON ROLE {role} IS {_literal(comment)}")
                else:
                    await conn.execute(f"ALTER ROLE {role} LOGIN PASSWORD {_literal(scram_verifier(password))}")
                await converge(conn, plan, current)
            notes = exposure_notes(plan, await exposure(conn, plan.role))
        finally:
            await conn.close()
        if target.embedded:
            notes.insert(0, "the embedded server listens on a local socket only, trusts it (the password is not "
                            "checked there) and runs only while a gatehouse process (serve) runs: for BI tools on "
                            "other machines, give the database a url")
        if server != "primary":
            notes.insert(0, f"it points at replica {server}: its data may lag the primary (the app's max_staleness "
                            "bounds the API's reads, not SQL's); SELECT now() - pg_last_xact_replay_timestamp() "
                            "tells how much")
        created.append(NewAccess(plan, server, login_url(base, plan.role, password), target.embedded, notes))
    return created


@dataclass(frozen=True, slots=True)
class AccessRole:
    """One access role as ``access list`` and ``versions`` show it."""

    app: str
    database: str
    role: str
    created: datetime | None
    connection_limit: int
    statement_timeout_ms: int | None
    search_path: str | None
    connections: int
    """Its sessions now, on the primary and every replica that answered."""
    last_activity: datetime | None
    """The latest activity of a session now open (PostgreSQL keeps no login history before version 17)."""
    statements: int | None
    """Statements it ran since the statistics were reset, when ``pg_stat_statements`` is installed."""
    unreachable: tuple[str, ...] = ()
    """Replicas whose sessions could not be counted."""


async def _activity(conn: asyncpg.Connection, role: str) -> tuple[int, datetime | None]:
    row = await conn.fetchrow("SELECT count(*) AS n, max(coalesce(state_change, backend_start)) AS at "
                              "FROM pg_stat_activity WHERE usename = $1", role)
    return (int(row["n"]), row["at"]) if row is not None else (0, None)


async def _statements(conn: asyncpg.Connection, role: str) -> int | None:
    schema = await conn.fetchval("SELECT extnamespace::regnamespace::text FROM pg_extension "
                                 "WHERE extname = 'pg_stat_statements'")
    if schema is None:
        return None
    try:
        async with conn.transaction():  # not loaded by shared_preload_libraries: it raises, and nothing is known
            calls = await conn.fetchval(f"SELECT coalesce(sum(s.calls), 0) FROM {schema}.pg_stat_statements s "
                                        "JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = $1", role)
    except asyncpg.PostgresError:
        return None
    return int(calls)


async def list_access(project: Project, app: str | None = None) -> list[AccessRole]:
    """Every access role of the project (or of one app), with its sessions now and its use."""
    found: list[AccessRole] = []
    for name, target in (await resolve_targets(project)).items():
        conn = await target.connect_owner()
        try:
            for role in await _roles(conn, project, name):
                if app is not None and role.app != app:
                    continue
                connections, last = await _activity(conn, role.role)
                unreachable: list[str] = []
                for replica, url in replica_urls(project, name).items():
                    try:
                        other = await asyncpg.connect(url, timeout=REPLICA_TIMEOUT_S)
                    except (OSError, asyncpg.PostgresError, TimeoutError):
                        unreachable.append(replica)
                        continue
                    try:
                        count, at = await _activity(other, role.role)
                    finally:
                        await other.close()
                    connections += count
                    last = max((t for t in (last, at) if t is not None), default=None)
                timeout = role.settings.get("statement_timeout")
                found.append(AccessRole(
                    app=role.app, database=name, role=role.role, created=role.created,
                    connection_limit=role.connection_limit,
                    statement_timeout_ms=int(timeout) if timeout and timeout.isdigit() else None,
                    search_path=role.settings.get("search_path"), connections=connections, last_activity=last,
                    statements=await _statements(conn, role.role), unreachable=tuple(unreachable)))
        finally:
            await conn.close()
    return found


async def revoke_access(project: Project, app: str, *, database: str | None = None) -> list[tuple[str, list[str]]]:
    """End the app's access roles' sessions and drop them (an app no longer in the project too); returns
    (role, notes) for each role dropped."""
    revoked: list[tuple[str, list[str]]] = []
    for name, target in (await resolve_targets(project)).items():
        if database is not None and name != database:
            continue
        conn = await target.connect_owner()
        try:
            for role in [r for r in await _roles(conn, project, name) if r.app == app]:
                ident = quote_ident(role.role)
                await conn.execute(f"ALTER ROLE {ident} NOLOGIN")  # committed: no new session from here on
                lsn = await conn.fetchval("SELECT CASE WHEN pg_is_in_recovery() THEN NULL "
                                          "ELSE pg_current_wal_lsn()::text END")
                notes = await _on_replicas(project, name, role.role, lsn)
                try:
                    left = await end_sessions(conn, role.role)
                except asyncpg.InsufficientPrivilegeError:
                    raise ProjectError(f"the database URL's user may not end {role.role}'s sessions; the role "
                                       "can no longer log in, but its open sessions go on",
                                       hint="GRANT pg_signal_backend TO the URL's user, then run revoke again"
                                       ) from None
                if left:
                    raise ProjectError(f"{left} session(s) of {role.role} did not end; the role can no longer "
                                       "log in", hint="run `gatehouse access revoke` again")
                async with conn.transaction():
                    await _apply_lock(conn)
                    await _drop_role(conn, role.role)
                revoked.append((role.role, notes))
        finally:
            await conn.close()
    return revoked
