"""The response cache: a read of a cached contract is answered from memory while its data is unchanged.

``[contracts.products] cache = "30s"`` (optionally ``cache_apps = ["web"]``) caches the reads of a contract.
What keeps it from ever being wrong:

* **The key holds everything that shapes the answer**: the read's route (app, API version, contract, format,
  the ``Prefer`` options a read uses, ``Range``: one route per distinct set of those, see ``routes.py``), the
  row filters with the caller's claims bound in, and the query string (parameters in a canonical order).
  Two apps never share an entry (the app is in the route), nor two tenants of one app (their claims are in
  the filters). The ETag is a digest of the same inputs plus the data versions, plus the project's
  generation, so it means the same on every instance.
* **An entry is tied to the data versions of its contract's base tables** (:mod:`.tables`), read in the
  same statement as its rows; it is served only while those are still the versions this instance knows
  (:mod:`.versions`): never after this instance's own write, never later than the poll bound after anyone
  else's. The ``cache`` duration is only a backstop.

HTTP: every answer of a cached contract has an ``ETag`` and ``Cache-Status`` (RFC 9211: ``hit``, or
``fwd=miss|stale|bypass`` with ``stored`` when kept), and ``Cache-Control: private, no-cache`` unless the
contract sets ``client_max_age``: a client (a browser) keeps the answer but asks again with
``If-None-Match``, which is answered ``304`` without running the query while the data is unchanged. A client
cache that served answers for ``max-age`` seconds on its own would show an app stale data after its own
write, which the server-side cache never does.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from gatehouse.cache.store import Entry, EntryStore
from gatehouse.cache.tables import SCHEMA, ViewLineage
from gatehouse.cache.versions import DataVersions, TableId
from gatehouse.config import parse_duration
from gatehouse.contracts.versions import schema_name
from gatehouse.http.exchange import HttpRequest, HttpResponse
from gatehouse.http.render import READ_VARY
from gatehouse.project import App, Project
from gatehouse.query.tree import Condition
from gatehouse.routes import ReadRoute

if TYPE_CHECKING:  # redis-py takes ~0.2 s to import: only a project with [redis] url pays for it
    from gatehouse.cache.shared_tier import SharedTier

CACHEABLE_STATUS = frozenset({200, 206})
T = TypeVar("T")

Filters = tuple[tuple[str, tuple[Condition, ...]], ...]
Counts = dict[tuple[str, str, str], int]
"""(app, contract, result) → how many reads had that result: hit, revalidated (304), miss, stale, bypass."""


def canonical_query(query_string: str) -> str:
    """The parameters ordered by name; the order of one name's repeated values is kept (it can matter)."""
    if "&" not in query_string:
        return query_string
    return "&".join(sorted(query_string.split("&"), key=lambda pair: pair.partition("=")[0]))


@dataclass(frozen=True, slots=True)
class CachedView:
    """A served contract version whose reads are cached."""

    label: str
    database: str
    tables: tuple[TableId, ...]
    relids: tuple[int, ...]
    ttl: float
    apps: frozenset[str] | None
    cache_control: str


