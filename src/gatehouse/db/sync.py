"""``gatehouse apply``: make one database match the project, idempotently.

Everything is computed as *desired state versus what the catalog says*, then only the difference is
executed, in one transaction, under an advisory lock. Running it twice changes nothing the second time,
and every change is reported as one line.

What it owns in a database:

* the ``gatehouse`` schema (keys, applied state);
* ``api_vN`` schemas, one view per contract served in version N (carry-forward);
* one NOLOGIN role per app with exactly its granted privileges on those views, and USAGE on the schemas
  that hold them; a grant removed from the project is revoked, an app removed is dropped;
* the authenticator: LOGIN, NOINHERIT, member of every app role, able to read only the key table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import asyncpg

from gatehouse.cache.tables import sync_data_versions
from gatehouse.contracts.versions import schema_name
from gatehouse.db import quote_ident
from gatehouse.db.changes import announce, lock_for_apply
from gatehouse.db.direct_access import sync_direct_access
from gatehouse.db.targets import DatabaseTarget
from gatehouse.events.capture import sync_event_capture
from gatehouse.events.mirror_tables import sync_mirrors
from gatehouse.observe.audit import AUDIT_DDL
from gatehouse.project import Project
from gatehouse.sagas.tables import sync_saga_tables

ACTION_PRIVILEGE = {"read": "SELECT", "insert": "INSERT", "update": "UPDATE", "delete": "DELETE"}

BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS gatehouse;
CREATE TABLE IF NOT EXISTS gatehouse.state (
    key    text PRIMARY KEY,
    value  text NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS gatehouse.views (
    schema_name  text NOT NULL,
    view_name    text NOT NULL,
    contract     text NOT NULL,
    checksum     text NOT NULL,
    PRIMARY KEY (schema_name, view_name)
);
CREATE TABLE IF NOT EXISTS gatehouse.keys (
    id           text PRIMARY KEY,
    app          text NOT NULL,
    hash         bytea NOT NULL,
    description  text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX IF NOT EXISTS keys_app_idx ON gatehouse.keys (app);
CREATE TABLE IF NOT EXISTS gatehouse.heartbeat (
    instance  text PRIMARY KEY,
    seq       bigint NOT NULL,
    at        timestamptz NOT NULL
);
"""


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


@dataclass(slots=True)
class ApplyReport:
    database: str
    changes: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.changes.append(line)


def project_fingerprint(project: Project, database: str) -> str:
    """What ``/ready`` compares with the database to know the project is applied."""
    views = sorted((n, c.label, c.checksum) for n, c in project.versions.views() if c.database == database)
    grants = sorted(
        (app.role, g.contract, sorted(g.actions)) for app in project.apps.values() for g in app.config.grants
    )
    return hashlib.sha256(json.dumps([views, grants]).encode()).hexdigest()


def app_role_pattern(project: Project) -> str:
    """A LIKE pattern matching exactly this project's app roles."""
    return f"{project.role_prefix}app_%".replace("_", r"\_")


def desired_privileges(project: Project, database: str) -> set[tuple[str, str, str, str]]:
    """(role, schema, view, privilege) for every view the project grants in this database."""
    wanted: set[tuple[str, str, str, str]] = set()
    for number, contract in project.versions.views():
        if contract.database != database:
            continue
        for app in project.apps.values():
            for action in app.grant_for(contract.name) & ACTION_PRIVILEGE.keys():  # ("events": no privilege)
                wanted.add((app.role, schema_name(number), contract.name, ACTION_PRIVILEGE[action]))
    return wanted


