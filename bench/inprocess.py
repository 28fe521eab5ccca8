"""gatehouse's request path in-process, without an HTTP server: for instruction counts and profiles.

    .venv/bin/python bench/inprocess.py --op point --requests 2400 [--profile]
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \
        .venv/bin/python bench/inprocess.py --op point --requests 800

Runs ``--requests`` requests of one operation of bench/run (``point``, ``list``, ``embedded``, ``insert``) through
``DataApp.handle`` on 16 concurrent tasks, against the shop demo served from the database ``--database`` (made
by bench/run or bench/pooler.py: migrated, applied, with an app ``bench``). The instruction count of one request
is the difference between two runs of different lengths divided by the difference in requests (start-up and
the database's share of the process cancel out; the database runs in its own processes, not counted).
``--profile`` also prints cProfile's 25 most expensive functions by their own time. It ends with the wall and CPU
time per request, how many requests ran in statement groups (``GATEHOUSE_SERVER__GROUP_STATEMENTS=1``: none), and
the garbage collector's share.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import random
import shutil
import tempfile
import time
from pathlib import Path

from gatehouse import operations
from gatehouse.app import DataApp
from gatehouse.demo import copy_shop
from gatehouse.http.deadlines import BodyDeadlines
from gatehouse.http.exchange import HttpRequest
from gatehouse.project import load_project
from gatehouse.runtime import Runtime

TASKS = 16
OPERATIONS = {
    "point": ("GET", "/products", "id=eq.{n}", 5000, b""),
    "list": ("GET", "/products", "price=gte.{n}&order=id&limit=50", 140, b""),
    "embedded": ("GET", "/orders", "select=id,status,order_items(product_id,quantity,unit_price)&id=eq.{n}", 3000,
                 b""),
    "insert": ("POST", "/orders", "", 1000, b'{"user_id": {n}, "status": "placed"}'),
}


class GcTime:
    """Time spent in the garbage collector, from ``gc.callbacks``: how often each generation ran, and the longest
    collection (a pause every request then in flight waits through)."""

    def __init__(self) -> None:
        self.runs = [0, 0, 0]
        self.seconds = 0.0
        self.longest = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.runs[info["generation"]] += 1
        self.seconds += took
        self.longest = max(self.longest, took)


def project_folder(folder: Path) -> Path:
    project = folder / "shop"
    copy_shop(project, services=False)
    toml = (project / "gatehouse.toml").read_text().replace('cache = "30s"\n', "")
    toml += ('\n[apps.bench]\nquota = { pool_size = 4 }\ngrants = [{ contract = "products", actions = ["read"] }, '
             '{ contract = "orders", actions = ["read", "insert"] }, '
             '{ contract = "order_items", actions = ["read"] }]\n')
    (project / "gatehouse.toml").write_text(toml)
    return project


async def run(database: str, operation: str, requests: int, profile: bool) -> None:
    folder = Path(tempfile.mkdtemp(prefix="gh-inprocess-"))
    try:
        os.environ["GATEHOUSE_DATABASES__SHOP__URL"] = f"postgresql://postgres@127.0.0.1:5432/{database}"
        project = load_project(project_folder(folder))
        await operations.apply_all(project)
        key = (await operations.create_key(project, "bench")).secret_key
        runtime = Runtime(project)
        await runtime.start()
        app = DataApp(runtime, manage_runtime=False)
        deadlines = BodyDeadlines(project.config.server.body_timeout_s)  # as `gatehouse serve` reads bodies
        method, path, query, high, body = OPERATIONS[operation]
        profile_header = "accept-profile" if method == "GET" else "content-profile"
        randomness = random.Random(7)
        headers = {"apikey": key, profile_header: "v1", "content-type": "application/json", "host": "bench"}

        async def one() -> None:
            n = randomness.randint(1, high)
            payload = body.replace(b"{n}", str(n).encode())

            async def chunks():  # type: ignore[no-untyped-def]
                yield payload

            request = HttpRequest(method, path, query.replace("{n}", str(n + 9 if operation == "list" else n)),
                                  dict(headers), client="127.0.0.1", body_chunks=chunks, body_deadlines=deadlines)
            response = await app.handle(request)
            assert response.status < 300, response.status

        async def worker(count: int) -> None:
            for _ in range(count):
                await one()

        await asyncio.gather(*(worker(20) for _ in range(TASKS)))  # warm: plans, pools, key ring
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        collector = GcTime()
        gc.callbacks.append(collector)
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(requests // TASKS) for _ in range(TASKS)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        gc.callbacks.remove(collector)
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        assert runtime.pools is not None
        groups = runtime.pools.statement_groups("bench", "shop")
        print(f"{operation}: {wall / requests * 1e6:.0f} µs per request (wall), {cpu / requests * 1e6:.0f} µs of this "
              f"process's CPU; statement groups: {groups.grouped} requests in {groups.groups} groups, "
              f"{groups.alone_again} run again alone")
        print(f"  garbage collector: {collector.seconds / requests * 1e6:.1f} µs per request, collections by "
              f"generation {collector.runs}, longest {collector.longest * 1e3:.2f} ms")
        await runtime.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--op", choices=sorted(OPERATIONS), default="point")
    parser.add_argument("--requests", type=int, default=2400)
    parser.add_argument("--database", default="gatehouse_pooler")
    parser.add_argument("--profile", action="store_true")
    options = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(options.database, options.op, options.requests, options.profile))


if __name__ == "__main__":
    main()
