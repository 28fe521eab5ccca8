"""What the database is busy with: long transactions, statements waiting for a lock, and the slowest statements
per application.

Each session is put to its app the way gatehouse marks them: its pools connect with ``application_name``
``gatehouse/<app>`` (:func:`gatehouse.db.app_pools.application_name`) and run as the app's role
(``App.role``); other sessions are named by their user and ``application_name``. Statement texts are shown
on one line with their literal values masked (:func:`~gatehouse.observe.doctor.statement_text`).

Slow statements come from ``pg_stat_statements`` when it is installed in the database and loaded
(``shared_preload_libraries``): its ``userid`` is the role a statement ran as, so the app's role names the
app. Otherwise ``pg_stat_activity`` is sampled a few times, and active statements running longer than
``--slow`` are reported by ``application_name`` and user.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from gatehouse.db import quote_ident
from gatehouse.observe.doctor import Outcome, fail, ok, seconds_text, statement_text, warn
from gatehouse.observe.doctor_checks import DOCTOR_APPLICATION, DatabaseProbe
from gatehouse.project import Project

SAMPLES = 4
SAMPLE_SPACING_S = 0.15
TOP_PER_APP = 3
MAX_LISTED = 20
ACTIVITY_COLUMNS = """pid, usename, application_name, state, wait_event_type,
    extract(epoch FROM now() - xact_start)::float8 AS xact_s,
    extract(epoch FROM now() - query_start)::float8 AS query_s,
    left(query, 500) AS query"""
NOT_OURS = f"""datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
    AND application_name IS DISTINCT FROM '{DOCTOR_APPLICATION}'"""


def who(project: Project, user: str | None, application: str | None) -> str:
    """``app mobile``, or for a session that is no app's, its user and program: ``postgres (psql)``."""
    if application and application.startswith("gatehouse/"):
        name = application.removeprefix("gatehouse/")
        if name in project.apps:
            return f"app {name}"
    for app in project.apps.values():
        if user == app.role:
            return f"app {app.name}"
    if user == project.authenticator_role:
        return f"gatehouse ({application or 'no application_name'})"
    return f"{user or 'another user'}" + (f" ({application})" if application else "")


def _app_name(label: str) -> str | None:
    return label.removeprefix("app ") if label.startswith("app ") else None


def _session(project: Project, row: asyncpg.Record) -> str:
    return f"pid {row['pid']}, {who(project, row['usename'], row['application_name'])}"


async def transactions(probe: DatabaseProbe) -> Outcome:
    """Check 9a: transactions open longer than ``--long`` (they hold locks and keep vacuum from cleaning up)."""
    conn = probe.connection()
    long_s = probe.options.long_s
    rows = await conn.fetch(
        f"SELECT {ACTIVITY_COLUMNS} FROM pg_stat_activity WHERE {NOT_OURS} "
        "AND xact_start < now() - make_interval(secs => $1) ORDER BY xact_start LIMIT $2", long_s, MAX_LISTED)
    if not rows:
        return ok(f"no transaction has been open longer than {seconds_text(long_s)}", data={"transactions": []})
    items = [{"pid": r["pid"], "who": who(probe.project, r["usename"], r["application_name"]), "state": r["state"],
              "seconds": r["xact_s"]} for r in rows]
    lines = [f"{_session(probe.project, r)}: {r['state'] or 'state hidden'} in a transaction open for "
             f"{seconds_text(r['xact_s'])}: {statement_text(r['query'])}" for r in rows]
    oldest = rows[0]
    return warn(f"{len(rows)} transaction{'s' if len(rows) > 1 else ''} open longer than {seconds_text(long_s)}; "
                f"the oldest: {lines[0]}", details=lines, data={"transactions": items},
                hint=f"end it where it was opened, or SELECT pg_terminate_backend({oldest['pid']}); "
                     "idle_in_transaction_session_timeout ends forgotten ones for you")


