"""Memory soak (issue 21): does ``gatehouse serve``'s memory stay flat under the bench's load for ten minutes?

    .venv/bin/python bench/soak.py [--minutes 10] [--warmup-minutes 1] [--interval 5] [--connections 16]

One ``gatehouse serve`` of the shop demo (a fresh database ``gatehouse_soak`` on 127.0.0.1:5432, the app
``bench`` with a pool of 4 and bench/run's grants, the products cache off) under bench/run's four operations
at once: four wrk processes (bench/wrk.lua), one per operation (point lookup, list of 50, order with items,
insert one order), with a quarter of the connections each (16 in all by default), closed loop. A warm-up
(default 1 minute) comes first, then the measured minutes; the server's resident memory is sampled all along
every few seconds: VmRSS from /proc/<pid>/status (the whole process, every thread), plus that of its child
processes if it has any, and the requests answered so far from its ``/metrics``.

The report: RSS at the start of the measured part (the first sample after the warm-up), at its end, its
maximum, the growth (end and maximum against the start, in %), the least-squares slope, and req/s by
operation (wrk's). The target is every measured sample within 5 % of the start. JSON goes to
bench/results/soak.json, the plot (RSS and req/s over time) to bench/results/soak.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from curves import RESULTS, SYSTEM_PG, WRK_LUA, Server, Shop, git_describe
from curves_plot import require_tools

LIMIT_PCT = 5.0
READ = ["Accept-Profile: v1"]
OPERATIONS = {  # name → (path template, low, high, wrk arguments besides the key): bench/run's four
    "point": ("/products?id=eq.%d", 1, 5000, READ),
    "list": ("/products?price=gte.%d&order=id&limit=50", 10, 150, READ),
    "embedded": ("/orders?select=id,status,order_items(product_id,quantity,unit_price)&id=eq.%d", 1, 3000, READ),
    "insert": ("/orders", 1, 1000, ["Content-Profile: v1", "Content-Type: application/json", "method=POST",
                                    'body={"user_id": %d, "status": "placed"}']),
}


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/<pid>/task/*/children)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue += [int(child) for child in children.read_text().split()]
            except OSError:
                continue
    return found


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (0 when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(found[1]) if found else 0


def requests_answered(server: Server) -> int:
    """Every request answered so far (``gatehouse_requests_total`` summed over its labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("gatehouse_requests_total{"))


def start_load(server: Server, key: str, connections: int, seconds: float, work: Path) -> dict[
        str, tuple[subprocess.Popen[str], Path]]:
    """One wrk per operation, the connections shared out among them (each at least 1); their output goes to a
    file each (a pipe could fill up over ten minutes)."""
    running = {}
    for i, (name, (template, low, high, extra)) in enumerate(OPERATIONS.items()):
        share = max(1, connections // len(OPERATIONS) + (1 if i < connections % len(OPERATIONS) else 0))
        out = work / f"wrk-{name}-{int(time.time())}.out"
        command = ["wrk", "-t1", f"-c{share}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", WRK_LUA,
                   server.url, "--", template, str(low), str(high), f"apikey: {key}", *extra]
        with out.open("w") as sink:  # (the child keeps its own copy)
            running[name] = (subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, text=True), out)
    return running


def finish_load(running: dict[str, tuple[subprocess.Popen[str], Path]]) -> dict[str, dict[str, Any]]:
    results = {}
    for name, (process, out) in running.items():
        process.wait()
        found = re.search(r"^BENCH_RESULT (\{.*\})$", out.read_text(), re.M)
        if process.returncode or not found:
            sys.exit(f"wrk for {name} failed: {out.read_text()[-500:]}")
        results[name] = json.loads(found[1])
    return results


def sample(server: Server, started: float, phase: str) -> dict[str, Any]:
    pids = tree(server.process.pid)
    own = status_kib(pids[0], "VmRSS")
    children = sum(status_kib(pid, "VmRSS") for pid in pids[1:])
    threads = len(list(Path(f"/proc/{pids[0]}/task").iterdir()))
    return {"t_s": round(time.monotonic() - started, 1), "phase": phase, "rss_kib": own + children,
            "server_rss_kib": own, "children_rss_kib": children, "children": len(pids) - 1,
            "rss_anon_kib": status_kib(pids[0], "RssAnon"), "threads": threads,
            "requests": requests_answered(server)}


