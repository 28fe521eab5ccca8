"""``gatehouse serve``: the data and admin ports, each an HTTP/1.1 :class:`Listener`, in one event loop.

Both ports run in this process and loop, so they share one :class:`Runtime` (pools, key ring, audit writer).
HTTP is parsed on the loop's own thread (``http/h1.py``; bench/README.md says why). SIGINT or SIGTERM stops
accepting, lets the requests being answered finish (``[server] shutdown_grace_s``), then closes the runtime
(the audit writer flushes what it holds).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

from gatehouse.app import create_admin_app, create_app
from gatehouse.config import ServerConfig
from gatehouse.errors import ProjectError
from gatehouse.http.h1 import Limits
from gatehouse.http.listener import Listener
from gatehouse.runtime import Runtime

T = TypeVar("T")
log = logging.getLogger("gatehouse.serve")


def run_in_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def bind_probe(host: str, port: int) -> int:
    """Bind a socket to the address the way the HTTP server will (``SO_REUSEADDR``: a port in TIME_WAIT is
    free) and close it; the port bound (useful with port 0). Raises ``OSError`` when it cannot."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        return int(probe.getsockname()[1])


def _cannot_listen(exc: OSError, host: str, port: int, what: str, option: str) -> ProjectError:
    if isinstance(exc, socket.gaierror):
        return ProjectError(f"the {what} address {host!r} does not resolve: {exc.strerror}",
                            hint="Use an IP address or a name this machine resolves.")
    return ProjectError(f"cannot listen on {host}:{port} for the {what} port: {exc.strerror}",
                        hint=f"Stop what uses it, or choose another port with {option}.")


def check_listenable(host: str, port: int, what: str, option: str) -> None:
    """Refuse early, with what to do, when the address cannot be listened on (before the runtime starts an
    embedded database for nothing)."""
    try:
        bind_probe(host, port)
    except OSError as exc:
        raise _cannot_listen(exc, host, port, what, option) from None


async def _listen(listener: Listener, host: str, port: int, what: str, option: str) -> None:
    try:
        await listener.start(host, port)
    except OSError as exc:  # taken between the probe and now
        raise _cannot_listen(exc, host, port, what, option) from None


_SPARE_FILES = 256  # open files kept for everything but client connections: pools, logs, the audit spool


def open_files_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files toward ``wanted`` (never past the hard limit) and return
    the limit now in force; without the ``resource`` module (Windows), ``wanted``."""
    try:
        import resource
    except ImportError:
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def limits_of(server: ServerConfig) -> Limits:
    """The connection limits from ``[server]``; ``max_connections`` lowered (with a warning) when the process
    may not open enough files for both ports to reach it, so that a flood of connections is refused with
    503 instead of leaving no file for a database connection."""
    wanted = 2 * server.max_connections + _SPARE_FILES
    available = open_files_limit(wanted)
    connections = server.max_connections
    if available < wanted:
        connections = max(1, (available - _SPARE_FILES) // 2)
        log.warning("this process may open only %d files: serving at most %d connections per port instead of "
                    "[server] max_connections = %d (raise `ulimit -n` to %d to allow them)",
                    available, connections, server.max_connections, wanted)
    return Limits(max_header_bytes=server.max_header_bytes, max_url_bytes=server.max_query_length,
                  header_timeout=server.header_timeout_s, keepalive_timeout=server.keepalive_timeout_s,
                  max_connections=connections)


async def serve(runtime: Runtime, *, host: str, port: int, admin_host: str, admin_port: int) -> None:
    """Run the data and admin ports in this event loop until SIGINT or SIGTERM."""
    if port == admin_port:
        raise ProjectError(f"the data and admin ports are both {port}",
                           hint="Give the admin port another number with --admin-port.")
    check_listenable(host, port, "data", "--port")
    check_listenable(admin_host, admin_port, "admin", "--admin-port")
    settings = runtime.project.config.server
    await runtime.start()
    try:
        limits = limits_of(settings)
        metrics = runtime.metrics
        data = Listener(create_app(runtime, manage_runtime=False).handle, limits,
                        on_refusal=lambda status: metrics.observe("", "", None, "", status, 0.0))
        admin = Listener(create_admin_app(runtime).handle, limits)
        await _listen(data, host, port, "data", "--port")
        try:
            await _listen(admin, admin_host, admin_port, "admin", "--admin-port")
        except ProjectError:
            await data.stop(0)
            raise
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        log.info("serving the data port on http://%s:%d, the admin port on http://%s:%d",
                 host, data.port, admin_host, admin.port)
        try:
            await stopping.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            log.info("stopping: finishing the requests being answered (at most %.0f s)", settings.shutdown_grace_s)
            await asyncio.gather(data.stop(settings.shutdown_grace_s), admin.stop(settings.shutdown_grace_s))
    finally:
        await runtime.stop()
