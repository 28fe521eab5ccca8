"""Where each request's CPU goes under the bench's load: gatehouse's threads, PostgreSQL, the load generator.

    .venv/bin/python bench/cpu_split.py [--op point] [--seconds 8] [--connections 16] [--set NAME=VALUE ...]

Serves the bench's project (``bench/inprocess.py``'s copy of the shop, on the database ``gatehouse_bench`` that
bench/run made) with ``gatehouse serve``, drives one operation with wrk as bench/run does (1 thread, 16
connections, ``bench/wrk.lua``), then runs ``bench/direct.py`` for the same operation; prints one line per system
with req/s, latency, and CPU per request: every thread of gatehouse's process by name (the event loop's thread
is the busiest ``gatehouse``; granian's Rust threads are the others), every PostgreSQL process together (those
that exited meanwhile included, through the postmaster's reaped-children counters), and the client (wrk, or
direct.py's one process). Also the statement groups gatehouse ran (its ``/metrics``).

Why: a system on 2 cores is bound by its busiest thread or by the cores; this says which, and what each side
would have to give up. ``--set`` passes settings to the server only (an A/B of one setting: run it twice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from inprocess import project_folder
from pgcpu import postgres_seconds, thread_seconds
from serving import REPO, serve

from gatehouse import operations
from gatehouse.project import load_project

WRK_SCRIPT = str(REPO / "bench" / "wrk.lua")
BODY = 'body={"user_id": %d, "status": "placed"}'
OPERATIONS = {  # the path template, the range of its number, wrk.lua's further arguments (as bench/run)
    "point": ("/products?id=eq.%d", 1, 5000, ["Accept-Profile: v1"]),
    "list": ("/products?price=gte.%d&order=id&limit=50", 10, 150, ["Accept-Profile: v1"]),
    "embedded": ("/orders?select=id,status,order_items(product_id,quantity,unit_price)&id=eq.%d", 1, 3000,
                 ["Accept-Profile: v1"]),
    "insert": ("/orders", 1, 1000, ["Content-Profile: v1", "method=POST", BODY, "Content-Type: application/json"]),
}


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(command: list[str], server_pid: int | None) -> tuple[dict[str, float], dict[str, float]]:
    """Run the load ``command``; its result line, and CPU µs per request by who spent it."""
    postgres, client = postgres_seconds(), children_seconds()
    threads = thread_seconds(server_pid) if server_pid else {}
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = [line for line in output.splitlines() if '"rps"' in line][-1]
    result = json.loads(line.removeprefix("BENCH_RESULT "))
    per = 1e6 / result["requests"]
    spent = {"postgres": (postgres_seconds() - postgres) * per, "client": (children_seconds() - client) * per}
    if server_pid:
        after = thread_seconds(server_pid)
        spent.update({name: (after.get(name, 0.0) - before) * per for name, before in threads.items()})
    return result, spent


def groups_run(admin_port: int) -> tuple[float, float]:
    """(groups, requests in them) so far, all apps together, from the admin port's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    totals = {"gatehouse_statement_groups_total": 0.0, "gatehouse_statement_grouped_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["gatehouse_statement_groups_total"], totals["gatehouse_statement_grouped_total"]


def report(system: str, result: dict[str, float], spent: dict[str, float], extra: str = "") -> None:
    threads = sorted(((name, us) for name, us in spent.items() if "/" in name and us >= 0.5), key=lambda kv: -kv[1])
    named = " ".join(f"{name.split('/')[0]}={us:.1f}" for name, us in threads)
    total = sum(spent.values())  # PostgreSQL, the client and every server thread
    print(f"{system}: {result['rps']:,.0f} req/s, p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms; "
          f"CPU µs per request: postgres {spent['postgres']:.1f}, client {spent['client']:.1f}"
          f"{', server threads ' + named if named else ''}; all {total:.0f}{extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=sorted(OPERATIONS), default="point")
    parser.add_argument("--seconds", type=int, default=8, help="measured seconds, after 2 s of warm-up")
    parser.add_argument("--database", default="gatehouse_bench")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server (repeatable)")
    parser.add_argument("--no-direct", action="store_true", help="measure gatehouse only")
    parser.add_argument("--connections", type=int, default=16,
                        help="wrk's connections = direct.py's tasks (16, as bench/run): more tells a system bound by "
                             "its latency (it goes faster) from one bound by a thread or the cores (it does not)")
    args = parser.parse_args()
    url = f"postgresql://postgres@127.0.0.1:5432/{args.database}"
    os.environ["GATEHOUSE_DATABASES__SHOP__URL"] = url
    with tempfile.TemporaryDirectory(prefix="gh-cpu-split-") as folder:
        project = project_folder(Path(folder))
        loaded = load_project(project)
        asyncio.run(operations.apply_all(loaded))
        key = asyncio.run(operations.create_key(loaded, "bench")).secret_key
        server, port, admin = serve(project, {**os.environ, **dict(pair.split("=", 1) for pair in args.set)})
        try:
            path, low, high, more = OPERATIONS[args.op]
            load = ["wrk", "-t1", f"-c{args.connections}", "-s", WRK_SCRIPT, f"http://127.0.0.1:{port}", "--",
                    path, str(low), str(high), f"apikey:{key}", *more]
            subprocess.run([*load[:2], "-d2s", *load[2:]], capture_output=True, check=True)
            groups, grouped = groups_run(admin)
            result, spent = measured([*load[:2], f"-d{args.seconds}s", *load[2:]], server.pid)
            groups, grouped = (now - before for now, before in zip(groups_run(admin), (groups, grouped), strict=True))
        finally:
            server.terminate()
            server.wait()
        report(f"gatehouse {args.op}", result, spent,
               f"; {grouped / result['requests']:.0%} of the requests in groups of {grouped / max(groups, 1):.1f}")
    if not args.no_direct:
        direct = [sys.executable, str(REPO / "bench" / "direct.py"), "--dsn", url, "--query", args.op,
                  "--concurrency", str(args.connections)]
        subprocess.run([*direct, "--duration", "2", "--warmup", "0"], capture_output=True, check=True)
        report(f"direct {args.op}", *measured([*direct, "--duration", str(args.seconds), "--warmup", "0"], None))


if __name__ == "__main__":
    main()
