"""The live state of one server: databases, pools, keys, schema cache, metrics.

Opened once by the app's lifespan and read by every request; the request path never creates any of it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg

from gatehouse.auth.failures import FailureThrottle
from gatehouse.auth.identity import KeyRing
from gatehouse.auth.jwt import JwtVerifier
from gatehouse.contracts.versions import schema_name
from gatehouse.db.app_pools import AppPools, PoolOptions
from gatehouse.db.catalog import Constraint, ViewShape, load_catalog, load_constraints
from gatehouse.db.faults import is_dead
from gatehouse.db.sync import project_fingerprint
from gatehouse.db.targets import DatabaseTarget, resolve_targets
from gatehouse.errors import DatabaseUnavailable
from gatehouse.observe.audit import AuditWriter
from gatehouse.observe.metrics import Metrics
from gatehouse.project import Project
from gatehouse.query.plans import PlanCache, ReadPlan
from gatehouse.routes import ReadRoute
from gatehouse.schema_cache import ApiSchema, build_schemas

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 2.0


@dataclass
class Runtime:
    project: Project
    metrics: Metrics = field(default_factory=Metrics)
    targets: dict[str, DatabaseTarget] = field(default_factory=dict)
    pools: AppPools | None = None
    keys: KeyRing | None = None
    tokens: JwtVerifier | None = None
    audit: AuditWriter | None = None
    auth_failures: FailureThrottle = field(default_factory=lambda: FailureThrottle(30))
    catalog: dict[tuple[str, str], ViewShape] = field(default_factory=dict)
    schemas: dict[int, ApiSchema] = field(default_factory=dict)
    plans: PlanCache[ReadPlan] = field(default_factory=PlanCache)
    """Compiled reads per query shape; they depend on ``schemas``, so both are replaced together."""
    routes: PlanCache[ReadRoute] = field(default_factory=PlanCache)
    """What a read's app, path and headers decide (version, contract, format, preferences), per distinct set."""
    _internal: dict[str, asyncpg.Pool] = field(default_factory=dict)

    async def start(self) -> None:
        project = self.project
        self.auth_failures = FailureThrottle(project.config.server.auth_failures_per_minute)
        self.targets = await resolve_targets(project)
        constraints: dict[str, list[Constraint]] = {}
        try:
            for name, target in self.targets.items():
                pool = await asyncpg.create_pool(**target.authenticator_kwargs(), min_size=1, max_size=2)
                assert pool is not None
                self._internal[name] = pool
                async with pool.acquire() as conn:
                    self.catalog.update(await load_catalog(conn))
                    constraints[name] = await load_constraints(conn)
            self._check_applied()
            self.schemas = build_schemas(project, self.catalog, constraints)
            self.plans, self.routes = PlanCache(), PlanCache()
            home = self.targets[project.home_database]
            self.keys = KeyRing(set(project.apps))

            async def listen() -> asyncpg.Connection:
                return await asyncpg.connect(**home.authenticator_kwargs(),
                                             server_settings={"application_name": "gatehouse/keys"})

            await self.keys.start(self._internal[project.home_database], listen)
            if project.config.auth.issuers:
                self.tokens = JwtVerifier(project.config.auth, set(project.apps))
                await self.tokens.start()
            self.audit = self._audit_writer(home)
            self.audit.start()
            server = project.config.server
            self.pools = AppPools(PoolOptions(acquire_timeout_s=server.pool_timeout_ms / 1000,
                                              max_idle_s=server.pool_max_idle_s,
                                              max_lifetime_s=server.pool_max_lifetime_s))
            await self.pools.open(self.targets, project.apps, self._databases_of_apps())
        except asyncpg.InvalidAuthorizationSpecificationError:
            await self.stop()
            raise DatabaseUnavailable(
                f"the role {project.authenticator_role} cannot log in: run `gatehouse apply` first"
            ) from None
        except BaseException:
            await self.stop()
            raise

    def _databases_of_apps(self) -> dict[str, set[str]]:
        result: dict[str, set[str]] = {}
        for app in self.project.apps.values():
            dbs = {self.project.database_of(g.contract) for g in app.config.grants}
            dbs |= {self.project.functions[f].database or self.project.home_database for f in app.config.functions}
            result[app.name] = {db for db in dbs if db is not None}
        return result

    def _check_applied(self) -> None:
        missing = [
            f"{schema_name(n)}.{c.name}" for n, c in self.project.versions.views()
            if (schema_name(n), c.name) not in self.catalog
        ]
        if missing:
            raise DatabaseUnavailable(
                f"the database does not serve {', '.join(missing[:5])}"
                f"{' and more' if len(missing) > 5 else ''}: run `gatehouse apply` first"
            )

    def _audit_writer(self, home: DatabaseTarget) -> AuditWriter:
        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(**home.authenticator_kwargs(),
                                         server_settings={"application_name": "gatehouse/audit"})

        self.project.state_dir.mkdir(parents=True, exist_ok=True)
        return AuditWriter(connect, self.project.state_dir / "audit-spool.jsonl")

    async def stop(self) -> None:
        if self.audit is not None:  # first: flush while the database is still there
            await self.audit.stop()
        if self.keys is not None:
            await self.keys.stop()
        if self.tokens is not None:
            await self.tokens.stop()
        if self.pools is not None:
            await self.pools.close()
        await asyncio.gather(*(p.close() for p in self._internal.values()), return_exceptions=True)
        self._internal.clear()

    async def readiness(self) -> dict[str, str]:
        """Per database: 'ok', or what is wrong. Ready when every value is 'ok'.

        Each database is asked (all at once, each within ``READY_TIMEOUT_S``) on the internal pool, so the
        answer is the database's state now: not ready while it cannot be reached, ready again as soon as it
        answers, without a restart."""
        names = list(self._internal)
        answers = await asyncio.gather(*(self._applied(self._internal[name]) for name in names),
                                       return_exceptions=True)
        report: dict[str, str] = {}
        for name, applied in zip(names, answers, strict=True):
            if isinstance(applied, BaseException):
                if not isinstance(applied, Exception):
                    raise applied
                report[name] = f"unreachable ({type(applied).__name__})"
            else:
                expected = project_fingerprint(self.project, name)
                report[name] = "ok" if applied == expected else "project not applied: run `gatehouse apply`"
        return report

    @staticmethod
    async def _applied(pool: asyncpg.Pool) -> object:
        """The fingerprint ``apply`` left; asked twice if the pool's connection turns out dead (the database
        restarted since it was last used)."""
        async with asyncio.timeout(READY_TIMEOUT_S):
            for attempt in (1, 2):
                async with pool.acquire() as conn:
                    try:
                        return await conn.fetchval("SELECT value FROM gatehouse.state WHERE key = 'fingerprint'")
                    except Exception as exc:
                        if attempt == 2 or not is_dead(exc, conn):
                            raise
        raise AssertionError("not reached: the second attempt returns or raises")
