"""Every change made in the console goes to the audit trail, with the admin who made it (and every sign-in and
sign-out, as ``console:session``).

The record is inserted on its own owner connection once the change is done, and awaited: the console says a
change worked only once its record is in ``gatehouse.audit`` (the CLI's ``gatehouse audit --user
console:admin`` and the console's audit page find it). ``subject`` is the admin's identity, ``target``
``console:<what>``, ``query`` what was done to what (``action=create&key_id=...``).
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from urllib.parse import urlencode

from gatehouse import operations
from gatehouse.admin.sessions import Session
from gatehouse.db.sync import bootstrap
from gatehouse.observe.audit import AuditRecord, audit_in_transaction
from gatehouse.project import Project


async def record_change(project: Project, session: Session, *, client: str, app: str, what: str, action: str,
                        status: int, started: float, **details: str) -> str:
    """Insert the audit record of one console change; returns its request id (the record's stable URL)."""
    request_id = f"console-{secrets.token_hex(8)}"
    record = AuditRecord(
        at=datetime.now(UTC), request_id=request_id, app=app, key_id="", subject=session.identity,
        method="POST", target=f"console:{what}", api_version=None,
        query=urlencode({"action": action, **details}), status=status, rows=None,
        duration_ms=(time.perf_counter() - started) * 1000, client=client)
    async with operations.owner_connection(project) as conn:
        await bootstrap(conn)
        await audit_in_transaction(conn, record)
    return request_id
