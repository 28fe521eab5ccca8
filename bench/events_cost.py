"""What change events cost the writes: inserts per second through gatehouse with `[events.orders]` off and on.

    .venv/bin/python bench/events_cost.py [--seconds 10] [--rounds 3]

Copies the shop demo (its one database, products uncached) with an app ``bench`` that may insert orders, migrates
and applies it into a fresh database ``gatehouse_bench_events`` on 127.0.0.1:5432, and drives ``POST /orders``
(one row, 16 connections, wrk, as bench/run's insert) against one ``gatehouse serve``: a round measures with the
project's events off, then with ``[events.orders] version = 1`` applied (the capture triggers on ``orders``), or
the other way round (alternating), restarting the server in between. Without sinks, so what is measured is the
capture in the writing transaction (shaping the row, the outbox row), not a relay. Target (issue 17): at most
15 % fewer inserts per second with events on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from serving import GATEHOUSE, REPO, cpu_seconds, serve

from gatehouse.demo import copy_shop

WRK_SCRIPT = REPO / "bench" / "wrk.lua"
DB = "gatehouse_bench_events"
PG = "postgresql://postgres@127.0.0.1:5432"
EVENTS = "\n[events.orders]\nversion = 1\n"




def psql(sql: str) -> None:
    subprocess.run(["psql", f"{PG}/postgres", "-qc", sql], check=True, capture_output=True)


def configure(project: Path, base: str, events: bool, env: dict[str, str]) -> None:
    (project / "gatehouse.toml").write_text(base + (EVENTS if events else ""))
    subprocess.run([GATEHOUSE, "--project", str(project), "apply"], env=env, check=True, capture_output=True)


def machine_busy_s() -> float:
    """CPU time the whole machine spent working (user, nice, system, irq, softirq; not idle, iowait or steal):
    per insert, the measure that a noisy VM's stolen time does not move."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")


def inserts_per_second(project: Path, key: str, seconds: int,
                       env: dict[str, str]) -> tuple[float, float, float, float, float]:
    """Inserts per second, p99 ms, and CPU µs per insert: the machine's (wrk, gatehouse, PostgreSQL together),
    gatehouse's, and wrk's (what is left is PostgreSQL's, and the machine's own)."""
    server, port, _ = serve(project, env)
    try:
        args = ["wrk", "-t1", "-c16", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}", "--", "/orders", "1", "100",
                f"apikey:{key}", "Content-Type: application/json", "method=POST",
                'body={"user_id": %d, "status": "placed"}']
        subprocess.run([*args[:3], "-d2s", *args[3:]], capture_output=True, check=True)
        busy, served = machine_busy_s(), cpu_seconds(server.pid)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        text = subprocess.run([*args[:3], f"-d{seconds}s", *args[3:]], capture_output=True, text=True,
                              check=True).stdout
        busy, served = machine_busy_s() - busy, cpu_seconds(server.pid) - served
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        loader = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        result = json.loads(next(line for line in text.splitlines() if line.startswith("BENCH_RESULT"))[13:])
        if result["errors"]:
            raise SystemExit(f"{result['errors']} requests failed: {result}")
        rps = float(result["rps"])
        per_insert = 1e6 / (rps * seconds)
        return rps, float(result["p99_ms"]), busy * per_insert, served * per_insert, loader * per_insert
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gh-bench-events-"))
    try:
        project = folder / "shop"
        copy_shop(project, services=False)
        base = (project / "gatehouse.toml").read_text().replace('cache = "30s"\n', "")
        base += ('\n[apps.bench]\nquota = { pool_size = 4, max_rows = 1000 }\n'
                 'grants = [{ contract = "orders", actions = ["read", "insert"] }]\n')
        (project / "gatehouse.toml").write_text(base)
        env = {**os.environ, "GATEHOUSE_DATABASES__SHOP__URL": f"{PG}/{DB}"}
        psql(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
        psql(f'CREATE DATABASE "{DB}"')
        gh = [GATEHOUSE, "--project", str(project)]
        subprocess.run([*gh, "migrate"], env=env, check=True, capture_output=True)
        subprocess.run([*gh, "apply"], env=env, check=True, capture_output=True)
        key = subprocess.run([*gh, "keys", "create", "bench", "--quiet"], env=env, check=True, capture_output=True,
                             text=True).stdout.strip()
        results: dict[bool, list[tuple[float, float, float, float, float]]] = {False: [], True: []}
        for round_number in range(options.rounds):
            for events in ((False, True) if round_number % 2 == 0 else (True, False)):
                configure(project, base, events, env)
                measured = inserts_per_second(project, key, options.seconds, env)
                results[events].append(measured)
                rps, p99, cpu, served, loader = measured
                print(f"round {round_number + 1}, events {'on ' if events else 'off'}: {rps:8,.0f} inserts/s, "
                      f"p99 {p99:.2f} ms; CPU µs per insert: {cpu:.0f} in all, {served:.0f} gatehouse, {loader:.0f} "
                      f"wrk, {cpu - served - loader:.0f} PostgreSQL and the rest", flush=True)
        off = statistics.median(r[0] for r in results[False])
        on = statistics.median(r[0] for r in results[True])
        cpu_off = statistics.median(r[2] for r in results[False])
        cpu_on = statistics.median(r[2] for r in results[True])
        print("\n| events | inserts/s (median) | p99 ms | CPU µs per insert: all / gatehouse / PostgreSQL and the rest "
              "(medians) | inserts/s by round |")
        print("| --- | ---: | ---: | ---: | --- |")
        for events, label in ((False, "off"), (True, "on")):
            rows = results[events]
            medians = [statistics.median(r[i] for r in rows) for i in (2, 3)]
            rest = statistics.median(r[2] - r[3] - r[4] for r in rows)
            print(f"| {label} | {statistics.median(r[0] for r in rows):,.0f} | "
                  f"{statistics.median(r[1] for r in rows):.2f} | {medians[0]:.0f} / {medians[1]:.0f} / {rest:.0f} | "
                  f"{' / '.join(f'{r[0]:,.0f}' for r in rows)} |")
        print(f"\nwith events on: {on / off:.2f} times the inserts per second ({(1 - on / off) * 100:.0f} % fewer; "
              f"target: at most 15 %); {cpu_on / cpu_off:.2f} times the CPU per insert")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
