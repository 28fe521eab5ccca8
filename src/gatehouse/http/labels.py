"""What a request turned out to be, filled in step by step: for metrics, the request log and the audit.

The middleware creates one :class:`RequestLabels` per request before anything runs, so even a request
refused at the first step (a bad key) is measured, logged and audited exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from starlette.requests import Request

from gatehouse.observe.audit import AuditRecord
from gatehouse.observe.redact import redact_query


@dataclass(slots=True)
class RequestLabels:
    request_id: str = ""
    method: str = ""
    query_string: str = ""
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    app: str = ""
    key_id: str = ""
    subject: str | None = None
    contract: str = ""
    """The contract, or ``rpc:<name>``."""
    version: str = ""
    rows: int | None = None
    audited: bool = False
    """Set once a write's record committed with the write itself, so the middleware does not record it twice."""

    @property
    def api_version(self) -> int | None:
        return int(self.version[1:]) if self.version.startswith("v") else None

    def audit_record(self, status: int, *, keep_values: bool = False) -> AuditRecord:
        elapsed = (datetime.now(UTC) - self.started).total_seconds() * 1000
        return AuditRecord(
            at=self.started, request_id=self.request_id, app=self.app, key_id=self.key_id, subject=self.subject,
            method=self.method, target=self.contract, api_version=self.api_version,
            query=self.query_string[:2000] if keep_values else redact_query(self.query_string),
            status=status, rows=self.rows, duration_ms=round(elapsed, 3),
        )


def labels_of(request: Request) -> RequestLabels:
    labels: RequestLabels | None = getattr(request.state, "gatehouse", None)
    if labels is None:  # outside the middleware (tests that call endpoints directly)
        labels = RequestLabels(method=request.method)
        request.state.gatehouse = labels
    return labels
