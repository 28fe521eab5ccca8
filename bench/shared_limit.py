"""Two gatehouse instances, one rate limit shared through Redis: how many requests do they admit together?

    .venv/bin/python bench/shared_limit.py [--rate 500] [--burst 50] [--seconds 10] [--redis redis://127.0.0.1:6379/0]

Copies the shop demo to a temporary folder (products uncached), gives the app ``bench`` a rate, migrates and
applies it into a fresh database ``gatehouse_bench_shared`` on 127.0.0.1:5432, starts two ``gatehouse serve``
with ``[redis] url`` set, and drives both at once with wrk (8 connections each, point lookups), well above the
rate. Admitted = answers that were not 429. The bound is the one ``limits/shared.py`` proves:
``burst + rate * (seconds + lease ttl 0.2 s)``; exact GCRA would admit ``burst + rate * seconds``. Then the
same with each instance alone (no Redis) for comparison: each admits the whole rate, together twice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from serving import GATEHOUSE, REPO, serve

from gatehouse.demo import copy_shop

DB = "gatehouse_bench_shared"
PG = "postgresql://postgres@127.0.0.1:5432"




def psql(sql: str) -> None:
    subprocess.run(["psql", f"{PG}/postgres", "-qc", sql], check=True, capture_output=True)


def prepare(folder: Path, rate: int, burst: int, env: dict[str, str]) -> str:
    project = folder / "shop"
    copy_shop(project, services=False)  # the shop alone: one database
    toml = (project / "gatehouse.toml").read_text().replace('cache = "30s"\n', "")
    toml += (f'\n[apps.bench]\nquota = {{ pool_size = 4, rate = "{rate}/s", burst = {burst} }}\n'
             'grants = [{ contract = "products", actions = ["read"] }]\n')
    (project / "gatehouse.toml").write_text(toml)
    psql(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    psql(f'CREATE DATABASE "{DB}"')
    for command in (["migrate"], ["apply"]):
        subprocess.run([GATEHOUSE, "--project", str(project), *command], env=env, check=True, capture_output=True)
    key = subprocess.run([GATEHOUSE, "--project", str(project), "keys", "create", "bench", "--quiet"], env=env,
                         check=True, capture_output=True, text=True).stdout.strip()
    return key




def _counters(admin: int) -> dict[str, float]:
    """The shared limits' counters from an instance's /metrics (absent without Redis)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {name: float(value) for line in text.splitlines() if line.startswith("gatehouse_ratelimit_")
            and " " in line and "{" not in line for name, value in [line.split(" ", 1)]}


def drive(ports: list[int], key: str, seconds: int) -> tuple[int, int]:
    """wrk against every port at once; (requests, non-2xx) summed."""
    runs = [subprocess.Popen(["wrk", "-t1", "-c8", f"-d{seconds}s", "-s", str(REPO / "bench" / "wrk.lua"),
                              f"http://127.0.0.1:{port}", "--", "/products?id=eq.%d", "1", "5000",
                              f"apikey:{key}"], stdout=subprocess.PIPE, text=True) for port in ports]
    requests = refused = 0
    for run in runs:
        out, _ = run.communicate()
        line = next(line for line in out.splitlines() if line.startswith("BENCH_RESULT "))
        result = json.loads(line.removeprefix("BENCH_RESULT "))
        requests += result["requests"]
        refused += result["non_2xx"]
    return requests, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    options = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
    env["GATEHOUSE_DATABASES__SHOP__URL"] = f"{PG}/{DB}"
    with tempfile.TemporaryDirectory(prefix="gatehouse-shared-") as folder:
        key = prepare(Path(folder), options.rate, options.burst, env)
        project = Path(folder) / "shop"
        rows = []
        for label, extra in (("shared through Redis", {"GATEHOUSE_REDIS__URL": options.redis,
                                                       "GATEHOUSE_REDIS__KEY_PREFIX": f"bench:{uuid.uuid4().hex}:"}),
                             ("each alone (no Redis)", {})):
            servers = [serve(project, {**env, **extra}) for _ in range(2)]
            try:
                time.sleep(1.5)  # both heartbeats seen
                requests, refused = drive([port for _, port, _ in servers], key, options.seconds)
                counted = [_counters(admin) for _, _, admin in servers]
            finally:
                for server, _, _ in servers:
                    server.terminate()
                    server.wait(30)
            admitted = requests - refused
            exact = options.burst + options.rate * options.seconds
            bound = options.burst + options.rate * (options.seconds + 0.2)
            degraded = sum(c.get("gatehouse_ratelimit_degraded_total", 0) for c in counted)
            errors = sum(c.get("gatehouse_ratelimit_redis_errors_total", 0) for c in counted)
            calls = sum(c.get("gatehouse_ratelimit_lease_calls_total", 0) for c in counted)
            rows.append(f"| {label} | {requests:,} | {admitted:,} | {admitted / options.seconds:,.0f} | "
                        f"{exact:,} | {bound:,.0f} | {admitted / exact:.3f} | {calls:,.0f} | {errors:,.0f} | "
                        f"{degraded:,.0f} |")
    print(f"\nrate {options.rate}/s, burst {options.burst}, two instances, {options.seconds} s, "
          "wrk: 8 connections on each\n")
    print("| limits | requests | admitted | admitted/s | exact GCRA | lease bound | admitted ÷ exact "
          "| lease calls | Redis errors | decided locally |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
