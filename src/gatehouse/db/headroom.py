"""Connection math: can the server take every pool gatehouse may open on it?

Each instance opens, per database, at most the sum of its apps' ``pool_size`` (plus a few of its own: the
catalog pool and the reload listener; in the home database the key listener and the audit writer too). Several instances
multiply that. PostgreSQL refuses logins beyond ``max_connections`` minus the slots reserved for superusers,
and a refused login in the middle of a traffic peak is an outage, so the sum is checked at start and a
clear warning says how many instances like this one fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from gatehouse.db import Connection
from gatehouse.project import Project

INTERNAL_POOL_SIZE = 2
"""gatehouse's own pool on each database (the catalog, readiness, the events feed...)."""
SAGA_POOL_EXTRA = 2
"""More in that pool on each database where sagas run: the runner records and settles runs on it."""
OWN_PER_DATABASE = INTERNAL_POOL_SIZE + 1
"""An instance's own connections to each database: its own pool and the listener that hears ``apply``."""
OWN_HOME = 2
"""More in the home database: the key listener and the audit writer."""


def apps_by_database(project: Project) -> dict[str, list[str]]:
    """database → the apps that have a pool on it (a grant on one of its contracts, or a logic function there)."""
    result: dict[str, list[str]] = {name: [] for name in project.config.databases}
    for app in project.apps.values():
        databases = {project.database_of(g.contract) for g in app.config.grants}
        databases |= {project.functions[f].database or project.home_database for f in app.config.functions
                      if f in project.functions}
        for database in databases:
            if database in result:
                result[database].append(app.name)
    return result


def pools_needed(project: Project, databases: list[str]) -> tuple[int, int, dict[str, int]]:
    """(app pools, gatehouse's own connections, pool size per app) of one instance over these databases."""
    using = apps_by_database(project)
    per_app: dict[str, int] = {}
    for database in databases:
        for name in using.get(database, []):
            per_app[name] = per_app.get(name, 0) + project.apps[name].config.quota.pool_size
    own = OWN_PER_DATABASE * len(databases) + (OWN_HOME if project.home_database in databases else 0)
    if project.sagas:
        own += SAGA_POOL_EXTRA * len(databases)
    return sum(per_app.values()), own, per_app


BUDGET = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int
       + coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int AS reserved,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'
            AND coalesce(application_name, '') NOT LIKE 'gatehouse/%')::int AS others
"""


@dataclass(frozen=True, slots=True)
class Headroom:
    max_connections: int
    reserved: int
    others: int
    """Client connections that are not gatehouse's, now."""
    per_instance: int

    @property
    def instances_that_fit(self) -> int:
        free = self.max_connections - self.reserved - self.others
        return max(0, free // self.per_instance) if self.per_instance else 0

    def warning(self, where: str, instances: int = 1) -> str | None:
        """A message when ``instances`` like this one would not fit (None when they do)."""
        if self.per_instance * instances <= self.max_connections - self.reserved - self.others:
            return None
        return (f"{where}: {instances} instance(s) may open {self.per_instance * instances} connections, but "
                f"max_connections is {self.max_connections} ({self.reserved} reserved, {self.others} used by "
                f"others): {self.instances_that_fit} instance(s) like this fit. Raise max_connections, lower the "
                "apps' pool_size, or put a pooler in front")


async def read_headroom(conn: Connection, project: Project, database: str) -> Headroom:
    """The budget of ``database``'s server against this instance's connections to that database."""
    row = await conn.fetchrow(BUDGET)
    assert row is not None
    pools, own, _ = pools_needed(project, [database])
    return Headroom(row["max_connections"], row["reserved"], row["others"], pools + own)
