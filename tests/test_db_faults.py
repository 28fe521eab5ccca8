"""When the database goes away: answers are 503 with Retry-After (never PostgreSQL's text), /ready says so,
and everything works again when it is back, without a restart. Killed or silently dropped connections cost
a read nothing (it runs again on a fresh connection) and a write is never sent twice.

Real faults only: ``pg_terminate_backend`` on the machine's PostgreSQL, a TCP proxy (below) cut like a NAT
that forgot its flows, a role's connection limit, and a private PostgreSQL cluster of the test's own, stopped
with ``pg_ctl -m immediate`` and started again (the machine's shared server is never stopped).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.app import create_admin_app
from gatehouse.db.app_pools import application_name
from gatehouse.db.faults import KEEPALIVE_IDLE_S, USER_TIMEOUT_MS
from gatehouse.db.sqlstate import api_error_from_postgres
from gatehouse.project import Project
from gatehouse.runtime import Runtime
from replica_cluster import Cluster, private_cluster

TOML = """
[project]
name = "faults"

[databases.main]

[server]
pool_timeout_ms = 3000

[apps.clerk]
quota = { pool_size = 1 }
grants = [{ contract = "items", actions = ["read", "insert"] }]
"""
AGING = """
pool_max_idle_s = 0.3
pool_max_lifetime_s = 0.8
"""
MIGRATION = """
CREATE TABLE items (id serial PRIMARY KEY, sku text NOT NULL UNIQUE, name text NOT NULL);
INSERT INTO items (sku, name) VALUES ('a-1', 'anvil'), ('b-2', 'bell');
"""
CONTRACTS = {"items.v1.sql": "SELECT id, sku, name FROM items"}
ITEMS = [{"id": 1, "sku": "a-1", "name": "anvil"}, {"id": 2, "sku": "b-2", "name": "bell"}]
POSTGRES_TEXT = ("refused", "errno", "terminat", "sigquit", "starting up", "shutting down", "too many",
                 "127.0.0.1", "fatal", "postgres", "role ")
"""Words of PostgreSQL's and the operating system's messages that no answer may carry."""
Served = tuple[httpx.AsyncClient, Runtime, Project]
URL_VARIABLE = "GATEHOUSE_DATABASES__MAIN__URL"


def assert_unavailable(response: httpx.Response, codes: tuple[str, ...] = ("PGRST000", "PGRST001")) -> None:
    """503 in PostgREST's shape, with a small Retry-After, and nothing of PostgreSQL's own text."""
    assert response.status_code == 503, (response.status_code, response.text)
    assert 1 <= int(response.headers["retry-after"]) <= 5
    if response.request.method == "HEAD":
        assert response.headers["proxy-status"].startswith("PostgREST; error=")
        return
    body = response.json()
    assert set(body) == {"code", "message", "details", "hint"}
    assert body["code"] in codes, body
    assert body["details"] is None
    text = response.text.lower()
    assert not [word for word in POSTGRES_TEXT if word in text], body


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0, every_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every_s)
    return True


async def app_backends(server: str, app: str, database: str) -> set[int]:
    conn = await asyncpg.connect(server)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = $2",
                                application_name(app), database)
    finally:
        await conn.close()
    return {row["pid"] for row in rows}


async def terminate_backends(server: str, app: str, database: str) -> int:
    conn = await asyncpg.connect(server)
    try:
        killed: int = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND datname = $2", application_name(app), database)
    finally:
        await conn.close()
    return killed


def database_of(project: Project) -> str:
    return f"{project.config.project.name}_main"


async def skus(project: Project, sku: str) -> int:
    async with operations.owner_connection(project) as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM items WHERE sku = $1", sku)
    return count


# --- a TCP proxy that can be cut ----------------------------------------------------------------


@dataclass(eq=False)
class Flow:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    cut: bool = False


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, as a NAT answers a packet of a flow it no longer knows."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class Proxy:
    """Between gatehouse and PostgreSQL. :meth:`cut` forgets every flow: the server's side is closed (its
    backend ends), the client's is left open and silent, and reset when the client next sends, so that a
    pooled connection looks alive until a statement is sent on it. With ``refuse``, new flows are reset too."""

    upstream: tuple[str, int]
    port: int = 0
    refuse: bool = False
    resets: int = 0
    flows: set[Flow] = field(default_factory=set)
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for flow in list(self.flows):
            flow.client.transport.abort()
            flow.server.transport.abort()

    def cut(self) -> None:
        for flow in self.flows:
            flow.cut = True
            flow.server.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            self.resets += 1
            reset(writer)
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        flow = Flow(writer, up_writer)
        self.flows.add(flow)
        try:
            await asyncio.gather(self._to_server(flow, reader), self._to_client(flow, up_reader),
                                 return_exceptions=True)
        finally:
            self.flows.discard(flow)

    async def _to_server(self, flow: Flow, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            if flow.cut:
                self.resets += 1
                reset(flow.client)
                return
            flow.server.write(data)
            await flow.server.drain()
        flow.server.close()

    async def _to_client(self, flow: Flow, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            if flow.cut:
                return
            flow.client.write(data)
            await flow.client.drain()
        if not flow.cut:
            flow.client.close()


@pytest.fixture
async def proxy(server_uri: str) -> AsyncIterator[Proxy]:
    address = urlsplit(server_uri)
    if not address.hostname or address.hostname.startswith("/"):
        pytest.skip("the test server is not reachable over TCP")
    relay = Proxy((address.hostname, address.port or 5432))
    await relay.start()
    yield relay
    await relay.close()


def via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    login = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{login + '@' if login else ''}127.0.0.1:{port}").geturl()


@pytest.fixture
async def serve(make_project: ProjectFactory, serve_project: Any,
                monkeypatch: pytest.MonkeyPatch) -> Callable[..., Awaitable[Served]]:
    """Serve the test project, on the machine's PostgreSQL unless ``cluster`` is given, and through
    ``proxy`` when given (migrated and applied directly, served through it)."""
    async def start(*, server_settings: str = "", cluster: Cluster | None = None,
                    proxy: Proxy | None = None) -> Served:
        project = make_project(toml=TOML.replace("[server]\n", "[server]\n" + server_settings),
                               migrations={"V001__items.sql": MIGRATION}, contracts=CONTRACTS)
        if cluster is not None:
            database = database_of(project)
            await cluster.create_database(database)
            monkeypatch.setenv(URL_VARIABLE, cluster.url(database))
        keys = await prepare(project)
        if proxy is not None:
            monkeypatch.setenv(URL_VARIABLE, via(os.environ[URL_VARIABLE], proxy.port))
        client, runtime = await serve_project(project)
        client.headers["apikey"] = keys["clerk"]
        return client, runtime, project

    return start


# --- PostgreSQL's own errors ------------------------------------------------------------------------


@pytest.mark.parametrize(("sqlstate", "text"), [
    ("08006", "could not receive data from server: Connection reset by peer"),
    ("08003", "connection was closed in the middle of operation"),
    ("57P01", "terminating connection due to administrator command"),
    ("57P02", "terminating connection because of crash of another server process"),
    ("57P03", "the database system is starting up"),
    ("57P05", "terminating connection due to idle-session timeout"),
    ("53300", "sorry, too many clients already"),
    ("53200", "out of memory"),
])
def test_a_database_going_away_is_503_with_retry_after(sqlstate: str, text: str) -> None:
    error = api_error_from_postgres(asyncpg.PostgresError.new({"C": sqlstate, "M": text, "S": "FATAL"}))
    assert (error.status, error.code) == (503, sqlstate)
    assert error.headers == {"Retry-After": "1"}
    assert text not in str(error.body()) and error.details is None


@pytest.mark.parametrize(("sqlstate", "status"), [("53400", 500), ("57014", 504), ("57000", 500)])
def test_other_operator_and_resource_errors_keep_their_status(sqlstate: str, status: int) -> None:
    error = api_error_from_postgres(asyncpg.PostgresError.new({"C": sqlstate, "M": "x", "S": "ERROR"}))
    assert error.status == status and "Retry-After" not in error.headers


# --- killed and dropped connections ---------------------------------------------------------------


async def test_killed_backends_cost_a_read_nothing_and_a_write_is_sent_once(
        serve: Callable[..., Awaitable[Served]], server_uri: str) -> None:
    client, runtime, project = await serve()
    database = database_of(project)
    assert (await client.get("/items?order=id")).json() == ITEMS
    before = await app_backends(server_uri, "clerk", database)
    assert before
    assert await terminate_backends(server_uri, "clerk", database) == len(before)
    answer = await client.get("/items?order=id")  # at once: its connection may not know yet that it is dead
    assert answer.status_code == 200 and answer.json() == ITEMS
    after = await app_backends(server_uri, "clerk", database)
    assert after and not after & before

    # A write on a connection the pool knows is dead: nothing was sent on it, so it goes on a new one, once.
    pool = runtime.pools.pool("clerk", "main")  # type: ignore[union-attr]
    assert await terminate_backends(server_uri, "clerk", database) == 1

    async def noticed() -> bool:
        return all(conn.is_closed() for conn in pool._idle)

    assert await eventually(noticed)
    written = await client.post("/items", json={"sku": "c-3", "name": "cog"})
    assert written.status_code == 201
    assert await skus(project, "c-3") == 1
    assert (await client.get("/items?select=id&order=id")).json() == [{"id": 1}, {"id": 2}, {"id": 3}]


async def test_a_connection_dropped_while_idle_costs_a_read_nothing(
        serve: Callable[..., Awaitable[Served]], proxy: Proxy) -> None:
    """A NAT or proxy forgot the pooled connection: the read meets a reset, and runs again on a new one."""
    client, runtime, _ = await serve(proxy=proxy)
    assert (await client.get("/items?order=id")).json() == ITEMS
    pool = runtime.pools.pool("clerk", "main")  # type: ignore[union-attr]
    proxy.cut()
    answer = await client.get("/items?order=id")
    assert answer.status_code == 200 and answer.json() == ITEMS
    assert pool.retried_reads == 1
    assert proxy.resets >= 1
    head = await client.head("/items")
    assert head.status_code == 200 and pool.retried_reads == 1  # the new connection is kept


async def test_a_write_on_a_dropped_connection_is_503_and_not_sent_again(
        serve: Callable[..., Awaitable[Served]], proxy: Proxy) -> None:
    client, runtime, project = await serve(proxy=proxy)
    assert (await client.get("/items?order=id")).status_code == 200
    proxy.cut()
    refused = await client.post("/items", json={"sku": "d-4", "name": "drum"})
    assert_unavailable(refused, codes=("PGRST001", "08003", "08006"))
    assert await skus(project, "d-4") == 0  # the statement never reached the database, and was not resent
    assert runtime.pools.pool("clerk", "main").retried_reads == 0  # type: ignore[union-attr]
    written = await client.post("/items", json={"sku": "d-4", "name": "drum"})  # the caller's own retry
    assert written.status_code == 201
    assert await skus(project, "d-4") == 1


async def test_a_read_whose_retry_cannot_connect_is_503(
        serve: Callable[..., Awaitable[Served]], proxy: Proxy) -> None:
    client, runtime, _ = await serve(proxy=proxy)
    assert (await client.get("/items")).status_code == 200
    pool = runtime.pools.pool("clerk", "main")  # type: ignore[union-attr]
    proxy.cut()
    proxy.refuse = True
    assert_unavailable(await client.get("/items"), codes=("PGRST000",))
    assert pool.retried_reads == 1  # once, not more
    started = time.monotonic()
    assert_unavailable(await client.get("/items"), codes=("PGRST000",))  # backing off: answered at once
    assert time.monotonic() - started < 0.3
    proxy.refuse = False

    async def back() -> bool:
        return (await client.get("/items")).status_code == 200

    assert await eventually(back, timeout_s=5.0, every_s=0.2)


async def test_too_many_connections_is_503_until_a_connection_can_be_opened(
        serve: Callable[..., Awaitable[Served]], server_uri: str) -> None:
    client, _, project = await serve()
    database = database_of(project)
    assert (await client.get("/items")).status_code == 200
    admin = await asyncpg.connect(server_uri)
    role = project.authenticator_role
    try:
        await admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
        await terminate_backends(server_uri, "clerk", database)
        assert_unavailable(await client.get("/items"), codes=("PGRST000",))
        started = time.monotonic()
        assert_unavailable(await client.get("/items"), codes=("PGRST000",))
        assert time.monotonic() - started < 0.3  # the server is not asked again during the backoff
        await admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')

        async def back() -> bool:
            return (await client.get("/items")).status_code == 200

        assert await eventually(back, timeout_s=6.0, every_s=0.2)
    finally:
        await admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
        await admin.close()


async def test_pooled_connections_ask_the_kernel_to_notice_a_vanished_peer(
        serve: Callable[..., Awaitable[Served]], server_uri: str) -> None:
    """A database whose packets vanish (no reset) must not hold a request forever: TCP keepalive and a user
    timeout end such a connection in about a minute, with no timer per statement."""
    host = urlsplit(server_uri).hostname or ""
    if not host or host.startswith("/"):
        pytest.skip("the test server is not reachable over TCP")
    client, runtime, _ = await serve()
    assert (await client.get("/items")).status_code == 200
    conn = runtime.pools.pool("clerk", "main")._idle[-1]  # type: ignore[union-attr]
    sock = conn._transport.get_extra_info("socket")  # type: ignore[union-attr]
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == USER_TIMEOUT_MS


# --- aging ----------------------------------------------------------------------------------------


async def test_connections_age_out_and_requests_keep_working(
        serve: Callable[..., Awaitable[Served]], server_uri: str) -> None:
    client, _, project = await serve(server_settings=AGING)
    database = database_of(project)
    first = await app_backends(server_uri, "clerk", database)
    seen: set[int] = set(first)
    stop = time.monotonic() + 2.0
    while time.monotonic() < stop:  # never idle long: only the 0.8 s lifetime replaces connections
        answer = await client.get("/items?order=id")
        assert answer.status_code == 200 and answer.json() == ITEMS
        seen |= await app_backends(server_uri, "clerk", database)
        await asyncio.sleep(0.03)
    last = await app_backends(server_uri, "clerk", database)
    assert len(seen) >= 3, seen
    assert last and not last & first

    async def idle_closed() -> bool:
        return not await app_backends(server_uri, "clerk", database)

    assert await eventually(idle_closed, timeout_s=2.0)  # idle 0.3 s: closed
    assert (await client.get("/items?order=id")).json() == ITEMS
    assert await app_backends(server_uri, "clerk", database)


# --- a database that is stopped and started again ---------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    yield from private_cluster("gh-faults-")


@asynccontextmanager
async def admin_port(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_admin_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin.test") as client:
        yield client


async def test_a_stopped_database_is_503_and_not_ready_until_it_is_back(
        cluster: Cluster, serve: Callable[..., Awaitable[Served]]) -> None:
    client, runtime, project = await serve(cluster=cluster)
    async with admin_port(runtime) as admin:
        assert (await client.get("/items?order=id")).json() == ITEMS
        assert (await admin.get("/ready")).status_code == 200

        await cluster.stop("immediate")  # a crash, as far as the clients can tell
        refused = [await client.get("/items"), await client.head("/items"),
                   await client.post("/items", json={"sku": "e-5", "name": "eel"})]
        for answer in refused:
            assert_unavailable(answer)
        started = time.monotonic()
        again = await client.get("/items?id=eq.1")
        assert time.monotonic() - started < 0.5  # no connect timeout per request while it is down
        assert_unavailable(again)
        refused.append(again)
        ready = await admin.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["databases"]["main"].startswith("unreachable")

        await cluster.start()  # the same server process keeps running: no restart of gatehouse

        async def back() -> bool:
            answer = await client.get("/items?order=id")
            if answer.status_code != 200:
                assert_unavailable(answer, codes=("PGRST000", "PGRST001", "57P03"))
                return False
            return bool(answer.json() == ITEMS)

        assert await eventually(back, timeout_s=10.0, every_s=0.2)
        assert (await admin.get("/ready")).status_code == 200
        written = await client.post("/items", json={"sku": "e-5", "name": "eel"})
        assert written.status_code == 201

    # Not one refused request went unrecorded: the audit writer spooled them while the database was down.
    ids = [answer.headers["x-request-id"] for answer in refused]

    async def audited() -> bool:
        conn = await asyncpg.connect(cluster.url(database_of(project)))
        try:
            rows = await conn.fetch("SELECT request_id, status FROM gatehouse.audit_log WHERE request_id = ANY($1)", ids)
        finally:
            await conn.close()
        return sorted((r["request_id"], r["status"]) for r in rows) == sorted((i, 503) for i in ids)

    assert await eventually(audited, timeout_s=10.0, every_s=0.25)
