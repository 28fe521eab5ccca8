"""Connection math: can the server take every pool gatehouse may open on it?

Each instance opens, per database server, at most the sum of its apps' ``pool_size`` (plus a few of its own:
the internal pool, the key and reload listeners, the audit writer, the replica checker). Several instances
multiply that. PostgreSQL refuses logins beyond ``max_connections`` minus the slots reserved for superusers,
and a refused login in the middle of a traffic peak is an outage, so the sum is checked at start and a
clear warning says how many instances like this one fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from gatehouse.db import Connection

OWN_CONNECTIONS = 6
"""What an instance opens besides the app pools, at most, on one server."""
BUDGET = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int
       + coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved,
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


async def read_headroom(conn: Connection, app_connections: int) -> Headroom:
    row = await conn.fetchrow(BUDGET)
    assert row is not None
    return Headroom(row["max_connections"], row["reserved"], row["others"], app_connections + OWN_CONNECTIONS)
