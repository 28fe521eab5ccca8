"""What went wrong when a database of the project does not let gatehouse in, said so a person can fix it.

Every failed login becomes one :class:`ConnectionFailed`: which database of the project, the address it was
tried at (user, host, port, database; never the password), what happened (refused, timed out, authentication
failed, no such database, ...), and what to check, including where the URL came from (the environment
variable or gatehouse.toml), since that is where a wrong port or password is fixed.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from gatehouse.errors import DatabaseUnavailable

CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError,
)
"""What ``asyncpg.connect`` raises when it cannot log in (a malformed URL is a ValueError)."""


@dataclass(frozen=True, slots=True)
class Address:
    user: str
    hosts: str
    """``host:port`` (comma-separated when the URL names several), or ``socket <dir>`` for a Unix socket."""
    database: str

    def __str__(self) -> str:
        return f"{self.user}@{self.hosts}/{self.database}" if self.user else f"{self.hosts}/{self.database}"


def address_of(dsn: str, user: str | None = None) -> Address:
    """The parts of a PostgreSQL URL a message may show: never its password."""
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        netloc = parts.netloc.rpartition("@")[2]
        login = unquote(parts.netloc.rpartition("@")[0].partition(":")[0]) if "@" in parts.netloc else ""
        database = unquote(parts.path.lstrip("/")) or (query.get("dbname") or [""])[0]
        host_param = (query.get("host") or [""])[0]
        port_param = (query.get("port") or [""])[0]
    except ValueError:
        return Address(user or "", "(an address that cannot be read)", "")
    hosts = [_host_port(spec, port_param) for spec in netloc.split(",")] if netloc else []
    if host_param.startswith("/"):
        hosts = [f"socket {host_param}"]
    elif host_param:
        hosts = [f"{h}:{port_param or 5432}" for h in host_param.split(",")]
    login = user or login or (query.get("user") or [""])[0]
    return Address(login, ", ".join(hosts) or "localhost:5432", database or login)


def _host_port(spec: str, default_port: str) -> str:
    if spec.startswith("["):  # [::1]:5432
        host, _, rest = spec[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = spec.partition(":")
    return f"{host or 'localhost'}:{port or default_port or 5432}"


class ConnectionFailed(DatabaseUnavailable):
    """A database of the project could not be logged in to; the message names it, the address and the fix."""

    def __init__(self, what: str, happened: str, check: str) -> None:
        self.what, self.happened, self.check = what, happened, check
        super().__init__(f"cannot connect to {what}: {happened}")

    def __str__(self) -> str:
        return f"{self.args[0]}\n  check: {self.check}"


def connection_failure(exc: BaseException, *, database: str, dsn: str, source: str, timeout_s: float,
                       user: str | None = None, as_authenticator: bool = False) -> ConnectionFailed:
    """Turn what ``asyncpg.connect`` raised into a message naming the database, the address and what to check.

    ``source`` says where the URL came from (``$SHOP_DATABASE_URL``, ``gatehouse.toml``, ``embedded``);
    ``user`` is the login when it is not the URL's own (the authenticator role).
    """
    address = address_of(dsn, user)
    embedded = source == "embedded"
    if embedded:
        what = f"database {database!r} (embedded PostgreSQL, {address.hosts})"
        where, url_fix = "it", "the URL"
    else:
        what = f"database {database!r} ({address}, URL from {source})"
        where, url_fix = address.hosts, f"the URL in {source}"
    if isinstance(exc, TimeoutError):
        return ConnectionFailed(
            what, f"no answer from {where} within {timeout_s:g} s",
            f"that {address.hosts} is the PostgreSQL server and is reachable from here (a firewall that drops "
            f"packets looks like this); if it is slow to answer, raise [databases.{database}] connect_timeout_s")
    if isinstance(exc, socket.gaierror):
        return ConnectionFailed(what, "the host name cannot be resolved",
                                f"the host name in {url_fix}, and this machine's DNS")
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return ConnectionFailed(
            what, f"{where} refused the connection (nothing listens there)",
            f"that PostgreSQL is running and listens on {address.hosts} (its listen_addresses and port), "
            f"and the host and port in {url_fix}")
    if isinstance(exc, FileNotFoundError) and embedded:
        return ConnectionFailed(what, "its socket is gone (the server stopped)", "run the command again")
    if isinstance(exc, asyncpg.InvalidPasswordError):
        if as_authenticator:
            return ConnectionFailed(
                what, f"authentication failed for the authenticator role {address.user!r}",
                f"that [databases.{database}] authenticator_password names the variable holding its password, "
                "and run `gatehouse apply` after changing it (apply sets the role's password)")
        return ConnectionFailed(what, f"authentication failed for user {address.user!r}",
                                f"the user and password in {url_fix} (or PGPASSWORD / ~/.pgpass when the URL "
                                "has no password)")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return ConnectionFailed(
            what, f"the server has no database named {address.database!r}",
            f"the database name at the end of {url_fix}, or create it (createdb {address.database})")
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        if as_authenticator:
            return ConnectionFailed(what, f"the authenticator role {address.user!r} may not log in ({exc})",
                                    "run `gatehouse apply` first: it creates the role and its grants")
        return ConnectionFailed(what, f"the server refused the login: {exc}",
                                f"that the user in {url_fix} exists, and the server's pg_hba.conf lets it in "
                                "from this host")
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return ConnectionFailed(what, "the server has no free connection slots",
                                "max_connections on the server, and the pool_size quotas of the apps")
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return ConnectionFailed(what, "the server is starting up or shutting down", "try again in a moment")
    if isinstance(exc, asyncpg.PostgresError):
        return ConnectionFailed(what, f"the server refused: {exc}", f"the server's log, and {url_fix}")
    if isinstance(exc, (ConnectionResetError, ssl.SSLError, asyncpg.ConnectionDoesNotExistError)):
        return ConnectionFailed(what, f"{where} closed the connection during the handshake",
                                f"that {address.hosts} is a PostgreSQL server, and its TLS settings (sslmode)")
    if isinstance(exc, (ValueError, asyncpg.InterfaceError)):
        return ConnectionFailed(
            what, "the URL cannot be read", f"{url_fix}: postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
    return ConnectionFailed(what, f"{reason}", f"that the server is running and reachable, and {url_fix}")
