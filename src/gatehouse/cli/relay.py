"""``gatehouse relay``: only the event relays (no HTTP), for deployments that run them apart from ``serve``.

It runs what ``serve`` runs in the background: one relay per database and sink of ``[events]`` /
``[sinks]`` (one instance publishes to a sink at a time, any number may stand by) and the outbox's cleaning,
until SIGTERM or Ctrl-C. ``--metrics-port`` serves its ``/metrics`` (Prometheus) on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Annotated

import typer

from gatehouse.cli.common import fail, out, project_here, run
from gatehouse.project import Project


def relay(
    sink: Annotated[list[str] | None, typer.Option("--sink", metavar="NAME", help="Only this sink (repeat the "
                                                   "option for more; default: every sink).")] = None,
    metrics_port: Annotated[int | None, typer.Option(metavar="PORT", help="Serve /metrics on this port of "
                                                     "127.0.0.1 (default: none).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Publish the outbox to the brokers and webhooks of gatehouse.toml (what `serve` also does), and nothing else."""
    from gatehouse.observe.logs import configure_logging

    project = project_here()
    if not project.config.events:
        raise fail("gatehouse.toml has no [events.<contract>]: there is nothing to relay",
                   hint='add e.g. [events.orders] version = 1, and a [sinks.<name>] to publish to')
    configure_logging(log_level)
    run(_relay(project, sink, metrics_port))


async def _relay(project: Project, only: list[str] | None, metrics_port: int | None) -> None:
    from prometheus_client import CollectorRegistry, start_http_server

    from gatehouse.db.targets import resolve_targets
    from gatehouse.events.relay import Relays

    targets = await resolve_targets(project)
    registry = CollectorRegistry()
    relays = Relays.for_project(project, targets, only=only, registry=registry)
    if relays is None:
        return
    if metrics_port is not None:
        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(number, stop.set)
    await relays.start()
    names = ", ".join(f"{r.database}/{r.sink.name}" for r in relays.relays) or "none (cleaning the outbox only)"
    out.print(f"relaying: {names}", highlight=False)
    try:
        await stop.wait()
    finally:
        await relays.stop()
