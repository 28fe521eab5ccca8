"""Collect the measurements of one bench/run into markdown tables and a JSON file.

bench/run measures in rounds: each round measures every system with every query, one after the other,
and leaves its files in its own folder DIR/round1, DIR/round2, ... In each folder: a file per
measurement named SYSTEM-QUERY.json (one JSON object as printed by bench/direct.py or bench/wrk.lua);
for a system it could not measure (in that round), SYSTEM.skipped holding the reason; and for a query
one system does not run (Platformatic's and Directus's REST have no equivalent of the embedded read),
SYSTEM-QUERY.skipped holding why. A folder with those files and no round folders (what bench/run wrote before it
had rounds) is read as a single round.

For each system and query the reported measurement is the round with the median req/s (with an even
number of rounds, the lower of the two middle ones), its p50/p99 with it; runs with more than 1% errors
are left out of the median. The ratios in the summary are those of the median measurements; the
per-round ratios compare two systems measured in the same round, so a slow spell of the machine
(CPU steal on a shared VM) counts against both. Besides gatehouse ÷ each other system, gatehouse ÷ the
fastest peer: per query, the peer (an off-the-shelf layer over PostgreSQL, PEERS) with the most req/s
among those with a valid run of it (per round: in that round). This script prints the tables and writes
the JSON.

    python bench/report.py --results-dir DIR --out bench/results/latest.json --meta key=value ...
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEMS = ("gatehouse", "baseline", "direct", "platformatic", "postgraphile", "directus")
"""``baseline``: another build of gatehouse (``GATEHOUSE_BASELINE``), measured exactly like gatehouse, for A/B runs."""
PEERS = ("platformatic", "postgraphile", "directus")
"""The off-the-shelf layers over PostgreSQL that gatehouse is compared with (direct is the floor, not a peer)."""
QUERIES = {
    "point": "point lookup",
    "list": "list of 50",
    "embedded": "order with items",
    "insert": "insert one order",
}
# The ratios: name -> (numerator, denominator) systems, by req/s.
RATIOS = {
    "gatehouse_over_direct": ("gatehouse", "direct"),
    "gatehouse_over_platformatic": ("gatehouse", "platformatic"),
    "gatehouse_over_postgraphile": ("gatehouse", "postgraphile"),
    "gatehouse_over_directus": ("gatehouse", "directus"),
    "gatehouse_over_baseline": ("gatehouse", "baseline"),
}
FASTEST_PEER = "gatehouse_over_fastest_peer"
"""gatehouse ÷ whichever of PEERS had the most req/s for that query (the issue's target is >= 1.2)."""
RATIO_NAMES = (*RATIOS, FASTEST_PEER)

Measurement = dict[str, Any]
Results = dict[str, dict[str, Measurement | None]]
QueryRatios = dict[str, dict[str, float | None]]
RoundRatios = dict[str, dict[str, dict[str, Any]]]
NotRun = dict[str, dict[str, str]]


@dataclass
class Round:
    """The files of one round (or of a flat folder)."""

    number: int
    results: Results
    skipped: dict[str, str]
    not_run: NotRun


def reason(path: Path) -> str:
    return " ".join(path.read_text().split())


def load(results_dir: Path) -> tuple[Results, dict[str, str], NotRun]:
    """The measurements by query and system, why a system was skipped, and why a query was not run on one."""
    results: Results = {}
    not_run: NotRun = {}
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


def load_rounds(results_dir: Path) -> list[Round]:
    """The rounds in results_dir/roundN (by N), or results_dir itself as round 1 when it has none."""
    numbered = []
    for path in results_dir.iterdir():
        match = re.fullmatch(r"round(\d+)", path.name)
        if match and path.is_dir():
            numbered.append((int(match.group(1)), path))
    if not numbered:
        numbered = [(1, results_dir)]
    return [Round(number, *load(path)) for number, path in sorted(numbered)]


def failed(measurement: Measurement) -> bool:
    """A run in which errors were more than 1% of requests measured errors, not the system."""
    return int(measurement.get("errors", 0)) > 0.01 * max(1, int(measurement.get("requests", 0)))


def ratio(numerator: Measurement | None, denominator: Measurement | None) -> float | None:
    if not numerator or not denominator or not denominator.get("rps") or failed(numerator):
        return None
    if failed(denominator):
        return None
    return round(float(numerator["rps"]) / float(denominator["rps"]), 3)


def fastest_peer(by_system: dict[str, Measurement | None]) -> str | None:
    """The peer with the most req/s among those with a valid (not failed) measurement."""
    valid = [(float(m["rps"]), peer) for peer in PEERS if (m := by_system.get(peer)) and not failed(m)]
    return max(valid)[1] if valid else None


def fastest_peers(results: Results) -> dict[str, str | None]:
    return {query: fastest_peer(by_system) for query, by_system in results.items()}


def ratios(results: Results) -> QueryRatios:
    by_query: QueryRatios = {}
    for query, by_system in results.items():
        by_query[query] = {name: ratio(by_system[top], by_system[bottom]) for name, (top, bottom) in RATIOS.items()}
        peer = fastest_peer(by_system)
        by_query[query][FASTEST_PEER] = ratio(by_system["gatehouse"], by_system[peer]) if peer else None
    return by_query


def median_measurement(rounds: list[Round], query: str, system: str) -> Measurement | None:
    """The run with the median req/s over the rounds (valid runs only, unless none is), with every round's req/s.

    Added keys: "round" (the run reported), "rps_rounds" (req/s by round, null where not measured),
    "valid_rounds" (how many runs the median is over) and "invalid_rounds" (rounds left out for errors).
    """
    runs = [(r.number, m) for r in rounds if (m := r.results[query][system]) is not None]
    if not runs:
        return None
    valid = [(number, m) for number, m in runs if not failed(m)]
    # No valid run at all: report the median of the invalid ones, marked INVALID in the table.
    candidates = sorted(valid or runs, key=lambda run: float(run[1]["rps"]))
    number, chosen = candidates[(len(candidates) - 1) // 2]
    by_round = {r.number: r.results[query][system] for r in rounds}
    return {
        **chosen,
        "round": number,
        "rps_rounds": [None if m is None else m["rps"] for m in by_round.values()],
        "valid_rounds": len(valid),
        "invalid_rounds": [n for n, m in runs if failed(m)],
    }


def spread(values: list[float | None]) -> dict[str, Any]:
    """The per-round values of a ratio with their median, min and max (over the rounds that have one)."""
    known = [v for v in values if v is not None]
    return {
        "rounds": values,
        "median": round(statistics.median(known), 3) if known else None,
        "min": min(known) if known else None,
        "max": max(known) if known else None,
    }


def round_ratios(rounds: list[Round]) -> RoundRatios:
    """Per query and ratio: the ratio within each round (both systems measured in that round).

    The fastest-peer ratio also has "peers": which peer was the fastest in each round.
    """
    within = [ratios(r.results) for r in rounds]
    by_query: RoundRatios = {
        query: {name: spread([by_round[query][name] for by_round in within]) for name in RATIO_NAMES}
        for query in QUERIES
    }
    for query in QUERIES:
        by_query[query][FASTEST_PEER]["peers"] = [fastest_peer(r.results[query]) for r in rounds]
    return by_query


def combine(rounds: list[Round]) -> tuple[Results, dict[str, str], dict[str, dict[str, Any]], NotRun]:
    """Median measurements; systems skipped in every round; systems skipped in some rounds; queries not run."""
    results: Results = {
        query: {system: median_measurement(rounds, query, system) for system in SYSTEMS} for query in QUERIES
    }
    skipped: dict[str, str] = {}
    partly_skipped: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        reasons = {r.number: r.skipped[system] for r in rounds if system in r.skipped}
        if not reasons:
            continue
        why = "; ".join(dict.fromkeys(reasons.values()))
        if len(reasons) == len(rounds):
            skipped[system] = why
        else:
            partly_skipped[system] = {"rounds": sorted(reasons), "reason": why}
    not_run: NotRun = {}
    for r in rounds:
        for query, by_system in r.not_run.items():
            not_run.setdefault(query, {}).update(by_system)
    return results, skipped, partly_skipped, not_run


def cell(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def in_rounds(values: list[int]) -> str:
    """'round 2' or 'rounds 2, 3'."""
    return ("round " if len(values) == 1 else "rounds ") + ", ".join(str(v) for v in values)


def per_round_rps(rounds: list[Round], query: str, system: str) -> str:
    parts = []
    for r in rounds:
        m = r.results[query][system]
        if m is None:
            parts.append("n/a")
        else:
            parts.append(cell(m["rps"], 0) + (" (INVALID)" if failed(m) else ""))
    return " / ".join(parts)


def ratio_cell(values: dict[str, Any]) -> str:
    if values["median"] is None:
        return "n/a"
    each = " / ".join("n/a" if v is None else f"{v:.2f}" for v in values["rounds"])
    return f"{each} (median {values['median']:.2f}, {values['min']:.2f}-{values['max']:.2f})"


CPU_KEYS = {  # each CPU table: a result's key ("server": a server's process, or direct's own), and its title
    "server": "Server CPU per request, µs (the server's process, all its threads; direct: its one process, which is "
              "also its load generator; median of the rounds, then each round):",
    "postgres_cpu_us": "PostgreSQL's CPU per request, µs (every postgres process while the load ran; median of the "
                       "rounds, then each round):",
}


def cpu_value(measurement: Measurement | None, key: str) -> float | None:
    """A measurement's CPU per request by ``key``; ``"server"`` is a server's process, or direct's own."""
    found = measurement or {}
    value = found.get("server_cpu_us", found.get("process_cpu_us")) if key == "server" else found.get(key)
    return float(value) if value else None


def cpu_table(rounds: list[Round], systems: list[str], key: str) -> list[str]:
    """CPU time per request by round (``key``: see :data:`CPU_KEYS`): steadier than req/s on a VM whose other
    guests take CPU, since it does not count the time a system waited."""
    measured = [
        system
        for system in systems
        if any(cpu_value(r.results[q][system], key) for r in rounds for q in QUERIES)
    ]
    if not measured:
        return []
    lines = [
        "",
        CPU_KEYS[key],
        "",
        "| query | " + " | ".join(measured) + " |",
        "| --- |" + " ---: |" * len(measured),
    ]
    for query, label in QUERIES.items():
        cells = []
        for system in measured:
            each = [cpu_value(r.results[query][system], key) for r in rounds]
            known = sorted(v for v in each if v)
            median = f"{statistics.median_low(known):.0f}" if known else "n/a"
            cells.append(f"{median} ({' / '.join('n/a' if not v else f'{v:.0f}' for v in each)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def ratio_title(name: str) -> str:
    return "gatehouse ÷ fastest peer" if name == FASTEST_PEER else " ÷ ".join(RATIOS[name])


def markdown(
    results: Results,
    skipped: dict[str, str],
    not_run: NotRun,
    query_ratios: QueryRatios,
    rounds: list[Round] | None = None,
    by_round: RoundRatios | None = None,
    partly_skipped: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The tables; with more than one round, also each round's req/s and the per-round ratios."""
    rounds = rounds or []
    several = len(rounds) > 1
    lines = []
    if several:
        lines += [
            f"{len(rounds)} rounds, each system measured once per round; req/s, p50 and p99 of the round with "
            "the median req/s (of two middle ones, the lower); ratios from those.",
            "",
            "| query | system | req/s | p50 (ms) | p99 (ms) | errors | req/s by round |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
    else:
        lines += [
            "| query | system | req/s | p50 (ms) | p99 (ms) | errors |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
    invalid_notes = []
    listed = [
        system
        for system in SYSTEMS
        if system != "baseline" or any(results[query]["baseline"] is not None for query in QUERIES)
    ]
    for query, label in QUERIES.items():
        for system in listed:
            m = results[query][system]
            extra = f" {per_round_rps(rounds, query, system)} |" if several else ""
            if m is None:
                run_here = system in skipped or system not in not_run.get(query, {})
                status = "not measured" if run_here else "not run for this query"
                if several and not run_here:
                    extra = " n/a |"
                lines.append(f"| {label} | {system} | n/a | n/a | n/a | {status} |{extra}")
                continue
            errors = str(m.get("errors", 0)) + (" (INVALID RUN)" if failed(m) else "")
            lines.append(
                f"| {label} | {system} | {cell(m['rps'], 0)} | {cell(m['p50_ms'], 2)} "
                f"| {cell(m['p99_ms'], 2)} | {errors} |{extra}"
            )
            invalid = m.get("invalid_rounds") or []
            if several and invalid:
                kept = "left out of the median" if not failed(m) else "no valid run: the median of the invalid ones"
                invalid_notes.append(
                    f"{system}, {label}: {in_rounds(invalid)} had more than 1% errors (INVALID), {kept}."
                )
    shown = [
        name
        for name in RATIO_NAMES
        if any(query_ratios[q][name] is not None for q in QUERIES) or name != "gatehouse_over_baseline"
    ]
    titles = [ratio_title(name) for name in shown]
    peers = fastest_peers(results)

    def median_cell(query: str, name: str) -> str:
        value = cell(query_ratios[query][name], 2)
        return f"{value} ({peers[query]})" if name == FASTEST_PEER and query_ratios[query][name] is not None else value

    lines += ["", "| query | " + " | ".join(f"{t} (req/s)" for t in titles) + " |", "| --- |" + " ---: |" * len(shown)]
    for query, label in QUERIES.items():
        lines.append(f"| {label} | " + " | ".join(median_cell(query, n) for n in shown) + " |")
    if several and by_round is not None:
        lines += [
            "",
            "Per-round ratios (both systems measured in the same round; round 1 / round 2 / ...):",
            "",
            "| query | " + " | ".join(f"{t} per round" for t in titles) + " |",
            "| --- |" + " ---: |" * len(shown),
        ]
        for query, label in QUERIES.items():
            lines.append(f"| {label} | " + " | ".join(ratio_cell(by_round[query][n]) for n in shown) + " |")
    for key in CPU_KEYS:
        lines += cpu_table(rounds or [], listed, key)
    notes = [
        f"{system}, {QUERIES[query]}: not run — {why}"
        for query, by_system in not_run.items()
        for system, why in by_system.items()
        if system not in skipped
    ]
    notes += invalid_notes
    if notes:
        lines.append("")
        lines += notes
    partial = [
        f"**{system}: not measured in {in_rounds(info['rounds'])}** — {info['reason']}"
        for system, info in (partly_skipped or {}).items()
    ]
    if skipped or partial:
        lines.append("")
        lines += [
            f"**{system}: NOT MEASURED** — {why}"
            for system, why in skipped.items()
            if system != "baseline" or "not selected" not in why
        ]
        lines += partial
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    rounds = load_rounds(args.results_dir)
    results, skipped, partly_skipped, not_run = combine(rounds)
    query_ratios = ratios(results)
    by_round = round_ratios(rounds)
    document = {
        "meta": parse_meta(args.meta),
        "queries": QUERIES,
        # Per system and query: the median run, with "round", "rps_rounds", "valid_rounds", "invalid_rounds".
        "results": results,
        # From the median runs; "gatehouse_over_fastest_peer" is over the peer named in "fastest_peer".
        "ratios": query_ratios,
        "fastest_peer": fastest_peers(results),
        # Within each round: {"rounds": [...], "median", "min", "max"}.
        "ratios_by_round": by_round,
        "skipped": skipped,
        "partly_skipped": partly_skipped,
        "not_run": not_run,
        "rounds": [
            {
                "round": r.number,
                "results": r.results,
                "ratios": ratios(r.results),
                "fastest_peer": fastest_peers(r.results),
                "skipped": r.skipped,
            }
            for r in rounds
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print(markdown(results, skipped, not_run, query_ratios, rounds, by_round, partly_skipped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
