"""What ``gatehouse check`` reports: a :class:`Finding` says what is wrong, where, and what to do; the exit code
and the rendering (a table for people, JSON for machines) of a list of them.

Its own module so the checks that live beside :mod:`gatehouse.check` (:mod:`gatehouse.check_config`,
:mod:`gatehouse.check_lineage`) make findings of the same kind without importing the module that calls them: the
imports point one way.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

Severity = Literal["error", "warning"]
Format = Literal["table", "json"]


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    code: str
    message: str
    contract: str | None = None
    """The contract version's label (``products.v1``), when the finding is about one."""
    file: str | None = None
    """Relative to the project folder."""
    hint: str | None = None


def error(code: str, message: str, **where: str | None) -> Finding:
    """An error finding (``where``: its contract, file and hint)."""
    return Finding("error", code, message, **where)


def exit_code(findings: Iterable[Finding]) -> int:
    """1 when any finding is an error (warnings alone pass), else 0."""
    return 1 if any(f.severity == "error" for f in findings) else 0


def ordered(findings: list[Finding]) -> list[Finding]:
    """Errors first, then by code, contract and message: the same findings always in the same order."""
    return sorted(findings, key=lambda f: (f.severity != "error", f.code, f.contract or "", f.message))


def render_findings(findings: list[Finding], fmt: Format = "table", *, color: bool = False, width: int = 120) -> str:
    """JSON (an array of findings) for machines; a table with a summary line for people."""
    if fmt == "json":
        return json.dumps([asdict(f) for f in findings], indent=2)
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=color, color_system="standard" if color else None,
                      soft_wrap=False)
    if findings:
        table = Table("level", "code", "contract", "finding", show_lines=True)
        for finding in findings:
            text = Text(finding.message)
            if finding.file:
                text.append(f"\n{finding.file}", style="cyan")
            if finding.hint:
                text.append(f"\nhint: {finding.hint}", style="dim")
            style = "bold red" if finding.severity == "error" else "yellow"
            table.add_row(Text(finding.severity, style=style), finding.code, finding.contract or "", text)
        console.print(table)
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    summary = "check passed: no findings" if not findings else f"{errors} error(s), {warnings} warning(s)"
    console.print(Text(summary, style="bold red" if errors else "bold green"))
    return buffer.getvalue()
