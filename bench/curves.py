"""Scaling curves (issue 21): gatehouse against the direct floor as apps, response size and connections grow.

    .venv/bin/python bench/curves.py [--duration 5] [--warmup 1] [--sweeps apps,rows,concurrency] [--pg auto]

Three sweeps, each point a short closed-loop measurement of gatehouse (``gatehouse serve``, driven by wrk with
bench/wrk.lua) and of direct (bench/direct.py: asyncpg pools in one process, no HTTP):

* **apps** 1, 10, 100: the point lookup, 16 connections, against a project of N apps (``app001``...), each with
  its own key and pool (``--app-pool-size``, default 2); wrk picks one of the N keys at random for every
  request. Direct opens N pools of the same size and picks one at random for every query: the same
  connections, used the same way, with nothing in between, which is the floor an app-aware layer can reach;
* **rows** 1, 50, 1000: ``/products?id=gt.<n>&order=id&limit=<rows>`` (exactly that many products), 16
  connections, the one app ``bench`` (``--pool-size``, default 4, as bench/run);
* **concurrency** 1, 4, 16, 64, 256 connections (direct: tasks): the point lookup, the app ``bench``.

Each point gives req/s, p50 and p99 (and for gatehouse its server's CPU per request, from /proc). The shop demo
goes into its own database, ``gatehouse_curves``, recreated every run; the demo's own apps are left out of the
project (a sweep point's apps are the only ones), as is the products cache (every read goes to PostgreSQL).
JSON goes to bench/results/curves.json, the PNGs (bench/curves_plot.py) next to it.

PostgreSQL connections: gatehouse opens min(2, pool_size) connections per app at start, and up to pool_size
under load (plus 5 of its own); direct opens all of its pools' connections. 100 apps with pools of 2 need ~210,
more than a stock ``max_connections = 100``. ``--pg auto`` (the default) uses the server at 127.0.0.1:5432 when
it has room for that, and otherwise starts a private PostgreSQL (that server's own binaries, every setting its
configuration files make, but a larger ``max_connections``) in a temporary folder for the whole run, and
stops it at the end. ``--pg system`` and ``--pg private`` force one or the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from curves_plot import require_tools
from serving import GATEHOUSE as VENV_GATEHOUSE
from serving import REPO, cpu_seconds, free_port

from gatehouse.auth.keys import create_key
from gatehouse.demo import copy_shop

GATEHOUSE = os.environ.get("GATEHOUSE", VENV_GATEHOUSE)
PYTHON = os.environ.get("BENCH_PYTHON", str(REPO / ".venv" / "bin" / "python"))
WRK_LUA = str(REPO / "bench" / "wrk.lua")
RESULTS = REPO / "bench" / "results"
SYSTEM_PG = "postgresql://postgres@127.0.0.1:5432"
OWN_CONNECTIONS = 5
"""gatehouse's own connections to a one-database project (db/headroom.py: its pool, the reload, key and audit
listeners), besides the apps' pools."""
POINT = ("/products?id=eq.%d", 1, 5000)
BENCH_GRANTS = """grants = [
    { contract = "products", actions = ["read"] },
    { contract = "orders", actions = ["read", "insert"] },
    { contract = "order_items", actions = ["read"] },
]"""


def psql(url: str, *commands: str) -> str:
    args = ["psql", "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", url]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def git_describe() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                          text=True)
    return done.stdout.strip() or "unknown"


# --- PostgreSQL: the system server, or a private one with room for every pool ----------------------------------

def free_connections(server: str) -> int:
    """Logins the server would still take: max_connections less the reserved slots and the clients now."""
    found = psql(f"{server}/postgres", "SELECT current_setting('max_connections')::int - "
                 "current_setting('superuser_reserved_connections')::int - count(*) FROM pg_stat_activity "
                 "WHERE backend_type = 'client backend'")
    return int(found)


