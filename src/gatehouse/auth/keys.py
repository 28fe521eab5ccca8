"""API keys: made once, shown once, stored only as a hash.

A key reads ``gh_<id>_<secret>``. The ``id`` is public (it names the key in lists, logs and audit) and is
how a key is found; the ``secret`` is 256 random bits. Only ``sha256(secret)`` is stored: a key is random
and long, so a slow password hash would add latency without adding safety. Comparison is constant-time.

Creating or revoking a key sends ``NOTIFY gatehouse_keys`` in the same transaction, so a running server
drops a revoked key at once instead of waiting for its next periodic refresh.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

KEY_PATTERN = re.compile(r"^gh_(?P<id>[a-z0-9]{10})_(?P<secret>[A-Za-z0-9_-]{43})$")
NOTIFY_CHANNEL = "gatehouse_keys"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str
    app: str
    secret_key: str
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    app: str
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def split_key(presented: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, or None."""
    match = KEY_PATTERN.match(presented)
    return (match["id"], match["secret"]) if match else None


def looks_like_key(value: str) -> bool:
    return value.startswith("gh_")


async def create_key(conn: asyncpg.Connection, app: str, *, expires_at: datetime | None = None,
                     description: str = "") -> NewKey:
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))
    secret = secrets.token_urlsafe(32)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO gatehouse.keys (id, app, hash, description, expires_at) VALUES ($1, $2, $3, $4, $5)",
            key_id, app, hash_secret(secret), description, expires_at,
        )
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, app)
    return NewKey(id=key_id, app=app, secret_key=f"gh_{key_id}_{secret}", expires_at=expires_at)


async def list_keys(conn: asyncpg.Connection, app: str | None = None) -> list[KeyInfo]:
    rows = await conn.fetch(
        "SELECT id, app, description, created_at, expires_at, revoked_at FROM gatehouse.keys "
        "WHERE $1::text IS NULL OR app = $1 ORDER BY app, created_at",
        app,
    )
    return [KeyInfo(**dict(row)) for row in rows]


async def revoke_key(conn: asyncpg.Connection, app: str, key_id: str | None) -> list[str]:
    """Revoke one key of ``app`` (or all of them when ``key_id`` is None); returns the ids revoked."""
    async with conn.transaction():
        rows = await conn.fetch(
            "UPDATE gatehouse.keys SET revoked_at = now() "
            "WHERE app = $1 AND ($2::text IS NULL OR id = $2) AND revoked_at IS NULL RETURNING id",
            app, key_id,
        )
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, app)
    return [r["id"] for r in rows]


async def rotate_keys(conn: asyncpg.Connection, app: str, *, overlap: timedelta,
                      expires_at: datetime | None = None) -> tuple[NewKey, list[str]]:
    """A new key for ``app``; its other live keys now expire after ``overlap``, so callers can switch over
    without an outage. Returns the new key and the ids of the keys that will expire."""
    new = await create_key(conn, app, expires_at=expires_at, description="rotated in")
    async with conn.transaction():
        rows = await conn.fetch(
            "UPDATE gatehouse.keys SET expires_at = least(coalesce(expires_at, 'infinity'), now() + $3::interval) "
            "WHERE app = $1 AND id <> $2 AND revoked_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > now()) RETURNING id",
            app, new.id, overlap,
        )
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, app)
    return new, [r["id"] for r in rows]
