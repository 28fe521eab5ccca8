"""Who is calling: headers → :class:`Identity`, with no database work on the request path.

The server holds every live key's hash in memory (:class:`KeyRing`), loaded at start, reloaded when a key
is created or revoked (``LISTEN gatehouse_keys``) and every ``REFRESH_S`` seconds as a safety net. So an
unknown, revoked or expired key is refused without touching a database connection.

Credentials come from the ``apikey`` header (as Supabase clients send it) and/or ``Authorization: Bearer``
with a key or a user's JWT (verified by :mod:`gatehouse.auth.jwt`). Keys in the query string are never
accepted.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from gatehouse.auth.jwt import JwtVerifier, TokenIdentity, looks_like_jwt
from gatehouse.auth.keys import NOTIFY_CHANNEL, hash_secret, looks_like_key, split_key
from gatehouse.background import stop_tasks
from gatehouse.db import Connection
from gatehouse.db.listener import Connect, Listener
from gatehouse.errors import InvalidClaims, MissingCredentials, Unauthenticated

log = logging.getLogger(__name__)
REFRESH_S = 30.0


@dataclass(frozen=True, slots=True)
class Identity:
    app: str
    key_id: str
    subject: str | None = None
    """The user inside the app, from a token's ``sub``; None for a key alone."""
    claims: Mapping[str, Any] = field(default_factory=dict)
    """The token's claims, for row filters and logic; empty for a key alone."""


@dataclass(frozen=True, slots=True)
class _KeyEntry:
    identity: Identity
    """Who the key stands for, made once per load (a key's identity never changes)."""
    hash: bytes
    expires_at: datetime | None


class KeyRing:
    """The live keys of a project, by public id."""

    def __init__(self, apps: set[str]) -> None:
        self._apps = apps
        self._keys: dict[str, _KeyEntry] = {}
        self._verified: dict[str, _KeyEntry] = {}
        """Keys already presented and verified since the last load, by the whole key, so that a key's next
        request skips parsing and hashing it. Only a live key gets in (one entry at most per key in
        ``_keys``); each load empties it, so a revoked key stops working exactly when it did before, and
        expiry is checked on every request. Like every request, it keeps keys in memory, never in a log."""
        self._listener: Listener | None = None
        self._reloads: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._refresher: asyncio.Task[None] | None = None

    async def load(self, conn: Connection) -> None:
        rows = await conn.fetch(
            "SELECT id, app, hash, expires_at FROM gatehouse.keys WHERE revoked_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > now())"
        )
        self._keys = {
            r["id"]: _KeyEntry(Identity(app=r["app"], key_id=r["id"]), bytes(r["hash"]), r["expires_at"])
            for r in rows if r["app"] in self._apps
        }
        self._verified = {}

    async def follow_apps(self, apps: set[str], pool: asyncpg.Pool) -> None:
        """The project's apps changed (a reload): keys of a removed app stop working, a new app's start."""
        if apps != self._apps:
            self._apps = apps
            await self._reload(pool)

    async def start(self, pool: asyncpg.Pool, listen: Connect) -> None:
        """Load now, then follow changes: NOTIFY on a connection of its own (``listen`` opens it) for speed, a
        periodic reload for safety. When the listening connection is opened again (:class:`Listener`), the
        keys are reloaded, since a revocation may have been missed meanwhile."""
        async with pool.acquire() as conn:
            await self.load(conn)
        self._listener = Listener(listen, {NOTIFY_CHANNEL: lambda _: self._reload_soon(pool)},
                                  on_reopen=lambda: self._reload(pool), what="key changes")
        await self._listener.start()  # the first connection must open: a failure here stops the start
        self._refresher = asyncio.create_task(self._refresh_forever(pool))

    async def stop(self) -> None:
        self._stopping = True
        tasks = {task for task in (self._refresher, *self._reloads) if task is not None}
        await stop_tasks(tasks)
        if self._listener is not None:
            await self._listener.stop()

    def _reload_soon(self, pool: asyncpg.Pool) -> None:
        task = asyncio.get_running_loop().create_task(self._reload(pool))
        self._reloads.add(task)  # held until done: the loop keeps only a weak reference to a task
        task.add_done_callback(self._reloads.discard)

    async def _reload(self, pool: asyncpg.Pool) -> None:
        try:
            async with pool.acquire() as conn:
                await self.load(conn)
        except Exception as exc:  # any failure, not only the expected ones: the refresher must outlive it
            log.warning("could not reload API keys, keeping the last good set: %s", type(exc).__name__)

    async def _refresh_forever(self, pool: asyncpg.Pool) -> None:
        while not self._stopping:
            await asyncio.sleep(REFRESH_S)
            await self._reload(pool)

    def verify(self, presented: str, now: datetime | None = None) -> Identity:
        entry = self._verified.get(presented)
        if entry is None:
            entry = self._verified[presented] = self._check(presented)
        if entry.expires_at is not None and entry.expires_at <= (now or datetime.now(UTC)):
            raise Unauthenticated("API key expired", hint="Ask for a new key: gatehouse keys create <app>.")
        return entry.identity

    def _check(self, presented: str) -> _KeyEntry:
        """The live key ``presented`` is, compared in constant time with its stored hash."""
        parts = split_key(presented)
        if parts is None:
            raise Unauthenticated("Invalid API key", hint="Check the key: it reads gh_<id>_<secret>.")
        key_id, secret = parts
        entry = self._keys.get(key_id)
        # Hash even when the id is unknown, so timing does not reveal which ids exist.
        presented_hash = hash_secret(secret)
        if entry is None or not hmac.compare_digest(presented_hash, entry.hash):
            raise Unauthenticated("Invalid API key", hint="The key is unknown or was revoked.")
        return entry


