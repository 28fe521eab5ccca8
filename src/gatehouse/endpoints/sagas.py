"""``POST /sagas/<name>`` starts a saga as the calling app; ``GET /sagas/<name>/<id>`` follows it.

::

    POST /sagas/place_order            Idempotency-Key: order-7781      Prefer: wait=10
    {"customer": "ann", "sku": "tea", "qty": 2, "amount": 100}
    → 202 Accepted   Location: /sagas/place_order/<id>   {"id": ..., "name": ..., "state": "running", ...}
    → 200 OK         (with Prefer: wait, when the run finished in time: its result or its error)

Granted per app like functions (``[apps.x] sagas = [...]``): a saga the app is not granted answers 404 exactly
as an unknown one, and a run answers only to the app that started it (404 to any other), so neither tells
whether something exists. The body is the saga's input, validated by its type before any database work (400).

``Idempotency-Key`` (optional, printable ASCII, at most :data:`MAX_KEY_LENGTH` characters, the IETF draft's
quoted form accepted too): the same key with the same saga and input answers the run the first request
started, whatever its state; with another request it is 422 and nothing starts. ``Prefer: wait=<s>`` (RFC
7240) waits up to ``[server] saga_wait_max_s`` for a final state. A waiting request holds no database
connection and gives back its app's in-flight and work slots: it reads the run now and then, each read a
connection taken and given back. Runs are taken by any instance's runner; this one is woken by the start.

Both are audited by the request path (target ``saga:<name>``) and measured per app and saga like ``/rpc``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import quote

import asyncpg
import orjson

from gatehouse.db.faults import BROKEN, cannot_connect, connection_lost
from gatehouse.errors import InvalidBody, InvalidIdempotencyKey, MethodNotAllowed, SagaNotFound
from gatehouse.http.exchange import JSON, HttpRequest, HttpResponse
from gatehouse.observe.audit import AuditUnavailable
from gatehouse.pipeline import identify
from gatehouse.project import App
from gatehouse.runtime import Runtime
from gatehouse.sagas.engine import SagaEngine
from gatehouse.sagas.store import FENCED, SagaRun

SAGA_PATH = re.compile(r"^/sagas/([^/]+)$")
RUN_PATH = re.compile(r"^/sagas/([^/]+)/([^/]+)$")
START_METHODS = ("POST",)
RUN_METHODS = ("GET", "HEAD")
MAX_KEY_LENGTH = 255
KEY = re.compile(r'^"?([\x21\x23-\x7e]{1,255})"?$')
"""Printable ASCII without spaces or quotes; the IETF draft sends it as a quoted sf-string, others bare."""
WAIT = re.compile(r"^\s*wait\s*=\s*\"?([0-9]{1,9})\"?\s*$", re.IGNORECASE)
POLL_FIRST_S = 0.02
POLL_MAX_S = 0.25
RETRY_AFTER_S = "1"
_STEP_COUNTS = ("SELECT count(*) FILTER (WHERE kind = 'forward') AS done, "
                "count(*) FILTER (WHERE kind = 'compensation') AS undone "
                f"FROM gatehouse.saga_steps WHERE saga_id = $1::uuid AND status <> '{FENCED}'")
T = TypeVar("T")


def _not_found(name: str) -> SagaNotFound:
    return SagaNotFound(f"Could not find the saga '{name[:80]}'",
                        hint="Check the name; sagas are granted to applications in gatehouse.toml ([apps.x] sagas).")


def _engine(runtime: Runtime, app: App, name: str) -> SagaEngine:
    """The engine, when ``name`` is a saga granted to ``app`` (else 404, the same for unknown and ungranted)."""
    if runtime.sagas is None or name not in runtime.project.sagas.sagas or name not in app.config.sagas:
        raise _not_found(name)
    return runtime.sagas


def _refuse_unrecorded(runtime: Runtime) -> None:
    if runtime.audit is not None and not runtime.audit.accepting():
        raise AuditUnavailable()  # 503: no start or read goes unrecorded


async def _database(call: Awaitable[T]) -> T:
    """``call`` on gatehouse's own pool, its connection failures answered 503 (never a 500 with their text)."""
    try:
        return await call
    except BROKEN:
        raise connection_lost() from None
    except (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError):
        raise cannot_connect() from None


def idempotency_key(request: HttpRequest) -> str | None:
    """The ``Idempotency-Key`` header, or None; 400 for one that is empty, too long or not printable ASCII."""
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    match = KEY.fullmatch(value.strip())
    if match is None:
        raise InvalidIdempotencyKey("The Idempotency-Key header is not a valid key",
                                    details=f"got {len(value)} characters",
                                    hint=f"Send 1 to {MAX_KEY_LENGTH} printable ASCII characters without "
                                         "spaces, e.g. a UUID, new for each new request.")
    return match.group(1)


def requested_wait(request: HttpRequest, bound: float) -> float:
    """``Prefer: wait=<seconds>`` (RFC 7240), at most ``bound``; 0 without it. Other preferences are ignored,
    as RFC 7240 asks of preferences a server does not know."""
    for token in (request.headers.get("prefer") or "").split(","):
        match = WAIT.fullmatch(token.split(";", 1)[0])
        if match is not None:
            return min(float(match.group(1)), bound)
    return 0.0


