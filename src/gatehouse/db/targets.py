"""Where each database of a project lives, and how gatehouse logs in to it.

A database with a URL is used as it is (it must exist). A database without one runs on the project's
*embedded* PostgreSQL: a server started from the ``pgserver`` wheel with its data under
``.gatehouse/pgdata``, reused across runs, listening on a Unix socket only, and stopped when the last
gatehouse process using it exits.

Two logins per database:

* the *owner* (the URL's user, or ``postgres`` when embedded) runs migrations and ``apply``;
* the *authenticator*, a non-superuser LOGIN role that owns nothing and is a member of every app role.
  ``serve`` connects as it, with the app's role as a startup parameter.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from gatehouse.errors import DatabaseUnavailable
from gatehouse.project import Project
from gatehouse.secrets import resolve_secret

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class DatabaseTarget:
    name: str
    owner_dsn: str
    authenticator: str
    authenticator_password: str | None
    embedded: bool

    def authenticator_kwargs(self) -> dict[str, Any]:
        """Connection arguments for the authenticator: the owner's address, the authenticator's identity."""
        return {
            "dsn": self.owner_dsn,
            "user": self.authenticator,
            "password": self.authenticator_password or "",
            "timeout": CONNECT_TIMEOUT_S,
        }

    async def connect_owner(self) -> asyncpg.Connection:
        try:
            return await asyncpg.connect(self.owner_dsn, timeout=CONNECT_TIMEOUT_S)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise DatabaseUnavailable(f"cannot connect to database {self.name!r}: {exc}") from None


def _start_embedded(state_dir: Path) -> str:
    """Start (or join) the project's embedded server; returns its base URI (database ``postgres``)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver  # here: only projects that use it pay for the import

        try:
            server = pgserver.get_server(state_dir / "pgdata", cleanup_mode="stop")  # type: ignore[attr-defined]
        except Exception as exc:  # pgserver raises plain exceptions from subprocesses
            raise DatabaseUnavailable(
                f"could not start the embedded PostgreSQL in {state_dir / 'pgdata'}: {exc}; "
                f"its log is {state_dir / 'pgdata' / 'log'}"
            ) from None
    return str(server.get_uri())


def _with_database(uri: str, database: str) -> str:
    base, _, query = uri.partition("?")
    prefix = base.rsplit("/", 1)[0]
    return f"{prefix}/{database}" + (f"?{query}" if query else "")


async def _ensure_database(server_uri: str, database: str) -> None:
    conn = await asyncpg.connect(server_uri, timeout=CONNECT_TIMEOUT_S)
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
        )
    return targets
