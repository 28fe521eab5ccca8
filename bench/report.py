"""Collect the measurements of one bench/run into a markdown table and a JSON file.

bench/run leaves, in one folder, a file per measurement named SYSTEM-QUERY.json (one JSON object
as printed by bench/direct.py or bench/wrk.lua); for a system it could not measure, SYSTEM.skipped
holding the reason; and for a query one system does not run (Platformatic has no equivalent of the
embedded read), SYSTEM-QUERY.skipped holding why. This script prints the tables and writes the JSON.

    python bench/report.py --results-dir DIR --out bench/results/latest.json --meta key=value ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SYSTEMS = ("gatehouse", "direct", "platformatic")
QUERIES = {
    "point": "point lookup",
    "list": "list of 50",
    "embedded": "order with items",
    "insert": "insert one order",
}

Measurement = dict[str, Any]


Results = dict[str, dict[str, Measurement | None]]


def reason(path: Path) -> str:
    return " ".join(path.read_text().split())


def load(results_dir: Path) -> tuple[Results, dict[str, str], dict[str, dict[str, str]]]:
    """The measurements by query and system, why a system was skipped, and why a query was not run on one."""
    results: Results = {}
    not_run: dict[str, dict[str, str]] = {}
    for query in QUERIES:
        results[query] = {}
        for system in SYSTEMS:
            path = results_dir / f"{system}-{query}.json"
            results[query][system] = json.loads(path.read_text()) if path.is_file() else None
            why = results_dir / f"{system}-{query}.skipped"
            if why.is_file():
                not_run.setdefault(query, {})[system] = reason(why)
    skipped = {
        system: reason(results_dir / f"{system}.skipped")
        for system in SYSTEMS
        if (results_dir / f"{system}.skipped").is_file()
    }
    return results, skipped, not_run


def ratio(numerator: Measurement | None, denominator: Measurement | None) -> float | None:
    if not numerator or not denominator or not denominator.get("rps") or failed(numerator):
        return None
    if failed(denominator):
        return None
    return round(float(numerator["rps"]) / float(denominator["rps"]), 3)


def failed(measurement: Measurement) -> bool:
    """A run in which errors were more than 1% of requests measured errors, not the system."""
    return int(measurement.get("errors", 0)) > 0.01 * max(1, int(measurement.get("requests", 0)))


def ratios(results: Results) -> dict[str, dict[str, float | None]]:
    return {
        query: {
            "gatehouse_over_direct": ratio(by_system["gatehouse"], by_system["direct"]),
            "gatehouse_over_platformatic": ratio(by_system["gatehouse"], by_system["platformatic"]),
        }
        for query, by_system in results.items()
    }


def cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown(
    results: Results,
    skipped: dict[str, str],
    not_run: dict[str, dict[str, str]],
    query_ratios: dict[str, dict[str, float | None]],
) -> str:
    lines = [
        "| query | system | req/s | p50 (ms) | p99 (ms) | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for query, label in QUERIES.items():
        for system in SYSTEMS:
            m = results[query][system]
            if m is None:
                run_here = system in skipped or system not in not_run.get(query, {})
                status = "not measured" if run_here else "not run for this query"
                lines.append(f"| {label} | {system} | n/a | n/a | n/a | {status} |")
                continue
            errors = str(m.get("errors", 0)) + (" (INVALID RUN)" if failed(m) else "")
            lines.append(
                f"| {label} | {system} | {cell(m['rps'], 0)} | {cell(m['p50_ms'], 2)} "
                f"| {cell(m['p99_ms'], 2)} | {errors} |"
            )
    lines += [
        "",
        "| query | gatehouse ÷ direct (req/s) | gatehouse ÷ platformatic (req/s) |",
        "| --- | ---: | ---: |",
    ]
    for query, label in QUERIES.items():
        over_direct = cell(query_ratios[query]["gatehouse_over_direct"], 2)
        over_platformatic = cell(query_ratios[query]["gatehouse_over_platformatic"], 2)
        lines.append(f"| {label} | {over_direct} | {over_platformatic} |")
    notes = [
        f"{system}, {QUERIES[query]}: not run — {why}"
        for query, by_system in not_run.items()
        for system, why in by_system.items()
        if system not in skipped
    ]
    if notes:
        lines.append("")
        lines += notes
    if skipped:
        lines.append("")
        lines += [f"**{system}: NOT MEASURED** — {why}" for system, why in skipped.items()]
    return "\n".join(lines)


def parse_meta(items: list[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--meta wants key=value, got {item!r}")
        meta[key] = value
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    results, skipped, not_run = load(args.results_dir)
    query_ratios = ratios(results)
    document = {
        "meta": parse_meta(args.meta),
        "queries": QUERIES,
        "results": results,
        "ratios": query_ratios,
        "skipped": skipped,
        "not_run": not_run,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print(markdown(results, skipped, not_run, query_ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
