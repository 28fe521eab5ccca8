"""Migration files: how they are named, read and checked, before anything runs.

``migrations/V<NNN>__<description>.sql`` (versioned) and ``R__<description>.sql`` (repeatable); a first line
``-- gatehouse: no-transaction`` or ``-- gatehouse: batch [size]`` changes how a file runs (see
:mod:`gatehouse.migrate.runner` and :mod:`gatehouse.migrate.batch`). Every mistake a file can hold is found
here, when the folder is read, and names the file and the fix; the runner and the batch runner both start
from what this module gives them, so neither imports the other's internals.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from gatehouse.errors import ProjectError
from gatehouse.migrate.statements import Statement, data_statement, mask, split_statements

VERSIONED = re.compile(r"^V(?P<version>[0-9]{1,9})__(?P<description>[A-Za-z0-9_]+)\.sql$")
REPEATABLE = re.compile(r"^R__(?P<description>[A-Za-z0-9_]+)\.sql$")
NO_TRANSACTION = re.compile(r"^\s*--\s*gatehouse:\s*no-transaction\s*$", re.IGNORECASE)
DIRECTIVE = re.compile(r"^\s*--\s*gatehouse:", re.IGNORECASE)

# name -> checksum of a migration's text (UTF-8, line endings read as "\n", no byte-order mark). The name is
# stored with each checksum; a new algorithm gets a new name and old rows keep being checked with theirs.
CHECKSUMS: dict[str, Callable[[str], str]] = {"sha256": lambda text: hashlib.sha256(text.encode()).hexdigest()}
CHECKSUM_ALGORITHM = "sha256"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int | None  # None: a repeatable migration
    description: str
    path: Path
    sql: str
    transactional: bool = True  # in one transaction, with its history row
    batch_size: int | None = None  # a ``-- gatehouse: batch`` file (not transactional): rows a batch

    @property
    def kind(self) -> str:
        return "versioned" if self.version is not None else "repeatable"

    @property
    def checksum(self) -> str:
        return CHECKSUMS[CHECKSUM_ALGORITHM](self.sql)

    def checksum_with(self, algorithm: str) -> str:
        if algorithm not in CHECKSUMS:
            raise ProjectError(f"the history of {self.path.name} uses checksum algorithm {algorithm!r}, "
                               "which this gatehouse does not know", hint="upgrade gatehouse")
        return CHECKSUMS[algorithm](self.sql)

    @property
    def label(self) -> str:
        text = self.description.replace("_", " ")
        return f"V{self.version:03d} {text}" if self.version is not None else f"R {text}"

    def statements(self) -> list[Statement]:
        return split_statements(self.sql)


class MigrationFailed(ProjectError):
    """A migration failed in the database; ``__cause__`` is PostgreSQL's error.

    ``statement`` is the statement that failed in a ``no-transaction`` migration (None for one run in a
    transaction, where nothing of it stays).
    """

    def __init__(self, migration: Migration, error: asyncpg.PostgresError, *, line: int | None,
                 statement: Statement | None = None) -> None:
        self.migration, self.line, self.sqlstate = migration, line, error.sqlstate
        self.reason = f"line {line}: {error.message}" if line else error.message  # what the history records
        said = "".join(f"\n  {name}: {text}" for name, text in (("detail", error.detail),
                                                                 ("PostgreSQL's hint", error.hint)) if text)
        hints: list[str] = []
        if statement is None:
            if error.sqlstate == "25001":  # active_sql_transaction: e.g. CREATE INDEX CONCURRENTLY
                hints.append("this statement cannot run inside a transaction: make `-- gatehouse: no-transaction` "
                             "the file's first line (and keep that file to this one statement)")
            if error.sqlstate == "55P03":  # lock_not_available: every try gave way to a lock held elsewhere
                hints.append("it waited for a lock again and again and gave way each time, so that the apps' "
                             "readers never queue behind it: a long transaction holds the table (see "
                             "pg_stat_activity); run `gatehouse migrate` again when it has ended")
                hints.append("nothing of it was applied")
            else:
                hints.append("nothing of it was applied (it ran in one transaction): fix the file and apply again")
        else:
            statements = migration.statements()
            number, total = statements.index(statement) + 1, len(statements)
            kept = ("nothing before it ran" if number == 1 else "statement 1 was applied and stays" if number == 2
                    else f"statements 1-{number - 1} were applied and stay")
            hints.append(f"it ran outside a transaction and statement {number} of {total} failed ({kept})")
            if "concurrently" in statement.sql.lower():
                hints.append("a failed CREATE INDEX CONCURRENTLY can leave an INVALID index behind: drop it")
            hints.append("undo or finish the change by hand, then run `gatehouse migrate repair`; "
                         "apply refuses to run until then")
        at = f" at line {line}" if line else ""
        super().__init__(f"migration {migration.label} failed{at}: {error.message}{said}", where=str(migration.path),
                         hint="; ".join(hints))


def _read(path: Path) -> tuple[str, bool, int | None]:
    """The file's SQL (without a byte-order mark), whether it runs in one transaction, and its batch size
    (None unless it is a batch file, which :func:`batch_size` checks)."""
    sql = path.read_text(encoding="utf-8").removeprefix("\ufeff")
    lines = [(n, line) for n, line in enumerate(sql.splitlines(), 1) if line.strip()]
    marked = [(n, line) for n, line in lines if NO_TRANSACTION.match(line) or MARKER.match(line)]
    if marked and marked[0][0] != lines[0][0]:
        raise ProjectError(f"`{marked[0][1].strip()}` is on line {marked[0][0]}; it counts only as the first line",
                           where=str(path), hint="move it to the top of the file")
    if lines and DIRECTIVE.match(lines[0][1]) and not marked:
        raise ProjectError(f"unknown directive `{lines[0][1].strip()}`", where=str(path),
                           hint="gatehouse knows `-- gatehouse: no-transaction` and `-- gatehouse: batch [size]`")
    return sql, not marked, batch_size(path, sql)


def discover(folder: Path) -> list[Migration]:
    """Every migration in the folder: versioned ones in version order, then repeatable ones in name order."""
    if not folder.is_dir():
        return []
    versioned: dict[int, Migration] = {}
    repeatable: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        if match := REPEATABLE.match(path.name):
            repeatable.append(Migration(None, match["description"], path, *_read(path)))
            continue
        match = VERSIONED.match(path.name)
        if match is None:
            raise ProjectError("a migration file is named V<number>__<description>.sql "
                               "(or R__<description>.sql for a repeatable one)",
                               where=str(path), hint="for example V003__add_product_sku.sql or R__report_views.sql")
        version = int(match["version"])
        if version in versioned:
            raise ProjectError(f"version {version} is used twice (also {versioned[version].path.name})",
                               where=str(path))
        versioned[version] = Migration(version, match["description"], path, *_read(path))
    return [versioned[v] for v in sorted(versioned)] + sorted(repeatable, key=lambda m: m.description)



MARKER = re.compile(r"^\s*--\s*gatehouse:\s*batch\b(?P<size>.*)$", re.IGNORECASE)
DEFAULT_BATCH_SIZE = 1000
MAX_BATCH_SIZE = 1_000_000
PLACEHOLDER = re.compile(r"(?<![:\w]):batch_size\b")
BOUNDED = re.compile(r"\b(?i:LIMIT|FETCH\s+(?:FIRST|NEXT))\s+:batch_size\b")
SKIP_LOCKED = re.compile(r"\s+SKIP\s+LOCKED\b", re.IGNORECASE)
EXAMPLE = ("UPDATE products SET title = name WHERE id IN "
           "(SELECT id FROM products WHERE title IS NULL LIMIT :batch_size FOR UPDATE SKIP LOCKED);")


@dataclass(frozen=True, slots=True)
class BatchStatement:
    statement: Statement
    table: str  # as written in the statement

    def sql(self, size: int, *, skip_locked: bool = True) -> str:
        """The statement with ``:batch_size`` replaced (in code only, not in a string or a comment)."""
        text, code = self.statement.sql, mask(self.statement.sql)
        spans = [m.span() for m in PLACEHOLDER.finditer(code)]
        if not skip_locked:
            spans += [m.span() for m in SKIP_LOCKED.finditer(code)]
        for start, end in sorted(spans, reverse=True):
            text = text[:start] + (str(size) if text[start] == ":" else "") + text[end:]
        return text

    @property
    def skips_locked(self) -> bool:
        return SKIP_LOCKED.search(mask(self.statement.sql)) is not None

    def line_of(self, error: asyncpg.PostgresError, sent: str) -> int:
        """The file's line of PostgreSQL's error position in ``sent`` (this statement, as run)."""
        position = int(error.position) if error.position and error.position.isdigit() else 0
        return self.statement.line + sent.count("\n", 0, max(position - 1, 0))


def batch_size(path: Path, sql: str) -> int | None:
    """The batch size of a ``-- gatehouse: batch`` file (whose statement is checked here, at discovery), or
    None for any other file. Raises :class:`ProjectError` naming the file and the fix."""
    first = next((line for line in sql.splitlines() if line.strip()), "")
    marker = MARKER.match(first)
    if marker is None:
        if ":batch_size" in sql and BOUNDED.search(mask(sql)):  # (mask reads every character: only if needed)
            raise ProjectError("the file uses `:batch_size` but is not a batch migration", where=str(path),
                               hint="make `-- gatehouse: batch` its first line (or write a number instead)")
        return None
    size = marker["size"].strip()
    if size and not (size.isdigit() and 0 < int(size) <= MAX_BATCH_SIZE):
        raise ProjectError(f"cannot read the batch size in `{first.strip()}`", where=str(path),
                           hint=f"write `-- gatehouse: batch` ({DEFAULT_BATCH_SIZE} rows a batch) or "
                                f"`-- gatehouse: batch 5000` (a whole number from 1 to {MAX_BATCH_SIZE:,})")
    batch_statement(path, sql)
    return int(size) if size else DEFAULT_BATCH_SIZE


def batch_statement(path: Path, sql: str) -> BatchStatement:
    """The one statement of a batch file, checked (see :func:`batch_size`)."""
    statements = split_statements(sql)
    if len(statements) != 1:
        raise ProjectError(f"a batch migration holds exactly one UPDATE or DELETE; this file has "
                           f"{len(statements)} statements", where=str(path),
                           hint="move the other statements to migrations of their own (a schema change "
                                f"before the backfill, in a file numbered lower); for example: {EXAMPLE}")
    [statement] = statements
    data = data_statement(statement.sql)
    if data is None or data.command not in ("UPDATE", "DELETE"):
        raise ProjectError("a batch migration runs an UPDATE or a DELETE again and again; this statement is "
                           f"{statement.sql.split(None, 1)[0].upper()}", where=str(path),
                           hint=f"write the backfill as one UPDATE or DELETE, for example: {EXAMPLE}")
    if not BOUNDED.search(mask(statement.sql)):
        raise ProjectError("a batch migration's statement takes its rows from a subquery with "
                           "`LIMIT :batch_size` (gatehouse puts the batch size there); none is in this one",
                           where=str(path), hint=f"select only the rows not yet done, for example: {EXAMPLE}")
    return BatchStatement(statement, data.table)
