"""Lint migrations with squawk (the ``squawk-cli`` package): locks, rewrites and other deploy hazards.

squawk reads SQL only (no database), so it runs before anything is applied. Files that gatehouse runs in a
transaction are linted with ``--assume-in-transaction`` (squawk then knows a table created earlier in the
same file is new, and that the file can be retried); ``-- gatehouse: no-transaction`` files are linted as
they run, statement by statement. ``-- gatehouse: batch`` files are not given to squawk: ``:batch_size`` is
not SQL it can parse, and gatehouse runs them with its own ``lock_timeout`` and ``statement_timeout``.
squawk reads ``.squawk.toml`` from the folder it runs in and its parents (pass the project root as
``cwd``), so a project can exclude rules or set ``pg_version`` there; a statement can be exempted with
``-- squawk-ignore rule``.

gatehouse adds its own warnings about backfills in a migration that runs in one transaction (a
``-- gatehouse: batch`` file is the fix for both, :mod:`gatehouse.migrate.batch`):

* ``backfill-holds-access-exclusive``: an UPDATE, DELETE or INSERT ... SELECT on a table that an earlier
  statement of the file locked ``ACCESS EXCLUSIVE`` (most forms of ALTER TABLE, TRUNCATE, LOCK TABLE,
  CLUSTER). The lock is held to the end of the transaction, so every reader of the table waits for the whole
  backfill. A data statement *before* the ALTER is not flagged: the lock is taken after it ran. Tables
  created in the same file are left out: nobody else can see them yet.
* ``backfill-not-batched``: an UPDATE or DELETE without a LIMIT on a table that has many rows
  (:data:`BACKFILL_ROWS`, estimated from ``pg_class.reltuples`` on the live database by
  :func:`row_estimates`: a table never analyzed has no estimate and is not flagged). Every row it changes
  stays locked until the migration commits: writers of those rows wait.

Findings are advice: nothing here raises. When squawk is not installed or fails, the report carries a
notice saying so instead of squawk's findings (gatehouse's own are still there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from gatehouse.migrate.files import Migration
from gatehouse.migrate.statements import IDENTIFIER, NAME, data_statement, mask, same_table

TIMEOUT_SECONDS = 120
NOT_INSTALLED = ("squawk is not installed, so migrations were not linted by it "
                 "(it comes with the squawk-cli package: pip install squawk-cli)")
BACKFILL_ROWS = 10_000
"""From this many rows, an UPDATE or DELETE in one transaction is worth batching: some tens of milliseconds
and more with every row it changes locked, longer with indexes and triggers."""
BATCH_IT = "move the backfill to its own `-- gatehouse: batch` migration; see docs/safe-schema-changes.md"
_TABLES = rf"(?:ONLY\s+)?{NAME}\s*\*?(?:\s*,\s*(?:ONLY\s+)?{NAME}\s*\*?)*"
EXCLUSIVE_STATEMENTS = (
    ("ALTER TABLE", re.compile(rf"ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?(?P<tables>{NAME})\s*\*?(?P<rest>.*)",
                               re.IGNORECASE | re.DOTALL)),
    ("TRUNCATE", re.compile(rf"TRUNCATE\s+(?:TABLE\s+)?(?P<tables>{_TABLES})(?P<rest>)", re.IGNORECASE)),
    ("LOCK TABLE", re.compile(rf"LOCK\s+(?:TABLE\s+)?(?P<tables>{_TABLES})(?P<rest>.*)", re.IGNORECASE | re.DOTALL)),
    ("CLUSTER", re.compile(rf"CLUSTER\s+(?:VERBOSE\s+)?(?P<tables>{NAME})(?P<rest>)", re.IGNORECASE)),
)
"""Statements that lock the tables they name ACCESS EXCLUSIVE (PostgreSQL's "Explicit Locking" table)."""
LIGHT_ALTERATIONS = tuple(re.compile(pattern, re.IGNORECASE | re.DOTALL) for pattern in (
    r"VALIDATE\s+CONSTRAINT\b",  # SHARE UPDATE EXCLUSIVE
    rf"ALTER\s+(?:COLUMN\s+)?{IDENTIFIER}\s+(?:SET\s+STATISTICS\b|(?:SET|RESET)\s*\()",  # SHARE UPDATE EXCLUSIVE
    r"(?:SET|RESET)\s*\(",  # storage parameters (fillfactor, autovacuum_*): SHARE UPDATE EXCLUSIVE
    r"CLUSTER\s+ON\b|SET\s+WITHOUT\s+CLUSTER\b",  # SHARE UPDATE EXCLUSIVE
    rf"ADD\s+(?:CONSTRAINT\s+{IDENTIFIER}\s+)?FOREIGN\s+KEY\b",  # SHARE ROW EXCLUSIVE: writers wait, readers not
    r"(?:ENABLE|DISABLE)\s+(?:REPLICA\s+|ALWAYS\s+)?TRIGGER\b",  # SHARE ROW EXCLUSIVE
    r"ATTACH\s+PARTITION\b",  # SHARE UPDATE EXCLUSIVE on the partitioned table
    r"DETACH\s+PARTITION\b.*\bCONCURRENTLY\b",  # SHARE UPDATE EXCLUSIVE
))
"""ALTER TABLE actions that take a weaker lock than ACCESS EXCLUSIVE: readers do not wait for them."""
WEAKER_LOCK_MODE = re.compile(r"\bIN\s+(?!ACCESS\s+EXCLUSIVE\b)[A-Z ]+\bMODE\b", re.IGNORECASE)
CREATED_TABLE = re.compile(rf"CREATE\s+(?:(?:GLOBAL\s+|LOCAL\s+)?(?:TEMP|TEMPORARY|UNLOGGED)\s+)?TABLE\s+"
                           rf"(?:IF\s+NOT\s+EXISTS\s+)?(?P<table>{NAME})", re.IGNORECASE)
ROW_ESTIMATE = "SELECT reltuples FROM pg_class WHERE oid = to_regclass($1) AND reltuples >= 0"


@dataclass(frozen=True, slots=True)
class Finding:
    file: Path
    line: int  # 1-based
    column: int  # 1-based
    rule: str  # squawk's rule name, e.g. require-concurrent-index-creation; "syntax-error" when it cannot parse
    level: str  # "warning" or "error"
    message: str
    help: str | None

    def __str__(self) -> str:
        text = f"{self.file.name}:{self.line}: {self.rule}: {self.message}"
        return f"{text} ({self.help})" if self.help else text


@dataclass(slots=True)
class LintReport:
    findings: list[Finding] = field(default_factory=list)
    notice: str | None = None  # why linting did not (fully) run; None when it did

    @property
    def clean(self) -> bool:
        return not self.findings and self.notice is None

    def for_file(self, path: Path) -> list[Finding]:
        return [f for f in self.findings if f.file == path]


def squawk_binary() -> str | None:
    """``$GATEHOUSE_SQUAWK``, else the squawk installed beside this Python (a venv not on PATH), else PATH's."""
    configured = os.environ.get("GATEHOUSE_SQUAWK")
    if configured:
        return configured
    beside = Path(sys.executable).parent / ("squawk.exe" if os.name == "nt" else "squawk")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("squawk")


def lint_files(paths: Sequence[Path], *, in_transaction: bool = True, pg_version: str | None = None,
               cwd: Path | None = None, binary: str | None = None) -> LintReport:
    """Run squawk once over the files; findings in file order, then line order."""
    if not paths:
        return LintReport()
    binary = binary or squawk_binary()
    if binary is None:
        return LintReport(notice=NOT_INSTALLED)
    command = [binary, "--reporter", "json", "--no-error-on-unmatched-pattern"]
    if in_transaction:
        command.append("--assume-in-transaction")
    if pg_version:
        command.append(f"--pg-version={pg_version}")
    by_name = {str(p): p for p in paths}
    try:
        done = subprocess.run([*command, *map(_glob_escape, by_name)], capture_output=True, text=True, cwd=cwd,
                              timeout=TIMEOUT_SECONDS, check=False)
    except FileNotFoundError:
        return LintReport(notice=NOT_INSTALLED)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return LintReport(notice=f"squawk could not run, so migrations were not linted: {exc}")
    try:
        raw = json.loads(done.stdout) if done.returncode in (0, 1) else None
    except json.JSONDecodeError:
        raw = None
    if not isinstance(raw, list):
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        return LintReport(notice=f"squawk failed (exit {done.returncode}), so migrations were not linted: "
                                 f"{said[0] if said else 'no output'}")
    order = {p: n for n, p in enumerate(paths)}
    findings = [_finding(item, by_name) for item in raw if isinstance(item, dict)]
    findings.sort(key=lambda f: (order.get(f.file, len(order)), f.line, f.column, f.rule))
    return LintReport(findings)


def _glob_escape(path: str) -> str:
    """squawk takes glob patterns: make a path match only itself (as Rust's ``glob::Pattern::escape``)."""
    return "".join(f"[{ch}]" if ch in "?*[]" else ch for ch in path)


def _finding(item: dict[str, Any], by_name: dict[str, Path]) -> Finding:
    name = str(item.get("file", ""))
    return Finding(
        file=by_name.get(name, Path(name)),
        line=int(item.get("line") or 0) + 1,
        column=int(item.get("column") or 0) + 1,
        rule=str(item.get("rule_name") or "unknown"),
        level=str(item.get("level") or "warning").lower(),
        message=str(item.get("message") or ""),
        help=str(item["help"]) if item.get("help") else None,
    )


def lint_migrations(migrations: Sequence[Migration], *, pg_version: str | None = None, cwd: Path | None = None,
                    binary: str | None = None, row_estimates: Mapping[str, float] | None = None) -> LintReport:
    """Lint migration files the way they will run (in a transaction, or statement by statement), with squawk
    and with gatehouse's backfill checks; ``row_estimates`` (:func:`row_estimates`) are the live tables' rows."""
    report = LintReport()
    for in_transaction in (True, False):
        paths = [m.path for m in migrations if m.transactional is in_transaction and m.batch_size is None]
        part = lint_files(paths, in_transaction=in_transaction, pg_version=pg_version, cwd=cwd, binary=binary)
        report.findings += part.findings
        report.notice = report.notice or part.notice
    for migration in migrations:
        report.findings += backfill_findings(migration, row_estimates or {})
    order = {m.path: n for n, m in enumerate(migrations)}
    report.findings.sort(key=lambda f: (order.get(f.file, len(order)), f.line, f.column, f.rule))
    return report


def backfill_findings(migration: Migration, row_estimates: Mapping[str, float], *,
                      many_rows: int = BACKFILL_ROWS) -> list[Finding]:
    """gatehouse's warnings about the backfills of a migration that runs in one transaction (see the module's
    documentation); ``row_estimates`` maps a table, as the migration writes it, to its rows."""
    if not migration.transactional:
        return []
    findings: list[Finding] = []
    locked: list[tuple[str, str, int]] = []  # (table, statement, line) locked ACCESS EXCLUSIVE so far
    created: list[str] = []
    for statement in migration.statements():
        code = mask(statement.sql)
        if new := CREATED_TABLE.match(code):
            created.append(new["table"])
            continue
        if exclusive := _exclusive(code):
            kind, tables = exclusive
            locked += [(table, kind, statement.line) for table in tables
                       if not any(same_table(table, new_table) for new_table in created)]
            continue
        data = data_statement(statement.sql)
        if data is None:
            continue
        holder = next(((kind, line) for table, kind, line in locked if same_table(table, data.table)), None)
        estimate = row_estimates.get(data.table, 0)
        if holder is not None:
            findings.append(Finding(
                migration.path, statement.line, 1, "backfill-holds-access-exclusive", "warning",
                f"{data.command} holds an ACCESS EXCLUSIVE lock on {data.table} through the whole backfill "
                f"({holder[0]} on line {holder[1]} took it): readers of {data.table} wait until the migration "
                "commits", BATCH_IT))
        elif data.command != "INSERT" and not data.limited and estimate >= many_rows:
            findings.append(Finding(
                migration.path, statement.line, 1, "backfill-not-batched", "warning",
                f"{data.command} of about {estimate:,.0f} rows of {data.table} in one transaction: every row it "
                "changes stays locked until the migration commits, and writers of those rows wait",
                "move it to a `-- gatehouse: batch` migration, which changes them in short transactions; see "
                "docs/safe-schema-changes.md"))
    return findings


def _exclusive(code: str) -> tuple[str, list[str]] | None:
    """The statement's kind and the tables it locks ACCESS EXCLUSIVE, if it does."""
    for kind, pattern in EXCLUSIVE_STATEMENTS:
        match = pattern.match(code)
        if match is None:
            continue
        if kind == "ALTER TABLE" and all(any(light.match(action.strip()) for light in LIGHT_ALTERATIONS)
                                         for action in _actions(match["rest"])):
            return None
        if kind == "LOCK TABLE" and WEAKER_LOCK_MODE.search(match["rest"]):
            return None
        return kind, [name for name in re.findall(NAME, match["tables"]) if name.upper() != "ONLY"]
    return None


def _actions(code: str) -> list[str]:
    """An ALTER TABLE's actions: the text after the table's name, split at the commas outside parentheses."""
    actions: list[str] = []
    depth = start = 0
    for i, ch in enumerate(code):
        if ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "," and depth == 0:
            actions.append(code[start:i])
            start = i + 1
    return [*actions, code[start:]]


def backfill_tables(migrations: Iterable[Migration]) -> set[str]:
    """The tables that an UPDATE or DELETE without a LIMIT changes in a migration run in one transaction: the
    ones :func:`row_estimates` is asked about."""
    return {data.table for m in migrations if m.transactional for statement in m.statements()
            if (data := data_statement(statement.sql)) and data.command != "INSERT" and not data.limited}


async def row_estimates(conn: asyncpg.Connection, tables: Iterable[str]) -> dict[str, float]:
    """``pg_class.reltuples`` of the tables that exist and have been analyzed (by ANALYZE, VACUUM or
    autovacuum; a table never analyzed has no estimate). Reads the catalog only: no table is locked."""
    estimates: dict[str, float] = {}
    for table in sorted(set(tables)):
        value = await conn.fetchval(ROW_ESTIMATE, table)
        if value is not None:
            estimates[table] = float(value)
    return estimates
