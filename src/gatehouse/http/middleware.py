"""What wraps every request of the data port and has no domain logic: request id, timing, metrics, the
request log line, the audit record of a request that did not write its own, and turning any error into
PostgREST's JSON shape.

An unexpected exception is logged as one line (type and where), never with a stack trace or the request's
values, and answered with a generic 500.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
import traceback
from collections.abc import Callable

from gatehouse.errors import ApiError, InternalError
from gatehouse.http.exchange import Handler, HttpRequest, HttpResponse
from gatehouse.http.responses import error_response
from gatehouse.observe.audit import AuditUnavailable
from gatehouse.observe.audit_writer import AuditWriter
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


class RequestGuard:
    """``handler`` wrapped: every request gets an id, one metric sample, one log line and one audit record."""

    def __init__(self, handler: Handler, metrics: Metrics, audit: Callable[[], AuditWriter | None] = lambda: None,
                 *, audit_values: bool = False) -> None:
        self.handler = handler
        self.metrics = metrics
        self.audit = audit
        self.audit_values = audit_values

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        incoming = request.headers.get("x-request-id")
        request_id = incoming if incoming is not None and REQUEST_ID.match(incoming) else new_request_id()
        labels = request.labels
        labels.request_id, labels.method, labels.query_string = request_id, request.method, request.query_string
        labels.client = request.client
        try:
            response = await self.handler(request)
        except ApiError as exc:
            response = error_response(exc)
        except Exception as exc:
            log.error("request %s failed: %s at %s", request_id, type(exc).__name__, _where(exc))
            error = InternalError("Internal error", hint=f"Quote request id {request_id} to the operators.")
            response = error_response(error)
        except BaseException:  # cancelled (the client went away): still measured and audited, as 499
            self._record(request, 499, time.perf_counter() - started)
            raise
        finally:
            if labels.release is not None:
                labels.release()
            if labels.release_work is not None:
                labels.release_work()
        if labels.limit_headers:
            for name, value in labels.limit_headers.items():
                response.headers.setdefault(name, value)
        response.headers["X-Request-Id"] = request_id
        self._record(request, response.status, time.perf_counter() - started)
        return response

    def _record(self, request: HttpRequest, status: int, elapsed: float) -> None:
        labels = request.labels
        self.metrics.observe(labels.app, labels.contract, labels.api_version, request.method, status, elapsed)
        writer = self.audit()  # looked up per request: the runtime opens its writer after the app is built
        if writer is not None and not labels.audited:
            try:
                writer.submit(labels.audit_record(status, keep_values=self.audit_values))
            except AuditUnavailable:
                log.error("request %s: the audit store and its spool are full; record not kept", labels.request_id)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %s %d %.1fms", request.method, request.path, labels.app or "-", status, elapsed * 1000,
                extra={"request_id": labels.request_id, "client": labels.client, "app": labels.app,
                       "key_id": labels.key_id, "user": labels.subject, "contract": labels.contract,
                       "version": labels.version, "status": status, "duration_ms": round(elapsed * 1000, 2)},
            )
