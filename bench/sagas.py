"""Sagas per second on one instance, and what a step record costs: statements and commits per local step.

    .venv/bin/python bench/sagas.py [--seconds 10] [--starters 8] [--batch 16] [--backlog 64]

A project of two fresh databases ``gh_bench_sagas_a`` and ``gh_bench_sagas_b`` on the PostgreSQL at
127.0.0.1:5432 (``BENCH_PG_URL`` names another) is migrated and applied; its saga ``trio`` has three trivial
local steps, each one statement as the app ``bench``: insert a row in ``a``, insert a row in ``b``, update the
first row in ``a`` (compensations declared, never run). In this one process, a :class:`~gatehouse.runtime.Runtime`
(what ``serve`` opens) and one :class:`~gatehouse.sagas.engine.SagaEngine` running its background loop (what
``serve`` runs) take the sagas that ``--starters`` tasks start through ``engine.start`` (as ``POST /sagas/trio``
would, less HTTP), keeping at most ``--backlog`` unfinished; after ``--seconds`` the starters stop and the backlog
is drained. Measured, after a warm-up of 50 sagas:

* sagas per second: sagas completed / time from the first start to the last one completed;
* every statement the saga path sends (each one round trip), counted by wrapping asyncpg's ``Connection.execute``
  and ``Connection._execute`` in this process, only in the starters' and the engine's tasks (a contextvar), so the
  runtime's background work (key refresh, cache polls, audit) is not counted; and every commit (an explicit
  COMMIT, or a writing statement outside a transaction, which PostgreSQL commits by itself; a lone SELECT
  commits nothing);
* the breakdown per saga, by statement, sorted: the step's own (the one statement on ``items``/``marks``), the
  step record (``saga_steps`` insert, with the audit row in the same statement), the step's transaction, and the
  saga's bookkeeping (``gatehouse.sagas``, reading the records back).

Targets: issue 18: one round trip per local step beyond the step's own; next-wave.md §5.5: ≤ 5 commits per 3-step
local saga, ≥ 200 sagas/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
from asyncpg.connection import Connection

SERVER = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFIX = "gh_bench_sagas"
WARM_UP = 50
TOML = """
[project]
name = "benchsagas"

[databases.a]

[databases.b]