async def locks(probe: DatabaseProbe) -> Outcome:
    """Check 9b: statements waiting for a lock, each with what it waits for and who holds it."""
    conn = probe.connection()
    waiting = await conn.fetch(
        f"SELECT {ACTIVITY_COLUMNS}, pg_blocking_pids(pid) AS blockers, "
        "(SELECT l.mode || coalesce(' on ' || l.relation::regclass::text, ' (' || l.locktype || ')') "
        " FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted LIMIT 1) AS wanted "
        f"FROM pg_stat_activity a WHERE {NOT_OURS} AND wait_event_type = 'Lock' "
        "AND cardinality(pg_blocking_pids(pid)) > 0 ORDER BY query_start LIMIT $1", MAX_LISTED)
    if not waiting:
        return ok("no statement is waiting for a lock", data={"waits": []})
    blocker_pids = sorted({pid for row in waiting for pid in row["blockers"]})
    blockers = {r["pid"]: r for r in await conn.fetch(
        f"SELECT {ACTIVITY_COLUMNS} FROM pg_stat_activity WHERE pid = ANY($1::int[])", blocker_pids)}
    project = probe.project
    lines, items = [], []
    for row in waiting:
        held_by = []
        for pid in row["blockers"]:
            blocker = blockers.get(pid)
            if blocker is None:
                held_by.append(f"pid {pid}")
                continue
            state = blocker["state"] or "state hidden"
            open_for = (f", its transaction open for {seconds_text(blocker['xact_s'])}" if blocker["xact_s"] is not None
                        else "")
            held_by.append(f"{_session(project, blocker)} ({state}{open_for})")
        waits_s = row["query_s"] or 0.0
        lines.append(f"{_session(project, row)} waits {seconds_text(waits_s)} for {row['wanted'] or 'a lock'}, "
                     f"held by {', '.join(held_by)}: {statement_text(row['query'])}")
        items.append({"pid": row["pid"], "who": who(project, row["usename"], row["application_name"]),
                      "app": _app_name(who(project, row["usename"], row["application_name"])),
                      "seconds": waits_s, "lock": row["wanted"], "blocked_by": list(row["blockers"])})
    longest = max(item["seconds"] for item in items)
    first = waiting[0]["blockers"][0]
    report = fail if longest >= probe.options.long_s else warn
    return report(f"{len(waiting)} statement{'s wait' if len(waiting) > 1 else ' waits'} for a lock: {lines[0]}",
                  details=lines, data={"waits": items},
                  hint=f"pid {first} holds the lock: end its transaction where it was opened, or SELECT "
                       f"pg_terminate_backend({first}); a migration that needs an ACCESS EXCLUSIVE lock should set "
                       "lock_timeout")


