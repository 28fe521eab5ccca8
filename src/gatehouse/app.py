"""``create_app(runtime)`` → the data port; ``create_admin_app(runtime)`` → the admin port. Each has a
``handle(HttpRequest) -> HttpResponse`` that ``gatehouse serve`` serves on granian (``server/``), and speaks
ASGI too (tests call them through httpx's ASGI transport).

The data port serves contracts; the admin port (keep it off the public network) serves ``/live``,
``/ready`` and ``/metrics``. Both share one :class:`Runtime`, opened by the data app's lifespan.
"""

from __future__ import annotations

import re

import orjson

from gatehouse import pipeline
from gatehouse.admin.console import Console
from gatehouse.endpoints.docs import STATIC_PATH, docs_endpoint, static_file
from gatehouse.endpoints.events import EVENTS_PATH, events_feed
from gatehouse.endpoints.openapi import openapi_endpoint
from gatehouse.endpoints.rpc import call_rpc
from gatehouse.endpoints.sagas import RUN_PATH, SAGA_PATH, follow_saga, start_saga
from gatehouse.errors import InvalidPath, InvalidUrlEncoding, MethodNotAllowed
from gatehouse.http.asgi import Receive, Scope, Send, serve_asgi
from gatehouse.http.exchange import HttpRequest, HttpResponse, json_response
from gatehouse.http.middleware import RequestGuard
from gatehouse.runtime import Runtime

READ_METHODS = ("GET", "HEAD")
CONTRACT_METHODS = ("OPTIONS", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
"""What a contract's path takes from some app; ``OPTIONS`` tells an app which of them it may use."""
CONTRACT_PATH = re.compile(r"^/(?:v([1-9][0-9]{0,3})/)?([^/]+)$")
RPC_PATH = re.compile(r"^/rpc/([^/]+)$")


class DataApp:
    """The data port: routes a request to its endpoint, inside :class:`RequestGuard` (``handle``)."""

    def __init__(self, runtime: Runtime, *, manage_runtime: bool = True) -> None:
        self.runtime = runtime
        self.manage_runtime = manage_runtime
        self.handle = RequestGuard(self.route, runtime.metrics, lambda: runtime.audit,
                                   audit_values=runtime.project.config.server.audit_query_values)

    async def route(self, request: HttpRequest) -> HttpResponse:
        path, method, runtime = request.path, request.method, self.runtime.pinned()  # one generation throughout
        if "\ufffd" in path:  # an ASGI server decodes the path and replaces bytes that are not UTF-8
            raise InvalidUrlEncoding("The URL path is not valid UTF-8",
                                     hint="Percent-encode the UTF-8 bytes of each character.")
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
            raise MethodNotAllowed(f"Unsupported HTTP method: {method}", allow=CONTRACT_METHODS)
        if path in ("/", "/docs") and method not in READ_METHODS and (path, method) != ("/", "OPTIONS"):
            raise MethodNotAllowed(f"Unsupported HTTP method: {method}",
                                   allow=("OPTIONS", *READ_METHODS) if path == "/" else READ_METHODS)
        if path == "/":
            return await openapi_endpoint(request, runtime)
        if path == "/docs":
            return await docs_endpoint(request)
        if path.startswith(STATIC_PATH + "/"):
            return static_file(request, path[len(STATIC_PATH) + 1:])
        rpc = RPC_PATH.match(path)
        if rpc is not None:  # every method: /rpc answers the ones it does not take itself (PGRST101)
            return await call_rpc(request, runtime, rpc.group(1))
        if (feed := EVENTS_PATH.match(path)) is not None:  # GET /events/<contract>: the change events feed
            return await events_feed(request, runtime, feed.group(1))
        if (saga := SAGA_PATH.match(path)) is not None:  # POST /sagas/<name>: start a saga
            return await start_saga(request, runtime, saga.group(1))
        if (run := RUN_PATH.match(path)) is not None:  # GET /sagas/<name>/<id>: follow one
            return await follow_saga(request, runtime, run.group(1), run.group(2))
        raise InvalidPath("Invalid path specified in request URL")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI."""
        if scope["type"] == "http":
            await serve_asgi(self.handle, scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

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


class AdminApp:
    """The admin port: ``/live``, ``/ready`` (every database reachable and applied), ``/metrics``, and the web
    console under ``/console`` (admin/)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.console = Console(runtime)
        self.handle = self.route

    async def route(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/console" or request.path.startswith("/console/"):
            return await self.console.handle(request)
        if request.path not in ("/live", "/ready", "/metrics"):
            return json_response(b'{"status":"not found"}', 404)
        if request.method not in READ_METHODS:
            return HttpResponse(405, {"Allow": ", ".join(READ_METHODS)})
        if request.path == "/live":
            return json_response(b'{"status":"live"}')
        if request.path == "/ready":
            if self.runtime.draining:  # stopping: still serving, but a load balancer should send nothing new
                return json_response(b'{"status":"draining"}', 503)
            report = await self.runtime.readiness()
            ok = bool(report) and all(value == "ok" for value in report.values())
            answer: dict[str, object] = {"status": "ready" if ok else "not ready", "databases": report}
            if self.runtime.replicas:  # shown, never a reason to be not ready: reads fall back to the primary
                answer["replicas"] = self.runtime.replicas.report()
            body = orjson.dumps(answer)
            return json_response(body, 200 if ok else 503)
        metrics = self.runtime.metrics
        return HttpResponse(200, {}, metrics.render(), metrics.content_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI (the runtime is opened by whoever runs this app with the data port)."""
        if scope["type"] == "http":
            await serve_asgi(self.route, scope, receive, send)
        elif scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})


def create_admin_app(runtime: Runtime) -> AdminApp:
    return AdminApp(runtime)
