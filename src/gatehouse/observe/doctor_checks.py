"""The doctor's first questions about one database: can its host be found and reached, does the owner get in,
is the connection encrypted, does the authenticator (``serve``'s login) get in, and does the database exist.

:class:`DatabaseProbe` holds what these checks learn (the owner's connection above all), so the later checks
of :mod:`.doctor_drift`, :mod:`.doctor_capacity` and :mod:`.doctor_activity` reuse it. Reachability is asked
the way ``pg_isready`` would, without logging in: DNS, a TCP (or Unix socket) connection, then PostgreSQL's
TLS request, whose one-byte answer proves a PostgreSQL server listens there (and whether it offers TLS),
without a line in the server's log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from gatehouse.config import DatabaseConfig
from gatehouse.db.connection_errors import CONNECT_ERRORS, ConnectionFailed, address_of, connection_failure
from gatehouse.db.targets import EMBEDDED, DatabaseTarget
from gatehouse.observe.doctor import Options, Outcome, Skipped, fail, ok, seconds_text, warn
from gatehouse.project import Project
from gatehouse.secrets import source_of

DOCTOR_APPLICATION = "gatehouse doctor"
"""The ``application_name`` of doctor's own sessions (not ``gatehouse/<app>``: they are no app's)."""
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
SOCKET_DIRS = ("/run/postgresql", "/var/run/postgresql", "/tmp", "/private/tmp")
MAINTENANCE_DATABASE = "postgres"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address a PostgreSQL URL names: a host and port, or a Unix socket directory and port."""

    host: str
    port: int

    @property
    def is_socket(self) -> bool:
        return self.host.startswith("/")

    @property
    def path(self) -> str:
        return f"{self.host}/.s.PGSQL.{self.port}"

    @property
    def label(self) -> str:
        if self.is_socket:
            return f"socket {self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def local(self) -> bool:
        """On this machine: a Unix socket, ``localhost`` or a loopback address."""
        if self.is_socket or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def endpoints_of(dsn: str) -> list[Endpoint]:
    """Where a PostgreSQL URL points, as asyncpg reads it (hosts, ``?host=``, ``?port=``, PGHOST, PGPORT)."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    default_port = int(((query.get("port") or [""])[0].split(",")[0]) or os.environ.get("PGPORT") or 5432)
    specs: list[tuple[str, int]] = []
    netloc = parts.netloc.rpartition("@")[2]
    for spec in netloc.split(",") if netloc else []:
        if spec.startswith("["):
            host, _, rest = spec[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = spec.partition(":")
        if host:
            specs.append((unquote(host), int(port or default_port)))
    host_param = (query.get("host") or [""])[0]
    if host_param:
        specs = [(host, default_port) for host in host_param.split(",") if host]
    if not specs:
        pghost = os.environ.get("PGHOST")
        if pghost:
            specs = [(host, default_port) for host in pghost.split(",") if host]
        else:  # asyncpg's defaults: the usual socket folders, then localhost
            specs = [(folder, default_port) for folder in SOCKET_DIRS
                     if os.path.exists(f"{folder}/.s.PGSQL.{default_port}")] + [("localhost", default_port)]
    return [Endpoint(host, port) for host, port in specs]


def url_place(source: str) -> str:
    """Where a URL is fixed, for hints: ``the URL in $SHOP_DATABASE_URL``."""
    return "the embedded server's settings" if source == EMBEDDED else f"the URL in {source}"


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(SSL_REQUEST)
    await writer.drain()
    return await reader.read(1)


async def reach_endpoint(endpoint: Endpoint, timeout_s: float) -> dict[str, Any]:
    """Resolve, connect and greet one endpoint; returns what happened, with times, for the report's data."""
    seen: dict[str, Any] = {"address": endpoint.label}
    started = time.perf_counter()
    if endpoint.is_socket:
        if not os.path.exists(endpoint.path):
            return seen | {"error": "no socket there (the server is not running, or listens elsewhere)",
                           "kind": "refused"}
        addresses = [endpoint.path]
    else:
        try:
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM), timeout_s)
        except socket.gaierror:
            return seen | {"error": f"the host name {endpoint.host!r} cannot be resolved", "kind": "dns"}
        except TimeoutError:
            return seen | {"error": f"no DNS answer for {endpoint.host!r} within {timeout_s:g} s", "kind": "dns"}
        seen["resolved_s"] = time.perf_counter() - started
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        seen["addresses"] = addresses
    errors: list[str] = []
    for address in addresses:
        connect_started = time.perf_counter()
        try:
            opened = (asyncio.open_unix_connection(address) if endpoint.is_socket
                      else asyncio.open_connection(address, endpoint.port))
            reader, writer = await asyncio.wait_for(opened, timeout_s)
        except TimeoutError:
            errors.append(f"{address}: no answer within {timeout_s:g} s")
            seen["kind"] = "timeout"
            continue
        except OSError as exc:
            refused = isinstance(exc, ConnectionRefusedError)
            errors.append(f"{address}: " + ("refused the connection (nothing listens there)" if refused
                                             else exc.strerror or str(exc)))
            seen["kind"] = "refused" if refused else "network"
            continue
        seen["connected_s"] = time.perf_counter() - connect_started
        try:
            byte = await asyncio.wait_for(_answer(reader, writer), timeout_s)
        except (TimeoutError, OSError):
            byte = None
        finally:
            writer.close()
        if byte in (b"S", b"N"):
            return seen | {"postgresql": True, "tls_offered": byte == b"S"}
        seen["kind"] = "silent" if byte is None else "not_postgresql"
        errors.append(f"{address}: " + (f"accepted the connection but did not answer PostgreSQL's greeting "
                                        f"within {timeout_s:g} s" if byte is None
                                        else "answered, but not as a PostgreSQL server"))
    return seen | {"error": "; ".join(errors) or "no address"}


