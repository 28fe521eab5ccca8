"""Is the project applied? What ``gatehouse apply`` would change in one database, found without changing it.

What *should* exist comes from the same functions ``apply`` uses (:mod:`gatehouse.db.sync`:
``desired_privileges``, ``app_role_pattern``, ``project_fingerprint``, the view and sequence lists); what
*does* exist is read from the catalog. Every difference is one line that names the app, the object and the
privilege, e.g. ``app mobile (role gh_shop_app_mobile) lacks SELECT on api_v1.products``: someone who
revoked a grant by hand, dropped a view, or changed a contract without running apply learns exactly what.
Pending migrations are listed too (a warning: ``gatehouse migrate`` is the fix, and it may be on its way).
"""

from __future__ import annotations

import asyncpg

from gatehouse.contracts.versions import schema_name
from gatehouse.db.sync import (
    SEQUENCES_BEHIND_VIEW,
    VIEW_PRIVILEGES,
    app_role_pattern,
    desired_privileges,
    project_fingerprint,
    qualified,
)
from gatehouse.migrate.runner import pending_migrations
from gatehouse.observe.doctor import Outcome, fail, ok, warn
from gatehouse.project import Project

LIVE_VIEWS = r"""
SELECT n.nspname AS schema, c.relname AS view
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'v' AND n.nspname ~ '^api_v[0-9]+$'
"""
SCHEMA_USAGE = r"""
SELECT g.rolname AS grantee, n.nspname AS schema
FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a JOIN pg_roles g ON g.oid = a.grantee
WHERE n.nspname ~ '^api_v[0-9]+$' AND g.rolname LIKE $1 AND a.privilege_type = 'USAGE'
"""
SEQUENCE_USAGE = r"""
SELECT g.rolname AS grantee, n.nspname AS schema, c.relname AS sequence
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL aclexplode(c.relacl) a
JOIN pg_roles g ON g.oid = a.grantee
WHERE c.relkind = 'S' AND a.privilege_type = 'USAGE' AND g.rolname LIKE $1
"""
MAX_DETAILS = 50


class Drift:
    """The differences found, with the apps' names put to their roles."""

    def __init__(self, project: Project) -> None:
        self.lines: list[str] = []
        self.app_of = {app.role: app.name for app in project.apps.values()}

    def who(self, role: str) -> str:
        app = self.app_of.get(role)
        return f"app {app} (role {role})" if app else f"role {role}"

    def add(self, line: str) -> None:
        self.lines.append(line)


async def _roles(conn: asyncpg.Connection, project: Project, drift: Drift) -> None:
    existing = {r["rolname"]: r for r in await conn.fetch(
        "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE $1",
        project.role_prefix.replace("_", r"\_") + "%")}
    auth = project.authenticator_role
    if auth not in existing:
        drift.add(f"the authenticator role {auth} does not exist")
    elif not existing[auth]["rolcanlogin"]:
        drift.add(f"the authenticator role {auth} may not log in (NOLOGIN)")
    members = {r["rolname"] for r in await conn.fetch(
        "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
        "JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = $1", auth)}
    for app in sorted(project.apps.values(), key=lambda a: a.name):
        if app.role not in existing:
            drift.add(f"app {app.name}: its role {app.role} does not exist")
        elif auth in existing and app.role not in members:
            drift.add(f"app {app.name}: the authenticator is not a member of its role {app.role} (its requests "
                      "cannot run as it)")
    wanted = {app.role for app in project.apps.values()}
    for role in sorted(r for r in existing if r.startswith(f"{project.role_prefix}app_") and r not in wanted):
        drift.add(f"role {role} belongs to no app in gatehouse.toml (apply drops it)")


async def _views(conn: asyncpg.Connection, project: Project, database: str, drift: Drift) -> None:
    wanted = {(schema_name(n), c.name): c for n, c in project.versions.views() if c.database == database}
    live = {(r["schema"], r["view"]) for r in await conn.fetch(LIVE_VIEWS)}
    recorded = {(r["schema_name"], r["view_name"]): r["checksum"] for r in await conn.fetch(
        "SELECT schema_name, view_name, checksum FROM gatehouse.views")}
    schemas = {schema for schema, _ in wanted}
    live_schemas = {r["nspname"] for r in await conn.fetch(
        r"SELECT nspname FROM pg_namespace WHERE nspname ~ '^api_v[0-9]+$'")}
    for schema in sorted(live_schemas - schemas):
        drift.add(f"schema {schema} serves no API version of the project (apply drops it)")
    for (schema, view), contract in sorted(wanted.items()):
        if (schema, view) not in live:
            drift.add(f"view {schema}.{view} ({contract.label}) is missing")
        elif recorded.get((schema, view)) != contract.checksum:
            drift.add(f"view {schema}.{view} was made from another text of {contract.label} "
                      f"({contract.path.name} changed since the last apply)")
    for schema, view in sorted(live - set(wanted)):
        if schema in schemas:
            drift.add(f"view {schema}.{view} is not a contract of the project (apply drops it)")


