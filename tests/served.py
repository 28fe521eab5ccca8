"""``gatehouse serve`` as a real process on real sockets, for the tests of the wire (tests/test_server.py and
tests/test_proxies.py): a small project with its own database, served with the ``[server]`` settings a test asks
for (as ``GATEHOUSE_SERVER__*`` variables, the way an operator would override them)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from conftest import _create_database, drop_project, run_sync, with_database
from gatehouse import operations
from gatehouse.project import Project, load_project

TOML = """
[project]
name = "{name}"

[databases.main]

[apps.web]
functions = ["slow"]
grants = [{{ contract = "items", actions = ["read", "insert", "update", "delete"] }}]
"""
MIGRATION = """
CREATE TABLE items (id serial PRIMARY KEY, note text NOT NULL DEFAULT '');
INSERT INTO items (note) SELECT 'item ' || n FROM generate_series(1, 20) AS n;
"""
LOGIC = '''
import asyncio

import gatehouse
from gatehouse.logic.context import Context


@gatehouse.rpc(read_only=True)
async def slow(ctx: Context, seconds: float) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}
'''


@dataclass
class Served:
    project: Project
    database_url: str
    key: str
    port: int = 0
    admin_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sql(self, query: str) -> object:
        async def fetch() -> object:
            conn = await asyncpg.connect(self.database_url)
            try:
                return await conn.fetchval(query)
            finally:
                await conn.close()
        return run_sync(fetch())

    def audit_clients(self, request_id: str) -> list[str]:
        async def fetch() -> list[str]:
            conn = await asyncpg.connect(self.database_url)
            try:
                rows = await conn.fetch("SELECT client FROM gatehouse.audit_log WHERE request_id = $1", request_id)
                return [row["client"] for row in rows]
            finally:
                await conn.close()
        for _ in range(50):  # reads are audited in batches, a moment after the answer
            clients = run_sync(fetch())
            if clients:
                return clients
            time.sleep(0.1)
        return []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def small_project(server_uri: str, root: Path) -> Iterator[Served]:
    """The project, migrated and applied, with a key for its app ``web``; dropped afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "gatehouse.toml").write_text(TOML.format(name=name))
    for relative, text in {"migrations/V001__items.sql": MIGRATION, "contracts/items.v1.sql":
                           "SELECT id, note FROM items", "logic/slow.py": LOGIC}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    database = with_database(server_uri, f"{name}_main")
    run_sync(_create_database(server_uri, f"{name}_main"))
    os.environ["GATEHOUSE_DATABASES__MAIN__URL"] = database
    try:
        project = load_project(root)

        async def prepare() -> str:
            await operations.migrate_all(project)
            await operations.apply_all(project)
            return (await operations.create_key(project, "web")).secret_key

        served = Served(project, database, run_sync(prepare()))
        yield served
    finally:
        os.environ.pop("GATEHOUSE_DATABASES__MAIN__URL", None)
        run_sync(drop_project(server_uri, [f"{name}_main"], f"{name}_"))


