"""``gatehouse serve``: the data and admin ports on granian, in this process's event loop.

granian's embedded server runs hyper (HTTP/1.1 and HTTP/2, TLS) on a Rust thread of its own and calls the RSGI
app (``server/rsgi.py``) on this loop, so both ports share one :class:`Runtime` (pools, key ring, audit writer,
metrics). The wire's limits come from ``[server]`` (:mod:`gatehouse.server.settings`). SIGTERM first drains
for ``shutdown_drain_s`` (``/ready`` answers 503 while both ports still serve, so that a load balancer's health
check sends new requests elsewhere; a second signal ends the drain), then, as SIGINT does at once, stops
accepting, closes idle connections, lets the requests being answered finish within ``shutdown_grace_s``, and
closes the runtime (the audit writer flushes what it holds).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from granian.server.embed import Server

from gatehouse.app import create_admin_app, create_app
from gatehouse.background import stop_tasks
from gatehouse.runtime import Runtime
from gatehouse.server.listen import cannot_listen, check_ports
from gatehouse.server.proxies import TrustedProxies
from gatehouse.server.rsgi import RsgiApp
from gatehouse.server.settings import granian_options

log = logging.getLogger("gatehouse.serve")
_STARTED_WITHIN_S = 10.0


class Port:
    """One listening port: a granian embedded server around an RSGI app, started and stopped as a task."""

    def __init__(self, app: RsgiApp, host: str, port: int, options: dict[str, Any], what: str) -> None:
        self.what = what
        self.host, self.port = host, port
        self.server = Server(app, address=host, port=port, **options)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and serve; returns once the socket listens (granian binds it before spawning its worker)."""
        self.task = asyncio.get_running_loop().create_task(self.server.serve(), name=f"granian-{self.what}")
        deadline = asyncio.get_running_loop().time() + _STARTED_WITHIN_S
        while not self.server.wrks:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise OSError(f"the {self.what} server stopped while starting")
            if asyncio.get_running_loop().time() > deadline:
                raise OSError(f"the {self.what} server did not start within {_STARTED_WITHIN_S:.0f} s")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float) -> None:
        """Stop accepting, let the requests being answered finish for at most ``grace`` seconds."""
        if self.task is None or self.task.done():
            return
        self.server.stop()  # type: ignore[no-untyped-call]
        try:
            await asyncio.wait_for(asyncio.shield(self.task), grace)
        except TimeoutError:
            log.warning("the %s port still had requests being answered after %.0f s of shutdown; dropping them",
                        self.what, grace)
            await stop_tasks([self.task])


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def serve(runtime: Runtime, *, host: str, port: int, admin_host: str, admin_port: int) -> None:
    """Run the data and admin ports in this event loop until SIGINT or SIGTERM."""
    port, admin_port = check_ports(host, port, admin_host, admin_port)  # port 0: a free one, picked now
    settings = runtime.project.config.server
    options = granian_options(settings, runtime.project.root)  # a TLS file that cannot be read fails before start
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    on_signal = _Stopper(runtime, stopping, settings.shutdown_drain_s, loop)
    for sig in _SIGNALS:  # handled until the very end: a second signal must not cut the audit's flush short
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await runtime.start()
        try:
            data, admin = _ports(runtime, host, port, admin_host, admin_port, options)
            await _serve_until(stopping, data, admin, settings.shutdown_grace_s)
        finally:
            await runtime.stop()
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)


class _Stopper:
    """What a signal does: SIGTERM drains first (``runtime.draining``, then ``stopping`` after ``drain_s``), SIGINT
    or a second signal stops at once."""

    def __init__(self, runtime: Runtime, stopping: asyncio.Event, drain_s: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.runtime, self.stopping, self.drain_s, self.loop = runtime, stopping, drain_s, loop

    def __call__(self, sig: signal.Signals) -> None:
        if sig == signal.SIGTERM and self.drain_s > 0 and not self.runtime.draining:
            self.runtime.draining = True
            log.info("draining: /ready answers 503 for %.0f s while requests are still served", self.drain_s)
            self.loop.call_later(self.drain_s, self.stopping.set)
            return
        self.runtime.draining = True
        self.stopping.set()


def _ports(runtime: Runtime, host: str, port: int, admin_host: str, admin_port: int,
           options: dict[str, Any]) -> tuple[Port, Port]:
    settings, metrics = runtime.project.config.server, runtime.metrics
    proxies = TrustedProxies(settings.trusted_proxies)
    data = RsgiApp(create_app(runtime, manage_runtime=False).handle, max_url_bytes=settings.max_query_length,
                   body_timeout_s=settings.body_timeout_s, proxies=proxies,
                   on_refusal=lambda status: metrics.observe("", "", None, "", status, 0.0))
    admin = RsgiApp(create_admin_app(runtime).handle, max_url_bytes=settings.max_query_length,
                    body_timeout_s=settings.body_timeout_s, proxies=proxies)
    return Port(data, host, port, options, "data"), Port(admin, admin_host, admin_port, options, "admin")


async def _serve_until(stopping: asyncio.Event, data: Port, admin: Port, grace: float) -> None:
    started: list[Port] = []
    try:
        for served, option in ((data, "--port"), (admin, "--admin-port")):
            try:
                await served.start()
            except OSError as exc:  # taken between the probe and now
                raise cannot_listen(exc, served.host, served.port, served.what, option) from None
            started.append(served)
        scheme = "https" if data.server.ssl_ctx[0] else "http"
        log.info("serving the data port on %s://%s:%d, the admin port on %s://%s:%d",
                 scheme, data.host, data.port, scheme, admin.host, admin.port)
        await stopping.wait()
    finally:
        log.info("stopping: finishing the requests being answered (at most %.0f s)", grace)
        await asyncio.gather(*(served.stop(grace) for served in started))
