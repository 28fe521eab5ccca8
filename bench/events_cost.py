"""What change events cost the writes: inserts per second through gatehouse with `[events.orders]` off and on.

    .venv/bin/python bench/events_cost.py [--seconds 10] [--rounds 3]

Copies the shop demo (products uncached) with an app ``bench`` that may insert orders, migrates and applies it
into a fresh database ``gatehouse_bench_events`` on 127.0.0.1:5432, and drives ``POST /orders`` (one row, 16
connections, wrk, as bench/run's insert) against one ``gatehouse serve``: a round measures with the project's
events off, then with ``[events.orders] version = 1`` applied (the capture triggers on ``orders``), or the other
way round (alternating), restarting the server in between. Without sinks, so what is measured is the capture in
the writing transaction (shaping the row, the outbox and version rows), not a relay. Target (issue 17): at most
15 % fewer inserts per second with events on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from serving import GATEHOUSE, REPO, serve

WRK_SCRIPT = REPO / "bench" / "wrk.lua"
DB = "gatehouse_bench_events"
PG = "postgresql://postgres@127.0.0.1:5432"
EVENTS = "\n[events.orders]\nversion = 1\n"




def psql(sql: str) -> None:
    subprocess.run(["psql", f"{PG}/postgres", "-qc", sql], check=True, capture_output=True)


def configure(project: Path, base: str, events: bool, env: dict[str, str]) -> None:
    (project / "gatehouse.toml").write_text(base + (EVENTS if events else ""))
    subprocess.run([GATEHOUSE, "--project", str(project), "apply"], env=env, check=True, capture_output=True)


def inserts_per_second(project: Path, key: str, seconds: int, env: dict[str, str]) -> tuple[float, float]:
    server, port, _ = serve(project, env)
    try:
        args = ["wrk", "-t1", "-c16", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}", "--", "/orders", "1", "100",
                f"apikey:{key}", "Content-Type: application/json", "method=POST",
                'body={"user_id": %d, "status": "placed"}']
        subprocess.run([*args[:3], "-d2s", *args[3:]], capture_output=True, check=True)
        text = subprocess.run([*args[:3], f"-d{seconds}s", *args[3:]], capture_output=True, text=True,
                              check=True).stdout
        result = json.loads(next(line for line in text.splitlines() if line.startswith("BENCH_RESULT"))[13:])
        if result["errors"]:
            raise SystemExit(f"{result['errors']} requests failed: {result}")
        return float(result["rps"]), float(result["p99_ms"])
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
        shutil.copytree(REPO / "examples" / "shop", project, ignore=shutil.ignore_patterns(".gatehouse"))
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
        results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for round_number in range(options.rounds):
            for events in ((False, True) if round_number % 2 == 0 else (True, False)):
                configure(project, base, events, env)
                rps, p99 = inserts_per_second(project, key, options.seconds, env)
                results[events].append((rps, p99))
                print(f"round {round_number + 1}, events {'on ' if events else 'off'}: {rps:8,.0f} inserts/s, "
                      f"p99 {p99:.2f} ms", flush=True)
        off = statistics.median(r[0] for r in results[False])
        on = statistics.median(r[0] for r in results[True])
        print("\n| events | inserts/s (median) | p99 ms (median) | by round |")
        print("| --- | ---: | ---: | --- |")
        for events, label in ((False, "off"), (True, "on")):
            rows = results[events]
            print(f"| {label} | {statistics.median(r[0] for r in rows):,.0f} | "
                  f"{statistics.median(r[1] for r in rows):.2f} | {' / '.join(f'{r[0]:,.0f}' for r in rows)} |")
        print(f"\nwith events on: {on / off:.2f} times the inserts per second ({(1 - on / off) * 100:.0f} % fewer; "
              "target: at most 15 %)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
