"""An embed across two databases (composed) against the same embed within one database, in one run.

    .venv/bin/python bench/compose.py [--seconds 10] [--rounds 3]

Builds the same data twice on the PostgreSQL at 127.0.0.1:5432 (user ``postgres``; ``BENCH_PG_URL`` names
another): 1,000 users and 10,000 orders (10 per user). Project ``split`` keeps orders in database ``shop`` and
users in ``billing``, linked by ``[[relations]] from = "orders.user_id", to = "users.id"``; project ``single``
keeps both tables in one database, with the same contracts and relation. Each is served by its own
``gatehouse serve`` (one worker, a pool of 4 per app and database, audit on), and wrk (16 connections,
``--seconds`` after 2 s of warm-up, rounds interleaved) asks both the same pages of 50:

* **to-one**: ``/orders?select=id,total,user:users(name,country)&id=gt.N&order=id&limit=50``
* **to-many**: ``/users?select=id,name,orders(id,total)&id=gt.N&order=id&limit=50`` (500 embedded rows)

The composed read costs two statements (shop, then billing for the page's 50 keys at once) where the
single-database read costs one; the target is at most 2x (``single ÷ split`` in req/s). Server CPU per
request from /proc. The databases ``gh_bench_compose_*`` are recreated on each run and left for a look.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from serving import GATEHOUSE, REPO, cpu_seconds
from serving import serve as serve_project

WRK_SCRIPT = REPO / "bench" / "wrk.lua"
SERVER = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

ORDERS = """
CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL, total numeric(10,2) NOT NULL);
CREATE INDEX orders_user_id ON orders (user_id);
INSERT INTO orders SELECT i, 1 + i % 1000, (i % 997) + 0.5 FROM generate_series(1, 10000) AS i;
"""
USERS = """
CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, country text);
INSERT INTO users SELECT i, 'user ' || i, (ARRAY['FR', 'DE', 'IT', NULL])[1 + i % 4] FROM generate_series(1, 1000) AS i;
"""
APPS = """
[apps.bench]
quota = { pool_size = 4, max_rows = 1000 }
grants = [{ contract = "orders", actions = ["read"] }, { contract = "users", actions = ["read"] }]

[[relations]]
from = "orders.user_id"
to = "users.id"
"""
OPERATIONS = {
    "to-one": ("/orders?select=id,total,user:users(name,country)&id=gt.%d&order=id&limit=50", 0, 9950),
    "to-many": ("/users?select=id,name,orders(id,total)&id=gt.%d&order=id&limit=50", 0, 950),
}




def database_url(name: str) -> str:
    return f"{SERVER.rsplit('/', 1)[0]}/{name}"


def make_project(folder: Path, name: str, databases: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A project folder whose databases hold ``databases`` (name → migration SQL); returns it and its env."""
    root = folder / name
    toml = f'[project]\nname = "bench{name}"\n\n' + "".join(f"[databases.{db}]\n" for db in databases) + APPS
    root.mkdir(parents=True)
    (root / "gatehouse.toml").write_text(toml)
    env = dict(os.environ)
    several = len(databases) > 1
    for db, sql in databases.items():
        physical = f"gh_bench_compose_{name}_{db}"
        subprocess.run(["psql", SERVER, "-qc", f'DROP DATABASE IF EXISTS "{physical}" WITH (FORCE)'], check=True)
        subprocess.run(["psql", SERVER, "-qc", f'CREATE DATABASE "{physical}"'], check=True)
        env[f"GATEHOUSE_DATABASES__{db.upper()}__URL"] = database_url(physical)
        migrations = root / "migrations" / db if several else root / "migrations"
        contracts = root / "contracts" / db if several else root / "contracts"
        migrations.mkdir(parents=True, exist_ok=True)
        contracts.mkdir(parents=True, exist_ok=True)
        (migrations / "V001__data.sql").write_text(sql)
        if "orders" in sql:
            (contracts / "orders.v1.sql").write_text("SELECT id, user_id, total FROM orders")
        if "users" in sql:
            (contracts / "users.v1.sql").write_text("SELECT id, name, country FROM users")
    return root, env