EMPTY_JWT = "Empty JWT is sent in Authorization header"


def _bearer(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (the scheme in any case); None for another scheme, which
    carries nothing for us. A bearer without a token is refused, as PostgREST refuses it, rather than read as
    no credentials at all."""
    scheme, *rest = headers.get("authorization", "").split(maxsplit=1) or [""]
    if scheme.lower() != "bearer":
        return None
    if not rest:
        raise Unauthenticated(EMPTY_JWT)
    return rest[0].strip()


async def authenticate(headers: Mapping[str, str], keys: KeyRing, tokens: JwtVerifier | None,
                       require_user: Callable[[str], bool]) -> Identity:
    """Who is calling, from the ``apikey`` header and/or ``Authorization: Bearer`` (a key or a user's JWT).

    The key names the application; a JWT names the user (and the application too, through its app claim,
    when no key is sent). When both name an application, they must agree.
    """
    apikey = headers.get("apikey", "").strip()
    bearer = _bearer(headers)
    by_key = keys.verify(apikey) if apikey else None
    user: TokenIdentity | None = None
    if bearer is not None and looks_like_key(bearer):
        second = keys.verify(bearer)
        if by_key is not None and second.app != by_key.app:
            raise Unauthenticated("The apikey header and the Bearer key name different applications")
        by_key = by_key or second
    elif bearer is not None:  # not a key: a JWT, as PostgREST reads every bearer token (its messages included)
        if tokens is None:
            if looks_like_jwt(bearer):
                raise Unauthenticated("JWT authentication is not configured",
                                      hint="Send the application's key, or configure [auth.issuers] in gatehouse.toml.")
            raise Unauthenticated("Invalid API key or token", hint="Check the key: it reads gh_<id>_<secret>.")
        user = await tokens.verify(bearer)
        if by_key is not None and user.app not in (None, by_key.app):
            raise InvalidClaims("JWT was issued for another application")
        if by_key is None and user.app is None:
            raise InvalidClaims("The token names no known application")
    if by_key is None and user is None:
        raise MissingCredentials()
    app = by_key.app if by_key is not None else user.app  # type: ignore[union-attr]
    assert app is not None
    if user is None:
        if require_user(app):
            raise MissingCredentials("This application requires a user token as well",
                                     hint="Send the user's JWT as 'Authorization: Bearer <token>' with the apikey.")
        assert by_key is not None
        return by_key  # the key's own identity, made when the key ring was loaded
    return Identity(
        app=app,
        key_id=by_key.key_id if by_key is not None else "",
        subject=user.subject if user is not None else None,
        claims=dict(user.claims) if user is not None else {},
    )