class Fill:
    """A read of a cached contract that the cache could not answer: its query reads the data versions too,
    and :meth:`keep` stores and labels its answer."""

    __slots__ = ("_cache", "_epochs", "_key", "_result", "current", "view")

    def __init__(self, cache: ResponseCache, view: CachedView, key: tuple[object, ...], result: str,
                 current: tuple[int, ...] | None = None) -> None:
        self._cache, self.view, self._key, self._result = cache, view, key, result
        self._epochs = cache.versions.epochs(view.tables)
        self.current = current
        """The versions an entry in the Redis tier must have been read at; None when that tier is not asked."""

    async def from_shared(self, request: HttpRequest) -> HttpResponse | None:
        """The answer another instance stored for these inputs at the versions this instance knows now."""
        cache, view, current = self._cache, self.view, self.current
        assert cache.shared is not None and current is not None
        app = str(self._key[0])
        entry = await cache.shared.get(cache.etag(self._key, current), current)
        if entry is None or cache.versions.current(view.database, view.tables) != current:
            cache.count(app, view.label, "miss")  # (or the versions moved while Redis answered)
            return None
        cache.count(app, view.label, "hit")
        cache.store.put(self._key, entry)
        return cache.answer(request, entry, "gatehouse; hit; detail=shared")

    def sql(self, sql: str, params: Sequence[object]) -> tuple[str, list[object]]:
        """The read's SQL with the data versions of its tables as one more column, from the same snapshot."""
        return self._cache.versioned_sql(sql, len(params) + 1), [*params, list(self.view.relids)]

    def keep(self, response: HttpResponse, versions: list[int], rows: int | None,
             redacted_query: str | None) -> HttpResponse:
        """Label the answer (ETag, Cache-Status, Cache-Control) and store it if it may be served again."""
        cache, view = self._cache, self.view
        read = tuple(versions)
        etag = cache.etag(self._key, read)
        stored = (response.status in CACHEABLE_STATUS and cache.versions.filled(view.tables, self._epochs, read)
                  and self._result != "bypass" and len(response.body) <= cache.max_entry_bytes)
        headers = response.headers
        headers["ETag"] = etag
        headers["Cache-Control"] = view.cache_control
        headers["Vary"] = READ_VARY
        if stored:
            entry = Entry(response.status, tuple(headers.items()), response.body, response.media_type, rows,
                          redacted_query, read, cache.clock() + view.ttl, etag)
            cache.store.put(self._key, entry)
            if cache.shared is not None:
                cache.shared.put(entry, view.ttl)
        headers["Cache-Status"] = f"gatehouse; fwd={self._result}{'; stored' if stored else ''}"
        return response


