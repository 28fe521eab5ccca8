"""The order of ``gatehouse doctor``'s checks, and running them for a project.

Per database, in the order a person would look (each step needs the ones it names):

====  =================  ======================================================  ==================
step  check              question                                                needs
====  =================  ======================================================  ==================
1     ``reach``          DNS and TCP to the database's host, and each replica's  -
2     ``login``          the owner (the URL's user) logs in                      reach
3     ``tls``            the connection is encrypted                             login
4     ``authenticator``  ``serve``'s login role logs in                          reach
5     ``database``       the database exists and accepts writes                  login
6     ``applied``        roles, grants and views are what ``apply`` makes        database
7     ``headroom``       max_connections against every pool on the server        login
8     ``replica``        each replica: streaming, replaying, how far behind      its reach
9     ``disk``           the database's size, the data directory's free space    login
10    ``transactions``   transactions open longer than ``--long``                database
11    ``locks``          statements waiting for a lock, and who holds it         database
12    ``slow``           the slowest statements per app                          database
13    ``pools``          each app's connections against its pool_size            database
====  =================  ======================================================  ==================
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path

from gatehouse.db.targets import resolve_targets
from gatehouse.errors import DatabaseUnavailable, ProjectError
from gatehouse.observe import doctor_activity, doctor_capacity
from gatehouse.observe.doctor import Check, Options, Outcome, Report, Result, run_checks
from gatehouse.observe.doctor_checks import DatabaseProbe
from gatehouse.observe.doctor_drift import applied
from gatehouse.observe.doctor_replicas import ReplicaProbe
from gatehouse.project import Project, load_project

START_TIMEOUT_S = 60.0
"""Finding the databases may start the embedded server: that gets longer than one check."""


def plan(probes: list[DatabaseProbe], replicas: dict[str, list[ReplicaProbe]]) -> list[Check]:
    """Every check of every database, in order."""
    servers: dict[str, list[str]] = {}
    for probe in probes:
        servers.setdefault(probe.server, []).append(probe.name)
    checks: list[Check] = []
    for probe in probes:
        db = probe.name
        reach, login, database = ("reach", db), ("login", db), ("database", db)
        same_server = servers[probe.server]
        checks.append(Check("reach", "DNS and TCP", db, probe.reach))
        checks += [Check("reach", "DNS and TCP", r.target, r.reach) for r in replicas[db]]
        checks += [
            Check("login", "owner login", db, probe.login, (reach,), probe.drop),
            Check("tls", "TLS", db, probe.tls, (login,), probe.drop),
            Check("authenticator", "authenticator login", db, probe.authenticator, (reach,)),
            Check("database", "database exists", db, probe.database, (login,), probe.drop),
            Check("applied", "project applied", db, partial(_applied, probe), (database,), probe.drop),
            Check("headroom", "connection headroom", db, partial(doctor_capacity.headroom, probe, same_server),
                  (login,), probe.drop),
        ]
        checks += [Check("replica", "replication", r.target, r.state, (("reach", r.target),), r.drop)
                   for r in replicas[db]]
        checks += [
            Check("disk", "disk", db, partial(doctor_capacity.disk, probe), (login,), probe.drop),
            Check("transactions", "long transactions", db, partial(doctor_activity.transactions, probe),
                  (database,), probe.drop),
            Check("locks", "lock waits", db, partial(doctor_activity.locks, probe), (database,), probe.drop),
            Check("slow", "slow statements", db, partial(doctor_activity.slow, probe), (database,), probe.drop),
            Check("pools", "pool saturation", db, partial(doctor_capacity.pools, probe), (database,), probe.drop),
        ]
    return checks


async def _applied(probe: DatabaseProbe) -> Outcome:
    return await applied(probe.connection(), probe.project, probe.name)


def _unstarted(project: str, check: str, title: str, exc: Exception) -> Report:
    hint = getattr(exc, "hint", None) or getattr(exc, "check", None)
    message = str(exc.args[0]) if exc.args else str(exc)
    where = getattr(exc, "where", None)
    return Report(project, (Result(check, title, project, "fail", f"{where}: {message}" if where else message,
                                   hint),))


DEFAULTS = Options()


async def diagnose(project: Project, options: Options = DEFAULTS,
                   on_result: Callable[[Result], None] | None = None) -> Report:
    """Run every check for the project's databases (or those in ``options.databases``)."""
    unknown = [name for name in options.databases if name not in project.config.databases]
    if unknown:
        raise ProjectError(f"no database named {unknown[0]!r} in gatehouse.toml",
                           hint=f"declared databases: {', '.join(project.config.databases)}")
    try:
        targets = await asyncio.wait_for(resolve_targets(project), max(START_TIMEOUT_S, options.timeout_s))
    except (ProjectError, DatabaseUnavailable, TimeoutError) as exc:
        if isinstance(exc, TimeoutError):
            exc = DatabaseUnavailable(f"the embedded server did not start within {START_TIMEOUT_S:g} s")
        return _unstarted(project.name, "settings", "settings", exc)
    chosen = [t for name, t in targets.items() if not options.databases or name in options.databases]
    probes = [DatabaseProbe(project, target, options) for target in chosen]
    replicas = {p.name: [ReplicaProbe(p, i, ref) for i, ref in enumerate(p.config.replicas)] for p in probes}
    try:
        results = await run_checks(plan(probes, replicas), options, on_result)
    finally:
        for probe in probes:
            await probe.close()
    return Report(project.name, tuple(results), options)


async def diagnose_folder(folder: Path, options: Options = DEFAULTS,
                          on_result: Callable[[Result], None] | None = None) -> Report:
    """:func:`diagnose` for a project folder; a project that does not load is the one failed check."""
    try:
        project = await asyncio.to_thread(load_project, folder)
    except ProjectError as exc:
        return _unstarted(folder.name, "project", "project loads", exc)
    return await diagnose(project, options, on_result)
