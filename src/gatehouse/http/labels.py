"""What a request turned out to be, filled in step by step: for metrics, the request log and the audit.

The middleware creates one :class:`RequestLabels` per request before anything runs, so even a request
refused at the first step (a bad key) is measured, logged and audited exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gatehouse.observe.audit import AuditRecord
from gatehouse.observe.redact import redact_query


@dataclass(slots=True)
class RequestLabels:
    request_id: str = ""
    client: str = ""
    """The caller's address (behind trusted proxies, the one they forwarded)."""
    method: str = ""
    query_string: str = ""
    redacted_query: str | None = None
    """The query string with its values masked, when the request path already knows it (from the plan cache)."""
    started: float = field(default_factory=time.time)
    """Wall-clock seconds (a float: a datetime per request is built only for the audit record)."""
    app: str = ""
    key_id: str = ""
    subject: str | None = None
    contract: str = ""
    """The contract, or ``rpc:<name>``."""
    api_version: int | None = None
    rows: int | None = None
    cached: bool = False
    """Answered from the response cache (or 304) without the database."""
    replica: bool = False
    """Answered by a replica (read from it), not the primary."""
    audited: bool = False
    """Set once a write's record committed with the write itself, so the middleware does not record it twice."""
    limit_headers: dict[str, str] | None = None
    """The ``RateLimit`` fields of an app under a rate limit: on every answer, success or error."""
    release: Callable[[], None] | None = None
    """Gives back the app's in-flight slot, once the answer is made."""
    release_work: Callable[[], None] | None = None
    """Gives back the request's work slot (``limits/fair.py``), once the answer is made."""

    @property
    def version(self) -> str:
        """``v2``, or empty before the request got as far as a version."""
        return "" if self.api_version is None else f"v{self.api_version}"

    def audit_record(self, status: int, *, keep_values: bool = False) -> AuditRecord:
        elapsed = (time.time() - self.started) * 1000
        if keep_values:
            query = self.query_string[:2000]
        else:
            query = self.redacted_query if self.redacted_query is not None else redact_query(self.query_string)
        return AuditRecord(datetime.fromtimestamp(self.started, UTC), self.request_id, self.app, self.key_id,
                           self.subject, self.method, self.contract, self.api_version, query, status, self.rows,
                           elapsed, self.cached, self.replica, self.client)