class ResponseCache:
    """The cached contracts of the project being served, their entries, and the counts of their results."""

    def __init__(self, versions: DataVersions, *, max_bytes: int, max_entry_bytes: int,
                 shared: SharedTier | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.versions = versions
        self.shared = shared
        """The Redis tier, when ``[redis] url`` is set."""
        self.store = EntryStore(max_bytes)
        self.max_entry_bytes = max_entry_bytes
        self.clock = clock
        self.counts: Counts = {}
        self._views: dict[tuple[int, str], CachedView] = {}
        self._written: dict[tuple[int, str], tuple[TableId, ...]] = {}
        self._wrapped: dict[str, str] = {}
        self._generation = ""

    @property
    def active(self) -> bool:
        return bool(self._views)

    def install(self, project: Project, lineages: Mapping[str, Mapping[tuple[str, str], ViewLineage]]) -> list[str]:
        """A new generation of the project: which contract versions are cached, what each reads; entries of
        the previous generation are dropped. Returns why a contract with a ``cache`` setting is not cached."""
        views: dict[tuple[int, str], CachedView] = {}
        written: dict[tuple[int, str], tuple[TableId, ...]] = {}
        refused: list[str] = []
        settings = project.config.contracts
        for number, contract in project.versions.views():
            lineage = lineages.get(contract.database, {}).get((schema_name(number), contract.name))
            tables = tuple((contract.database, t.relid) for t in lineage.tables) if lineage is not None else ()
            written[(number, contract.name)] = tables
            setting = settings.get(contract.name)
            if setting is None or not setting.cache:
                continue
            why = "PostgreSQL does not serve it yet" if lineage is None else lineage.uncacheable
            if why is not None:
                refused.append(f"{contract.label} in v{number} is not cached: {why}")
                continue
            assert lineage is not None
            max_age = setting.client_max_age
            views[(number, contract.name)] = CachedView(
                f"{contract.label}", contract.database, tables, tuple(t.relid for t in lineage.tables),
                parse_duration(setting.cache), None if setting.cache_apps is None else frozenset(setting.cache_apps),
                "private, no-cache" if max_age is None else f"private, max-age={int(parse_duration(max_age))}")
        self._views, self._written, self._wrapped = views, written, {}
        self._generation = hashlib.blake2b(project.config.model_dump_json().encode() + "".join(
            sorted(c.checksum for _, c in project.versions.views())).encode(), digest_size=8).hexdigest()
        self.store.clear()
        self.versions.track(table for view in views.values() for table in view.tables)
        return refused

    def consult(self, request: HttpRequest, app: App, route: ReadRoute, filters: Filters) -> HttpResponse | Fill | None:
        """The cached answer (200/206, or 304 for a matching ``If-None-Match``), a :class:`Fill` when the
        read must run, or None when the contract is not cached for this app. A hit sets the request's
        ``rows`` label from the entry."""
        view = self._views.get((route.version, route.contract.name))
        if view is None or (view.apps is not None and app.name not in view.apps):
            return None
        key = (app.name, route, filters, canonical_query(request.query_string))
        current = self.versions.current(view.database, view.tables)
        if current is None:
            return self._count(app, view, "bypass", Fill(self, view, key, "bypass"))
        asked = request.headers.get("if-none-match")
        entry = self.store.get(key)
        if entry is not None:
            if entry.versions == current and entry.expires > self.clock():
                if asked is not None and _matches(asked, entry.etag):
                    return self._count(app, view, "revalidated", self._not_modified(view, entry.etag))
                self._count(app, view, "hit", None)
                return self.answer(request, entry, "gatehouse; hit")
            self.store.drop(key)
            return self._count(app, view, "stale", Fill(self, view, key, "stale"))
        if asked is not None:
            etag = self.etag(key, current)
            if _matches(asked, etag):
                return self._count(app, view, "revalidated", self._not_modified(view, etag))
        if self.shared is not None:  # counted as a hit or a miss once Redis has answered
            return Fill(self, view, key, "miss", current)
        return self._count(app, view, "miss", Fill(self, view, key, "miss"))

    def answer(self, request: HttpRequest, entry: Entry, status: str) -> HttpResponse:
        """An entry as the answer to ``request`` (which gets the entry's row count for the audit)."""
        labels = request.labels
        labels.rows, labels.redacted_query = entry.rows, entry.redacted_query
        headers = dict(entry.headers)
        headers["Cache-Status"] = f"{status}; ttl={max(0, int(entry.expires - self.clock()))}"
        return HttpResponse(entry.status, headers, entry.body, entry.media_type)

    def count(self, app: str, contract: str, result: str) -> None:
        key = (app, contract, result)
        self.counts[key] = self.counts.get(key, 0) + 1

    def wrote(self, version: int, contract: str, database: str) -> None:
        """A write through this contract committed (or failed): its tables are dirty at once."""
        tables = self._written.get((version, contract))
        if tables:
            self.versions.wrote(tables)
        else:
            self.versions.wrote_database(database)

    def etag(self, key: tuple[object, ...], versions: tuple[int, ...]) -> str:
        """A weak validator: the same inputs and the same data versions give the same tag on every instance."""
        app, route, filters, query = key
        assert isinstance(route, ReadRoute)
        inputs = (self._generation, app, route.version, route.contract.label, route.fmt, route.count_mode,
                  route.requested, filters, query, versions)
        return f'W/"{hashlib.blake2b(repr(inputs).encode(), digest_size=12).hexdigest()}"'

    def versioned_sql(self, sql: str, param: int) -> str:
        wrapped = self._wrapped.get(sql)
        if wrapped is None:
            wrapped = self._wrapped[sql] = (
                f"SELECT _gh_read.*, ARRAY(SELECT coalesce(sum(d.v), 0)::int8 FROM unnest(${param}::oid[]) "
                f"WITH ORDINALITY AS t(relid, i) LEFT JOIN {SCHEMA}.data_versions d ON d.relid = t.relid "
                f"GROUP BY t.i ORDER BY t.i) AS _gh_versions FROM ({sql}) AS _gh_read")
            if len(self._wrapped) > 4096:
                self._wrapped.clear()
        return wrapped

    def _not_modified(self, view: CachedView, etag: str) -> HttpResponse:
        return HttpResponse(304, {"ETag": etag, "Cache-Control": view.cache_control, "Vary": READ_VARY,
                                  "Cache-Status": "gatehouse; hit; detail=not-modified"})

    def _count(self, app: App, view: CachedView, result: str, answer: T) -> T:
        self.count(app.name, view.label, result)
        return answer


def _matches(asked: str, etag: str) -> bool:
    """``If-None-Match``: ``*`` or a list of tags, compared weakly (RFC 9110 §13.1.2)."""
    if asked.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in asked.split(","))
