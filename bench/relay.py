"""Relay throughput per sink: events/s from one relay, from a backlog in the outbox to the broker's acknowledgement.

    .venv/bin/python bench/relay.py [--events 20000] [--batch 500] [--sinks nats,rabbitmq,redis,webhook]

For each sink, a fresh database ``gh_bench_relay`` on the PostgreSQL at 127.0.0.1:5432 (``BENCH_PG_URL`` names
another) gets ``--events`` outbox rows (~250 bytes of payload, 500 aggregates), then one
:class:`~gatehouse.events.relay.Relay` (the code ``serve`` and ``gatehouse relay`` run) publishes them all, storing
its position after each acknowledged batch, exactly as in production. Measured: wall time from start to the
last position stored, and the relay process's CPU per event (the webhook receiver runs in this process too, so
its CPU is included in that row). Brokers: NATS ``BENCH_NATS_URL`` (default nats://127.0.0.1:4222, a stream of
its own, deleted after), RabbitMQ ``BENCH_AMQP_URL`` (default amqp://guest:guest@127.0.0.1:5672/, a durable queue
bound so messages are routable and confirmed after being stored), Redis ``BENCH_REDIS_URL`` (default
redis://127.0.0.1:6379/0). Targets (next-wave.md §4.6): ≥ 5,000/s to JetStream, ≥ 1,000/s to RabbitMQ.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from gatehouse.config_events import SinkConfig
from gatehouse.events import relay_store
from gatehouse.events.outbox import OUTBOX_DDL
from gatehouse.events.relay import Relay
from gatehouse.events.sinks import open_sink

SERVER = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
URLS = {"nats": os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222"),
        "rabbitmq": os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        "redis": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")}
TARGETS = {"nats": 5000, "rabbitmq": 1000}
DATABASE = "gh_bench_relay"


def _with_database(uri: str, database: str) -> str:
    base, _, query = uri.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


async def fresh_outbox(events: int) -> str:
    admin = await asyncpg.connect(SERVER)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()
    dsn = _with_database(SERVER, DATABASE)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE SCHEMA gatehouse")
        await conn.execute(OUTBOX_DDL)
        await conn.execute(relay_store.RELAY_DDL)
        for start in range(0, events, 5000):  # transactions of 5,000 rows
            await conn.execute(
                "INSERT INTO gatehouse.outbox (aggregatetype, aggregateid, type, payload, contract_version) "
                "SELECT 'orders', (n % 500)::text, 'updated', jsonb_build_object('id', n % 500, 'total', n * 1.5, "
                "'status', 'paid', 'customer', 'customer ' || (n % 97), 'note', repeat('x', 120)), 1 "
                "FROM generate_series($1::int, $2::int) AS n", start, min(start + 5000, events) - 1)
    finally:
        await conn.close()
    return dsn


async def receiver() -> tuple[asyncio.Server, str]:
    """A webhook receiver that answers 200 to every POST (HTTP/1.1, keep-alive)."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/events"


async def prepare_broker(kind: str, tag: str) -> Callable[[], Awaitable[None]]:
    """Make the broker take the events (RabbitMQ: a bound durable queue); returns the clean-up."""
    if kind == "rabbitmq":
        import aio_pika

        connection = await aio_pika.connect(URLS["rabbitmq"])
        channel = await connection.channel()
        exchange = await channel.declare_exchange(f"bench-{tag}", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(f"bench-{tag}", durable=True)
        await queue.bind(exchange, "#")

        async def drop() -> None:
            await queue.delete(if_unused=False, if_empty=False)
            await exchange.delete()
            await connection.close()
        return drop
    if kind == "nats":
        async def drop_stream() -> None:
            import nats

            nc = await nats.connect(URLS["nats"])
            await nc.jetstream().delete_stream(f"BENCH{tag}")
            await nc.close()
        return drop_stream
    if kind == "redis":
        async def drop_key() -> None:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(URLS["redis"])
            await client.delete(f"bench{tag}:orders")
            await client.aclose()
        return drop_key

    async def nothing() -> None:
        return None
    return nothing


async def run_one(kind: str, events: int, batch: int) -> dict[str, Any]:
    dsn = await fresh_outbox(events)
    tag = uuid.uuid4().hex[:8]
    server = None
    url = URLS.get(kind, "")
    if kind == "webhook":
        server, url = await receiver()
    subject = f"bench{tag}:{{contract}}" if kind == "redis" else f"bench{tag}.{{contract}}.{{type}}"
    config = SinkConfig(kind=kind, url="env:BENCH_SINK_URL", subject=subject, exchange=f"bench-{tag}",
                        stream=f"BENCH{tag}", batch=batch, timeout_ms=30_000)
    os.environ["BENCH_SINK_URL"] = url
    cleanup = await prepare_broker(kind, tag)

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(dsn)

    relay = Relay("bench", open_sink("bench", config, "bench"), config, ["orders"], connect)
    conn = await connect()
    last = await conn.fetchval("SELECT max(seq) FROM gatehouse.outbox")
    cpu, started = time.process_time(), time.perf_counter()
    task = asyncio.get_running_loop().create_task(relay.run())
    try:
        while relay.position is None or relay.position.seq < last:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await relay.sink.close()
        await conn.close()
        await cleanup()
        if server is not None:
            server.close()
    return {"sink": kind, "events": events, "seconds": wall, "rate": events / wall, "cpu_us": cpu / events * 1e6,
            "failures": relay.stats.failures}


def table(rows: list[dict[str, Any]], batch: int) -> str:
    lines = [f"relay throughput, one relay, batches of {batch} (events/s from a backlog to acknowledged positions)",
             "", f"{'sink':<10} {'events':>8} {'seconds':>8} {'events/s':>10} {'CPU µs/event':>13} {'target':>8}"]
    for row in rows:
        target = TARGETS.get(row["sink"])
        verdict = "" if target is None else (f"≥{target:,}" + (" ok" if row["rate"] >= target else " MISSED"))
        lines.append(f"{row['sink']:<10} {row['events']:>8,} {row['seconds']:>8.2f} {row['rate']:>10,.0f} "
                     f"{row['cpu_us']:>13.0f} {verdict:>8}")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--sinks", default="nats,rabbitmq,redis,webhook")
    args = parser.parse_args()
    rows = [await run_one(kind, args.events, args.batch) for kind in args.sinks.split(",")]
    admin = await asyncpg.connect(SERVER)
    await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    await admin.close()
    print(table(rows, args.batch))


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
