"""Reads through a streaming replica against reads from the primary, in one run; and what read-your-writes costs.

    .venv/bin/python bench/replicas.py [--seconds 10] [--rounds 3] [--pairs 500]

Makes a private primary and a hot standby (``pg_basebackup -R``, as tests/replica_cluster.py does; both on
this machine, so the replica's CPU is the primary's CPU: the point is gatehouse's cost of routing, not more
capacity), loads the shop demo, and serves it with one ``gatehouse serve``. Two apps of equal quotas read the
same point lookups: ``direct`` from the primary, ``replicated`` with ``reads = { from = "replica" }``. wrk drives
each in turn (16 connections, ``--seconds`` after 2 s of warm-up), rounds interleaved; server CPU per request
from /proc. Then ``--pairs`` write-then-read pairs (a PATCH, then a GET with the write's token) measure the
share of token reads a replica answered and the read's latency with the guard, against the same reads without
a token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from gatehouse.demo import copy_shop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from serving import (  # noqa: E402  (bench/, next to this script)
    GATEHOUSE,
    cpu_seconds,
    serve,
)

from replica_cluster import make_pair  # noqa: E402  (the tests' primary-and-replica maker)

WRK_SCRIPT = REPO / "bench" / "wrk.lua"




def project_folder(folder: Path) -> Path:
    project = folder / "shop"
    copy_shop(project, services=False)  # the shop alone: one database, with its replica
    toml = (project / "gatehouse.toml").read_text().replace('cache = "30s"\n', "")
    toml = toml.replace("[databases.shop]\n", '[databases.shop]\nreplicas = ["env:BENCH_REPLICA_URL"]\n')
    grants = ('grants = [{ contract = "products", actions = ["read"] }, '
              '{ contract = "orders", actions = ["read", "update"] }]\n')
    toml += (f'\n[apps.direct]\nquota = {{ pool_size = 4, max_rows = 1000 }}\n{grants}'
             f'\n[apps.replicated]\nquota = {{ pool_size = 4, max_rows = 1000 }}\n'
             f'reads = {{ from = "replica", max_staleness = "5s" }}\n{grants}')
    (project / "gatehouse.toml").write_text(toml)
    return project




def wrk(port: int, key: str, seconds: int) -> tuple[float, float, float]:
    """(req/s, p50 ms, p99 ms) of point lookups over 5,000 products, from bench/wrk.lua's result line."""
    args = ["wrk", "-t1", "-c16", f"-d{seconds}s", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}", "--",
            "/products?id=eq.%d", "1", "5000", f"apikey:{key}"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in text.splitlines() if line.startswith("BENCH_RESULT"))[13:])
    return float(result["rps"]), float(result["p50_ms"]), float(result["p99_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=500)
    options = parser.parse_args()
    pair_maker = make_pair()
    pair = next(pair_maker)
    folder = Path(tempfile.mkdtemp(prefix="gh-bench-replicas-"))
    server = None
    try:
        subprocess.run(["psql", pair.primary_uri, "-qc", "CREATE DATABASE shop"], check=True, capture_output=True)
        primary, replica = pair.urls("shop")
        env = {**os.environ, "GATEHOUSE_DATABASES__SHOP__URL": primary, "BENCH_REPLICA_URL": replica}
        project = project_folder(folder)
        gh = [GATEHOUSE, "--project", str(project)]
        print("migrate and apply the shop on the private primary...", flush=True)
        for command in (["migrate"], ["apply"]):
            subprocess.run([*gh, *command], env=env, check=True, capture_output=True)
        keys = {app: subprocess.run([*gh, "keys", "create", app, "--quiet"], env=env, check=True,
                                    capture_output=True, text=True).stdout.strip() for app in ("direct", "replicated")}
        server, port, _ = serve(project, env)
        time.sleep(1)
        results: dict[str, list[tuple[float, float, float, float]]] = {"direct": [], "replicated": []}
        for round_number in range(options.rounds):
            order = ["direct", "replicated"] if round_number % 2 == 0 else ["replicated", "direct"]
            for app in order:
                wrk(port, keys[app], 2)
                before = cpu_seconds(server.pid)
                rps, p50, p99 = wrk(port, keys[app], options.seconds)
                cpu_us = (cpu_seconds(server.pid) - before) / (rps * options.seconds) * 1e6
                results[app].append((rps, p50, p99, cpu_us))
                print(f"round {round_number + 1} {app:10} {rps:9,.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
                      f"server CPU {cpu_us:.0f} µs/req", flush=True)
        print("\n| reads from | req/s | p50 ms | p99 ms | server CPU µs/req | req/s by round |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
        for app, label in (("direct", "primary"), ("replicated", "replica (r1)")):
            rows = results[app]
            print(f"| {label} | {statistics.median(r[0] for r in rows):,.0f} | "
                  f"{statistics.median(r[1] for r in rows):.2f} | {statistics.median(r[2] for r in rows):.2f} | "
                  f"{statistics.median(r[3] for r in rows):.0f} | {' / '.join(f'{r[0]:,.0f}' for r in rows)} |")
        token_reads(port, keys["replicated"], options.pairs)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
        pair_maker.close()


def token_reads(port: int, key: str, pairs: int) -> None:
    """Write-then-read pairs with the write's token: how many a replica answers. Then the guard's own cost: the
    same reads with a token the replica has long had (the guard runs and passes) and without one, alternating."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"apikey": key}) as client:
        by_replica, token = 0, ""
        for i in range(pairs):
            written = client.patch(f"/orders?id=eq.{i % 100 + 1}", json={"status": "paid"})
            token = written.headers["gatehouse-consistency"]
            time.sleep(0.01)  # (the replica a few ms behind, as a client's next request would find it)
            read = client.get(f"/orders?id=eq.{i % 100 + 1}&select=id,status", headers={"Gatehouse-Consistency": token})
            by_replica += read.headers["gatehouse-source"] == "r1"
        time.sleep(6)  # past max_staleness: the instance's memory of the app's writes no longer applies
        timings: dict[bool, list[float]] = {True: [], False: []}
        for i in range(2 * pairs):
            guarded = i % 2 == 0
            started = time.perf_counter()
            read = client.get(f"/orders?id=eq.{i % 100 + 1}&select=id,status",
                              headers={"Gatehouse-Consistency": token} if guarded else {})
            timings[guarded].append(time.perf_counter() - started)
            assert read.headers["gatehouse-source"] == "r1"
        print(f"\nread-your-writes: {by_replica}/{pairs} token reads 10 ms after their write answered by the "
              f"replica ({by_replica / pairs:.0%}); a read's p50 with the guard "
              f"{statistics.median(timings[True]) * 1000:.3f} ms, without a token "
              f"{statistics.median(timings[False]) * 1000:.3f} ms")


if __name__ == "__main__":
    main()
