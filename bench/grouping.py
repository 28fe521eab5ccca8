"""What statement groups (``gatehouse.db.statement_groups``) gain at the database, without gatehouse around them.

    .venv/bin/python bench/grouping.py [--database gatehouse_bench] [--seconds 6] [--rounds 3]

On the shop database made by bench/run: 16 asyncio tasks over an asyncpg pool of 4 connections (bench/run's
settings) run the bench's point lookup, and an insert with an audit-like second insert in the same statement
(into a scratch table pair made and dropped here), each way in turn per round:

- ``alone``: every task runs its own statement on a connection of the pool, as gatehouse without groups;
- ``grouped``: a task that finds every connection busy queues; the next free connection runs every queued
  statement in one ``fetchmany`` (one round trip, one implicit transaction), as ``[server] group_statements``.

Prints statements per second for each; uvloop when installed (as ``gatehouse serve``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Callable, Sequence

import asyncpg

POINT = ("SELECT coalesce(json_agg(t), '[]')::text, count(*) "
         "FROM (SELECT id, name, price FROM products WHERE id = $1) t")
INSERT = ("WITH written AS (INSERT INTO bench_grouping_orders (user_id, status) VALUES ($1, 'placed') RETURNING 1), "
          "audited AS (INSERT INTO bench_grouping_audit (app, query, status) VALUES ('bench', $2, 201)) "
          "SELECT count(*) FROM written")
SETUP = """
DROP TABLE IF EXISTS bench_grouping_orders, bench_grouping_audit;
CREATE TABLE bench_grouping_orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL, status text NOT NULL,
                                    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE bench_grouping_audit (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(),
                                   app text NOT NULL, query text, status int NOT NULL);
CREATE INDEX ON bench_grouping_audit (at); CREATE INDEX ON bench_grouping_audit (app, at);
CREATE INDEX ON bench_grouping_audit (status);
"""
TASKS, POOL_SIZE, MAX_GROUP = 16, 4, 32


async def measure(dsn: str, sql: str, args: Callable[[], Sequence[object]], grouped: bool,
                  seconds: float) -> float:
    pool = await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)
    free = asyncio.Semaphore(POOL_SIZE)
    waiting: list[tuple[Sequence[object], asyncio.Future[object]]] = []
    done = 0
    stop = time.monotonic() + seconds

    async def in_group(params: Sequence[object]) -> object:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        waiting.append((params, future))
        async with free:
            group = [] if future.done() else waiting[:MAX_GROUP]  # (answered meanwhile: leave the rest to theirs)
            del waiting[:len(group)]
            if group:
                async with pool.acquire() as conn:
                    rows = await conn.fetchmany(sql, [p for p, _ in group])
                for (_, waiter), row in zip(group, rows, strict=True):
                    waiter.set_result(row)
        return await future

    async def task() -> None:
        nonlocal done
        while time.monotonic() < stop:
            params = args()
            if grouped:
                await in_group(params)
            else:
                await pool.fetchrow(sql, *params)
            done += 1

    await asyncio.gather(*(task() for _ in range(TASKS)))
    await pool.close()
    return done / seconds


async def run(database: str, seconds: float, rounds: int) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:5432/{database}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(SETUP)
    await conn.close()
    operations: dict[str, tuple[str, Callable[[], Sequence[object]]]] = {
        "point lookup": (POINT, lambda: (random.randint(1, 5000),)),
        "insert with its audit row": (INSERT, lambda: (random.randint(1, 1000), "id=eq.***")),
    }
    try:
        for number in range(1, rounds + 1):
            for name, (sql, args) in operations.items():
                alone = await measure(dsn, sql, args, False, seconds)
                grouped = await measure(dsn, sql, args, True, seconds)
                print(f"round {number}  {name:26s} alone {alone:8,.0f}/s  grouped {grouped:8,.0f}/s  "
                      f"x{grouped / alone:.2f}", flush=True)
    finally:
        conn = await asyncpg.connect(dsn)
        await conn.execute("DROP TABLE IF EXISTS bench_grouping_orders, bench_grouping_audit")
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--database", default="gatehouse_bench")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(options.database, options.seconds, options.rounds))


if __name__ == "__main__":
    main()