def run_phase(server: Server, key: str, args: argparse.Namespace, seconds: float, phase: str, started: float,
              samples: list[dict[str, Any]], work: Path) -> dict[str, dict[str, Any]]:
    """Load for ``seconds``, sampling every ``args.interval`` s (and once more at the end)."""
    running = start_load(server, key, args.connections, seconds, work)
    next_at = time.monotonic()
    while any(process.poll() is None for process, _ in running.values()):
        if time.monotonic() >= next_at:
            samples.append(sample(server, started, phase))
            next_at += args.interval
            minute = int(samples[-1]["t_s"] // 60)
            if phase == "measured" and len(samples) > 1 and minute != int(samples[-2]["t_s"] // 60):
                print(f"  {samples[-1]['t_s'] / 60:5.1f} min: RSS {samples[-1]['rss_kib'] / 1024:.1f} MiB",
                      flush=True)
        time.sleep(min(0.5, max(0.0, next_at - time.monotonic())))
    samples.append(sample(server, started, phase))
    return finish_load(running)


def summarize(samples: list[dict[str, Any]], load: dict[str, dict[str, Any]]) -> dict[str, Any]:
    measured = [s for s in samples if s["phase"] == "measured"]
    start, end = measured[0]["rss_kib"], measured[-1]["rss_kib"]
    most, least = max(s["rss_kib"] for s in measured), min(s["rss_kib"] for s in measured)
    ts, ys = [s["t_s"] for s in measured], [s["rss_kib"] for s in measured]
    mean_t, mean_y = sum(ts) / len(ts), sum(ys) / len(ys)
    spread = sum((t - mean_t) ** 2 for t in ts)
    slope = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True)) / spread if spread else 0.0
    requests = sum(r["requests"] for r in load.values())
    return {
        "rss_start_mib": round(start / 1024, 1), "rss_end_mib": round(end / 1024, 1),
        "rss_max_mib": round(most / 1024, 1), "rss_min_mib": round(least / 1024, 1),
        "growth_pct": round((end - start) / start * 100, 2), "max_growth_pct": round((most - start) / start * 100, 2),
        "slope_mib_per_hour": round(slope * 3600 / 1024, 2),
        "flat": all(abs(y - start) <= start * LIMIT_PCT / 100 for y in ys), "limit_pct": LIMIT_PCT,
        "rps": round(sum(r["rps"] for r in load.values()), 1),
        "rps_by_operation": {name: r["rps"] for name, r in load.items()},
        "p99_ms_by_operation": {name: r["p99_ms"] for name, r in load.items()},
        "errors": sum(r["errors"] for r in load.values()), "requests": requests,
        "children_max": max(s["children"] for s in samples),
    }