async def _statements_table(conn: asyncpg.Connection) -> str | None:
    schema = await conn.fetchval("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                                 "WHERE e.extname = 'pg_stat_statements'")
    return f"{quote_ident(schema)}.pg_stat_statements" if schema else None


async def _from_statements(probe: DatabaseProbe, table: str) -> Outcome:
    project = probe.project
    roles = {app.role: app.name for app in project.apps.values()}
    rows = await probe.connection().fetch(
        "SELECT r.rolname AS role, s.calls, s.mean_exec_time / 1000 AS mean_s, s.max_exec_time / 1000 AS max_s, "
        f"left(s.query, 500) AS query FROM {table} s JOIN pg_roles r ON r.oid = s.userid "
        "WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND r.rolname = ANY($1) "
        "ORDER BY s.mean_exec_time DESC", list(roles))
    per_app: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        listed = per_app.setdefault(roles[row["role"]], [])
        if len(listed) < TOP_PER_APP:
            listed.append({"mean_s": row["mean_s"], "max_s": row["max_s"], "calls": row["calls"],
                           "statement": statement_text(row["query"])})
    lines = [f"app {app}: {seconds_text(s['mean_s'])} on average over {s['calls']} calls (at most "
             f"{seconds_text(s['max_s'])}): {s['statement']}" for app, listed in sorted(per_app.items())
             for s in listed]
    data = {"source": "pg_stat_statements", "apps": per_app}
    slow = sorted((s["mean_s"], app) for app, listed in per_app.items() for s in listed
                  if s["mean_s"] > probe.options.slow_s)
    if slow:
        mean_s, app = slow[-1]
        return warn(f"app {app}'s slowest statement takes {seconds_text(mean_s)} on average (pg_stat_statements), "
                    f"over --slow {seconds_text(probe.options.slow_s)}", details=lines, data=data, hint=SLOW_HINT)
    if not lines:
        return ok("pg_stat_statements has recorded no statement of the apps yet", data=data)
    return ok(f"no app's statements take longer than {seconds_text(probe.options.slow_s)} on average "
              "(pg_stat_statements)", details=lines, data=data)


SLOW_HINT = ("EXPLAIN ANALYZE the statement: an index on the columns it filters or sorts by, or a narrower contract, "
             "usually helps; the app's quota.statement_timeout_ms bounds it meanwhile")


async def _from_samples(probe: DatabaseProbe, note: str) -> Outcome:
    conn = probe.connection()
    project = probe.project
    seen: dict[tuple[int, object], asyncpg.Record] = {}
    spacing = min(SAMPLE_SPACING_S, probe.options.timeout_s / (3 * SAMPLES))  # well within the check's time
    for sample in range(SAMPLES):
        if sample:
            await asyncio.sleep(spacing)
        for row in await conn.fetch(
                f"SELECT {ACTIVITY_COLUMNS}, query_start FROM pg_stat_activity WHERE {NOT_OURS} "
                "AND state = 'active' AND query_start < now() - make_interval(secs => $1)", probe.options.slow_s):
            key = (row["pid"], row["query_start"])
            if key not in seen or row["query_s"] > seen[key]["query_s"]:
                seen[key] = row
    by_who: dict[str, list[asyncpg.Record]] = {}
    for row in sorted(seen.values(), key=lambda r: -r["query_s"]):
        by_who.setdefault(who(project, row["usename"], row["application_name"]), []).append(row)
    window = f"{SAMPLES} samples of pg_stat_activity over {seconds_text(spacing * (SAMPLES - 1))}"
    if not by_who:
        return ok(f"no statement ran longer than {seconds_text(probe.options.slow_s)} ({window}; {note})",
                  data={"source": "pg_stat_activity", "statements": []})
    lines = [f"{label}: pid {row['pid']} running for {seconds_text(row['query_s'])}: {statement_text(row['query'])}"
             for label, rows in by_who.items() for row in rows[:TOP_PER_APP]]
    items = [{"who": label, "app": _app_name(label), "pid": row["pid"], "seconds": row["query_s"],
              "statement": statement_text(row["query"])} for label, rows in by_who.items() for row in rows]
    return warn(f"{len(seen)} statement{'s' if len(seen) > 1 else ''} running longer than "
                f"{seconds_text(probe.options.slow_s)}: {lines[0]}", details=[*lines, f"({window}; {note})"],
                data={"source": "pg_stat_activity", "statements": items}, hint=SLOW_HINT)


async def slow(probe: DatabaseProbe) -> Outcome:
    """Check 10: the slowest statements per app (pg_stat_statements, else samples of pg_stat_activity)."""
    table = await _statements_table(probe.connection())
    if table is None:
        return await _from_samples(probe, "pg_stat_statements is not installed in this database")
    try:
        return await _from_statements(probe, table)
    except asyncpg.ObjectNotInPrerequisiteStateError:
        return await _from_samples(probe, "pg_stat_statements is installed but not in shared_preload_libraries")
    except asyncpg.InsufficientPrivilegeError:
        return await _from_samples(probe, f"{probe.address.user} may not read pg_stat_statements")
