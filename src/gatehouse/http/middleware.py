"""Cross-cutting ASGI middleware with no domain logic: request id, timing, metrics, the request log line,
and turning any error into PostgREST's JSON shape.

It is a plain ASGI callable (not Starlette's BaseHTTPMiddleware) because it wraps every request and must
cost next to nothing. An unexpected exception is logged as one line (type and where), never with a stack
trace or the request's values, and answered with a generic 500.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
import traceback
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gatehouse.errors import ApiError, InternalError
from gatehouse.http.labels import RequestLabels
from gatehouse.http.responses import error_response
from gatehouse.observe.audit import AuditUnavailable, AuditWriter
from gatehouse.observe.metrics import Metrics

log = logging.getLogger("gatehouse.request")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PROCESS_ID = secrets.token_hex(6)
_sequence = itertools.count(1)


def new_request_id() -> str:
    """Unique per process start and request, without a random-number syscall on every request."""
    return f"{_PROCESS_ID}{next(_sequence):012x}"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


class RequestMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, audit: Callable[[], AuditWriter | None] = lambda: None,
                 *, audit_values: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.audit = audit
        self.audit_values = audit_values

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID.match(incoming) else new_request_id()
        labels = RequestLabels(request_id=request_id, method=scope["method"],
                               query_string=scope.get("query_string", b"").decode("latin-1"))
        scope.setdefault("state", {})["gatehouse"] = labels
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ApiError as exc:
            status = exc.status
            await error_response(exc, head=scope["method"] == "HEAD")(scope, receive, send_wrapper)
        except Exception as exc:
            log.error("request %s failed: %s at %s", request_id, type(exc).__name__, _where(exc))
            if not response_started:
                error = InternalError("Internal error", hint=f"Quote request id {request_id} to the operators.")
                await error_response(error)(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.observe(app=labels.app, contract=labels.contract, version=labels.version,
                                 method=scope["method"], status=status, seconds=elapsed)
            writer = self.audit()  # looked up per request: the runtime opens its writer after the app is built
            if writer is not None and not labels.audited:
                try:
                    writer.submit(labels.audit_record(status, keep_values=self.audit_values))
                except AuditUnavailable:
                    log.error("request %s: the audit store and its spool are full; record not kept", request_id)
            log.info(
                "%s %s %s %d %.1fms",
                scope["method"], scope["path"], labels.app or "-", status, elapsed * 1000,
                extra={"request_id": request_id, "app": labels.app, "key_id": labels.key_id,
                       "user": labels.subject, "contract": labels.contract, "version": labels.version,
                       "status": status, "duration_ms": round(elapsed * 1000, 2)},
            )
