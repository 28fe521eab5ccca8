"""Split a PostgreSQL script into its statements, for migrations that must run one statement at a time.

A migration marked ``-- gatehouse: no-transaction`` cannot be sent as one query string: PostgreSQL runs a
multi-statement string in one implicit transaction, which is exactly what ``CREATE INDEX CONCURRENTLY``
refuses. The splitter knows enough of PostgreSQL's lexical rules to find the semicolons that end statements:
``'strings'`` (with ``''``), ``E'strings'`` (with backslash escapes), ``"identifiers"``, ``$tag$ dollar
quotes $tag$``, ``-- line comments`` and nested ``/* block comments */``. Parentheses do not matter (a
semicolon cannot appear inside them outside a string or a dollar-quoted body).

The same lexer gives :func:`mask` (the code with comments and literals blanked out), on which the batch
runner and the lint look for keywords and table names without being fooled by a comment or a string, and
:func:`data_statement`, which says what table an UPDATE, DELETE or INSERT ... SELECT changes rows of.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_FIRST = r"[^\x00-\x40\x5b-\x5e\x60\x7b-\x7f]"
r"""An unquoted identifier's first character: a letter, ``_`` or any character past ASCII. Written as the ASCII
characters it is not: the same set as ``[A-Za-z_\x80-\U0010ffff]``, but that range takes ``re`` about 8 ms to
compile (12 with ``re.IGNORECASE``) each time it is used, which was a quarter of a second of every ``gatehouse``
command's start."""
_NEXT = r"[^\x00-\x23\x25-\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f]"
r"""Its further characters: those, a digit or ``$`` (``[A-Za-z0-9_$\x80-\U0010ffff]``)."""
_TAG_NEXT = r"[^\x00-\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f]"
r"""A dollar quote's tag's further characters: as :data:`_NEXT` but ``$`` (``[A-Za-z0-9_\x80-\U0010ffff]``)."""
DOLLAR_TAG = re.compile(rf"\$(?:{_FIRST}{_TAG_NEXT}*)?\$")
IDENTIFIER = rf'(?:"(?:[^"]|"")+"|{_FIRST}{_NEXT}*)'
NAME = rf"{IDENTIFIER}(?:\s*\.\s*{IDENTIFIER})?"
"""A table's name as written: ``products``, ``shop.products``, ``"Order lines"``."""
WORD = re.compile(rf"{IDENTIFIER}|[()]")
COMMANDS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE"})
TARGETS = {
    "UPDATE": re.compile(rf"UPDATE\s+(?:ONLY\s+)?(?P<table>{NAME})", re.IGNORECASE),
    "DELETE": re.compile(rf"DELETE\s+FROM\s+(?:ONLY\s+)?(?P<table>{NAME})", re.IGNORECASE),
    "INSERT": re.compile(rf"INSERT\s+INTO\s+(?P<table>{NAME})", re.IGNORECASE),
}
LISTED_VALUES = re.compile(r"\s*(?:AS\s+\S+\s*)?(?:\([^()]*\)\s*)?(?:OVERRIDING\s+\w+\s+VALUE\s+)?(?:VALUES|DEFAULT)\b",
                           re.IGNORECASE)
"""What follows ``INSERT INTO t`` when the rows are written out, not read from a table."""


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


def _lexeme(sql: str, i: int) -> tuple[int, str]:
    """Where the lexeme at ``sql[i]`` ends and what it is: ``blank`` (white space or a comment), ``literal``
    (a string or a dollar-quoted body), ``identifier`` (double-quoted) or ``code`` (one other character)."""
    ch = sql[i]
    if sql.startswith("--", i):
        end = sql.find("\n", i)
        return (len(sql) if end < 0 else end + 1), "blank"
    if sql.startswith("/*", i):
        return _skip_block_comment(sql, i), "blank"
    if ch.isspace():
        return i + 1, "blank"
    if ch == "'":
        escaped = i > 0 and sql[i - 1] in "eE" and (i < 2 or not _identifier_char(sql[i - 2]))
        return _skip_quoted(sql, i, "'", backslash=escaped), "literal"
    if ch == '"':
        return _skip_quoted(sql, i, '"', backslash=False), "identifier"
    if ch == "$" and (i == 0 or not _identifier_char(sql[i - 1])) and (tag := DOLLAR_TAG.match(sql, i)):
        end = sql.find(tag.group(), tag.end())
        return (len(sql) if end < 0 else end + len(tag.group())), "literal"
    return i + 1, "code"


