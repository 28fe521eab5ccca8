"""Closed-loop load against PostgreSQL through an asyncpg pool, no HTTP in between.

This is the "direct" baseline of the benchmark: what an application that connects to the
database itself pays for the same operations that gatehouse (and Platformatic) serve over HTTP: a point
lookup, a list of 50, an order with its items (one round trip, the JSON shape built in SQL) and the insert
of one order.
N asyncio tasks each run one query after another for a fixed time; the result is printed as one
JSON line (the same shape that bench/wrk.lua prints for the HTTP runs), with the CPU each query cost
while measured: this process's (``process_cpu_us``: client and load generator together) and every
PostgreSQL process's (``postgres_cpu_us``, bench/pgcpu.py).

    python bench/direct.py --dsn postgresql://postgres@127.0.0.1:5432/gatehouse_bench --query point

Two options serve bench/curves.py: ``--query rows --rows N`` (N products in id order from a random id: the
response-size curve) and ``--pools N`` (N pools of ``--pool-size`` each, every query on one picked at random:
the floor for N applications with a pool each, as gatehouse keeps one per app).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import asyncpg
from pgcpu import postgres_seconds

# How each query is run on the pool: fetchrow (one row, which must exist), fetch (all rows) or execute.
Kind = Literal["fetchrow", "fetch", "execute"]


@dataclass(frozen=True)
class Query:
    """One measured operation: its SQL, how it is run, and the range of its random parameter."""

    sql: str
    kind: Kind
    low: int
    high: int


# The parameter ranges are the same as in bench/run for the HTTP runs.
QUERIES: dict[str, Query] = {
    # GET /products?id=eq.<n>
    "point": Query("SELECT id, name, price FROM products WHERE id = $1", "fetchrow", 1, 5000),
    # GET /products?price=gte.<n>&order=id&limit=50
    "list": Query("SELECT id, name, price FROM products WHERE price >= $1 ORDER BY id LIMIT 50", "fetch", 10, 150),
    # GET /orders?select=id,status,order_items(product_id,quantity,unit_price)&id=eq.<n>
    "embedded": Query(
        "SELECT o.id, o.status, (SELECT json_agg(json_build_object("
        "'product_id', i.product_id, 'quantity', i.quantity, 'unit_price', i.unit_price)) "
        "FROM order_items i WHERE i.order_id = o.id) AS order_items FROM orders o WHERE o.id = $1",
        "fetchrow",
        1,
        3000,
    ),
    # POST /orders {"user_id": <n>, "status": "placed"}
    "insert": Query("INSERT INTO orders (user_id, status) VALUES ($1, 'placed')", "execute", 1, 1000),
}
PRODUCTS = 5000
"""Products in the demo (ids 1..5000): a rows query starts at most ``rows`` before the last one."""


def rows_query(rows: int) -> Query:
    """GET /products?id=gt.<n>&order=id&limit=<rows>: exactly ``rows`` products (up to 5000) from a random id."""
    return Query(f"SELECT id, name, price FROM products WHERE id > $1 ORDER BY id LIMIT {int(rows)}", "fetch", 0,
                 max(0, PRODUCTS - rows))


@dataclass
class Tally:
    """What the tasks of one phase recorded."""

    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0


async def worker(pools: list[asyncpg.Pool], query: Query, rng: random.Random, deadline: float,
                 tally: Tally) -> None:
    while time.perf_counter() < deadline:
        pool = pools[rng.randrange(len(pools))] if len(pools) > 1 else pools[0]
        param = rng.randint(query.low, query.high)
        start = time.perf_counter_ns()
        try:
            if query.kind == "fetchrow":
                row = await pool.fetchrow(query.sql, param)
                if row is None:
                    raise LookupError(f"no row for {param}")
            elif query.kind == "fetch":
                await pool.fetch(query.sql, param)
            else:
                await pool.execute(query.sql, param)
        except (asyncpg.PostgresError, LookupError, OSError):
            tally.errors += 1
            continue
        tally.latencies_ns.append(time.perf_counter_ns() - start)


async def run_phase(
    pools: list[asyncpg.Pool], query: Query, concurrency: int, seconds: float, seed: int
) -> tuple[Tally, float]:
    tally = Tally()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(worker(pools, query, random.Random(seed + i), deadline, tally) for i in range(concurrency))
    )
    return tally, time.perf_counter() - started


def percentile_ms(sorted_ns: list[int], pct: float) -> float:
    if not sorted_ns:
        return 0.0
    index = min(len(sorted_ns) - 1, max(0, round(pct / 100 * len(sorted_ns)) - 1))
    return sorted_ns[index] / 1e6


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    pools: list[asyncpg.Pool] = []
    query = rows_query(args.rows) if args.query == "rows" else QUERIES[args.query]
    try:
        for _ in range(args.pools):
            pools.append(await asyncpg.create_pool(args.dsn, min_size=args.pool_size, max_size=args.pool_size))
        if args.warmup > 0:
            await run_phase(pools, query, args.concurrency, args.warmup, args.seed)
        postgres, process = postgres_seconds(), time.process_time()
        tally, elapsed = await run_phase(pools, query, args.concurrency, args.duration, args.seed + 1000)
        postgres, process = postgres_seconds() - postgres, time.process_time() - process
    finally:
        await asyncio.gather(*(pool.close() for pool in pools))
    latencies = sorted(tally.latencies_ns)
    return {
        "tool": "direct",
        "requests": len(latencies),
        "errors": tally.errors,
        "duration_s": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile_ms(latencies, 50), 3),
        "p99_ms": round(percentile_ms(latencies, 99), 3),
        # CPU per query while measured: this process (the load and the client together), and PostgreSQL's
        **({"process_cpu_us": round(process / len(latencies) * 1e6, 1),
            "postgres_cpu_us": round(postgres / len(latencies) * 1e6, 1)} if latencies else {}),
        "concurrency": args.concurrency,
        "pool_size": args.pool_size,
        **({"pools": args.pools} if args.pools != 1 else {}),
        **({"rows": args.rows} if args.query == "rows" else {}),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", required=True, help="PostgreSQL URL")
    parser.add_argument("--query", choices=[*sorted(QUERIES), "rows"], required=True)
    parser.add_argument("--rows", type=int, default=50, help="products per answer of --query rows (default 50)")
    parser.add_argument("--pools", type=int, default=1,
                        help="pools of --pool-size each; every query picks one at random (default 1)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent tasks (default 16)")
    parser.add_argument("--pool-size", type=int, default=4, help="asyncpg pool size (default 4)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # uvloop when it is installed (a dependency of gatehouse): what a tuned
    # asyncio application runs on, and what gatehouse itself gets.
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main_async(args))
        result["event_loop"] = "asyncio"
    else:
        result = uvloop.run(main_async(args))
        result["event_loop"] = "uvloop"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