def wrk(port: int, key: str, operation: str, seconds: int) -> tuple[float, float, float]:
    path, low, high = OPERATIONS[operation]
    args = ["wrk", "-t1", "-c16", f"-d{seconds}s", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}", "--",
            path, str(low), str(high), f"apikey:{key}"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in text.splitlines() if line.startswith("BENCH_RESULT"))[13:])
    if result.get("errors"):
        raise SystemExit(f"{operation}: {result['errors']} error answers")
    return float(result["rps"]), float(result["p50_ms"]), float(result["p99_ms"])


def serve(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int, str]:
    gh = [GATEHOUSE, "--project", str(root)]
    for command in (["migrate"], ["apply"]):
        subprocess.run([*gh, *command], env=env, check=True, capture_output=True)
    key = subprocess.run([*gh, "keys", "create", "bench", "--quiet"], env=env, check=True, capture_output=True,
                         text=True).stdout.strip()
    for url in (v for k, v in env.items() if k.startswith("GATEHOUSE_DATABASES__")):
        subprocess.run(["psql", url, "-qc", "VACUUM ANALYZE"], check=True)
    server, port, _ = serve_project(root, env)
    return server, port, key


def check_same(ports: dict[str, tuple[int, str]]) -> None:
    """Both answer each operation with the same body (a bench of different answers would prove nothing)."""
    for operation, (path, _, _) in OPERATIONS.items():
        bodies = set()
        for port, key in ports.values():
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path % 120}", headers={"apikey": key})
            with urllib.request.urlopen(request, timeout=10) as answer:
                bodies.add(answer.read())
        if len(bodies) != 1:
            raise SystemExit(f"{operation}: the composed and the single-database answers differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gh-bench-compose-"))
    servers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        ports: dict[str, tuple[int, str]] = {}
        for name, databases in (("split", {"shop": ORDERS, "billing": USERS}), ("single", {"main": ORDERS + USERS})):
            print(f"migrate, apply and serve {name}...", flush=True)
            server, port, key = serve(*make_project(folder, name, databases))
            servers[name] = server
            ports[name] = (port, key)
        check_same(ports)
        results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
        for round_number in range(options.rounds):
            for operation in OPERATIONS:
                order = ["split", "single"] if round_number % 2 == 0 else ["single", "split"]
                for name in order:
                    port, key = ports[name]
                    wrk(port, key, operation, 2)
                    before = cpu_seconds(servers[name].pid)
                    rps, p50, p99 = wrk(port, key, operation, options.seconds)
                    cpu_us = (cpu_seconds(servers[name].pid) - before) / (rps * options.seconds) * 1e6
                    results.setdefault((operation, name), []).append((rps, p50, p99, cpu_us))
                    print(f"round {round_number + 1} {operation:8} {name:7} {rps:8,.0f} req/s  p50 {p50:.2f} ms  "
                          f"p99 {p99:.2f} ms  server CPU {cpu_us:.0f} µs/req", flush=True)
        print("\n| page of 50 | databases | req/s | p50 ms | p99 ms | server CPU µs/req | req/s by round |")
        print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
        for (operation, name), rows in results.items():
            label = "two (composed)" if name == "split" else "one"
            print(f"| {operation} | {label} | {statistics.median(r[0] for r in rows):,.0f} | "
                  f"{statistics.median(r[1] for r in rows):.2f} | {statistics.median(r[2] for r in rows):.2f} | "
                  f"{statistics.median(r[3] for r in rows):.0f} | {' / '.join(f'{r[0]:,.0f}' for r in rows)} |")
        print()
        for operation in OPERATIONS:
            ratios = [one[0] / two[0] for one, two in zip(results[(operation, "single")], results[(operation, "split")],
                                                          strict=True)]
            verdict = "within" if statistics.median(ratios) <= 2 else "OVER"
            print(f"{operation}: one database ÷ composed = {statistics.median(ratios):.2f}x in req/s "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}; {verdict} the 2x target)")
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