async def _sync_roles(conn: asyncpg.Connection, project: Project, target: DatabaseTarget,
                      report: ApplyReport) -> None:
    existing = {r["rolname"]: r for r in await conn.fetch(
        "SELECT rolname, rolcanlogin, rolinherit FROM pg_roles WHERE rolname LIKE $1",
        project.role_prefix.replace("_", r"\_") + "%",
    )}
    auth = quote_ident(project.authenticator_role)
    if project.authenticator_role not in existing:
        await conn.execute(f"CREATE ROLE {auth} LOGIN NOINHERIT")
        report.add(f"created role {project.authenticator_role} (LOGIN, NOINHERIT)")
    if target.authenticator_password:
        await conn.execute(f"ALTER ROLE {auth} PASSWORD {_literal(target.authenticator_password)}")
    wanted_roles = {app.role for app in project.apps.values()}
    members = {r["rolname"] for r in await conn.fetch(
        "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
        "JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = $1", project.authenticator_role,
    )}
    for role in sorted(wanted_roles):
        if role not in existing:
            await conn.execute(f"CREATE ROLE {quote_ident(role)} NOLOGIN")
            report.add(f"created role {role}")
        if role not in members:
            await conn.execute(f"GRANT {quote_ident(role)} TO {auth}")
            report.add(f"granted role {role} to {project.authenticator_role}")
    app_prefix = f"{project.role_prefix}app_"
    for role in sorted(r for r in existing if r.startswith(app_prefix) and r not in wanted_roles):
        await conn.execute(f"DROP OWNED BY {quote_ident(role)}")
        try:
            async with conn.transaction():
                await conn.execute(f"DROP ROLE {quote_ident(role)}")
            report.add(f"dropped role {role} (app removed from the project)")
        except asyncpg.DependentObjectsStillExistError:
            report.add(f"revoked everything from {role}; it still has privileges in another database, "
                       "so it is dropped when that database is applied")
    await conn.execute(f"GRANT USAGE ON SCHEMA gatehouse TO {auth}")
    await conn.execute(f"GRANT SELECT ON gatehouse.keys, gatehouse.state, gatehouse.views TO {auth}")
    # the audit writer's batches, their summaries (which name their batch: the batch's id, from RETURNING)
    await conn.execute(f"GRANT INSERT ON gatehouse.audit, gatehouse.audit_batch, gatehouse.audit_minute TO {auth}")
    await conn.execute(f"GRANT SELECT (id) ON gatehouse.audit_batch TO {auth}")
    await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON gatehouse.heartbeat TO {auth}")  # replica lag
    for role in sorted(wanted_roles):  # a write's record is inserted in the write's own transaction
        await conn.execute(f"GRANT USAGE ON SCHEMA gatehouse TO {quote_ident(role)}")
        await conn.execute(f"GRANT INSERT ON gatehouse.audit TO {quote_ident(role)}")


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def _sync_views(conn: asyncpg.Connection, project: Project, database: str, report: ApplyReport) -> None:
    wanted = {
        (schema_name(n), c.name): c for n, c in project.versions.views() if c.database == database
    }
    schemas = {s for s, _ in wanted}
    existing_schemas = {r["nspname"] for r in await conn.fetch(
        r"SELECT nspname FROM pg_namespace WHERE nspname ~ '^api_v[0-9]+$'"
    )}
    recorded = {(r["schema_name"], r["view_name"]): r["checksum"] for r in await conn.fetch(
        "SELECT v.schema_name, v.view_name, v.checksum FROM gatehouse.views v "
        "JOIN pg_views p ON p.schemaname = v.schema_name AND p.viewname = v.view_name"
    )}
    live_views = {(r["schemaname"], r["viewname"]) for r in await conn.fetch(
        r"SELECT schemaname, viewname FROM pg_views WHERE schemaname ~ '^api_v[0-9]+$'"
    )}
    for schema in sorted(existing_schemas - schemas):
        await conn.execute(f"DROP SCHEMA {quote_ident(schema)} CASCADE")
        await conn.execute("DELETE FROM gatehouse.views WHERE schema_name = $1", schema)
        report.add(f"dropped schema {schema} (no contract is served in it any more)")
    for schema in sorted(schemas - existing_schemas):
        await conn.execute(f"CREATE SCHEMA {quote_ident(schema)}")
        report.add(f"created schema {schema}")
    for schema, view in sorted(live_views - set(wanted)):
        if schema in schemas:
            await conn.execute(f"DROP VIEW {qualified(schema, view)} CASCADE")
            await conn.execute("DELETE FROM gatehouse.views WHERE schema_name = $1 AND view_name = $2",
                               schema, view)
            report.add(f"dropped view {schema}.{view}")
    for (schema, view), contract in sorted(wanted.items()):
        if recorded.get((schema, view)) == contract.checksum:
            continue
        name = qualified(schema, view)
        replaced = (schema, view) in live_views
        await conn.execute(f"DROP VIEW IF EXISTS {name} CASCADE")
        await conn.execute(f"CREATE VIEW {name} AS\n{contract.sql}\n")
        comment = contract.description or f"{contract.label}"
        await conn.execute(f"COMMENT ON VIEW {name} IS {_literal(comment)}")
        await conn.execute(
            "INSERT INTO gatehouse.views (schema_name, view_name, contract, checksum) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (schema_name, view_name) DO UPDATE SET contract = $3, checksum = $4",
            schema, view, contract.label, contract.checksum,
        )
        report.add(f"{'re-created' if replaced else 'created'} view {schema}.{view} ({contract.label})")


VIEW_PRIVILEGES = r"""
SELECT g.rolname AS grantee, n.nspname AS schema, c.relname AS view, a.privilege_type AS privilege
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL aclexplode(c.relacl) a
JOIN pg_roles g ON g.oid = a.grantee
WHERE n.nspname ~ '^api_v[0-9]+$' AND g.rolname LIKE $1
"""
"""(grantee, schema, view, privilege) of every privilege on an API view held by a role LIKE ``$1``."""