def start(project: Served, **settings: object) -> Served:
    """Run ``gatehouse serve`` for the project with these ``[server]`` settings; a running server (its own ports and
    process), once ``/ready``."""
    served = dataclasses.replace(project, port=free_port(), admin_port=free_port())
    env = {**os.environ, "GATEHOUSE_DATABASES__MAIN__URL": served.database_url}
    for key, value in settings.items():
        env[f"GATEHOUSE_SERVER__{key.upper()}"] = value if isinstance(value, str) else _toml(value)
    served.log = served.project.root / f"serve-{served.port}.log"
    with served.log.open("wb") as log:
        served.process = subprocess.Popen(
            [sys.executable, "-m", "gatehouse", "--project", str(served.project.root), "serve", "--port",
             str(served.port), "--admin-port", str(served.admin_port)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    scheme = "https" if "tls_cert_file" in settings else "http"
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise AssertionError(f"gatehouse serve exited: {served.log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{scheme}://127.0.0.1:{served.admin_port}/ready", verify=False, timeout=1).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop(served)
    raise AssertionError(f"gatehouse serve never became ready: {served.log.read_text()[-2000:]}")


def _toml(value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return str(value)


def stop(served: Served, *, timeout: float = 20) -> int:
    """SIGTERM, and the exit status (killed after ``timeout`` seconds)."""
    process = served.process
    if process is None:
        return 0
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- raw HTTP over a socket -----------------------------------------------------------------------------


class Wire:
    """One client connection, written and read byte for byte."""

    def __init__(self, port: int, *, source: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(source, 0) if source else None)
        self.buffer = b""

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, *, timeout: float = 10, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-cased names) and body (by Content-Length)."""
        self.sock.settimeout(timeout)
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a response; got {self.buffer[:200]!r}")
            self.buffer += chunk
        head_bytes, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
        status = int(status_line.split()[1])
        length = 0 if head or status in (204, 304) else int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body

    def closed(self, *, timeout: float = 5) -> bool:
        """Whether the server closes the connection (EOF or reset) within ``timeout`` seconds, sending nothing."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        self.buffer += data
        return data == b""


def request(method: str, target: str, key: str, *, body: bytes = b"", extra: str = "",
            version: str = "HTTP/1.1") -> bytes:
    head = f"{method} {target} {version}\r\nHost: t\r\napikey: {key}\r\n{extra}"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@dataclass
class Serving:
    """A ``gatehouse serve`` started by :func:`serving`: its URLs, and once stopped, its exit status and stderr."""

    base: str
    admin: str
    returncode: int | None = None
    stderr: str = ""


@contextmanager
def serving(root: Path, *, env: dict[str, str] | None = None, timeout_s: float = 60) -> Iterator[Serving]:
    """``gatehouse serve`` of the project folder ``root`` (the environment: this process's, or ``env``) on free
    ports, for a synchronous test, once ``/ready``; stopped with SIGTERM afterwards (its status and stderr kept)."""
    port, admin_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "gatehouse", "--project", str(root), "serve", "--port",
                               str(port), "--admin-port", str(admin_port)],
                              env=env if env is not None else dict(os.environ), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    running = Serving(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{running.admin}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)
        yield running
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, running.stderr = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, running.stderr = server.communicate()
        running.returncode = server.returncode


@dataclass
class Instance:
    """One ``gatehouse serve`` process of a project, started by :func:`serve_instance`."""

    process: asyncio.subprocess.Process
    base: str
    admin: str
    log: bytearray = dataclasses.field(default_factory=bytearray)
    """The last ``LOG_TAIL_BYTES`` of its stderr, read as they come: a pipe nobody reads fills up (64 KiB), and the
    server then blocks on its next log line, unable even to stop (a test's teardown waited 30 s per instance)."""
    reader: asyncio.Task[None] | None = None


LOG_TAIL_BYTES = 64_000


async def _keep_tail(stream: asyncio.StreamReader, log: bytearray) -> None:
    while chunk := await stream.read(65_536):
        log += chunk
        del log[:-LOG_TAIL_BYTES]


async def serve_instance(root: Path, *, env: dict[str, str] | None = None, timeout_s: float = 60) -> Instance:
    """Start ``gatehouse serve`` for the project folder ``root`` (the environment: this process's, or ``env``) on
    free ports, without blocking the event loop (a test's own servers, e.g. a fake payment service, keep
    answering); the instance once ``/ready``."""
    port, admin = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatehouse", "--project", str(root), "serve", "--port", str(port), "--admin-port",
        str(admin), env=env if env is not None else dict(os.environ), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    instance = Instance(process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}")
    assert process.stderr is not None
    instance.reader = asyncio.create_task(_keep_tail(process.stderr, instance.log))
    async with httpx.AsyncClient() as client, asyncio.timeout(timeout_s):
        while True:
            if process.returncode is not None:
                await instance.reader
                raise AssertionError(bytes(instance.log) or b"gatehouse serve exited")
            try:
                if (await client.get(f"{instance.admin}/ready", timeout=1)).status_code == 200:
                    return instance
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


async def stop_instance(instance: Instance, *, kill: bool = False) -> int:
    """SIGTERM (SIGKILL with ``kill``) and the exit status."""
    if instance.process.returncode is None:
        instance.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await instance.process.wait()
        except TimeoutError:
            instance.process.kill()
            await instance.process.wait()
    if instance.reader is not None:
        await instance.reader  # the pipe's end, now that the process has exited
    return instance.process.returncode or 0

