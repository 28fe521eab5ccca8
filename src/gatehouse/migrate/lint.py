"""Lint migrations with squawk (the ``squawk-cli`` package): locks, rewrites and other deploy hazards.

squawk reads SQL only (no database), so it runs before anything is applied. Files that gatehouse runs in a
transaction are linted with ``--assume-in-transaction`` (squawk then knows a table created earlier in the
same file is new, and that the file can be retried); ``-- gatehouse: no-transaction`` files are linted as
they run, statement by statement. squawk reads ``.squawk.toml`` from the folder it runs in and its parents
(pass the project root as ``cwd``), so a project can exclude rules or set ``pg_version`` there; a statement
can be exempted with ``-- squawk-ignore rule``.

Findings are advice: nothing here raises. When squawk is not installed or fails, the report carries a
notice saying so instead of findings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatehouse.migrate.runner import Migration

TIMEOUT_SECONDS = 120
NOT_INSTALLED = ("squawk is not installed, so migrations were not linted "
                 "(it comes with the squawk-cli package: pip install squawk-cli)")


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
                    binary: str | None = None) -> LintReport:
    """Lint migration files the way they will run (in a transaction, or statement by statement)."""
    report = LintReport()
    for in_transaction in (True, False):
        paths = [m.path for m in migrations if m.transactional is in_transaction]
        part = lint_files(paths, in_transaction=in_transaction, pg_version=pg_version, cwd=cwd, binary=binary)
        report.findings += part.findings
        report.notice = report.notice or part.notice
    order = {m.path: n for n, m in enumerate(migrations)}
    report.findings.sort(key=lambda f: (order.get(f.file, len(order)), f.line, f.column, f.rule))
    return report