async def _sync_privileges(conn: asyncpg.Connection, project: Project, database: str,
                           report: ApplyReport) -> None:
    pattern = app_role_pattern(project)
    actual = {(r["grantee"], r["schema"], r["view"], r["privilege"])
              for r in await conn.fetch(VIEW_PRIVILEGES, pattern)}
    wanted = desired_privileges(project, database)
    for role, schema, view, privilege in sorted(actual - wanted):
        await conn.execute(f"REVOKE {privilege} ON {qualified(schema, view)} FROM {quote_ident(role)}")
        report.add(f"revoked {privilege} on {schema}.{view} from {role}")
    for role, schema, view, privilege in sorted(wanted - actual):
        await conn.execute(f"GRANT {privilege} ON {qualified(schema, view)} TO {quote_ident(role)}")
        report.add(f"granted {privilege} on {schema}.{view} to {role}")

    usage_actual = {(r["grantee"], r["schema"]) for r in await conn.fetch(
        r"""
        SELECT g.rolname AS grantee, n.nspname AS schema
        FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a JOIN pg_roles g ON g.oid = a.grantee
        WHERE n.nspname ~ '^api_v[0-9]+$' AND g.rolname LIKE $1 AND a.privilege_type = 'USAGE'
        """, pattern,
    )}
    usage_wanted = {(role, schema) for role, schema, _, _ in wanted}
    for role, schema in sorted(usage_actual - usage_wanted):
        await conn.execute(f"REVOKE USAGE ON SCHEMA {quote_ident(schema)} FROM {quote_ident(role)}")
        report.add(f"revoked USAGE on schema {schema} from {role}")
    for role, schema in sorted(usage_wanted - usage_actual):
        await conn.execute(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {quote_ident(role)}")
        report.add(f"granted USAGE on schema {schema} to {role}")


SEQUENCES_BEHIND_VIEW = r"""
SELECT DISTINCT sn.nspname AS schema, s.relname AS sequence
FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
     AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
JOIN pg_depend sd ON sd.refclassid = 'pg_class'::regclass AND sd.refobjid = d.refobjid
     AND sd.classid = 'pg_class'::regclass AND sd.deptype = 'a'
JOIN pg_class s ON s.oid = sd.objid AND s.relkind = 'S'
JOIN pg_namespace sn ON sn.oid = s.relnamespace
WHERE r.ev_class = to_regclass($1)
"""


async def _sync_sequences(conn: asyncpg.Connection, project: Project, database: str, report: ApplyReport) -> None:
    """An insert through a view evaluates the table's ``serial`` defaults as the app's role, which therefore
    needs USAGE on those sequences: exactly for the apps that may insert, and no others."""
    wanted: set[tuple[str, str, str]] = set()
    for role, schema, view, privilege in desired_privileges(project, database):
        if privilege == "INSERT":
            for row in await conn.fetch(SEQUENCES_BEHIND_VIEW, qualified(schema, view)):
                wanted.add((role, row["schema"], row["sequence"]))
    pattern = app_role_pattern(project)
    actual = {(r["grantee"], r["schema"], r["sequence"]) for r in await conn.fetch(
        r"""
        SELECT g.rolname AS grantee, n.nspname AS schema, c.relname AS sequence
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL aclexplode(c.relacl) a
        JOIN pg_roles g ON g.oid = a.grantee
        WHERE c.relkind = 'S' AND a.privilege_type = 'USAGE' AND g.rolname LIKE $1
        """, pattern,
    )}
    for role, schema, sequence in sorted(actual - wanted):
        await conn.execute(f"REVOKE USAGE ON SEQUENCE {qualified(schema, sequence)} FROM {quote_ident(role)}")
        report.add(f"revoked USAGE on sequence {schema}.{sequence} from {role}")
    for role, schema, sequence in sorted(wanted - actual):
        await conn.execute(f"GRANT USAGE ON SEQUENCE {qualified(schema, sequence)} TO {quote_ident(role)}")
        report.add(f"granted USAGE on sequence {schema}.{sequence} to {role}")


async def bootstrap(conn: asyncpg.Connection) -> None:
    """Create gatehouse's own schema and tables if missing (also used by ``keys`` before any apply)."""
    await conn.execute(BOOTSTRAP)
    await conn.execute(AUDIT_DDL)


async def apply_database(project: Project, target: DatabaseTarget) -> ApplyReport:
    report = ApplyReport(database=target.name)
    conn = await target.connect_owner()
    try:
        async with conn.transaction():
            await lock_for_apply(conn)
            had_schema = await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = 'gatehouse'")
            await bootstrap(conn)
            if not had_schema:
                report.add("created schema gatehouse")
            await _sync_roles(conn, project, target, report)
            report.changes.extend(await sync_mirrors(conn, project, target.name))  # before views over them
            await _sync_views(conn, project, target.name, report)
            await _sync_privileges(conn, project, target.name, report)
            await _sync_sequences(conn, project, target.name, report)
            report.changes.extend(await sync_event_capture(conn, project, target.name, project.authenticator_role))
            report.changes.extend(await sync_saga_tables(conn, project, target.name))  # after the roles
            for change in await sync_direct_access(conn, project, target.name):  # BI tools' SQL roles
                report.add(change)
            readers = {app.name: app.role for app in project.apps.values()} | {"": project.authenticator_role}
            for change in await sync_data_versions(conn, project, target.name, readers):
                report.add(change)
            await conn.execute(
                "INSERT INTO gatehouse.state (key, value) VALUES ('fingerprint', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = $1, at = now()",
                project_fingerprint(project, target.name),
            )
            await announce(conn, "apply")  # running servers reload at commit, without a restart
    finally:
        await conn.close()
    return report
