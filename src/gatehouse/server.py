"""``gatehouse serve``: the data and admin ports on granian's embedded server, in one event loop.

Both ports run in this process and loop, so they share one :class:`Runtime` (pools, key ring, audit writer).
The data port speaks RSGI: granian parses HTTP in its Rust threads and hands over a parsed request, which
leaves the Python thread to gatehouse's own work (measured in bench/README.md).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

from granian.constants import Interfaces
from granian.log import LogLevels
from granian.server.embed import Server as EmbeddedServer

from gatehouse.app import create_admin_app, create_app
from gatehouse.errors import ProjectError
from gatehouse.runtime import Runtime

T = TypeVar("T")
log = logging.getLogger("gatehouse.serve")
# granian's own messages go through our log configuration (one format, one stream); its start-up lines
# would only repeat ours, and it warns that embedding is experimental, so only its errors are kept.
_GRANIAN_LOGGING = {"version": 1, "disable_existing_loggers": False,
                    "loggers": {"_granian": {"handlers": [], "propagate": True}}}


def run_in_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _http_server(app: object, host: str, port: int, log_level: str) -> EmbeddedServer:
    level = LogLevels.debug if log_level == "debug" else LogLevels.error
    return EmbeddedServer(app, address=host, port=port, interface=Interfaces.RSGI, log_level=level,
                          log_dictconfig=_GRANIAN_LOGGING, log_access=False, websockets=False)


def bind_probe(host: str, port: int) -> int:
    """Bind a socket to the address the way the HTTP server will (``SO_REUSEADDR``: a port in TIME_WAIT is
    free) and close it; the port bound (useful with port 0). Raises ``OSError`` when it cannot."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        return int(probe.getsockname()[1])


def check_listenable(host: str, port: int, what: str, option: str) -> None:
    """Refuse early, with what to do, when the address cannot be listened on (the HTTP server itself would
    fail in its own thread, with a backtrace and nothing to act on)."""
    try:
        bind_probe(host, port)
    except socket.gaierror as exc:
        raise ProjectError(f"the {what} address {host!r} does not resolve: {exc.strerror}",
                           hint="Use an IP address or a name this machine resolves.") from None
    except OSError as exc:
        raise ProjectError(f"cannot listen on {host}:{port} for the {what} port: {exc.strerror}",
                           hint=f"Stop what uses it, or choose another port with {option}.") from None


async def serve(runtime: Runtime, *, host: str, port: int, admin_host: str, admin_port: int,
                log_level: str = "info") -> None:
    """Run the data and admin ports in this event loop until SIGINT or SIGTERM."""
    if port == admin_port:
        raise ProjectError(f"the data and admin ports are both {port}",
                           hint="Give the admin port another number with --admin-port.")
    check_listenable(host, port, "data", "--port")
    check_listenable(admin_host, admin_port, "admin", "--admin-port")
    await runtime.start()
    try:
        data = _http_server(create_app(runtime, manage_runtime=False), host, port, log_level)
        admin = _http_server(create_admin_app(runtime), admin_host, admin_port, log_level)
        servers = (data, admin)

        def stop_all() -> None:
            for server in servers:
                server.stop()  # type: ignore[no-untyped-call]

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_all)
        log.info("serving the data port on http://%s:%d, the admin port on http://%s:%d",
                 host, port, admin_host, admin_port)
        try:
            await asyncio.gather(data.serve(), admin.serve())
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        await runtime.stop()
