"""CPU time spent so far by every PostgreSQL process on this machine, and by the threads of one process.

    .venv/bin/python bench/pgcpu.py        # prints PostgreSQL's seconds so far

A measurement's share is the difference between two readings, divided by its requests: bench/run takes one
before and one after each wrk run (``postgres_cpu_us`` in its results), bench/direct.py around its measured
phase, bench/cpu_split.py around each of its runs. PostgreSQL's share is every ``postgres`` process's user and
system time plus the time of the children it reaped (the postmaster's: backends of connections closed
meanwhile). Every cluster on the machine counts: measure with only the bench's PostgreSQL busy.

Why: on a shared VM whose other guests take CPU in spells, requests per second move by tens of per cent between
runs; the CPU a request costs moves much less, and says which side (the server, PostgreSQL) a difference is in.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def stat_ticks(stat: str, *, reaped: bool = False) -> int:
    """User + system clock ticks of one ``/proc/.../stat`` line; with ``reaped``, also its reaped children's."""
    fields = stat.rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15 if reaped else 13])


def postgres_seconds() -> float:
    """CPU of every PostgreSQL process so far, with the children the postmaster reaped (closed connections)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        if stat[stat.index("(") + 1:].startswith("postgres"):
            total += stat_ticks(stat, reaped=True)
    return total / TICK


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU of each thread of ``pid`` so far, keyed by name and thread id."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        threads[f"{stat[stat.index('(') + 1:stat.rindex(')')]}/{tid}"] = stat_ticks(stat) / TICK
    return threads


if __name__ == "__main__":
    print(f"{postgres_seconds():.2f}")