[apps.bench]
grants = [
  { contract = "items", actions = ["read", "insert", "update"] },
  { contract = "marks", actions = ["read", "insert"] },
]
"""
FILES = {
    "migrations/a/V001__items.sql": "CREATE TABLE items (id bigserial PRIMARY KEY, saga text NOT NULL, qty int);",
    "migrations/b/V001__marks.sql": "CREATE TABLE marks (id bigserial PRIMARY KEY, saga text NOT NULL);",
    "contracts/a/items.v1.sql": "SELECT id, saga, qty FROM items",
    "contracts/b/marks.v1.sql": "SELECT id, saga FROM marks",
    "logic/trio.py": '''
import gatehouse
from gatehouse import Saga
from gatehouse.logic.context import Context


@gatehouse.step(database="a")
async def reserve(ctx: Context, saga: str) -> int:
    [row] = await ctx.insert("items", {"saga": saga, "qty": 1}, select="id")
    return int(row["id"])


@gatehouse.step(database="a")
async def release(ctx: Context, item: int) -> None:
    await ctx.update("items", {"qty": 0}, id=item)


@gatehouse.step(database="b")
async def mark(ctx: Context, saga: str) -> int:
    [row] = await ctx.insert("marks", {"saga": saga}, select="id")
    return int(row["id"])


@gatehouse.step(database="a")
async def confirm(ctx: Context, item: int) -> None:
    await ctx.update("items", {"qty": 2}, id=item)


@gatehouse.saga
async def trio(s: Saga, n: int) -> int:
    item = await s.step(reserve, s.id).compensate_with(release)
    await s.step(mark, s.id)
    await s.step(confirm, item)
    return item
''',
}

COUNTING: contextvars.ContextVar[bool] = contextvars.ContextVar("bench_counting", default=False)
statements: Counter[str] = Counter()
commits = 0


def _normal(query: str) -> str:
    text = re.sub(r"\s+", " ", query).strip()
    text = re.sub(r"(SAVEPOINT|RELEASE SAVEPOINT|ROLLBACK TO SAVEPOINT) \S+", r"\1 _", text)
    return text[:90]


def _count(conn: Connection, query: str) -> None:
    global commits
    if not COUNTING.get():
        return
    statements[_normal(query)] += 1
    head = query.lstrip()[:8].upper()
    if head.startswith("COMMIT") or (not conn.is_in_transaction()
                                     and not head.startswith(("BEGIN", "START", "SELECT"))):
        commits += 1  # (a SELECT outside a transaction commits nothing to wait for: it wrote nothing)


def install_counters() -> None:
    plain, extended = Connection.execute, getattr(Connection, "_execute")  # noqa: B009 (private: not typed)

    async def execute(self: Connection, query: str, *args: Any, timeout: float | None = None) -> str:
        if not args:
            _count(self, query)
        return await plain(self, query, *args, timeout=timeout)

    async def _execute(self: Connection, query: str, args: Any, limit: int, timeout: float | None,
                       **kwargs: Any) -> Any:
        _count(self, query)
        return await extended(self, query, args, limit, timeout, **kwargs)

    setattr(Connection, "execute", execute)  # noqa: B010 (asyncpg's stubs refuse a patched method)
    setattr(Connection, "_execute", _execute)  # noqa: B010


def _dsn(database: str) -> str:
    base, _, query = SERVER.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


async def fresh_project(root: Path) -> Any:
    from gatehouse import operations
    from gatehouse.project import load_project

    (root / "gatehouse.toml").write_text(TOML)
    for relative, text in FILES.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    for name in ("a", "b"):
        os.environ[f"GATEHOUSE_DATABASES__{name.upper()}__URL"] = _dsn(f"{PREFIX}_{name}")
    project = load_project(root)
    admin = await asyncpg.connect(SERVER)
    try:
        for name in ("a", "b"):
            await admin.execute(f"DROP DATABASE IF EXISTS {PREFIX}_{name} WITH (FORCE)")
        for row in await admin.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1",
                                     project.role_prefix.replace("_", r"\_") + "%"):
            await admin.execute(f'DROP ROLE "{row["rolname"]}"')
        for name in ("a", "b"):
            await admin.execute(f"CREATE DATABASE {PREFIX}_{name}")
    finally:
        await admin.close()
    await operations.migrate_all(project)
    await operations.apply_all(project)
    return load_project(root)


async def measure(project: Any, seconds: float, starters: int, batch: int, backlog: int) -> dict[str, Any]:
    global commits
    from gatehouse.runtime import Runtime
    from gatehouse.sagas.engine import SagaEngine

    runtime = Runtime(project, run_sagas=False)
    await runtime.start()
    COUNTING.set(True)  # the engine's loop task, created below, and the starters inherit it
    engine = SagaEngine(runtime, batch=batch, poll_s=0.05)
    engine.start_background()
    stats = engine.stats

    def finished() -> int:
        return sum(stats.finished.values())

    async def start_until(stop_at: float, counter: list[int]) -> None:
        while time.monotonic() < stop_at:
            if sum(stats.started.values()) - finished() >= backlog:
                await asyncio.sleep(0.001)
                continue
            counter[0] += 1
            await engine.start("bench", "trio", counter[0])

    async def drain(total: int) -> None:
        async with asyncio.timeout(120):  # a saga left running (it should not be) ends the bench with an error
            while finished() < total:
                await asyncio.sleep(0.005)

    try:
        for n in range(WARM_UP):
            await engine.start("bench", "trio", -n - 1)
        await drain(WARM_UP)
        statements.clear()
        commits = 0
        before = finished()
        started_at = time.monotonic()
        started = [0]
        await asyncio.gather(*(start_until(started_at + seconds, started) for _ in range(starters)))
        await drain(before + started[0])
        elapsed = time.monotonic() - started_at
        done = finished() - before
        states = dict(stats.finished)
    finally:
        COUNTING.set(False)
        await engine.stop()
        await runtime.stop()
    return {"sagas": done, "elapsed": elapsed, "states": states, "statements": Counter(statements),
            "commits": commits}


def category(statement: str) -> str:
    if re.search(r'\b"?(items|marks)"?\b', statement) and "gatehouse." not in statement:
        return "step's own"
    if ("INSERT INTO gatehouse.saga_steps" in statement and not statement.startswith("SELECT")) \
            or "gatehouse.audit" in statement or "SAVEPOINT" in statement:
        return "step record"
    if statement.startswith(("BEGIN", "COMMIT", "ROLLBACK", "START")) or "set_config" in statement:
        return "step transaction"
    return "saga bookkeeping"


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    sagas = result["sagas"]
    per_saga = {s: n / sagas for s, n in result["statements"].items()}
    by_category: Counter[str] = Counter()
    for statement, calls in per_saga.items():
        by_category[category(statement)] += calls
    total = sum(per_saga.values())
    own = by_category["step's own"]
    beyond_local = (by_category["step record"] + by_category["step transaction"]) / 3
    record_only = by_category["step record"] / 3
    print(f"\n## Sagas on one instance ({args.starters} starters, batch {args.batch}, backlog {args.backlog}, "
          f"{args.seconds:g} s of starts)\n")
    print("| measure | value | target |")
    print("|---|---:|---:|")
    print(f"| sagas completed | {sagas:,} in {result['elapsed']:.2f} s (final states, warm-up included: "
          f"{result['states']}) | |")
    print(f"| **sagas per second** | **{sagas / result['elapsed']:,.0f}** | ≥ 200 |")
    print(f"| statements per saga (3 local steps) | {total:.2f} | |")
    print(f"| the steps' own statements per saga | {own:.2f} | |")
    print(f"| **commits per saga** | **{result['commits'] / sagas:.2f}** | ≤ 5 |")
    print(f"| step record per local step (record and audit row: one statement) | {record_only:.2f} | 1 |")
    print(f"| in the step's transaction beyond its own, per local step | {beyond_local:.2f} | |")
    print(f"| saga bookkeeping per saga (start, claim, replay reads, settle) | "
          f"{by_category['saga bookkeeping']:.2f} | |")
    print("\n| statement | per saga | counted as |")
    print("|---|---:|---|")
    for statement, calls in sorted(per_saga.items(), key=lambda item: -item[1]):
        if calls >= 0.01:
            print(f"| `{statement.replace('|', '/')}` | {calls:.2f} | {category(statement)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--starters", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="Runs the engine claims per round.")
    parser.add_argument("--backlog", type=int, default=64, help="Unfinished sagas at most (the starters wait).")
    args = parser.parse_args()
    install_counters()

    async def go() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="gh-bench-sagas-") as folder:
            project = await fresh_project(Path(folder))
            return await measure(project, args.seconds, args.starters, args.batch, args.backlog)

    report(asyncio.run(go()), args)


if __name__ == "__main__":
    main()