@contextlib.contextmanager
def private_postgres(like: str, max_connections: int) -> Iterator[str]:
    """A throwaway PostgreSQL on a free loopback port (user ``postgres``, trust): the binaries of the server at
    ``like``, the settings its configuration files make (but where it listens, its paths and its connection
    limit). Yields its URL without a database; stopped and deleted on exit."""
    major = psql(f"{like}/postgres", "SELECT current_setting('server_version_num')::int / 10000")
    bindir = Path(f"/usr/lib/postgresql/{major}/bin")
    if not (bindir / "pg_ctl").exists():
        found = shutil.which("pg_ctl")
        if found is None:
            sys.exit(f"no PostgreSQL {major} binaries (pg_ctl) to start a private server with: use --pg system")
        bindir = Path(found).parent
    skipped = {"port", "listen_addresses", "unix_socket_directories", "max_connections", "cluster_name",
               "external_pid_file", "data_directory", "hba_file", "ident_file"}
    mirrored = [line.split("|", 1) for line in psql(
        f"{like}/postgres", "SELECT name || '|' || current_setting(name) FROM pg_settings "
        "WHERE source = 'configuration file'").splitlines()]
    root = Path(tempfile.mkdtemp(prefix="gatehouse-curves-pg-"))
    root.chmod(0o755)
    data, port = root / "data", free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"], check=True, capture_output=True)
        settings = {name: value for name, value in mirrored if name not in skipped and not name.startswith("ssl")}
        settings |= {"port": str(port), "listen_addresses": "127.0.0.1", "unix_socket_directories": str(root),
                     "max_connections": str(max_connections)}
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n# bench/curves.py\n")
            for name, value in settings.items():
                conf.write(f"{name} = '{value}'\n")
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                        "start"], check=True, capture_output=True)
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}"
        finally:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- the shop project and its apps -----------------------------------------------------------------------------

class Shop:
    """The shop demo in ``work``, migrated into a fresh database; its apps are whatever :meth:`configure` says."""

    def __init__(self, work: Path, server: str, database: str) -> None:
        self.url = f"{server}/{database}"
        self.project = work / "shop"
        self.env = {**os.environ, "GATEHOUSE_DATABASES__SHOP__URL": self.url}
        self.keys: dict[str, str] = {}
        psql(f"{server}/postgres", f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)',
             f'CREATE DATABASE "{database}"')
        copy_shop(self.project, services=False)  # the shop alone: one database
        text = (self.project / "gatehouse.toml").read_text()
        text = re.sub(r'(?m)^cache = "30s"\n', "", text)  # every read goes to the database, as in bench/run
        # the demo's apps out: a point's apps are the only ones with pools
        self.base = "".join(t for t in re.split(r"(?m)^(?=\[)", text) if not t.startswith("[apps."))
        self.configure({})
        self.gh("migrate")

    def gh(self, *args: str) -> str:
        done = subprocess.run([GATEHOUSE, "--project", str(self.project), *args], env=self.env, capture_output=True,
                              text=True)
        if done.returncode:
            sys.exit(f"gatehouse {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    def configure(self, apps: dict[str, int]) -> None:
        """The project's apps become ``apps`` (name → pool_size; the bench app's grants each), applied, each with a
        key (made once per app and run)."""
        blocks = [f'\n[apps.{name}]\nquota = {{ pool_size = {pool}, max_rows = 1000, statement_timeout_ms = 10000 }}'
                  f"\n{BENCH_GRANTS}\n" for name, pool in apps.items()]
        (self.project / "gatehouse.toml").write_text(self.base + "".join(blocks))
        if not apps:
            return
        self.gh("apply")
        missing = [name for name in apps if name not in self.keys]
        if missing:
            self.keys |= asyncio.run(self._create_keys(missing))
        psql(self.url, "VACUUM ANALYZE")

    async def _create_keys(self, apps: list[str]) -> dict[str, str]:
        conn = await asyncpg.connect(self.url)
        try:
            return {app: (await create_key(conn, app, description="bench/curves.py")).secret_key for app in apps}
        finally:
            await conn.close()


class Server:
    """``gatehouse serve`` of a shop, ready (``/ready`` 200), its output in ``log``."""

    def __init__(self, shop: Shop, log: Path, env: dict[str, str] | None = None) -> None:
        self.port, self.admin = free_port(), free_port()
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [GATEHOUSE, "--project", str(shop.project), "serve", "--port", str(self.port), "--admin-port",
             str(self.admin), "--log-level", "warning"], env={**shop.env, **(env or {})}, stdout=self.log,
            stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{self.admin}/ready", timeout=1) as answer:
                if answer.status == 200:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"gatehouse serve did not get ready; see {log}: {log.read_text()[-1500:]}")
            time.sleep(0.2)

    def get(self, path: str, headers: dict[str, str]) -> Any:
        """One GET that must answer 200: its JSON."""
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# --- one measurement -------------------------------------------------------------------------------------------