async def _input(request: HttpRequest, limit: int) -> Any:
    raw = await request.body(limit)  # 413 / 408
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidBody("Empty or invalid json", hint="The body is the saga's input, as JSON.") from None


async def _steps(runtime: Runtime, run: SagaRun) -> tuple[int, int]:
    """(steps done, steps undone): the records of every database the project's sagas keep them in."""
    project = runtime.project
    done = undone = 0
    for database in sorted(project.sagas.databases(project.home_database)):
        try:
            async with runtime.internal_pool(database).acquire() as conn:
                row = await conn.fetchrow(_STEP_COUNTS, run.id)
        except asyncpg.UndefinedTableError:  # a database a step acts on since a deploy, not applied yet: none there
            continue
        assert row is not None  # an aggregate without GROUP BY answers one row
        done, undone = done + int(row["done"]), undone + int(row["undone"])
    return done, undone


async def _describe(runtime: Runtime, run: SagaRun) -> dict[str, Any]:
    """What the app sees of a run: never its input, lease or a stack trace; the result once completed, the
    saga's own message once it is being undone or stopped."""
    done, undone = await _database(_steps(runtime, run))
    answer: dict[str, Any] = {"id": run.id, "name": run.name, "state": run.state, "steps_done": done,
                              "steps_undone": undone, "created_at": run.created_at, "updated_at": run.updated_at}
    if run.state == "completed":
        answer["result"] = run.result
    elif run.state != "running":
        answer["error"] = run.error
    return answer


def _location(request: HttpRequest, run: SagaRun) -> str:
    return f"{request.root_path}/sagas/{quote(run.name, safe='')}/{run.id}"


async def _answer(request: HttpRequest, runtime: Runtime, run: SagaRun, headers: dict[str, str]) -> HttpResponse:
    """200 with a finished run, 202 (come back to its ``Location``) with one still going."""
    headers = {**headers, "Location": _location(request, run), "Cache-Control": "no-store"}
    if not run.finished:
        headers["Retry-After"] = RETRY_AFTER_S
    body = orjson.dumps(await _describe(runtime, run))
    return HttpResponse(200 if run.finished else 202, headers, body, JSON)


async def _wait(engine: SagaEngine, run: SagaRun, seconds: float) -> SagaRun:
    """The run once finished, or as it is after ``seconds``; reads it now and then on a connection held for
    the read only (runs are advanced by whichever instance claims them, so there is nothing local to wait on)."""
    deadline = time.monotonic() + seconds
    pause = POLL_FIRST_S
    while not run.finished and (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(pause, left))
        run = await _database(engine.get(run.id))
        pause = min(pause * 1.5, POLL_MAX_S)
    return run


async def start_saga(request: HttpRequest, runtime: Runtime, name: str) -> HttpResponse:
    """``POST /sagas/<name>``."""
    if request.method not in START_METHODS:
        raise MethodNotAllowed(f"Unsupported HTTP method: {request.method}", allow=START_METHODS)
    project, labels = runtime.project, request.labels
    identity, app = await identify(request, runtime)  # 401 / 429
    engine = _engine(runtime, app, name)  # 404
    labels.contract = f"saga:{name}"
    _refuse_unrecorded(runtime)  # 503
    key = idempotency_key(request)  # 400
    wait = requested_wait(request, project.config.server.saga_wait_max_s)
    data = await _input(request, project.config.server.max_body_bytes)  # 400 / 413
    run = await _database(engine.start(app.name, name, data, key, subject=identity.subject,  # the steps run
                                       claims=identity.claims))  # as this user; 400 (input) / 422 (key reused)
    headers: dict[str, str] = {}
    if wait > 0 and not run.finished:
        for release in (labels.release, labels.release_work):  # a waiting client holds no slot of its app
            if release is not None:
                release()
        labels.release = labels.release_work = None
        run = await _wait(engine, run, wait)
        headers["Preference-Applied"] = f"wait={wait:g}"
    return await _answer(request, runtime, run, headers)


async def follow_saga(request: HttpRequest, runtime: Runtime, name: str, run_id: str) -> HttpResponse:
    """``GET /sagas/<name>/<id>``: to the app that started the run only, and when a user started it, to that
    user only (a grant taken away since does not hide the app's own runs from it); for any other, 404 as for a
    run that does not exist."""
    if request.method not in RUN_METHODS:
        raise MethodNotAllowed(f"Unsupported HTTP method: {request.method}", allow=RUN_METHODS)
    identity, app = await identify(request, runtime)  # 401 / 429
    engine = runtime.sagas
    if engine is None:
        raise _not_found(name)
    _refuse_unrecorded(runtime)
    try:
        run = await _database(engine.get(run_id))
    except SagaNotFound:
        run = None
    if run is None or run.app != app.name or run.name != name or run.subject not in (None, identity.subject):
        raise SagaNotFound(f"Could not find the run '{run_id[:80]}' of the saga '{name[:80]}'",
                           hint="Use the Location answered when the run was started, with the same application's key.")
    request.labels.contract = f"saga:{name}"
    return await _answer(request, runtime, run, {})
