"""Who is signed in to the console: tokens checked in constant time, sessions kept in this process.

A session is a random id (256 bits) in an ``HttpOnly; SameSite=Strict`` cookie scoped to ``/console``; what it
stands for (the admin's identity and role, its CSRF token, when it ends) stays on the server, so a cookie
carries no claim to forge and signing out or a restart ends it for good. Several instances each keep their own:
an admin signs in again on another one.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from gatehouse.admin.settings import ConsoleConfig
from gatehouse.errors import ProjectError
from gatehouse.secrets import resolve_secret

Role = Literal["admin", "readonly"]
COOKIE = "gh_console"
PRE_COOKIE = "gh_console_signin"
"""Before sign-in there is no session: the sign-in form's CSRF token is also set in this short-lived cookie
(double submit), so another site cannot sign a browser in as someone else."""
MAX_SESSIONS = 1000


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    identity: str
    """What the audit records as the admin: ``console:admin`` or ``console:readonly``."""
    role: Role
    csrf: str
    expires: float

    @property
    def may_change(self) -> bool:
        return self.role == "admin"


def configured_tokens(config: ConsoleConfig) -> dict[Role, str]:
    """The tokens whose environment variables are set; a variable named but unset signs nobody in."""
    tokens: dict[Role, str] = {}
    for role, reference in (("admin", config.admin_token), ("readonly", config.readonly_token)):
        try:
            value = resolve_secret(reference, what=f"[console] {role}_token")
        except ProjectError:
            continue
        if value:
            tokens[role] = value  # type: ignore[index]
    return tokens


def role_of(presented: str, tokens: dict[Role, str]) -> Role | None:
    """The role a presented token signs in as; every token is compared, in constant time."""
    found: Role | None = None
    for role, token in tokens.items():
        if hmac.compare_digest(presented.encode(), token.encode()) and found is None:
            found = role
    return found


class SessionStore:
    def __init__(self, minutes: int) -> None:
        self.seconds = minutes * 60.0
        self._sessions: dict[str, Session] = {}

    def open(self, role: Role) -> Session:
        now = time.monotonic()
        self._prune(now)
        if len(self._sessions) >= MAX_SESSIONS:  # the oldest goes: sign-ins cannot grow memory without bound
            del self._sessions[min(self._sessions.values(), key=lambda s: s.expires).id]
        session = Session(secrets.token_urlsafe(32), f"console:{role}", role, secrets.token_urlsafe(32),
                          now + self.seconds)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires <= time.monotonic():
            del self._sessions[session_id]
            return None
        return session

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _prune(self, now: float) -> None:
        for gone in [key for key, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[gone]


def same_token(expected: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())


class SignInThrottle:
    """Failed sign-ins per client address in the last minute. A client over the limit is refused *before* its
    token is looked at, so guessing on gets no answer about the token until the minute has passed."""

    WINDOW_S = 60.0
    MAX_CLIENTS = 10_000

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._failures: dict[str, list[float]] = {}

    def _recent(self, client: str, now: float) -> list[float]:
        kept = [t for t in self._failures.get(client, ()) if now - t < self.WINDOW_S]
        if kept:
            self._failures[client] = kept
        else:
            self._failures.pop(client, None)
        return kept

    def wait_s(self, client: str) -> int:
        """Seconds until this client may try again; 0 when it may now."""
        now = time.monotonic()
        recent = self._recent(client, now)
        if len(recent) < self.per_minute:
            return 0
        return max(1, int(recent[-self.per_minute] + self.WINDOW_S - now) + 1)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        if len(self._failures) >= self.MAX_CLIENTS and client not in self._failures:
            for other in list(self._failures):  # forget clients whose failures are older than the window
                self._recent(other, now)
        self._failures.setdefault(client, []).append(now)
