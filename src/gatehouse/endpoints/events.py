"""``GET /events/<contract>``: the change events of an evented contract, for apps that have no broker.

::

    GET /events/orders?after=<position>&limit=100&wait=20
    → 200 [{"id": ..., "aggregatetype": "orders", "aggregateid": "42", "type": "updated", "payload": {...},
            "version": 1, "aggregate_version": 567, "position": "1234-567", "created_at": ...}, ...]
      Gatehouse-Next: 1234-567          (send it as ``after`` next time; also in ``Link: <...>; rel="next"``)

* ``after``: a position from ``Gatehouse-Next`` (or an event's ``position``); none: from the oldest event kept;
  ``now``: only events committed from now on.
* ``limit``: 1 to :data:`MAX_LIMIT` events (default :data:`DEFAULT_LIMIT`).
* ``wait``: when there is nothing after ``after``, wait up to this many seconds (at most :data:`MAX_WAIT_S`) for
  the next event and answer as soon as one commits (:mod:`gatehouse.events.feed_watch`); default 0.

Granted per app like a contract, with the action ``events``: a contract that is not evented, or that the app
has no grant on, is answered 404 exactly as an unknown contract; a grant without ``events`` is 403. The feed
reads the outbox as the authenticator, on gatehouse's internal pool, in order of position: a transaction that
commits late is delivered after the ones before it committed, never skipped (:mod:`gatehouse.events.outbox`).
A waiting request gives back its app's in-flight and work slots while it waits.
"""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qsl, quote

import asyncpg
import orjson

from gatehouse.db import Connection
from gatehouse.db.faults import BROKEN, cannot_connect, connection_lost
from gatehouse.errors import (
    ActionNotGranted,
    FilteredEventsRefused,
    InvalidEventPosition,
    InvalidFeedParameter,
    InvalidUrlEncoding,
    MethodNotAllowed,
    PoolTimeout,
    UnknownContract,
)
from gatehouse.events.feed_watch import watch_for
from gatehouse.events.outbox import COMPLETE_BELOW, START, Event, Position, read_after
from gatehouse.http.exchange import JSON, HttpRequest, HttpResponse
from gatehouse.observe.audit import AuditUnavailable
from gatehouse.pipeline import identify
from gatehouse.runtime import Runtime

EVENTS_PATH = re.compile(r"^/events/([^/]+)$")
METHODS = ("GET", "HEAD")
ACTION = "events"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_WAIT_S = 30.0
NEXT_HEADER = "Gatehouse-Next"
PARAMETERS = ("after", "limit", "wait")
LAST_SEQ = 2**63 - 1


