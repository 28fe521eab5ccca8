"""Direct SQL access for BI tools: one LOGIN role per app and database that reads the app's views, nothing else.

This module creates, keeps in step and drops the roles; what a role should be is planned in
:mod:`gatehouse.db.direct_access_plan`, what it can reach and how it is used is reported by
:mod:`gatehouse.db.direct_access_report`.

How the role gets its privileges, and why not by membership of the app role: the app role also holds what
gatehouse's own paths need (INSERT on ``gatehouse.audit`` for a write's audit record, USAGE on the sequences
behind insertable views, the app's insert/update/delete grants, every API version the app may ask for). A
member would inherit all of that, so a BI user could forge audit records or write through views. So the
access role is a member of nothing (NOINHERIT too, so a membership granted by hand later is not picked up
silently) and holds its own privileges: USAGE on the app's ``api_vN`` schema and SELECT on exactly the views
the app may read there. ``gatehouse apply`` keeps them in step with the project (:func:`sync_direct_access`):
a grant removed from the app is revoked from its access role, a view re-created is granted again, and an app
removed from the project (or given a row filter) loses its direct access, its sessions ended.

The password is random, shown once, and sent to the server only as a SCRAM-SHA-256 verifier computed here, so
the clear text never reaches the server's statement log or ``pg_stat_statements``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from gatehouse.access import choose_version
from gatehouse.db import quote_ident
from gatehouse.db.changes import lock_for_apply
from gatehouse.db.direct_access_plan import (
    REPLICA_TIMEOUT_S,
    AccessPlan,
    ExistingRole,
    comment_text,
    existing_roles,
    known_app,
    login_server,
    login_url,
    plan_access,
    replica_urls,
)
from gatehouse.db.direct_access_report import exposure, exposure_notes
from gatehouse.db.targets import resolve_targets
from gatehouse.errors import ProjectError
from gatehouse.project import Project

REPLAY_WAIT_S = 5.0
"""How long ``revoke`` waits for a replica to replay the NOLOGIN before ending its sessions there."""
REPLAYED = "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, true)"
"""On a replica: has it replayed the WAL up to ``$1`` (a primary's ``pg_current_wal_lsn()``)?"""


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


# --- the database side -----------------------------------------------------------------------------------


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
    for current in await existing_roles(conn, project, database):
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

async def create_access(project: Project, app_name: str, *, database: str | None = None,
                        replica: str | None = None, primary: bool = False,
                        rotate: bool = False) -> list[NewAccess]:
    """Create the app's access role in each database it reads from (or the one named), or with ``rotate`` give
    existing ones a new password; returns the connection strings, each shown once."""
    app = known_app(project, app_name)
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
            current = next((r for r in await existing_roles(conn, project, plan.database) if r.role == plan.role), None)
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
                await lock_for_apply(conn)  # never halfway through an apply of this database
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


async def revoke_access(project: Project, app: str, *, database: str | None = None) -> list[tuple[str, list[str]]]:
    """End the app's access roles' sessions and drop them (an app no longer in the project too); returns
    (role, notes) for each role dropped."""
    revoked: list[tuple[str, list[str]]] = []
    for name, target in (await resolve_targets(project)).items():
        if database is not None and name != database:
            continue
        conn = await target.connect_owner()
        try:
            for role in [r for r in await existing_roles(conn, project, name) if r.app == app]:
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
                    await lock_for_apply(conn)  # never halfway through an apply of this database
                    await _drop_role(conn, role.role)
                revoked.append((role.role, notes))
        finally:
            await conn.close()
    return revoked