def _reach_hint(kind: str, endpoint: Endpoint, source: str) -> str:
    place = url_place(source)
    if kind == "dns":
        return f"the host name in {place}, and this machine's DNS (getent hosts {endpoint.host})"
    if kind == "refused":
        return (f"that PostgreSQL is running and listens on {endpoint.label} (its listen_addresses and port), "
                f"and the host and port in {place}")
    if kind == "timeout":
        return f"a firewall between here and {endpoint.label} (dropped packets look like this), and {place}"
    if kind in ("silent", "not_postgresql"):
        return f"that {endpoint.label} is the PostgreSQL server's port (not a proxy or another service)"
    return f"the network between here and {endpoint.label}, and {place}"


async def reach(endpoints: list[Endpoint], source: str, timeout_s: float) -> tuple[Outcome, bool | None]:
    """Check 1 for one server: returns the outcome and whether the server offers TLS (None: unknown)."""
    seen = [await reach_endpoint(endpoint, timeout_s) for endpoint in endpoints]
    lines = []
    for one in seen:
        if "error" in one:
            lines.append(f"{one['address']}: {one['error']}")
            continue
        dns = f"resolved in {seconds_text(one['resolved_s'])}, " if "resolved_s" in one else ""
        lines.append(f"{one['address']}: {dns}connected in {seconds_text(one['connected_s'])}, PostgreSQL answered")
    good = [one for one in seen if one.get("postgresql")]
    tls_offered = good[0]["tls_offered"] if good else None
    data = {"endpoints": seen}
    if len(good) == len(seen):
        return ok("; ".join(lines), data=data), tls_offered
    first_bad = next(i for i, one in enumerate(seen) if "error" in one)
    hint = _reach_hint(str(seen[first_bad].get("kind", "network")), endpoints[first_bad], source)
    if good:
        return warn(f"{len(seen) - len(good)} of {len(seen)} addresses cannot be reached", hint=hint,
                    details=lines, data=data), tls_offered
    return fail("; ".join(lines), hint=hint, data=data), None


def sslmode_of(dsn: str) -> str:
    return ((parse_qs(urlsplit(dsn).query).get("sslmode") or [""])[0] or os.environ.get("PGSSLMODE")
            or "prefer")


