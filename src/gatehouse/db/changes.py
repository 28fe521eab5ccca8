"""How running servers learn that a database changed under them, without a restart.

``apply`` and every migration call :func:`announce` inside their own transaction: it writes a new
*revision* into ``gatehouse.state`` and sends ``NOTIFY gatehouse_reload``. Both take effect at commit,
together, so a server that hears the notification reads the changed catalog, and a server that missed it
(its listening connection was down) sees the revision differ at its next poll. PostgREST does the same with
``NOTIFY pgrst, 'reload schema'``; the revision row is the fallback its users have to script themselves.
"""

from __future__ import annotations

import uuid

from gatehouse.db import Connection

CHANNEL = "gatehouse_reload"
APPLY_LOCK_KEY = 0x6761746568  # "gateh": one apply at a time per database


async def lock_for_apply(conn: Connection) -> None:
    """``apply``'s advisory lock, until the caller's transaction ends: whatever else changes what ``apply``
    manages (roles, grants) takes it too, so that neither sees the other halfway."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", APPLY_LOCK_KEY)


async def announce(conn: Connection, why: str) -> str:
    """Mark the database changed (in the caller's transaction, if any) and tell the servers; returns the
    new revision. ``why`` travels with the notification, for the servers' logs."""
    revision = uuid.uuid4().hex
    await conn.execute(
        "INSERT INTO gatehouse.state (key, value) VALUES ('revision', $1) "
        "ON CONFLICT (key) DO UPDATE SET value = $1, at = now()", revision,
    )
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{revision} {why}"[:7000])
    return revision


async def current_revision(conn: Connection) -> str | None:
    """The revision of the database's last change (None before the first ``apply`` or migration)."""
    value = await conn.fetchval("SELECT value FROM gatehouse.state WHERE key = 'revision'")
    return str(value) if value is not None else None
