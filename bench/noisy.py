"""The noisy-neighbour benchmark (issue 15, fair sharing): does a quiet app's latency follow a noisy app's load?

    .venv/bin/python bench/noisy.py [--duration 10] [--rate 100] [--modes on,off] [--cases alone,db,cpu]

One ``gatehouse serve`` on the shop demo (a fresh database ``gatehouse_noisy`` on 127.0.0.1:5432, user
``postgres``; the copy's products contract is not cached, so every read goes to the database) with two apps of
equal quotas, ``quiet`` and ``noisy``. For each mode (``[server] fair_sharing`` on, then off: an A/B in one run,
a server started for each) and case, the quiet app sends point lookups at a steady open-loop rate:

* **alone**: nothing else;
* **db**: the noisy app saturates the database: wrk, 16 connections, closed loop, ``customer_summary`` (an
  aggregate over every order item, ~0 rows out);
* **cpu**: the noisy app saturates gatehouse's CPU: wrk, 64 connections, closed loop, point lookups.

The quiet client is open loop: request *i* is due at ``t0 + i / rate`` and its latency is measured from that
moment, whether or not a connection was free (no coordinated omission). Each request takes an idle keep-alive
connection or opens one. The noisy app's answers are counted from the server's ``/metrics`` (its 429s above
all: fairness must come from ordering, not refusals). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gatehouse.demo import copy_shop

REPO = Path(__file__).resolve().parent.parent
GATEHOUSE = os.environ.get("GATEHOUSE", str(REPO / ".venv/bin/gatehouse"))
PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
DB = os.environ.get("BENCH_DB", "gatehouse_noisy")
APPS = """
[apps.quiet]
quota = {{ pool_size = {pool}, max_rows = 1000, statement_timeout_ms = 10000 }}
grants = [{{ contract = "products", actions = ["read"] }}]

[apps.noisy]
quota = {{ pool_size = {pool}, max_rows = 1000, statement_timeout_ms = 10000 }}
grants = [{{ contract = "products", actions = ["read"] }}, {{ contract = "orders", actions = ["read"] }},
          {{ contract = "order_items", actions = ["read"] }}, {{ contract = "customer_summary", actions = ["read"] }}]
