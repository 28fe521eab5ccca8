"""The live state of one server: databases, pools, keys, schema cache, metrics.

Opened once by the app's lifespan and read by every request; the request path never creates any of it.
What the project and the databases say (the project, the catalog, the schemas and the plans compiled
against them) is replaced as one, when the server follows a change (:mod:`gatehouse.follow`): a request
takes :meth:`Runtime.pinned` once and sees one generation from start to end, never half of each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import asyncpg

from gatehouse.auth.failures import FailureThrottle
from gatehouse.auth.identity import KeyRing
from gatehouse.auth.jwt import JwtVerifier
from gatehouse.cache.responses import ResponseCache
from gatehouse.cache.tables import ViewLineage, read_lineage
from gatehouse.cache.versions import DataVersions
from gatehouse.contracts.versions import schema_name
from gatehouse.db.app_pools import AppPools, PoolOptions
from gatehouse.db.catalog import Constraint, ViewShape, load_catalog, load_constraints
from gatehouse.db.changes import current_revision
from gatehouse.db.headroom import INTERNAL_POOL_SIZE, SAGA_POOL_EXTRA, read_headroom
from gatehouse.db.replicas import ReplicaSet
from gatehouse.db.targets import DatabaseTarget, resolve_targets
from gatehouse.errors import DatabaseUnavailable, ProjectError
from gatehouse.events.mirror_runner import MirrorRunner
from gatehouse.events.outbox_metrics import OutboxCollector
from gatehouse.events.relay import Relays
from gatehouse.follow import Follower, Revisions
from gatehouse.limits.admission import InFlight, RateLimiter
from gatehouse.limits.fair import FairShare
from gatehouse.observe.alerts import AlertEvaluator
from gatehouse.observe.audit_writer import AuditWriter
from gatehouse.observe.db_metrics import PoolReading
from gatehouse.observe.metrics import Metrics
from gatehouse.observe.saga_metrics import SagaCollector
from gatehouse.project import Project, load_project
from gatehouse.query.compose import ComposedPlan
from gatehouse.query.plans import PlanCache, ReadPlan
from gatehouse.readiness import readiness_report
from gatehouse.routes import ReadRoute
from gatehouse.sagas.engine import SagaEngine
from gatehouse.schema_cache import ApiSchema, build_schemas
from gatehouse.write_plans import WriteTemplate

log = logging.getLogger(__name__)
_AUDIT_WRITABLE = ("SELECT CASE WHEN to_regclass('gatehouse.audit_minute') IS NOT NULL "
                   "THEN has_table_privilege('gatehouse.audit_minute', 'INSERT') ELSE false END")
"""Whether this server's role may store batches of audit records (a database applied by an older version may not)."""
Lineages = dict[str, dict[tuple[str, str], ViewLineage]]
"""database → (schema, view) → the base tables it reads."""


