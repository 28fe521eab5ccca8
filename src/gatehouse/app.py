"""``create_app(runtime)`` → the data port's ASGI app; ``create_admin_app`` → the admin port's.

The data port serves contracts; the admin port (keep it off the public network) serves ``/live``,
``/ready`` and ``/metrics``. Both share one :class:`Runtime`, opened by the data app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route, Router
from starlette.types import ASGIApp

from gatehouse import pipeline
from gatehouse.errors import InvalidPath, MethodNotAllowed
from gatehouse.http.docs import docs_endpoint, docs_static_app
from gatehouse.http.middleware import RequestMiddleware
from gatehouse.http.openapi import openapi_endpoint
from gatehouse.logic.endpoint import call_rpc
from gatehouse.runtime import Runtime

T = TypeVar("T")
READ_METHODS = ("GET", "HEAD")
JSON = "application/json; charset=utf-8"


def create_app(runtime: Runtime, *, manage_runtime: bool = True) -> ASGIApp:
    async def contract(request: Request) -> Response:
        name = request.path_params["contract"]
        version = request.path_params.get("version")
        path_version = int(version) if version is not None else None
        if request.method in READ_METHODS:
            return await pipeline.read(request, runtime, name, path_version)
        if request.method in pipeline.WRITE_ACTIONS:
            return await pipeline.write(request, runtime, name, path_version)
        if request.method == "OPTIONS":
            return await pipeline.options(request, runtime, name, path_version)
        raise MethodNotAllowed(f"Unsupported HTTP method: {request.method}")

    async def rpc(request: Request) -> Response:
        return await call_rpc(request, runtime, request.path_params["name"])

    async def root(request: Request) -> Response:
        return await openapi_endpoint(request, runtime)

    async def not_found(request: Request) -> Response:
        raise InvalidPath("Invalid path specified in request URL")

    methods = ["GET", "HEAD", "POST", "PATCH", "PUT", "DELETE", "OPTIONS", "TRACE"]
    routes = [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/docs", docs_endpoint, methods=["GET", "HEAD"]),
        Mount("/docs/static", docs_static_app()),
        Route("/rpc/{name:str}", rpc, methods=["GET", "HEAD", "POST"]),
        Route("/v{version:int}/{contract:str}", contract, methods=methods),
        Route("/{contract:str}", contract, methods=methods),
        Route("/{path:path}", not_found, methods=methods),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_: object) -> AsyncIterator[None]:
        if manage_runtime:
            await runtime.start()
        try:
            yield
        finally:
            if manage_runtime:
                await runtime.stop()

    # A bare Router, not Starlette(): errors must reach RequestMiddleware, which answers them in
    # PostgREST's shape, instead of Starlette's plain-text 500 page.
    return RequestMiddleware(Router(routes=routes, lifespan=lifespan), runtime.metrics, lambda: runtime.audit,
                             audit_values=runtime.project.config.server.audit_query_values)


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
    """Run a coroutine on uvloop when it is installed (it comes with uvicorn[standard]), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def serve(runtime: Runtime, *, host: str, port: int, admin_host: str, admin_port: int,
                log_level: str = "info") -> None:
    """Run the data and admin ports in this event loop until interrupted."""
    await runtime.start()
    try:
        data = uvicorn.Server(uvicorn.Config(
            create_app(runtime, manage_runtime=False), host=host, port=port, access_log=False,
            log_level=log_level, lifespan="off", server_header=False,
        ))
        admin = uvicorn.Server(uvicorn.Config(
            create_admin_app(runtime), host=admin_host, port=admin_port, access_log=False,
            log_level="warning", lifespan="off", server_header=False,
        ))
        servers = (data, admin)
        for server in servers:  # one set of signal handlers for both servers, installed below
            server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]

        def stop_all() -> None:
            for server in servers:
                server.should_exit = True

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_all)
        try:
            await asyncio.gather(data.serve(), admin.serve())
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        await runtime.stop()
