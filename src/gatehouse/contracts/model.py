"""A contract file becomes a :class:`ContractVersion`: one ``SELECT`` with explicit, uniquely named columns.

Files are ``contracts/<name>.v<N>.sql`` (or ``contracts/<database>/<name>.v<N>.sql`` when the project has
more than one database). Leading ``--`` comment lines are the contract's description. The SQL is parsed
with sqlglot so mistakes are caught at load, long before a view is created: ``SELECT *`` (anywhere, CTEs and
subqueries included), more than one statement, anything but a query, and unnamed or duplicate columns.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError

from gatehouse.errors import ProjectError

FILE_PATTERN = re.compile(r"^(?P<name>[a-z][a-z0-9_]{0,39})\.v(?P<version>[1-9][0-9]{0,3})\.sql$")


@dataclass(frozen=True, slots=True)
class ContractVersion:
    name: str
    version: int
    database: str
    sql: str
    columns: tuple[str, ...]
    description: str
    path: Path

    @property
    def label(self) -> str:
        return f"{self.name}.v{self.version}"

    @property
    def checksum(self) -> str:
        """sha256 of the SQL text as written; a released version's checksum never changes."""
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


NOT_NULL_LINE = re.compile(r"^--\s*not\s+null\s*:(?P<names>.*)$", re.IGNORECASE)
"""``-- not null: id, name`` among the leading comments: PostgreSQL reports every view column as nullable, so
the contract declares which of its columns never are (recorded in contracts.lock)."""


def _description(sql: str) -> str:
    lines: list[str] = []
    for line in sql.splitlines():
        stripped = line.strip()
        if not stripped.startswith("--"):
            break
        if not NOT_NULL_LINE.match(stripped):
            lines.append(stripped.removeprefix("--").strip())
    return " ".join(part for part in lines if part)


def declared_not_null(sql: str) -> frozenset[str]:
    """Column names declared never null by ``-- not null: a, b`` lines in the file's leading comments."""
    names: set[str] = set()
    for line in sql.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("--"):
            break
        match = NOT_NULL_LINE.match(stripped)
        if match:
            names.update(n.strip() for n in re.split(r"[,\s]+", match["names"]) if n.strip())
    return frozenset(names)


def check_not_null(sql: str, columns: Iterable[str], *, where: str) -> frozenset[str]:
    """:func:`declared_not_null`, refusing names that are not output columns of the contract."""
    declared = declared_not_null(sql)
    known = list(columns)
    unknown = sorted(declared - set(known))
    if unknown:
        raise ProjectError(f"`-- not null:` names {', '.join(unknown)}, not a column of this contract",
                           where=where, hint=f"its columns: {', '.join(known)}")
    return declared




def _star_location(sql: str) -> str:
    for number, line in enumerate(sql.splitlines(), start=1):
        if re.search(r"(^|[\s,.(])\*(\s|,|$)", line.split("--", 1)[0]):
            return f"line {number}"
    return "the select list"


def _output_columns(query: exp.Query, where: str) -> tuple[str, ...]:
    names: list[str] = []
    for projection in query.selects:
        name = projection.alias_or_name
        if not isinstance(projection, exp.Alias | exp.Column) or not name:
            raise ProjectError(
                f"the column `{projection.sql(dialect='postgres')}` has no name",
                where=where, hint="give it one: `... AS my_column`",
            )
        names.append(name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProjectError(f"column names appear twice: {', '.join(duplicates)}", where=where,
                           hint="rename one of them with AS")
    return tuple(names)


def parse_contract_sql(sql: str, *, where: str) -> tuple[str, ...]:
    """Check the SQL of one contract and return its output column names, in order."""
    try:
        statements = [s for s in sqlglot.parse(sql, read="postgres") if s is not None]
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        line = first.get("line")
        raise ProjectError(
            f"cannot parse the SQL{f' (line {line})' if line else ''}: {first.get('description', exc)}",
            where=where,
        ) from None
    if len(statements) != 1:
        raise ProjectError(f"a contract is one SELECT statement; found {len(statements)} statements",
                           where=where)
    query = statements[0]
    if not isinstance(query, exp.Query):
        raise ProjectError(f"a contract is a SELECT; found {query.key.upper()}", where=where,
                           hint="write changes to the data as migrations, not contracts")
    for select in query.find_all(exp.Select):
        for projection in select.expressions:
            if isinstance(projection, exp.Star) or (
                isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star)
            ):
                raise ProjectError(
                    f"SELECT * is not allowed in a contract ({_star_location(sql)})",
                    where=where,
                    hint="list the columns explicitly, so a new column in the table never leaks into the API",
                )
    return _output_columns(query, where)


def load_contract_file(path: Path, database: str) -> ContractVersion:
    match = FILE_PATTERN.match(path.name)
    if match is None:
        raise ProjectError(
            "a contract file is named <name>.v<N>.sql (lower-case name, version from 1)",
            where=str(path), hint="for example products.v1.sql",
        )
    sql = path.read_text(encoding="utf-8")
    columns = parse_contract_sql(sql, where=str(path))  # `-- not null:` names are checked by `gatehouse check`
    return ContractVersion(
        name=match["name"],
        version=int(match["version"]),
        database=database,
        sql=sql.strip().rstrip(";").strip(),
        columns=columns,
        description=_description(sql),
        path=path,
    )
