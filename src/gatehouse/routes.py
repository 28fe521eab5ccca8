"""What a read's app, path and headers decide before its query is looked at: its :class:`ReadRoute` (API
version, contract, format, preferences, Range, the answer's own headers).

Each of those steps is a function of the app, the path, a few headers and the immutable project alone, so a
route is worked out once per distinct set of them and kept in ``Runtime.routes`` (a bounded LRU, beside the
compiled plans). A request that fails a step (404, 406, 416) caches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from gatehouse.access import choose_version, granted_contract, lifecycle_headers, readable_contracts
from gatehouse.contracts.model import ContractVersion
from gatehouse.http.exchange import HttpRequest
from gatehouse.http.negotiate import Format, Preferences, parse_prefer, range_header, response_format
from gatehouse.project import App, Project
from gatehouse.query.plans import PlanCache


@dataclass(frozen=True, slots=True, eq=False)
class ReadRoute:
    """What a read's app, path and headers decide before its query is looked at."""

    version: int
    contract: ContractVersion
    fmt: Format
    count_mode: str | None
    requested: tuple[int, int | None] | None
    readable: frozenset[str]
    headers: dict[str, str]
    """The answer's own headers (``Content-Profile``, a deprecated version's, ``Preference-Applied``); copied
    per request."""
    replicas: ReplicaPolicy | None = None
    """May a replica answer, and how old may its data be (None: the primary; or no replicas)."""


@dataclass(frozen=True, slots=True)
class ReplicaPolicy:
    """What the app's (or its grant's) ``reads`` and the request's ``Prefer`` allow."""

    only: bool
    """``replica_only``: 503 rather than the primary."""
    max_staleness_s: float


def replica_policy(project: Project, app: App, contract: ContractVersion,
                   prefs: Preferences) -> tuple[ReplicaPolicy | None, set[str]]:
    """The read's policy, and the preferences that shaped it (for ``Preference-Applied``)."""
    if not project.config.databases[contract.database].replicas:
        return None, set()
    grant = next((g for g in app.config.grants if g.contract == contract.name), None)
    reads = grant.reads if grant is not None and grant.reads is not None else app.config.reads
    if reads.source == "primary":
        return None, set()
    only = reads.source == "replica_only"
    if not only and prefs.get("read-from") == "primary":  # (an app kept off the primary stays off it)
        return None, {"read-from"}
    bound = reads.max_staleness_s
    asked = prefs.get("max-staleness")
    if asked is not None and float(asked) < bound:
        return ReplicaPolicy(only, float(asked)), {"max-staleness"}
    return ReplicaPolicy(only, bound), set()


def read_route(request: HttpRequest, project: Project, routes: PlanCache[ReadRoute], app: App, contract_name: str,
               path_version: int | None) -> ReadRoute:
    """The request's route, from ``routes`` when a request with the same app, path and headers had one."""
    headers = request.headers
    get = request.method == "GET"
    key = (app.name, contract_name, path_version, get, headers.get("accept-profile"), headers.get("accept"),
           headers.get("prefer"), headers.get("range") if get else None)
    route = routes.get(key)
    if route is None:
        version = choose_version(project, app, headers.get("accept-profile"), path_version)  # 406
        contract = granted_contract(project, app, version, contract_name, "read")  # 404 / 403
        fmt = response_format(headers.get("accept"))  # 406
        prefs = parse_prefer(headers.get("prefer"))
        requested = range_header(headers.get("range")) if get else None  # 416
        out = {"Content-Profile": f"v{version}", **lifecycle_headers(project, version)}
        policy, shaped = replica_policy(project, app, contract, prefs)
        applied = prefs.applied({"count", *shaped})
        if applied:
            out["Preference-Applied"] = applied
        route = ReadRoute(version, contract, fmt, prefs.get("count"), requested,
                          readable_contracts(project, app, version), out, policy)
        routes.put(key, route)
    return route