async def _end_transaction(conn: asyncpg.Connection) -> None:
    """What an internal connection needs when it goes back to its pool: nothing but a transaction left open ended.
    (asyncpg's default reset sends ``RESET ALL``, ``UNLISTEN *``... every time, a round trip per use; gatehouse's
    own code never leaves session state on these connections: LISTEN and session locks have connections of their
    own.)"""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


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
    limiter: RateLimiter = field(default_factory=RateLimiter)
    in_flight: InFlight = field(default_factory=lambda: InFlight(0.2))
    fair: FairShare = field(default_factory=FairShare.off)
    """The work slots all apps share, by turns (limits/fair.py)."""
    catalog: dict[tuple[str, str], ViewShape] = field(default_factory=dict)
    schemas: dict[int, ApiSchema] = field(default_factory=dict)
    plans: PlanCache[ReadPlan] = field(default_factory=PlanCache)
    """Compiled reads per query shape; they depend on ``schemas``, so both are replaced together."""
    composed: PlanCache[ComposedPlan] = field(default_factory=PlanCache)
    """Reads with embeds across databases (query/compose.py), per query shape; replaced with ``schemas`` too."""
    routes: PlanCache[ReadRoute] = field(default_factory=PlanCache)
    """What a read's app, path and headers decide (version, contract, format, preferences), per distinct set."""
    writes: PlanCache[WriteTemplate] = field(default_factory=PlanCache)
    """Plain inserts' plans, per request shape (``write_plans``); replaced with ``schemas`` too."""
    cache: ResponseCache = field(default_factory=lambda: ResponseCache(DataVersions(0.1), max_bytes=0,
                                                                       max_entry_bytes=0))
    """Answers of cached contracts, valid while their tables' data versions are unchanged."""
    replicas: ReplicaSet = field(default_factory=ReplicaSet.none)
    """The databases' streaming replicas, their lag and their per-app pools (db/replicas.py)."""
    follower: Follower | None = None
    mirrors: MirrorRunner | None = None
    """The local read copies kept from other contracts' events (events/mirror_runner.py); None without any."""
    relays: Relays | None = None
    """The event relays, one per (database, sink) (events/relay.py); None without sinks."""
    alerts: AlertEvaluator | None = None
    """The ``[alerts]`` rules, evaluated in the background (observe/alerts.py); None without rules."""
    sagas: SagaEngine | None = None
    """The saga engine (sagas/engine.py); None when ``logic/`` declares no saga."""
    run_sagas: bool = True
    """Whether :meth:`start` runs due sagas in the background (``LogicHarness`` drives them step by step)."""
    draining: bool = False
    """Set on SIGTERM (server/serve.py): ``/ready`` answers 503 while requests are still served."""
    _internal: dict[str, asyncpg.Pool] = field(default_factory=dict)

    def pinned(self) -> Runtime:
        """This runtime as a request sees it: the same pools, keys and writers, and the generation of project,
        catalog, schemas and plans of this moment, kept for the request's whole life. (A shallow copy of the
        attributes: 0.3 µs, where ``copy.copy`` takes 1.4 µs on every request.)"""
        view = object.__new__(Runtime)
        view.__dict__.update(self.__dict__)
        return view

    async def start(self) -> None:
        project = self.project
        self.auth_failures = FailureThrottle(project.config.server.auth_failures_per_minute)
        self.limiter = RateLimiter.from_config(project.config.redis)
        await self.limiter.start()  # never fails because of Redis: limits fall back to this instance's share
        shared = self.limiter.shared
        if shared is not None:
            self.metrics.watch_limits(lambda: {**dataclasses.asdict(shared.stats), "live": shared.live_instances,
                                               "breaker": shared.breaker_state,
                                               "breaker_opens": shared.breaker_opens})
        self.in_flight = InFlight(project.config.server.admission_wait_ms / 1000)
        self.fair = FairShare.for_project(project)
        self.metrics.watch_work(lambda: (self.fair.active, self.fair.queued, self.fair.waited))
        cache = project.config.cache
        shared_tier = None
        if project.config.redis.url is not None:
            from gatehouse.cache.shared_tier import SharedTier  # (imports redis-py: only when it is used)

            shared_tier = SharedTier.from_config(project.config.redis)
        self.cache = ResponseCache(DataVersions(cache.poll_ms / 1000), max_bytes=cache.max_bytes,
                                   max_entry_bytes=cache.max_entry_bytes, shared=shared_tier)
        store = self.cache.store
        self.metrics.watch_cache(lambda: self.cache.counts, lambda: (len(store), store.size))
        self.targets = await resolve_targets(project)
        try:
            size = INTERNAL_POOL_SIZE + (SAGA_POOL_EXTRA if project.sagas else 0)
            for name, target in self.targets.items():
                pool = await asyncpg.create_pool(**target.authenticator_kwargs(), min_size=1, max_size=size,
                                                 reset=_end_transaction)
                assert pool is not None
                self._internal[name] = pool
            if project.config.events:  # events waiting, per database
                self.metrics.registry.register(OutboxCollector(self._internal))
            seen = await self._revisions()
            catalog, constraints, lineages = await self._read_catalogs(lineage=_caches(project))
            missing = _missing_views(project, catalog)
            if missing:
                raise DatabaseUnavailable(f"the database does not serve {missing}: run `gatehouse apply` first")
            if not await self._internal[project.home_database].fetchval(_AUDIT_WRITABLE):
                raise DatabaseUnavailable("the database has no audit store this version of gatehouse writes to "
                                          "(gatehouse.audit_minute): run `gatehouse apply` first")
            self._install(project, catalog, constraints, lineages)
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
            options = PoolOptions(acquire_timeout_s=server.pool_timeout_ms / 1000, max_idle_s=server.pool_max_idle_s,
                                  max_lifetime_s=server.pool_max_lifetime_s, group_statements=server.group_statements)
            self.pools = AppPools(options)
            await self.pools.open(self.targets, project.apps, project.databases_of_apps())
            self.replicas = ReplicaSet.for_project(project, self.targets, options)
            await self.replicas.start(self._internal)
            await self._check_headroom(project)
            self.metrics.watch_databases(self._pool_readings, lambda: self.replicas.readings()[0],
                                         self.replicas.fallback_readings)
            self.follower = Follower({name: self._listen_to(target) for name, target in self.targets.items()},
                                     self._revisions, self.reload)
            await self.follower.start(seen)
            self.relays = Relays.for_runtime(self)  # ProjectError when a sink's url or secret variable is not set
            if self.relays is not None:
                await self.relays.start()
            self.mirrors = MirrorRunner.for_project(project, self.targets)
            if self.mirrors is not None:
                await self.mirrors.start()
            self.alerts = AlertEvaluator.for_runtime(self)  # ProjectError when a webhook's variable is not set
            if self.alerts is not None:
                await self.alerts.start()
            if project.sagas:
                self.sagas = SagaEngine(self, lease_s=project.config.server.saga_lease_s)
                self.metrics.registry.register(SagaCollector(self.sagas.stats, self._internal[project.home_database]))
                if self.run_sagas:
                    self.sagas.start_background()
        except asyncpg.InvalidAuthorizationSpecificationError:
            await self.stop()
            raise DatabaseUnavailable(
                f"the role {project.authenticator_role} cannot log in: run `gatehouse apply` first"
            ) from None
        except BaseException:
            await self.stop()
            raise

    def internal_pool(self, database: str) -> asyncpg.Pool:
        """gatehouse's own small pool on ``database`` (the authenticator, no app role): the catalog, readiness,
        the events feed's reads of the outbox."""
        return self._internal[database]

    def _pool_readings(self) -> list[PoolReading]:
        return [*(self.pools.readings() if self.pools is not None else ()), *self.replicas.readings()[1]]

    async def _check_headroom(self, project: Project) -> None:
        """Warn when the pools this instance may open do not fit a database server's ``max_connections``."""
        for name, pool in self._internal.items():
            try:
                async with pool.acquire() as conn:
                    warning = (await read_headroom(conn, project, name)).warning(f"database {name}")
            except (OSError, asyncpg.PostgresError) as exc:
                log.debug("could not read the connection budget of %s: %s", name, type(exc).__name__)
                continue
            if warning is not None:
                log.warning("%s", warning)

    def _listen_to(self, target: DatabaseTarget) -> Callable[[], Awaitable[asyncpg.Connection]]:
        async def listen() -> asyncpg.Connection:
            return await asyncpg.connect(**target.authenticator_kwargs(),
                                         server_settings={"application_name": "gatehouse/follow"})
        return listen

    async def _revisions(self) -> Revisions:
        revisions: Revisions = {}
        for name, pool in self._internal.items():
            async with pool.acquire() as conn:
                revisions[name] = await current_revision(conn)
        return revisions

    async def _read_catalogs(self, *, lineage: bool) -> tuple[dict[tuple[str, str], ViewShape],
                                                              dict[str, list[Constraint]], Lineages]:
        """The views, constraints and (when a contract is cached: it costs two recursive catalog queries per
        database) the base tables each view reads."""
        catalog: dict[tuple[str, str], ViewShape] = {}
        constraints: dict[str, list[Constraint]] = {}
        lineages: Lineages = {}
        for name, pool in self._internal.items():
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                catalog.update(await load_catalog(conn))
                constraints[name] = await load_constraints(conn)
                if lineage:
                    lineages[name] = await read_lineage(conn)
        return catalog, constraints, lineages

    def _install(self, project: Project, catalog: dict[tuple[str, str], ViewShape],
                 constraints: dict[str, list[Constraint]], lineages: Lineages) -> None:
        """Serve a new generation: all of it replaced in one step (no ``await`` in between)."""
        schemas = build_schemas(project, catalog, constraints)
        self.project, self.catalog, self.schemas = project, catalog, schemas
        self.plans, self.routes, self.composed, self.writes = PlanCache(), PlanCache(), PlanCache(), PlanCache()
        self.limiter.follow()
        for refused in self.cache.install(project, lineages):
            log.warning("%s", refused)
        self.cache.versions.start(self._internal)

    async def reload(self) -> None:
        """:meth:`_reload`, counted in the metrics by outcome."""
        try:
            outcome = await self._reload()
        except BaseException:
            self.metrics.reloaded("failed")
            raise
        self.metrics.reloaded(outcome)

    async def _reload(self) -> str:
        """Serve what the project folder and the databases say now (called by :class:`Follower`).

        The project folder is read again; if it does not load, or the databases do not serve it (this
        server's copy is older or newer than what was applied), the project served so far is kept, with the
        catalog read again (a migration may have changed a column's type). Settings that shape the server
        itself (``[server]``, ``[databases]``, ``[auth]``, ``[alerts]``, ``[events]``, ``[sinks]``, ``[mirrors]``)
        take effect at the next start (events and mirrors also need ``apply``)."""
        current = self.project
        try:
            project = await asyncio.to_thread(load_project, current.root)
        except ProjectError as exc:
            log.warning("the project folder does not load, so it is not reloaded: %s", exc)
            project = current
        for section in ("server", "databases", "auth", "alerts", "events", "sinks", "mirrors"):
            if getattr(project.config, section) != getattr(current.config, section):
                log.warning("[%s] changed in gatehouse.toml: it takes effect when the server restarts", section)
        if project.config.databases != current.config.databases:
            project = current
        catalog, constraints, lineages = await self._read_catalogs(lineage=_caches(project) or _caches(current))
        chosen = next((p for p in (project, current) if not _missing_views(p, catalog)), None)
        if chosen is None:
            log.warning("the database does not serve %s: keeping the schema cache until it does",
                        _missing_views(current, catalog))
            return "kept"
        if chosen is not current and self.pools is not None:  # a new app's pool is there before its first call
            await self.pools.update(self.targets, chosen.apps, chosen.databases_of_apps())
        self._install(chosen, catalog, constraints, lineages)
        if chosen is not current:
            await self._follow_apps(chosen)
        log.info("reloaded: %d API version(s), %d app(s)", len(chosen.versions.served), len(chosen.apps))
        same = chosen.config == current.config and chosen.contracts == current.contracts
        return "schema" if same else "project"

    async def _follow_apps(self, project: Project) -> None:
        """Apps added or removed: their keys and tokens follow (a removed app's credentials may pass in the
        moment before, and are then refused by ``pipeline.identify``, which finds no such app)."""
        apps = set(project.apps)
        if self.keys is not None:
            await self.keys.follow_apps(apps, self._internal[project.home_database])
        if self.tokens is not None and self.tokens.apps != apps:
            tokens = JwtVerifier(self.project.config.auth, apps)
            await tokens.start()
            old, self.tokens = self.tokens, tokens
            await old.stop()

    def _audit_writer(self, home: DatabaseTarget) -> AuditWriter:
        async def connect() -> asyncpg.Connection:
            return await asyncpg.connect(**home.authenticator_kwargs(),
                                         server_settings={"application_name": "gatehouse/audit"})

        self.project.state_dir.mkdir(parents=True, exist_ok=True)
        return AuditWriter(connect, self.project.state_dir / "audit-spool.jsonl")

    async def stop(self) -> None:
        if self.sagas is not None:  # first: its runs need the pools
            await self.sagas.stop()
            self.sagas = None
        if self.alerts is not None:
            await self.alerts.stop()
            self.alerts = None
        if self.mirrors is not None:
            await self.mirrors.stop()
            self.mirrors = None
        if self.relays is not None:
            await self.relays.stop()
            self.relays = None
        if self.follower is not None:
            await self.follower.stop()
        await self.cache.versions.stop()
        if self.cache.shared is not None:
            await self.cache.shared.close()
        await self.limiter.stop()
        if self.audit is not None:  # first: flush while the database is still there
            await self.audit.stop()
        if self.keys is not None:
            await self.keys.stop()
        if self.tokens is not None:
            await self.tokens.stop()
        await self.replicas.stop()
        if self.pools is not None:
            await self.pools.close()
        await asyncio.gather(*(p.close() for p in self._internal.values()), return_exceptions=True)
        self._internal.clear()

    async def readiness(self) -> dict[str, str]:
        """Per database: 'ok', or what is wrong (:func:`gatehouse.readiness.readiness_report`). Ready when every
        value is 'ok'."""
        return await readiness_report(self._internal, lambda: self.project, self.follower)


def _missing_views(project: Project, catalog: Mapping[tuple[str, str], ViewShape]) -> str:
    """The views ``project`` serves that the catalog lacks, for a message ('' when none)."""
    missing = [f"{schema_name(n)}.{c.name}" for n, c in project.versions.views()
               if (schema_name(n), c.name) not in catalog]
    return f"{', '.join(missing[:5])}{' and more' if len(missing) > 5 else ''}" if missing else ""


def _caches(project: Project) -> bool:
    """Does any contract of the project have a ``cache`` setting?"""
    return any(settings.cache for settings in project.config.contracts.values())