def parse_query(query_string: str) -> tuple[Position | None, int, float]:
    """(after — None for ``now`` —, limit, wait) from the query string; 400 for anything else."""
    try:
        pairs = parse_qsl(query_string, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise InvalidUrlEncoding("The query string is not valid UTF-8 once percent-decoded") from None
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name not in PARAMETERS:
            raise InvalidFeedParameter(f"The events feed takes no parameter '{name[:40]}'",
                                       hint=f"It takes {', '.join(PARAMETERS)}.")
        if name in seen:
            raise InvalidFeedParameter(f"'{name}' is given twice", hint="Give each parameter once.")
        seen[name] = value
    after: Position | None = START
    if "after" in seen:
        if seen["after"] == "now":
            after = None
        else:
            try:
                after = Position.parse(seen["after"])
            except ValueError:
                raise InvalidEventPosition("'after' is not an event position",
                                           hint=f"Send the {NEXT_HEADER} of the last answer (or an event's "
                                                "position), or 'now'.") from None
    limit = _number(seen, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT, whole=True)
    wait = _number(seen, "wait", 0, 0, MAX_WAIT_S, whole=False)
    return after, int(limit), wait


def _number(seen: dict[str, str], name: str, default: float, low: float, high: float, *, whole: bool) -> float:
    text = seen.get(name)
    if text is None:
        return default
    pattern = r"[0-9]{1,7}" if whole else r"[0-9]{1,7}(\.[0-9]{1,3})?"
    if not re.fullmatch(pattern, text) or not low <= float(text) <= high:
        kind = "a whole number" if whole else "a number of seconds"
        raise InvalidFeedParameter(f"'{name}' must be {kind} from {low:g} to {high:g}",
                                   details=f"got {text[:40]!r}")
    return float(text)


async def _now(conn: Connection) -> Position:
    """The position before every event not yet readable: events of transactions that end from now on (by the
    bound the reads themselves use: a transaction of another database does not hold it back)."""
    below = int(await conn.fetchval(COMPLETE_BELOW + "SELECT below::text FROM bound"))
    return Position(below - 1, LAST_SEQ)


async def _read(pool: asyncpg.Pool, timeout_s: float, after: Position | None, limit: int,
                contract: str) -> tuple[Position, list[Event]]:
    try:
        async with pool.acquire(timeout=timeout_s) as conn:
            if after is None:
                return await _now(conn), []
            return after, await read_after(conn, after, limit, [contract])
    except TimeoutError:
        raise PoolTimeout("Timed out acquiring connection from connection pool.",
                          hint="The events feed is busy; retry shortly.") from None
    except asyncpg.UndefinedTableError:  # evented in gatehouse.toml, but apply has not run since
        raise UnknownContract(f"Could not find the events of '{contract}'",
                              hint="Its database has no outbox yet: run `gatehouse apply`.") from None
    except BROKEN:
        raise connection_lost() from None
    except (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError):
        raise cannot_connect() from None


async def events_feed(request: HttpRequest, runtime: Runtime, name: str) -> HttpResponse:
    if request.method not in METHODS:
        raise MethodNotAllowed(f"Unsupported HTTP method: {request.method}", allow=METHODS)
    project, labels = runtime.project, request.labels
    _, app = await identify(request, runtime, name, (ACTION,))  # 401 / 429
    labels.contract = f"events:{name}"
    if runtime.audit is not None and not runtime.audit.accepting():
        raise AuditUnavailable()  # 503: no read goes unrecorded
    grant = app.grant_for(name)
    database = project.database_of(name)
    if name not in project.config.events or not grant or database is None:
        raise UnknownContract(f"Could not find the events of '{name}'",
                              hint="Check the name: events are served for contracts with an [events.<name>] "
                                   "section, to apps granted the 'events' action on them.")
    if ACTION not in grant:
        raise ActionNotGranted(f"The application may not read the events of '{name}'",
                               hint=f"Its grant on '{name}' allows: {', '.join(sorted(grant))}.")
    if name in app.row_filters:
        raise FilteredEventsRefused(f"The events of '{name}' are not filtered by the application's row filter",
                                    hint="Grant 'events' only where the grant has no filter.")
    after, limit, wait = parse_query(request.query_string)  # 400

    pool = runtime.internal_pool(database)
    timeout_s = project.config.server.pool_timeout_ms / 1000
    position, events = await _read(pool, timeout_s, after, limit, name)
    if not events and wait > 0:
        for release in (labels.release, labels.release_work):  # a waiting client holds no slot of its app
            if release is not None:
                release()
        labels.release = labels.release_work = None
        watch = watch_for(pool, timeout_s)
        deadline = time.monotonic() + wait
        while not events and (left := deadline - time.monotonic()) > 0:
            if not await watch.wait(name, position, left):
                break
            position, events = await _read(pool, timeout_s, position, limit, name)
    if events:
        position = events[-1].position
    labels.rows = len(events)
    body = orjson.dumps([event.as_json() for event in events])
    next_url = f"{request.root_path}/events/{quote(name)}?after={position.text()}&limit={limit}"
    headers = {NEXT_HEADER: position.text(), "Link": f'<{next_url}>; rel="next"', "Cache-Control": "no-store"}
    return HttpResponse(200, headers, body, JSON)
