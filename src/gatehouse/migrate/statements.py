"""Split a PostgreSQL script into its statements, for migrations that must run one statement at a time.

A migration marked ``-- gatehouse: no-transaction`` cannot be sent as one query string: PostgreSQL runs a
multi-statement string in one implicit transaction, which is exactly what ``CREATE INDEX CONCURRENTLY``
refuses. The splitter knows enough of PostgreSQL's lexical rules to find the semicolons that end statements:
``'strings'`` (with ``''``), ``E'strings'`` (with backslash escapes), ``"identifiers"``, ``$tag$ dollar
quotes $tag$``, ``-- line comments`` and nested ``/* block comments */``. Parentheses do not matter (a
semicolon cannot appear inside them outside a string or a dollar-quoted body).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    line: int  # 1-based line of the file where the statement's first significant character is

    def line_of(self, position: int) -> int:
        """The file's line of a 1-based character position inside this statement (PostgreSQL's ``position``)."""
        return self.line + self.sql.count("\n", 0, max(position - 1, 0))


def _identifier_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_" or ch == "$" or ord(ch) > 127


def _skip_quoted(sql: str, i: int, quote: str, backslash: bool) -> int:
    """Index just past the closing quote of a literal starting at ``sql[i] == quote``."""
    i += 1
    while i < len(sql):
        ch = sql[i]
        if backslash and ch == "\\":
            i += 2
            continue
        if ch == quote:
            if i + 1 < len(sql) and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return i


def _skip_block_comment(sql: str, i: int) -> int:
    depth = 0
    while i < len(sql):
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return i


def split_statements(sql: str) -> list[Statement]:
    """The statements of a script, without empty or comment-only ones, each with the line it starts on."""
    statements: list[Statement] = []
    start = 0
    first_significant: int | None = None
    i = 0
    while i < len(sql):
        ch = sql[i]
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = len(sql) if end < 0 else end + 1
            continue
        if sql.startswith("/*", i):
            i = _skip_block_comment(sql, i)
            continue
        if ch.isspace():
            i += 1
            continue
        if first_significant is None:
            first_significant = i
        if ch == ";":
            _add(statements, sql, start, i, first_significant)
            start, first_significant = i + 1, None
            i += 1
        elif ch == "'":
            escaped = i > 0 and sql[i - 1] in "eE" and (i < 2 or not _identifier_char(sql[i - 2]))
            i = _skip_quoted(sql, i, "'", backslash=escaped)
        elif ch == '"':
            i = _skip_quoted(sql, i, '"', backslash=False)
        elif ch == "$" and (i == 0 or not _identifier_char(sql[i - 1])) and (tag := DOLLAR_TAG.match(sql, i)):
            end = sql.find(tag.group(), tag.end())
            i = len(sql) if end < 0 else end + len(tag.group())
        else:
            i += 1
    _add(statements, sql, start, len(sql), first_significant)
    return statements


def _add(statements: list[Statement], sql: str, start: int, end: int, first_significant: int | None) -> None:
    if first_significant is None or first_significant == end:  # nothing but blanks, comments or a lone ";"
        return
    text = sql[first_significant:end].rstrip()
    statements.append(Statement(text, sql.count("\n", 0, first_significant) + 1))
