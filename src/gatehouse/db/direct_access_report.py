"""Direct SQL access for BI tools, what an access role can reach and how it is used: the exposure checks (and
the notes ``access create`` prints about them), and ``access list``'s / ``versions``' view of every access role,
its sessions now and its statements."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from gatehouse.db.direct_access_plan import REPLICA_TIMEOUT_S, AccessPlan, existing_roles, replica_urls
from gatehouse.db.targets import resolve_targets
from gatehouse.project import Project

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
            for role in await existing_roles(conn, project, name):
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