def split_statements(sql: str) -> list[Statement]:
    """The statements of a script, without empty or comment-only ones, each with the line it starts on."""
    statements: list[Statement] = []
    start = 0
    first_significant: int | None = None
    i = 0
    while i < len(sql):
        end, kind = _lexeme(sql, i)
        if kind != "blank" and first_significant is None:
            first_significant = i
        if kind == "code" and sql[i] == ";":
            _add(statements, sql, start, i, first_significant)
            start, first_significant = end, None
        i = end
    _add(statements, sql, start, len(sql), first_significant)
    return statements


def mask(sql: str) -> str:
    """The SQL with comments, string literals and dollar-quoted bodies blanked out (same length, line breaks
    kept), so that a search for keywords or for ``:batch_size`` cannot match text that is not code."""
    parts: list[str] = []
    i = 0
    while i < len(sql):
        end, kind = _lexeme(sql, i)
        text = sql[i:end]
        parts.append(re.sub(r"[^\n]", " ", text) if kind in ("blank", "literal") else text)
        i = end
    return "".join(parts)


def _add(statements: list[Statement], sql: str, start: int, end: int, first_significant: int | None) -> None:
    if first_significant is None or first_significant == end:  # nothing but blanks, comments or a lone ";"
        return
    text = sql[first_significant:end].rstrip()
    statements.append(Statement(text, sql.count("\n", 0, first_significant) + 1))


def table_key(name: str) -> tuple[str, ...]:
    """A written name the way PostgreSQL reads it: ``Shop."Items"`` is ``("shop", "Items")``."""
    return tuple(part[1:-1].replace('""', '"') if part.startswith('"') else part.lower()
                 for part in re.findall(IDENTIFIER, name))


def same_table(a: str, b: str) -> bool:
    """Whether two written names can be the same table (a name without a schema matches it in any schema)."""
    key_a, key_b = table_key(a), table_key(b)
    return key_a == key_b or (min(len(key_a), len(key_b)) == 1 and key_a[-1] == key_b[-1])


def top_level_words(code: str) -> Iterator[re.Match[str]]:
    """The words of masked code that are outside every parenthesis, in order (a subquery's are not)."""
    depth = 0
    for match in WORD.finditer(code):
        if match.group() == "(":
            depth += 1
        elif match.group() == ")":
            depth -= 1
        elif depth == 0:
            yield match


@dataclass(frozen=True, slots=True)
class DataStatement:
    command: str  # UPDATE, DELETE or INSERT (an INSERT that reads its rows from a query)
    table: str  # the table it changes rows of, as written
    limited: bool  # a LIMIT appears in it (in a subquery or a WITH: the statement changes a bounded batch)


def data_statement(sql: str) -> DataStatement | None:
    """What one statement changes rows of, if it is an UPDATE, a DELETE or an INSERT ... SELECT (a WITH before
    it included): the statements whose run time, and the row locks they hold, grow with a table."""
    code = mask(sql)
    words = top_level_words(code)
    main = next(words, None)
    if main is not None and main.group().upper() == "WITH":
        main = next((word for word in words if word.group().upper() in COMMANDS), None)
    pattern = TARGETS.get(main.group().upper()) if main is not None else None
    target = pattern.match(code, main.start()) if pattern is not None and main is not None else None
    if target is None or main is None:
        return None
    command = main.group().upper()
    after = code[target.end():]
    if command == "INSERT" and (LISTED_VALUES.match(after) or not re.search(r"\b(?:SELECT|TABLE)\b", after, re.I)):
        return None
    return DataStatement(command, target["table"], re.search(r"\bLIMIT\b", code, re.IGNORECASE) is not None)