def wrk(url: str, connections: int, seconds: float, template: str, low: int, high: int, args: list[str]) -> dict[
        str, Any]:
    """One wrk run with bench/wrk.lua: its result line (req/s, p50/p99 in ms, errors)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", WRK_LUA,
               url, "--", template, str(low), str(high), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    found = re.search(r"^BENCH_RESULT (\{.*\})$", done.stdout, re.M)
    if done.returncode or not found:
        raise RuntimeError(f"wrk failed: {done.stdout[-500:]} {done.stderr[-500:]}")
    result: dict[str, Any] = json.loads(found[1])
    return result


def measure_gatehouse(server: Server, connections: int, target: tuple[str, int, int], args: list[str],
                      warmup: float, duration: float) -> dict[str, Any]:
    template, low, high = target
    if warmup > 0:
        wrk(server.url, connections, warmup, template, low, high, args)
    before = cpu_seconds(server.process.pid)
    result = wrk(server.url, connections, duration, template, low, high, args)
    used = cpu_seconds(server.process.pid) - before
    if result["requests"]:
        result["server_cpu_us"] = round(used / result["requests"] * 1e6, 1)
    return result


def measure_direct(url: str, query: list[str], concurrency: int, pools: int, pool_size: int, warmup: float,
                   duration: float) -> dict[str, Any]:
    command = [PYTHON, str(REPO / "bench" / "direct.py"), "--dsn", url, *query, "--concurrency", str(concurrency),
               "--pools", str(pools), "--pool-size", str(pool_size), "--warmup", str(warmup), "--duration",
               str(duration)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=warmup + duration + 120)
    if done.returncode:
        raise RuntimeError(f"bench/direct.py failed: {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- the sweeps ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    sweep: str
    x: int
    """Apps, rows or connections: the sweep's variable."""
    apps: dict[str, int]
    """The project's apps (name → pool_size) for this point."""
    connections: int
    rows: int | None
    """Products per answer; None: the point lookup."""

    def http_target(self) -> tuple[str, int, int]:
        if self.rows is None:
            return POINT
        return f"/products?id=gt.%d&order=id&limit={self.rows}", 0, max(0, 5000 - self.rows)

    def direct_query(self) -> list[str]:
        return ["--query", "point"] if self.rows is None else ["--query", "rows", "--rows", str(self.rows)]


def points(args: argparse.Namespace) -> list[Point]:
    bench = {"bench": args.pool_size}
    found: list[Point] = []
    for sweep in args.sweeps:
        if sweep == "apps":
            found += [Point("apps", n, {f"app{i:03d}": args.app_pool_size for i in range(1, n + 1)}, 16, None)
                      for n in args.apps]
        elif sweep == "rows":
            found += [Point("rows", n, bench, 16, n) for n in args.rows]
        else:
            found += [Point("concurrency", n, bench, n, None) for n in args.connections]
    return found


def run_sweep(shop: Shop, work: Path, sweep: list[Point], args: argparse.Namespace, round_: int) -> list[dict[
        str, Any]]:
    """Direct for every point of the sweep, then gatehouse (one server per set of apps), so that the two never
    hold their connections at once."""
    results: list[dict[str, Any]] = []

    def keep(point: Point, system: str, result: dict[str, Any]) -> None:
        errors = result.get("errors", 0)
        result.update(sweep=point.sweep, x=point.x, system=system, round=round_, connections=point.connections,
                      valid=errors <= 0.01 * max(1, result["requests"] + errors))
        results.append(result)
        print(f"  {point.sweep}={point.x} {system}: {result['rps']:,.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
              f"p99 {result['p99_ms']:.2f} ms" + (f", {result['server_cpu_us']} µs CPU/req"
                                                   if "server_cpu_us" in result else "")
              + ("" if result["valid"] else f"  INVALID: {errors} errors"), flush=True)

    for point in sweep:
        pool_size = next(iter(point.apps.values()))
        keep(point, "direct", measure_direct(shop.url, point.direct_query(), point.connections, len(point.apps),
                                             pool_size, args.warmup, args.duration))
    env = {"GATEHOUSE_SERVER__MAX_ACTIVE": str(args.max_active)} if args.max_active else {}
    for apps in dict.fromkeys(tuple(p.apps.items()) for p in sweep):
        shop.configure(dict(apps))
        keyfile = work / f"keys-{len(apps)}"
        keyfile.write_text("".join(shop.keys[name] + "\n" for name, _ in apps))
        server = Server(shop, work / f"serve-{sweep[0].sweep}-{len(apps)}-{round_}.log", env)
        try:
            for point in (p for p in sweep if tuple(p.apps.items()) == apps):
                key_args = [f"header-file=apikey:{keyfile}"] if point.sweep == "apps" else [
                    f"apikey: {shop.keys[apps[0][0]]}"]
                template, low, high = point.http_target()
                answer = server.get(template % ((low + high) // 2), {"apikey": shop.keys[apps[-1][0]],
                                                                    "Accept-Profile": "v1"})
                if len(answer) != (point.rows or 1):
                    sys.exit(f"{template}: {len(answer)} rows, not {point.rows or 1}")
                keep(point, "gatehouse", measure_gatehouse(server, point.connections, point.http_target(),
                                                           [*key_args, "Accept-Profile: v1"], args.warmup,
                                                           args.duration))
        finally:
            server.stop()
    return results