class DatabaseProbe:
    """What the checks of one database share: its target, its settings, and the owner's connection."""

    def __init__(self, project: Project, target: DatabaseTarget, options: Options) -> None:
        self.project = project
        self.target = target
        self.options = options
        self.config: DatabaseConfig = project.config.databases[target.name]
        self.endpoints = endpoints_of(target.owner_dsn)
        self.address = address_of(target.owner_dsn)
        self.conn: asyncpg.Connection | None = None
        self.database_missing = False
        self.tls_offered: bool | None = None
        self.dropped: str | None = None
        self.sees_everything = False
        """The owner is a superuser or pg_read_all_stats: other roles' sessions and statements are visible."""

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def local(self) -> bool:
        return all(endpoint.local for endpoint in self.endpoints)

    @property
    def server(self) -> str:
        """The server this database lives on (for grouping the project's databases by server)."""
        return ", ".join(endpoint.label for endpoint in self.endpoints)

    def settings(self) -> dict[str, str]:
        limit = str(int(self.options.timeout_s * 1000))
        return {"application_name": DOCTOR_APPLICATION, "statement_timeout": limit, "lock_timeout": limit}

    def connection(self) -> asyncpg.Connection:
        if self.conn is None:
            raise Skipped(f"skipped: {self.dropped or 'no connection to the database'}")
        return self.conn

    def drop(self) -> None:
        """Abandon the owner's connection after a check overran (a hung server must not hang the next check)."""
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None
            self.dropped = "the server stopped answering during an earlier check"

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            try:
                await asyncio.wait_for(conn.close(), self.options.timeout_s)
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                conn.terminate()

    def _failure(self, exc: BaseException, **extra: Any) -> ConnectionFailed:
        return connection_failure(exc, database=self.name, dsn=self.target.owner_dsn, source=self.target.source,
                                  timeout_s=self.options.timeout_s, **extra)

    # --- 1. DNS and TCP -----------------------------------------------------------------------------------

    async def reach(self) -> Outcome:
        outcome, self.tls_offered = await reach(self.endpoints, self.target.source, self.options.timeout_s)
        return outcome

    # --- 2. the owner's login -------------------------------------------------------------------------------

    async def _connect(self, **extra: Any) -> asyncpg.Connection:
        return await asyncpg.connect(self.target.owner_dsn, timeout=self.options.timeout_s,
                                     server_settings=self.settings(), **extra)

    async def login(self) -> Outcome:
        started = time.perf_counter()
        try:
            self.conn = await self._connect()
        except asyncpg.InvalidCatalogNameError:
            self.database_missing = True  # said by the database check; the server-wide checks go on
            try:
                self.conn = await self._connect(database=MAINTENANCE_DATABASE)
            except CONNECT_ERRORS as exc:
                raise self._failure(exc) from None
        except CONNECT_ERRORS as exc:
            raise self._failure(exc) from None
        elapsed = time.perf_counter() - started
        row = await self.conn.fetchrow(
            "SELECT current_user AS login, current_setting('server_version') AS version, "
            "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser, "
            "pg_has_role('pg_read_all_stats', 'MEMBER') AS stats")
        assert row is not None
        self.sees_everything = bool(row["superuser"] or row["stats"])
        where = f" to the server (database {self.address.database!r} is checked below)" if self.database_missing else ""
        role = ", superuser" if row["superuser"] else ""
        details = [] if self.sees_everything else [
            f"{row['login']} is neither a superuser nor a member of pg_read_all_stats: other roles' sessions and "
            "statements are partly hidden from the checks below (GRANT pg_read_all_stats TO it to see them)"]
        version = str(row["version"]).split(" ")[0]
        return ok(f"logged in as {row['login']}{where} in {seconds_text(elapsed)} (PostgreSQL {version}{role})",
                  details=details, data={"login": row["login"], "server_version": row["version"],
                                         "superuser": bool(row["superuser"]), "seconds": elapsed})

    # --- 3. TLS ----------------------------------------------------------------------------------------------

    async def tls(self) -> Outcome:
        conn = self.connection()
        row = await conn.fetchrow("SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        server_ssl = await conn.fetchval("SELECT current_setting('ssl')")
        mode = sslmode_of(self.target.owner_dsn)
        data = {"encrypted": bool(row and row["ssl"]), "sslmode": mode, "server_ssl": server_ssl,
                "local": self.local}
        if row is not None and row["ssl"]:
            details = [] if mode in ("verify-ca", "verify-full") or self.local else [
                f"sslmode={mode} encrypts but does not check the server's certificate: verify-full also rules "
                "out an impostor"]
            return ok(f"encrypted ({row['version']}, {row['cipher']}; sslmode={mode})", details=details,
                      data=data | {"version": row["version"], "cipher": row["cipher"]})
        if self.local:
            kind = "a Unix socket" if all(e.is_socket for e in self.endpoints) else "this machine"
            return ok(f"not encrypted: the server is on {kind}, so nothing crosses a network", data=data)
        server = "the server has ssl = off" if server_ssl == "off" else f"sslmode={mode} in the URL"
        return warn(f"not encrypted: {self.server} is reached over the network in clear text ({server})",
                    hint=f"turn ssl on in the server's postgresql.conf and add sslmode=verify-full (at least require) "
                         f"to {url_place(self.target.source)}", data=data)

    # --- 4. the authenticator ----------------------------------------------------------------------------------

    async def authenticator(self) -> Outcome:
        role = self.target.authenticator
        arguments = self.target.authenticator_kwargs() | {"timeout": self.options.timeout_s,
                                                          "server_settings": self.settings()}
        if self.database_missing:
            arguments["database"] = MAINTENANCE_DATABASE
        started = time.perf_counter()
        try:
            conn = await asyncpg.connect(**arguments)
        except CONNECT_ERRORS as exc:
            failure = self._failure(exc, user=role, as_authenticator=True)
            return fail(failure.happened, hint=self._authenticator_hint(exc, failure),
                        data={"role": role, "password_from": self._password_source()})
        elapsed = time.perf_counter() - started
        try:
            superuser = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        finally:
            await conn.close()
        data = {"role": role, "password_from": self._password_source(), "seconds": elapsed}
        if superuser:
            return warn(f"{role} is a superuser: the app roles cannot limit what its connections do",
                        hint=f"ALTER ROLE {role} NOSUPERUSER (gatehouse apply makes it an ordinary role)", data=data)
        password = f", password from {self._password_source()}" if self.config.authenticator_password else ""
        return ok(f"{role} logged in in {seconds_text(elapsed)}{password}", data=data)

    def _password_source(self) -> str | None:
        reference = self.config.authenticator_password
        return source_of(reference) if reference else None

    def _authenticator_hint(self, exc: BaseException, failure: ConnectionFailed) -> str:
        role, key = self.target.authenticator, f"[databases.{self.name}] authenticator_password"
        if not isinstance(exc, asyncpg.InvalidPasswordError):
            return failure.check
        source = self._password_source()
        if source is None:
            return (f"the server asks {role} for a password and {key} is not set: add authenticator_password = "
                    '"env:VARIABLE" with it to gatehouse.toml, set VARIABLE, and run `gatehouse apply`')
        return (f"the password in {source} ({key}) is not {role}'s: correct {source}, or run `gatehouse apply` to "
                "give the role the password it holds")

    # --- 5. the database exists ----------------------------------------------------------------------------------

    async def database(self) -> Outcome:
        conn = self.connection()
        name = self.address.database
        if self.database_missing:
            return fail(f"the server has no database named {name!r}",
                        hint=f"create it (createdb {name}) and run `gatehouse migrate` and `gatehouse apply`, or fix "
                             f"the database name at the end of {url_place(self.target.source)}")
        row = await conn.fetchrow(
            "SELECT current_database() AS name, pg_is_in_recovery() AS standby, "
            "pg_encoding_to_char(encoding) AS encoding, datconnlimit AS limit "
            "FROM pg_database WHERE datname = current_database()")
        assert row is not None
        data = {"name": row["name"], "encoding": row["encoding"], "standby": row["standby"],
                "connection_limit": row["limit"]}
        if row["standby"]:
            return fail(f"database {row['name']!r} is on a standby (in recovery): it refuses writes, migrations and "
                        "apply", hint=f"point [databases.{self.name}] url at the primary; standbys belong in "
                                      f"[databases.{self.name}] replicas", data=data)
        limit = "" if row["limit"] < 0 else f", at most {row['limit']} connections"
        return ok(f"database {row['name']!r} exists ({row['encoding']}, accepts writes{limit})", data=data)
