"""``create_app(runtime)`` → the data port (an ASGI and RSGI app); ``create_admin_app`` → the admin port's.

The data port serves contracts; the admin port (keep it off the public network) serves ``/live``,
``/ready`` and ``/metrics``. Both share one :class:`Runtime`, opened by the data app's lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import orjson
from granian.constants import Interfaces
from granian.log import LogLevels
from granian.server.embed import Server as EmbeddedServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gatehouse import pipeline
from gatehouse.errors import InvalidPath, MethodNotAllowed
from gatehouse.http.docs import STATIC_PATH, docs_endpoint, static_file
from gatehouse.http.exchange import HttpRequest, HttpResponse
from gatehouse.http.middleware import RequestGuard
from gatehouse.http.openapi import openapi_endpoint
from gatehouse.http.servers import RsgiScope, serve_asgi, serve_rsgi
from gatehouse.logic.endpoint import call_rpc
from gatehouse.runtime import Runtime

T = TypeVar("T")
log = logging.getLogger("gatehouse.serve")
READ_METHODS = ("GET", "HEAD")
JSON = "application/json; charset=utf-8"
CONTRACT_PATH = re.compile(r"^/(?:v([1-9][0-9]{0,3})/)?([^/]+)$")
RPC_PATH = re.compile(r"^/rpc/([^/]+)$")


class DataApp:
    """The data port: routes a request to its endpoint, inside :class:`RequestGuard`. Speaks ASGI and RSGI."""

    def __init__(self, runtime: Runtime, *, manage_runtime: bool = True) -> None:
        self.runtime = runtime
        self.manage_runtime = manage_runtime
        self.handle = RequestGuard(self.route, runtime.metrics, lambda: runtime.audit,
                                   audit_values=runtime.project.config.server.audit_query_values)

    async def route(self, request: HttpRequest) -> HttpResponse:
        path, method, runtime = request.path, request.method, self.runtime
        contract = CONTRACT_PATH.match(path)
        if contract is not None and path != "/docs":
            name, version = contract.group(2), contract.group(1)
            path_version = int(version) if version is not None else None
            if method in READ_METHODS:
                return await pipeline.read(request, runtime, name, path_version)
            if method in pipeline.WRITE_ACTIONS:
                return await pipeline.write(request, runtime, name, path_version)
            if method == "OPTIONS":
                return await pipeline.options(request, runtime, name, path_version)
            raise MethodNotAllowed(f"Unsupported HTTP method: {method}")
        if path in ("/", "/docs") and method not in READ_METHODS:
            raise MethodNotAllowed(f"Unsupported HTTP method: {method}")
        if path == "/":
            return await openapi_endpoint(request, runtime)
        if path == "/docs":
            return await docs_endpoint(request)
        if path.startswith(STATIC_PATH + "/"):
            return static_file(request, path[len(STATIC_PATH) + 1:])
        rpc = RPC_PATH.match(path)
        if rpc is not None:
            if method not in ("GET", "HEAD", "POST"):
                raise MethodNotAllowed(f"Unsupported HTTP method: {method}")
            return await call_rpc(request, runtime, rpc.group(1))
        raise InvalidPath("Invalid path specified in request URL")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI."""
        if scope["type"] == "http":
            await serve_asgi(self.handle, scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def __rsgi__(self, scope: RsgiScope, protocol: Any) -> None:
        """RSGI (granian)."""
        await serve_rsgi(self.handle, scope, protocol)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self.manage_runtime:
                        await self.runtime.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": type(exc).__name__})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.manage_runtime:
                    await self.runtime.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(runtime: Runtime, *, manage_runtime: bool = True) -> DataApp:
    return DataApp(runtime, manage_runtime=manage_runtime)


def create_admin_app(runtime: Runtime) -> ASGIApp:
    async def live(_: Request) -> Response:
        return Response(b'{"status":"live"}', media_type=JSON)

    async def ready(_: Request) -> Response:
        report = await runtime.readiness()
        ok = bool(report) and all(value == "ok" for value in report.values())
        body = orjson.dumps({"status": "ready" if ok else "not ready", "databases": report})
        return Response(body, status_code=200 if ok else 503, media_type=JSON)

    async def metrics(_: Request) -> Response:
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)

    return Starlette(routes=[Route("/live", live), Route("/ready", ready), Route("/metrics", metrics)])


def run_in_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _granian_logging() -> dict[str, Any]:
    """granian's own messages go through our log configuration (one format, one stream), at warning or
    quieter: its start-up lines would only repeat ours."""
    return {"version": 1, "disable_existing_loggers": False,
            "loggers": {"_granian": {"handlers": [], "propagate": True}}}


def _http_server(app: object, interface: Interfaces, host: str, port: int, log_level: str) -> EmbeddedServer:
    level = LogLevels.debug if log_level == "debug" else LogLevels.error
    return EmbeddedServer(app, address=host, port=port, interface=interface, log_level=level,
                          log_dictconfig=_granian_logging(), log_access=False, websockets=False)


async def serve(runtime: Runtime, *, host: str, port: int, admin_host: str, admin_port: int,
                log_level: str = "info") -> None:
    """Run the data and admin ports in this event loop until interrupted.

    Both run on granian's embedded server, in this process and event loop, so they share one Runtime
    (pools, key ring, audit writer). The data port speaks RSGI: granian parses HTTP in its Rust threads
    and hands over a parsed request, which leaves the Python thread to gatehouse's own work.
    """
    await runtime.start()
    try:
        data = _http_server(create_app(runtime, manage_runtime=False), Interfaces.RSGI, host, port, log_level)
        admin = _http_server(create_admin_app(runtime), Interfaces.ASGINL, admin_host, admin_port, log_level)
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