def connections_needed(args: argparse.Namespace) -> int:
    """The most connections one system opens at a point (gatehouse: every pool full, plus its own)."""
    most = max([n * args.app_pool_size for n in args.apps] if "apps" in args.sweeps else [0])
    return int(max(most, args.pool_size)) + OWN_CONNECTIONS


def main() -> None:
    def numbers(text: str) -> list[int]:
        return [int(n) for n in text.split(",") if n]

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per point (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every sweep; the plot takes the median")
    parser.add_argument("--sweeps", type=lambda s: s.split(","), default=["apps", "rows", "concurrency"])
    parser.add_argument("--apps", type=numbers, default=[1, 10, 100], help="apps sweep (default 1,10,100)")
    parser.add_argument("--rows", type=numbers, default=[1, 50, 1000], help="rows sweep (default 1,50,1000)")
    parser.add_argument("--connections", type=numbers, default=[1, 4, 16, 64, 256],
                        help="concurrency sweep (default 1,4,16,64,256)")
    parser.add_argument("--pool-size", type=int, default=4, help="the bench app's pool (rows, concurrency)")
    parser.add_argument("--app-pool-size", type=int, default=2, help="each app's pool in the apps sweep")
    parser.add_argument("--max-active", type=int, default=1024,
                        help="gatehouse's [server] max_active (default 1024: only the pools bound the requests at "
                             "work, as for direct; 0 keeps gatehouse's default, the largest pool_size plus "
                             "group_statements)")
    parser.add_argument("--pg", choices=["auto", "system", "private"], default="auto")
    parser.add_argument("--db", default="gatehouse_curves")
    parser.add_argument("--out", type=Path, default=RESULTS / "curves.json")
    parser.add_argument("--no-plot", action="store_true", help="only the JSON (no matplotlib needed)")
    args = parser.parse_args()
    require_tools(plot=not args.no_plot)
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.2f}" + ("  (busy: numbers will be low and noisy)" if load > 0.5 else ""))
    needed = connections_needed(args) + 10  # and psql, the key listener's reconnects, slack
    private = args.pg == "private" or (args.pg == "auto" and free_connections(SYSTEM_PG) < needed)
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="gatehouse-curves-") as folder, contextlib.ExitStack() as stack:
        server = stack.enter_context(private_postgres(SYSTEM_PG, max(100, needed + 20))) if private else SYSTEM_PG
        pg = {"where": "private" if private else "system", "url": server, "needed_connections": needed,
              "max_connections": int(psql(f"{server}/postgres", "SHOW max_connections")),
              "version": psql(f"{server}/postgres", "SHOW server_version")}
        print(f"PostgreSQL: {pg['where']} ({server}, max_connections {pg['max_connections']}, the run needs "
              f"~{needed})", flush=True)
        shop = Shop(Path(folder), server, args.db)
        results: list[dict[str, Any]] = []
        every = points(args)
        for round_ in range(1, args.rounds + 1):
            for sweep in dict.fromkeys(p.sweep for p in every):
                print(f"round {round_}/{args.rounds}, sweep {sweep}", flush=True)
                results += run_sweep(shop, Path(folder), [p for p in every if p.sweep == sweep], args, round_)
    meta = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "commit": git_describe(), "cpus": os.cpu_count(),
            "loadavg_start": round(load, 2), "loadavg_end": round(os.getloadavg()[0], 2), "postgres": pg,
            "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds, "pool_size": args.pool_size,
            "app_pool_size": args.app_pool_size, "max_active": args.max_active or "default", "wrk_threads": 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"written to {args.out}")
    if not args.no_plot:
        from curves_plot import plot_all

        for path in plot_all(args.out):
            print(f"drawn: {path}")


if __name__ == "__main__":
    main()