async def _privileges(conn: asyncpg.Connection, project: Project, database: str, drift: Drift) -> None:
    pattern = app_role_pattern(project)
    wanted = desired_privileges(project, database)
    actual = {(r["grantee"], r["schema"], r["view"], r["privilege"])
              for r in await conn.fetch(VIEW_PRIVILEGES, pattern)}
    for role, schema, view, privilege in sorted(wanted - actual):
        drift.add(f"{drift.who(role)} lacks {privilege} on {schema}.{view}")
    for role, schema, view, privilege in sorted(actual - wanted):
        drift.add(f"{drift.who(role)} has {privilege} on {schema}.{view}, which gatehouse.toml does not grant")
    usage_wanted = {(role, schema) for role, schema, _, _ in wanted}
    usage = {(r["grantee"], r["schema"]) for r in await conn.fetch(SCHEMA_USAGE, pattern)}
    for role, schema in sorted(usage_wanted - usage):
        drift.add(f"{drift.who(role)} lacks USAGE on schema {schema}")
    for role, schema in sorted(usage - usage_wanted):
        drift.add(f"{drift.who(role)} has USAGE on schema {schema}, which it does not need")
    sequences: set[tuple[str, str, str]] = set()
    for role, schema, view, privilege in wanted:
        if privilege == "INSERT":
            for row in await conn.fetch(SEQUENCES_BEHIND_VIEW, qualified(schema, view)):
                sequences.add((role, row["schema"], row["sequence"]))
    granted = {(r["grantee"], r["schema"], r["sequence"]) for r in await conn.fetch(SEQUENCE_USAGE, pattern)}
    for role, schema, sequence in sorted(sequences - granted):
        drift.add(f"{drift.who(role)} lacks USAGE on sequence {schema}.{sequence} (its inserts fail)")
    for role, schema, sequence in sorted(granted - sequences):
        drift.add(f"{drift.who(role)} has USAGE on sequence {schema}.{sequence}, which it does not need")


async def find_drift(conn: asyncpg.Connection, project: Project, database: str) -> list[str]:
    """Every difference between the database and what ``gatehouse apply`` makes (empty: applied)."""
    drift = Drift(project)
    await _roles(conn, project, drift)
    await _views(conn, project, database, drift)
    await _privileges(conn, project, database, drift)
    if not drift.lines:
        stored = await conn.fetchval("SELECT value FROM gatehouse.state WHERE key = 'fingerprint'")
        if stored != project_fingerprint(project, database):
            drift.add("the project changed since the last apply (its recorded fingerprint differs), so running "
                      "servers report not ready")
    return drift.lines


async def applied(conn: asyncpg.Connection, project: Project, database: str) -> Outcome:
    """Check 5: the project applied (roles, grants, views match) and no migration pending."""
    pending = [m.label for m in await pending_migrations(conn, project.migrations_dir(database))]
    has_schema = await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = 'gatehouse'")
    if not has_schema:
        return fail("the project was never applied to this database (it has no gatehouse schema)",
                    hint="run `gatehouse migrate` and `gatehouse apply`",
                    data={"drift": [], "pending_migrations": pending})
    lines = await find_drift(conn, project, database)
    data = {"drift": lines, "pending_migrations": pending}
    waiting = [f"migration {label} is pending" for label in pending]
    if lines:
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        return fail(f"{len(lines)} difference{'s' if len(lines) > 1 else ''} from what `gatehouse apply` makes: "
                    f"{lines[0]}{more}", details=(lines + waiting)[:MAX_DETAILS], data=data,
                    hint="run `gatehouse apply` to make the database match the project"
                         + (" (after `gatehouse migrate`)" if pending else "")
                         + "; whoever changed it by hand should change gatehouse.toml instead")
    if pending:
        return warn(f"{len(pending)} migration{'s are' if len(pending) > 1 else ' is'} pending: {', '.join(pending)}",
                    hint="run `gatehouse migrate` (then `gatehouse apply`)", details=waiting, data=data)
    apps = sum(1 for app in project.apps.values() if any(
        project.database_of(g.contract) == database for g in app.config.grants))
    views = sum(1 for _, c in project.versions.views() if c.database == database)
    return ok(f"roles, grants and views match the project ({views} views, {apps} apps with grants here)", data=data)
