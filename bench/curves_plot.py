"""Draw bench/curves.py's results: one PNG per sweep (throughput, p99, gatehouse's CPU per request).

    .venv/bin/python bench/curves_plot.py [bench/results/curves.json]

matplotlib is not a dependency of gatehouse; it is in the ``bench`` extra: ``.venv/bin/pip install -e '.[bench]'``
(or ``pip install matplotlib``). With several rounds, each point is the run with the median req/s (of the valid
runs; the lower middle one for an even count), as in bench/report.py.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

INSTALL_HINT = ("matplotlib is needed to draw the PNGs and is not installed: .venv/bin/pip install -e '.[bench]' "
                "(or .venv/bin/pip install matplotlib); or pass --no-plot for the JSON only")
SYSTEMS = {"gatehouse": ("gatehouse (HTTP, wrk)", "tab:blue", "o"), "direct": ("direct (asyncpg, no HTTP)",
                                                                                "tab:gray", "s")}
SWEEPS = {
    "apps": ("number of apps", "apps (each with its own API key and pool of {app_pool_size}); point lookup, "
             "16 connections"),
    "rows": ("response size", "rows per answer (products in id order, limit=N); 16 connections"),
    "concurrency": ("concurrency", "concurrent connections (wrk) = concurrent tasks (direct); point lookup"),
}


def require_matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit(INSTALL_HINT)
    matplotlib.use("Agg")


def require_tools(plot: bool) -> None:
    """Exit with what to install when wrk (or, to draw, matplotlib) is missing: curves.py and soak.py need both."""
    if plot:
        require_matplotlib()
    if shutil.which("wrk") is None:
        sys.exit("wrk is required (apt-get install wrk)")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    valid = [r for r in runs if r.get("valid", True)] or runs
    ordered = sorted(valid, key=lambda r: float(r["rps"]))
    return ordered[(len(ordered) - 1) // 2]


def series(results: list[dict[str, Any]], sweep: str, system: str) -> list[dict[str, Any]]:
    """The median run at each x of one sweep and system, by x."""
    by_x: dict[int, list[dict[str, Any]]] = {}
    for result in results:
        if result["sweep"] == sweep and result["system"] == system:
            by_x.setdefault(int(result["x"]), []).append(result)
    return [median_run(by_x[x]) for x in sorted(by_x)]


def plot_sweep(data: dict[str, Any], sweep: str, out: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    meta, results = data["meta"], data["results"]
    name, xlabel = SWEEPS[sweep]
    xlabel = xlabel.format(**meta)
    figure, (rps_ax, p99_ax, cpu_ax) = plt.subplots(1, 3, figsize=(16, 5.2), layout="constrained")
    lines = {system: series(results, sweep, system) for system in SYSTEMS}
    for system, (label, colour, marker) in SYSTEMS.items():
        runs = lines[system]
        if not runs:
            continue
        xs = [r["x"] for r in runs]
        rps_ax.plot(xs, [r["rps"] for r in runs], marker=marker, color=colour, label=label)
        p99_ax.plot(xs, [r["p99_ms"] for r in runs], marker=marker, color=colour, label=label)
        p99_ax.plot(xs, [r["p50_ms"] for r in runs], marker=marker, color=colour, linestyle=":", alpha=0.6,
                    label=f"{system} p50")
        for r in runs:
            if not r.get("valid", True):
                rps_ax.annotate("INVALID", (r["x"], r["rps"]), color="red", fontsize=8)
    direct = {r["x"]: r["rps"] for r in lines["direct"]}
    for r in lines["gatehouse"]:  # gatehouse ÷ direct at each point, above gatehouse's marker
        if direct.get(r["x"]):
            ratio = f"{r['rps'] / direct[r['x']]:.2f}×"  # noqa: RUF001 (the multiplication sign)
            rps_ax.annotate(ratio, (r["x"], r["rps"]), textcoords="offset points", xytext=(0, -14), ha="center",
                            fontsize=8, color="tab:blue")
    cpu = [r for r in lines["gatehouse"] if "server_cpu_us" in r]
    cpu_ax.plot([r["x"] for r in cpu], [r["server_cpu_us"] for r in cpu], marker="o", color="tab:blue",
                label="gatehouse serve: user + system CPU, all threads")
    xs_all = sorted({int(r["x"]) for r in results if r["sweep"] == sweep})
    for ax, ylabel, title in ((rps_ax, "requests per second", "throughput (higher is better)"),
                              (p99_ax, "latency (ms)", "p99 (solid) and p50 (dotted), lower is better"),
                              (cpu_ax, "µs of CPU per request", "gatehouse's CPU per request")):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xs_all))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.set_xlabel(xlabel if ax is p99_ax else xlabel.split(";")[0])
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if ax is p99_ax and sweep == "concurrency":  # from ~1 ms to seconds
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    pg = meta.get("postgres", {})
    figure.suptitle(
        f"gatehouse vs direct by {name}: {meta['date']}, commit {meta['commit']}\n"
        f"{meta['duration_s']:g} s per point after {meta['warmup_s']:g} s warm-up, {meta['rounds']} round(s), "
        f"wrk -t1; pools: bench app {meta['pool_size']}, apps sweep {meta['app_pool_size']} each; "
        f"PostgreSQL {pg.get('version', '?')} ({pg.get('where', '?')}), {meta['cpus']} CPUs, "
        f"load average {meta['loadavg_start']} at start", fontsize=10)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_all(source: Path) -> list[Path]:
    """One PNG per sweep in ``source``, next to it: curves-<sweep>.png."""
    import json

    require_matplotlib()
    data = json.loads(source.read_text())
    drawn = []
    for sweep in dict.fromkeys(r["sweep"] for r in data["results"]):
        out = source.parent / f"curves-{sweep}.png"
        plot_sweep(data, sweep, out)
        drawn.append(out)
    return drawn


if __name__ == "__main__":
    default = Path(__file__).resolve().parent / "results" / "curves.json"
    for drawn_png in plot_all(Path(sys.argv[1]) if len(sys.argv) > 1 else default):
        print(f"drawn: {drawn_png}")
