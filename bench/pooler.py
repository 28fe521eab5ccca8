"""What a transaction pooler (PgBouncer) in front of the apps' pools costs, and the ways to keep the app's role.

    .venv/bin/python bench/pooler.py [--seconds 10] [--rounds 3]

Two measurements, each in interleaved rounds on the machine's PostgreSQL (database ``gatehouse_pooler``,
recreated) with a PgBouncer 1.18 (Debian's) in ``pool_mode = transaction`` on a free port:

1. **asyncpg alone** (no HTTP), 16 tasks over 4 connections, a point lookup on the shop's ``api_v1.products``
   as the app's role, four ways:
   - ``direct``: the role as a startup parameter, statements prepared once (what gatehouse does without a pooler);
   - ``pgbouncer, role per pooler database``: through PgBouncer to the app's own pooler database, whose
     ``connect_query`` sets the role (what ``pooler_url`` does), statements parsed on every execution
     (PgBouncer 1.18 keeps no prepared statements);
   - ``pgbouncer, SET LOCAL ROLE``: through one shared pooler database as the authenticator, each lookup in
     its own transaction: ``BEGIN; SET LOCAL ROLE ...`` (one simple query), the lookup, ``COMMIT``;
   - ``direct, SET LOCAL ROLE``: the same three round trips without the pooler, to separate their cost
     from the pooler's.
2. **gatehouse serve** with and without ``pooler_url``: wrk's point lookup and insert (bench/wrk.lua, 16
   connections), the app ``bench`` with a pool of 4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from gatehouse.demo import copy_shop
from gatehouse.project import load_project

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from serving import GATEHOUSE, serve  # noqa: E402  (bench/, next to this script)

from pgbouncer import PgBouncer  # noqa: E402  (the tests' PgBouncer)

DATABASE = "gatehouse_pooler"
SERVER = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432")
WRK_SCRIPT = REPO / "bench" / "wrk.lua"
TASKS, POOL = 16, 4
LOOKUP = "SELECT id, name, price FROM api_v1.products WHERE id = $1"
Lookup = Callable[[asyncpg.Connection, int], Awaitable[object]]


def project_folder(folder: Path) -> Path:
    project = folder / "shop"
    copy_shop(project, services=False)
    toml = (project / "gatehouse.toml").read_text().replace('cache = "30s"\n', "")
    toml += ('\n[apps.bench]\nquota = { pool_size = 4 }\ngrants = [{ contract = "products", actions = ["read"] }, '
             '{ contract = "orders", actions = ["read", "insert"] }]\n')
    (project / "gatehouse.toml").write_text(toml)
    return project


async def drive(connect: Callable[[], Awaitable[asyncpg.Connection]], lookup: Lookup, seconds: float) -> float:
    """Lookups per second of ``TASKS`` tasks sharing ``POOL`` connections for ``seconds`` (after 1 s warm-up)."""
    connections = [await connect() for _ in range(POOL)]
    free: asyncio.Queue[asyncpg.Connection] = asyncio.Queue()
    for conn in connections:
        free.put_nowait(conn)
    done = 0
    counting = False
    stop_at = 0.0

    async def task(seed: int) -> None:
        nonlocal done
        n = seed
        while time.monotonic() < stop_at:
            conn = await free.get()
            try:
                await lookup(conn, n % 5000 + 1)
            finally:
                free.put_nowait(conn)
            n += 7
            done += counting
    for phase, length in (("warm", 1.0), ("count", seconds)):
        counting = phase == "count"
        done = 0
        stop_at = time.monotonic() + length
        started = time.monotonic()
        await asyncio.gather(*(task(i) for i in range(TASKS)))
    rate = done / (time.monotonic() - started)
    for conn in connections:
        await conn.close()
    return rate


async def set_local_lookup(conn: asyncpg.Connection, n: int, role: str) -> object:
    await conn.execute(f'BEGIN; SET LOCAL ROLE "{role}"')
    try:
        return await conn.fetchrow(LOOKUP, n)
    finally:
        await conn.execute("COMMIT")


def asyncpg_ways(database_url: str, bouncer: PgBouncer, role: str, authenticator: str
                 ) -> dict[str, Callable[[], Awaitable[asyncpg.Connection]]]:
    return {
        "direct (role as startup parameter)": lambda: asyncpg.connect(
            database_url, user=authenticator, server_settings={"role": role}),
        "pgbouncer, role per pooler database": lambda: asyncpg.connect(
            bouncer.url("shop__bench"), user=authenticator, statement_cache_size=0),
        "pgbouncer, SET LOCAL ROLE": lambda: asyncpg.connect(
            bouncer.url("shop__shared"), user=authenticator, statement_cache_size=0),
        "direct, SET LOCAL ROLE": lambda: asyncpg.connect(database_url, user=authenticator),
    }


def wrk(port: int, key: str, seconds: int, insert: bool) -> tuple[float, float, float]:
    args = ["wrk", "-t1", "-c16", f"-d{seconds}s", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}", "--"]
    if insert:
        args += ["/orders", "1", "1000", f"apikey:{key}", "Content-Profile:v1", "method=POST",
                 'body={"user_id": %d, "status": "placed"}', "Content-Type:application/json"]
    else:
        args += ["/products?id=eq.%d", "1", "5000", f"apikey:{key}", "Accept-Profile:v1"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in text.splitlines() if line.startswith("BENCH_RESULT"))[13:])
    return float(result["rps"]), float(result["p50_ms"]), float(result["p99_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gh-bench-pooler-"))
    subprocess.run(["psql", SERVER, "-qc", f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"], check=True)
    subprocess.run(["psql", SERVER, "-qc", f"CREATE DATABASE {DATABASE}"], check=True)
    database_url = f"{SERVER}/{DATABASE}"
    env = {**os.environ, "GATEHOUSE_DATABASES__SHOP__URL": database_url}
    project_root = project_folder(folder)
    gh = [GATEHOUSE, "--project", str(project_root)]
    print("migrate and apply the shop...", flush=True)
    for command in (["migrate"], ["apply"]):
        subprocess.run([*gh, *command], env=env, check=True, capture_output=True)
    key = subprocess.run([*gh, "keys", "create", "bench", "--quiet"], env=env, check=True, capture_output=True,
                         text=True).stdout.strip()
    os.environ["GATEHOUSE_DATABASES__SHOP__URL"] = database_url
    os.environ["GATEHOUSE_DATABASES__SHOP__POOLER_URL"] = "postgresql://127.0.0.1:1/shop"
    project = load_project(project_root)
    from gatehouse.db.pooler import pgbouncer_databases

    lines = [line for line in pgbouncer_databases(project) if not line.startswith(";")]
    lines.append(f"shop__shared = host=127.0.0.1 port=5432 dbname={DATABASE} user={project.authenticator_role}")
    role, authenticator = project.apps["bench"].role, project.authenticator_role
    bouncer = PgBouncer(lines, authenticator, pool_size=POOL)
    server = None
    try:
        ways = asyncpg_ways(database_url, bouncer, role, authenticator)
        lookups: dict[str, Lookup] = {name: (lambda c, n: c.fetchrow(LOOKUP, n)) for name in ways}
        for name in ways:
            if "SET LOCAL" in name:
                lookups[name] = lambda c, n: set_local_lookup(c, n, role)
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for round_number in range(options.rounds):
            for name, connect in ways.items():
                rate = asyncio.run(drive(connect, lookups[name], options.seconds))
                rates[name].append(rate)
                print(f"round {round_number + 1} {name:40} {rate:9,.0f} lookups/s", flush=True)
        base = statistics.median(rates["direct (role as startup parameter)"])
        print("\n| asyncpg, 16 tasks over 4 connections | lookups/s | ÷ direct | by round |")
        print("| --- | ---: | ---: | --- |")
        for name, values in rates.items():
            print(f"| {name} | {statistics.median(values):,.0f} | {statistics.median(values) / base:.2f} | "
                  f"{' / '.join(f'{v:,.0f}' for v in values)} |")

        served: dict[str, list[tuple[float, float, float]]] = {}
        pooled_env = {**env, "GATEHOUSE_DATABASES__SHOP__POOLER_URL": bouncer.url("shop")}
        for round_number in range(options.rounds):
            for label, run_env in (("direct", env), ("pooler_url", pooled_env)):
                server, port, _ = serve(project_root, run_env)
                time.sleep(1)
                for operation in ("point lookup", "insert"):
                    insert = operation == "insert"
                    wrk(port, key, 2, insert)
                    result = wrk(port, key, options.seconds, insert)
                    served.setdefault(f"{operation}|{label}", []).append(result)
                    print(f"round {round_number + 1} gatehouse {label:10} {operation:12} {result[0]:9,.0f} req/s  "
                          f"p50 {result[1]:.2f} ms  p99 {result[2]:.2f} ms", flush=True)
                server.terminate()
                server.wait(timeout=30)
                server = None
        print("\n| gatehouse serve | req/s | p50 ms | p99 ms | ÷ direct | req/s by round |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
        for operation in ("point lookup", "insert"):
            direct_rps = statistics.median(r[0] for r in served[f"{operation}|direct"])
            for label in ("direct", "pooler_url"):
                rows = served[f"{operation}|{label}"]
                rps = statistics.median(r[0] for r in rows)
                print(f"| {operation}, {label} | {rps:,.0f} | {statistics.median(r[1] for r in rows):.2f} | "
                      f"{statistics.median(r[2] for r in rows):.2f} | {rps / direct_rps:.2f} | "
                      f"{' / '.join(f'{r[0]:,.0f}' for r in rows)} |")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        bouncer.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
