"""Every change made in the console goes to the audit trail, with the admin who made it (and every sign-in and
sign-out, as ``console:session``).

A change and its record commit together (:func:`audited`: the change's statements and :func:`record_change`
in one transaction on an owner connection), so the console never reports a change whose record is missing, and
no change stays without its record. ``subject`` is the admin's identity, ``target`` ``console:<what>``, ``query``
what was done to what (``action=create&key_id=...``); the CLI's ``gatehouse audit --user console:admin`` and the
console's audit page find it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import urlencode

import asyncpg

from gatehouse import operations
from gatehouse.admin.sessions import Session
from gatehouse.db.sync import bootstrap
from gatehouse.observe.audit import AuditRecord, audit_in_transaction
from gatehouse.project import Project


@asynccontextmanager
async def audited(project: Project) -> AsyncIterator[asyncpg.Connection]:
    """An owner connection of the home database inside a transaction: make the change on it, then
    :func:`record_change` on it; both commit at the end, or neither."""
    async with operations.owner_connection(project) as conn:
        await bootstrap(conn)
        async with conn.transaction():
            yield conn


async def record_change(conn: asyncpg.Connection, session: Session, *, client: str, app: str, what: str,
                        action: str, status: int, started: float, **details: str) -> str:
    """Insert the audit record of one console change on ``conn`` (in the change's transaction); returns its request
    id (the record's stable URL)."""
    request_id = f"console-{secrets.token_hex(8)}"
    record = AuditRecord(
        at=datetime.now(UTC), request_id=request_id, app=app, key_id="", subject=session.identity,
        method="POST", target=f"console:{what}", api_version=None,
        query=urlencode({"action": action, **details}), status=status, rows=None,
        duration_ms=(time.perf_counter() - started) * 1000, client=client)
    await audit_in_transaction(conn, record)
    return request_id