"""
QUIET_PATH = "/products?id=eq.{}"
NOISE = {  # case → (wrk connections, path template, low, high)
    "db": (16, "/customer_summary?total_spent=lt.%d", -2, -1),
    "cpu": (64, "/products?id=eq.%d", 1, 5000),
}


def psql(database: str, *commands: str) -> None:
    args = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", f"{PG}/{database}"]
    for command in commands:
        args += ["-c", command]
    subprocess.run(args, check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def setup(work: Path, pool: int) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The shop in ``work``, migrated and applied to a fresh database; returns (project, environment, keys)."""
    psql("postgres", f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)', f'CREATE DATABASE "{DB}"')
    project = work / "shop"
    copy_shop(project, services=False)  # the shop alone: one database, as measured
    toml = project / "gatehouse.toml"
    text = toml.read_text().replace('cache = "30s"\n', "")  # every read goes to the database
    toml.write_text(text + APPS.format(pool=pool))
    env = {**os.environ, "GATEHOUSE_DATABASES__SHOP__URL": f"{PG}/{DB}"}

    def gh(*args: str) -> str:
        done = subprocess.run([GATEHOUSE, "--project", str(project), *args], env=env, capture_output=True,
                              text=True)
        if done.returncode:
            sys.exit(f"gatehouse {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    gh("migrate")
    gh("apply")
    keys = {app: gh("keys", "create", app, "--quiet").strip().splitlines()[-1] for app in ("quiet", "noisy")}
    psql(DB, "VACUUM ANALYZE")
    return project, env, keys


class Server:
    def __init__(self, project: Path, env: dict[str, str], fair: bool, log: Path) -> None:
        self.port, self.admin = free_port(), free_port()
        env = {**env, "GATEHOUSE_SERVER__FAIR_SHARING": "true" if fair else "false"}
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [GATEHOUSE, "--project", str(project), "serve", "--port", str(self.port), "--admin-port",
             str(self.admin), "--log-level", "warning"], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"gatehouse serve did not get ready; see {log}")
            time.sleep(0.2)

    def scrape(self, app: str) -> tuple[dict[str, int], dict[float, int]]:
        """For ``app``, from ``/metrics``: requests answered so far per status, and the cumulative histogram of
        their durations inside gatehouse (bucket bound in seconds → count)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        counts: dict[str, int] = {}
        buckets: dict[float, int] = {}
        for line in text.splitlines():
            if f'app="{app}"' not in line:
                continue
            value = int(float(line.rsplit(" ", 1)[1]))
            status = re.search(r'status="(\d+)"', line)
            bound = re.search(r'le="([^"]+)"', line)
            if line.startswith("gatehouse_requests_total{") and status:
                counts[status[1]] = counts.get(status[1], 0) + value
            elif line.startswith("gatehouse_request_duration_seconds_bucket{") and bound:
                key = float(bound[1])
                buckets[key] = buckets.get(key, 0) + value
        return counts, buckets

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# --- the quiet app's open-loop client ------------------------------------------------------------------------

class OpenLoop:
    """Sends at a fixed schedule over keep-alive connections (opened as needed) and keeps each latency."""

    def __init__(self, port: int, key: str) -> None:
        self.port, self.key = port, key
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.latencies: list[float] = []
        self.failed = 0
        self.reasons: Counter[str] = Counter()
        """Why requests failed: a status, or the exception's name."""

    async def _one(self, due: float, keep: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.idle:
                reader, writer = self.idle.pop()
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            path = QUIET_PATH.format(random.randint(1, 5000))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\napikey: {self.key}\r\n"
                         "Accept-Profile: v1\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await reader.readexactly(int(length[1]) if length else 0)
            status = int(head.split(b" ", 2)[1])
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            if keep:
                self.failed += 1
                self.reasons[type(exc).__name__] += 1
            return
        if keep:
            self.latencies.append(loop.time() - due)
            if status != 200:
                self.failed += 1
                self.reasons[str(status)] += 1
        self.idle.append((reader, writer))

    async def run(self, rate: float, warmup: float, duration: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        tasks: set[asyncio.Task[None]] = set()
        for i in range(int((warmup + duration) * rate)):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(self._one(due, keep=i >= warmup * rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        for _, writer in self.idle:
            writer.close()


@contextlib.contextmanager
def client_priority(nice: int) -> Iterator[None]:
    """Run the quiet client at this niceness (Linux: this thread only; lowering it needs root): the instrument
    should not wait for the CPU behind the load it measures, whose clients would be on other machines."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        nice = 0
    try:
        yield
    finally:
        if nice:
            os.setpriority(os.PRIO_PROCESS, 0, 0)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


@dataclass
class Result:
    mode: str
    case: str
    p50_ms: float
    p99_ms: float
    inside_p99_ms: float
    """The quiet app's p99 inside gatehouse (a histogram bucket's bound, from /metrics)."""
    quiet_sent: int
    quiet_failed: int
    noisy_rps: float
    noisy_refused: int
    noisy_other_errors: int
    round: int = 0


def bucket_percentile(before: dict[float, int], after: dict[float, int], share: float) -> float:
    """The bucket bound (ms) under which ``share`` of the requests between two scrapes took their time."""
    delta = sorted((bound, after[bound] - before.get(bound, 0)) for bound in after)
    total = delta[-1][1] if delta else 0
    return next((bound * 1000 for bound, count in delta if count >= share * total and total), float("nan"))


def measure(server: Server, keys: dict[str, str], mode: str, case: str, args: argparse.Namespace) -> Result:
    before, _ = server.scrape("noisy")
    wrk = None
    if case in NOISE:
        connections, template, low, high = NOISE[case]
        wrk = subprocess.Popen(
            ["wrk", "-t1", f"-c{connections}", f"-d{args.warmup + args.duration + 1:.0f}s", "--timeout", "10s",
             "-s", str(REPO / "bench/wrk.lua"), f"http://127.0.0.1:{server.port}", "--", template, str(low),
             str(high), f"apikey:{keys['noisy']}", "Accept-Profile:v1"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
    client = OpenLoop(server.port, keys["quiet"])
    _, inside_before = server.scrape("quiet")
    with client_priority(args.client_nice):
        asyncio.run(client.run(args.rate, args.warmup, args.duration))
    _, inside_after = server.scrape("quiet")
    noisy_rps = 0.0
    if wrk is not None:
        out, _ = wrk.communicate(timeout=60)
        found = re.search(r"BENCH_RESULT (\{.*\})", out)
        noisy_rps = json.loads(found[1])["rps"] if found else float("nan")
    after, _ = server.scrape("noisy")
    delta = {status: after.get(status, 0) - before.get(status, 0) for status in after}
    refused = delta.get("429", 0)
    others = sum(count for status, count in delta.items() if int(status) >= 400 and status != "429")
    lat = client.latencies
    if client.failed:
        print(f"  the quiet app's failures: {dict(client.reasons)}", flush=True)
    unanswered = sum(count for reason, count in client.reasons.items() if not reason.isdigit())
    return Result(mode, case, percentile(lat, 0.5) * 1000, percentile(lat, 0.99) * 1000,
                  bucket_percentile(inside_before, inside_after, 0.99), len(lat) + unanswered, client.failed,
                  noisy_rps, refused, others)


def warm(server: Server, keys: dict[str, str]) -> None:
    """A new server's first seconds are slower (connections opened, plans compiled, PostgreSQL's caches)."""
    for connections, template, low, high in NOISE.values():
        subprocess.run(["wrk", "-t1", f"-c{connections}", "-d1s", "-s", str(REPO / "bench/wrk.lua"),
                        f"http://127.0.0.1:{server.port}", "--", template, str(low), str(high),
                        f"apikey:{keys['noisy']}", "Accept-Profile:v1"], capture_output=True, check=True)
    asyncio.run(OpenLoop(server.port, keys["quiet"]).run(200, 0, 1))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else float("nan")


def table(results: list[Result]) -> str:
    """Per mode and case, the median over the rounds; the p99 ratio is each round's against its own alone."""
    lines = ["| fair sharing | noise | quiet p50 ms | quiet p99 ms | p99 ÷ alone (by round) | quiet p99 inside "
             "gatehouse, ms (≤) | quiet errors | noisy req/s | noisy 429 | noisy other errors |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    rounds = max(r.round for r in results) + 1
    alone = {(r.mode, r.round): r.p99_ms for r in results if r.case == "alone"}
    for mode in dict.fromkeys(r.mode for r in results):
        for case in dict.fromkeys(r.case for r in results):
            runs = [r for r in results if r.mode == mode and r.case == case]
            ratios = [r.p99_ms / alone[(mode, r.round)] for r in runs if (mode, r.round) in alone]
            by_round = " / ".join(f"{x:.2f}" for x in ratios)
            lines.append(
                f"| {mode} | {case} | {median([r.p50_ms for r in runs]):.2f} | {median([r.p99_ms for r in runs]):.2f} "
                f"| {median(ratios):.2f}{f' ({by_round})' if rounds > 1 else ''} "
                f"| {median([r.inside_p99_ms for r in runs]):g} | {sum(r.quiet_failed for r in runs)}/"
                f"{sum(r.quiet_sent for r in runs)} | {median([r.noisy_rps for r in runs]):,.0f} "
                f"| {sum(r.noisy_refused for r in runs)} | {sum(r.noisy_other_errors for r in runs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per case")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring, per case")
    parser.add_argument("--rate", type=float, default=100.0, help="the quiet app's requests per second")
    parser.add_argument("--modes", default="on,off", help="fair_sharing settings to run, in order")
    parser.add_argument("--cases", default="alone,db,cpu")
    parser.add_argument("--pool-size", type=int, default=4, help="each app's pool_size")
    parser.add_argument("--client-nice", type=int, default=-10, help="the quiet client's niceness (as root)")
    parser.add_argument("--rounds", type=int, default=3, help="each round runs every mode (alternating which "
                                                                "goes first) and case once")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is required (apt-get install wrk)")
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {args.rate:g} quiet req/s, {args.duration:g} s per "
          f"case (+{args.warmup:g} s warm-up), {args.rounds} round(s); max_active="
          f"{os.environ.get('GATEHOUSE_SERVER__MAX_ACTIVE', 'default')}", flush=True)
    results: list[Result] = []
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(prefix="gatehouse-noisy-") as folder:
        work = Path(folder)
        project, env, keys = setup(work, args.pool_size)
        for round_ in range(args.rounds):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                server = Server(project, env, mode == "on", work / f"serve-{mode}-{round_}.log")
                try:
                    warm(server, keys)
                    for case in args.cases.split(","):
                        result = measure(server, keys, mode, case, args)
                        result.round = round_
                        results.append(result)
                        print(f"  round {round_ + 1} {mode} {case}: p50 {result.p50_ms:.2f} ms, p99 "
                              f"{result.p99_ms:.2f} ms (inside ≤ {result.inside_p99_ms:g}), noisy "
                              f"{result.noisy_rps:,.0f} req/s, 429: {result.noisy_refused}", flush=True)
                finally:
                    server.stop()
    print(f"load average at end: {os.getloadavg()[0]:.2f}\n")
    print(table(results))


if __name__ == "__main__":
    main()