def plot(data: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    samples, summary, meta = data["samples"], data["summary"], data["meta"]
    minutes = [s["t_s"] / 60 for s in samples]
    figure, (rss_ax, rps_ax) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, layout="constrained",
                                            height_ratios=[3, 1.4])
    rss_ax.plot(minutes, [s["rss_kib"] / 1024 for s in samples], color="tab:blue", marker=".",
                label="gatehouse serve: VmRSS (all threads, and children if any)")
    start = summary["rss_start_mib"]
    rss_ax.axhspan(start * 0.95, start * 1.05, color="tab:green", alpha=0.12, label="start of the measured part ± 5 %")
    warm_end = next((m for m, s in zip(minutes, samples, strict=True) if s["phase"] == "measured"), 0.0)
    for ax in (rss_ax, rps_ax):
        ax.axvspan(0, warm_end, color="gray", alpha=0.12, label="warm-up (not counted)" if ax is rss_ax else None)
        ax.grid(True, alpha=0.3)
    rss_ax.set_ylabel("resident memory (MiB)")
    rss_ax.set_ylim(bottom=0)
    rss_ax.legend(fontsize=8, loc="lower right")
    rates = [(b["t_s"] / 60, (b["requests"] - a["requests"]) / (b["t_s"] - a["t_s"]))
             for a, b in itertools.pairwise(samples) if b["t_s"] - a["t_s"] >= meta["interval_s"] / 2]
    rps_ax.plot([m for m, _ in rates], [r for _, r in rates], color="tab:gray",
                label="requests answered per second (/metrics)")
    rps_ax.set_ylabel("req/s")
    rps_ax.set_xlabel("minutes since the load started")
    rps_ax.set_ylim(bottom=0)
    rps_ax.legend(fontsize=8, loc="lower right")
    verdict = "flat" if summary["flat"] else "NOT flat"
    figure.suptitle(
        f"gatehouse serve memory under the bench's mixed load: {meta['date']}, commit {meta['commit']}\n"
        f"{meta['minutes']:g} min measured after {meta['warmup_minutes']:g} min warm-up, {meta['connections']} "
        f"connections (point, list, embedded, insert), load average {meta['loadavg_start']} at start\n"
        f"RSS {summary['rss_start_mib']} → {summary['rss_end_mib']} MiB ({summary['growth_pct']:+.1f} %, max "
        f"{summary['max_growth_pct']:+.1f} %): {verdict} within {LIMIT_PCT:g} %; {summary['rps']:,.0f} req/s",
        fontsize=10)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="measured minutes (default 10)")
    parser.add_argument("--warmup-minutes", type=float, default=1.0, help="load before measuring (default 1)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections in all (default 16)")
    parser.add_argument("--pool-size", type=int, default=4, help="the bench app's pool (default 4)")
    parser.add_argument("--db", default="gatehouse_soak")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    parser.add_argument("--no-plot", action="store_true", help="only the JSON (no matplotlib needed)")
    args = parser.parse_args()
    require_tools(plot=not args.no_plot)
    load_avg = os.getloadavg()[0]
    print(f"load average at start: {load_avg:.2f}; {args.warmup_minutes:g} min warm-up, {args.minutes:g} min "
          f"measured, {args.connections} connections", flush=True)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gatehouse-soak-") as folder:
        work = Path(folder)
        shop = Shop(work, SYSTEM_PG, args.db)
        shop.configure({"bench": args.pool_size})
        key = shop.keys["bench"]
        server = Server(shop, work / "serve.log")
        try:
            for name, (template, low, _, _) in OPERATIONS.items():  # each answers before the load starts
                if name != "insert":
                    server.get(template.replace("%d", str(low)), {"apikey": key, "Accept-Profile": "v1"})
            insert = urllib.request.Request(server.url + "/orders", data=b'{"user_id": 1, "status": "placed"}',
                                            headers={"apikey": key, "Content-Profile": "v1",
                                                     "Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(insert, timeout=10) as answer:
                if answer.status != 201:
                    sys.exit(f"POST /orders answered {answer.status}, not 201")
            started = time.monotonic()
            if args.warmup_minutes > 0:
                run_phase(server, key, args, args.warmup_minutes * 60, "warm-up", started, samples, work)
            print(f"warm-up done: RSS {samples[-1]['rss_kib'] / 1024:.1f} MiB" if samples else "no warm-up",
                  flush=True)
            load = run_phase(server, key, args, args.minutes * 60, "measured", started, samples, work)
        finally:
            server.stop()
    summary = summarize(samples, load)
    meta = {"date": date, "commit": git_describe(), "cpus": os.cpu_count(), "loadavg_start": round(load_avg, 2),
            "loadavg_end": round(os.getloadavg()[0], 2), "minutes": args.minutes,
            "warmup_minutes": args.warmup_minutes, "interval_s": args.interval, "connections": args.connections,
            "pool_size": args.pool_size}
    data = {"meta": meta, "summary": summary, "load": load, "samples": samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"written to {args.out}")
    if not args.no_plot:
        png = args.out.with_suffix(".png")
        plot(data, png)
        print(f"drawn: {png}")


if __name__ == "__main__":
    main()
