"""Room to work: connection headroom on the server, disk, and how full each app's pool is.

Headroom is the sum a person would do on paper. PostgreSQL lets ``max_connections`` minus the slots kept for
superusers (``superuser_reserved_connections``, and ``reserved_connections`` from 16 on) be used by ordinary
roles. Each gatehouse instance opens, per database, every app's pool (``quota.pool_size``) plus a few of its
own (:func:`gatehouse.db.headroom.pools_needed`); times ``--instances``; plus whatever other clients already
hold. Behind a transaction pooler (``pooler_url``) the apps' pools are the pooler's (``gatehouse pooler`` gives
each app's pooler database its ``pool_size``), shared by every instance: counted once. Over 80 % is a
warning, over 100 % a failure: some pool will not get its connections under load.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from gatehouse.db.headroom import apps_by_database, pools_needed
from gatehouse.observe.doctor import Outcome, bytes_text, fail, ok, percent_text, warn
from gatehouse.observe.doctor_checks import DOCTOR_APPLICATION, DatabaseProbe

WARN_AT, FAIL_AT = 0.80, 1.00
DISK_WARN_AT, DISK_FAIL_AT = 0.80, 0.95
async def headroom(probe: DatabaseProbe, same_server: list[str]) -> Outcome:
    """Check 6: max_connections against every pool of the project on this server, and others' connections."""
    conn = probe.connection()
    row = await conn.fetchrow(
        "SELECT current_setting('max_connections')::int AS max, "
        "current_setting('superuser_reserved_connections')::int AS superuser, "
        "coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int AS reserved, "
        "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "   AND pid <> pg_backend_pid() AND usename IS DISTINCT FROM $1 "
        "   AND application_name IS DISTINCT FROM $2)::int AS others", probe.target.authenticator,
        DOCTOR_APPLICATION)
    assert row is not None
    instances = probe.options.instances
    pools, own, per_app = pools_needed(probe.project, same_server)
    available = row["max"] - row["superuser"] - row["reserved"]
    pooled = probe.target.pooler_dsn is not None
    need = (own + (0 if pooled else pools)) * instances + (pools if pooled else 0) + row["others"]
    share = need / available if available > 0 else float("inf")
    here = f" (databases {', '.join(same_server)})" if len(same_server) > 1 else ""
    times = f"times {instances} instance{'s' if instances != 1 else ''}"
    sums = (f"gatehouse's own {own} {times}, + the pooler's pools {pools} (once: shared by every instance)"
            if pooled else f"pools {pools} + gatehouse's own {own}, {times}")
    reason = f"{need} of {available} connections ({percent_text(share)}): {sums}, + {row['others']} in use by " \
             f"other clients{here}"
    data = {"max_connections": row["max"], "reserved": row["superuser"] + row["reserved"], "available": available,
            "pools": pools, "own": own, "instances": instances, "others": row["others"], "needed": need,
            "share": round(share, 4), "pool_size": per_app}
    largest = ", ".join(f"{name} {size}" for name, size in sorted(per_app.items(), key=lambda i: -i[1])[:5])
    hint = (f"raise max_connections on the server (now {row['max']}), lower the apps' quota.pool_size "
            f"(largest: {largest or 'none'}), or run fewer instances; a pooler (PgBouncer) in front also helps")
    if share > FAIL_AT:
        return fail(reason, hint=hint, data=data)
    if share > WARN_AT:
        return warn(reason, hint=hint, data=data)
    return ok(reason, data=data)


def _own_data_directory(path: str, port: int) -> bool:
    """Is ``path`` this server's data directory, seen from here? (A server in a container reached on
    127.0.0.1 has one that is not this machine's.) Its postmaster.pid names the port it listens on."""
    try:
        lines = (Path(path) / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) > 3 and lines[3].strip() == str(port)


async def disk(probe: DatabaseProbe) -> Outcome:
    """Check 8: the database's size, and free space of the data directory when the server is on this machine."""
    conn = probe.connection()
    size = await conn.fetchval("SELECT pg_database_size(current_database())")
    name = probe.address.database
    sized = f"database {name!r} takes {bytes_text(size)}" if not probe.database_missing else "no database yet"
    data: dict[str, object] = {"database_bytes": size}
    if not probe.local:
        return ok(f"{sized}; the server is not on this machine, so its free space is not checked here", data=data,
                  hint="watch the disk on the server itself (or its provider's metrics)")
    directory = await conn.fetchval("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
    port = int(await conn.fetchval("SELECT current_setting('port')"))
    if directory is None:
        return ok(f"{sized}; the data directory is not shown to {probe.address.user or 'this user'}, so its free "
                  "space is not checked", data=data,
                  hint="GRANT pg_read_all_settings to the owner to let doctor check the disk")
    if not await asyncio.to_thread(_own_data_directory, directory, port):
        return ok(f"{sized}; the data directory {directory} is not readable from here (another machine or a "
                  "container), so its free space is not checked", data=data)
    usage = await asyncio.to_thread(shutil.disk_usage, directory)
    used = usage.used / (usage.used + usage.free) if usage.used + usage.free else 0.0
    data |= {"data_directory": directory, "disk_total_bytes": usage.total, "disk_free_bytes": usage.free,
             "disk_used": round(used, 4)}
    reason = f"{sized}; the disk of {directory} is {percent_text(used)} full ({bytes_text(usage.free)} free)"
    hint = (f"free space on {os.path.dirname(directory) or directory}'s disk or grow it; large tables and old WAL "
            "(a stuck replication slot keeps it) are the usual causes")
    if used > DISK_FAIL_AT:
        return fail(reason, hint=hint, data=data)
    if used > DISK_WARN_AT:
        return warn(reason, hint=hint, data=data)
    return ok(reason, data=data)


async def pools(probe: DatabaseProbe) -> Outcome:
    """Check 11: each app's connections in pg_stat_activity against its pool_size: all busy is a warning."""
    conn = probe.connection()
    rows = await conn.fetch(
        "SELECT substr(application_name, 11) AS app, count(*)::int AS connections, "
        "count(*) FILTER (WHERE state = 'active')::int AS active "
        "FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'gatehouse/%' "
        "GROUP BY 1")
    seen = {r["app"]: (r["connections"], r["active"]) for r in rows}
    instances = probe.options.instances
    using = apps_by_database(probe.project).get(probe.name, [])
    lines, full, over = [], [], []
    data: dict[str, dict[str, int]] = {}
    for name in sorted(using):
        size = probe.project.apps[name].config.quota.pool_size
        connections, active = seen.get(name, (0, 0))
        data[name] = {"connections": connections, "active": active, "pool_size": size}
        lines.append(f"{name}: {connections} connection{'s' if connections != 1 else ''} ({active} active) of "
                     f"{size} per instance")
        if connections > size * instances:
            over.append(name)
        elif connections >= size and active == connections:
            full.append(name)
    if not any(seen.get(name) for name in using):
        return ok("no gatehouse server is connected to this database now (nothing to measure)",
                  data={"apps": data})
    if full or over:
        said = [f"every connection of {', '.join(full)} is busy: requests wait for one" if full else "",
                f"{', '.join(over)} hold more connections than {instances} instance(s) may open" if over else ""]
        return warn("; ".join(s for s in said if s), details=lines, data={"apps": data},
                    hint="raise the app's quota.pool_size (within the headroom above) or find its slow statements "
                         "below" + ("; pass --instances with the number of gatehouse instances" if over else ""))
    return ok("; ".join(lines), data={"apps": data})
