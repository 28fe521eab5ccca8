"""A position in one query parameter's text: what the small grammars of PostgREST's query string share.

Each parameter (``select``, ``order``, a filter's key, a logic tree, ``columns``) is read by a small recursive
grammar of its own (:mod:`gatehouse.query.grammar`, :mod:`gatehouse.query.conditions`); all of them read names,
quoted or bare, and JSON paths the same way, bound them the same way, and word a syntax error as PostgREST does,
with the column where it was found.
"""

from __future__ import annotations

import re

from gatehouse.errors import QueryParseError
from gatehouse.query.tree import Arrow, Field

MAX_DEPTH = 8
"""Levels of embedding, of a logic tree, of an embed path, and steps of a JSON path, each at most."""
MAX_NAME_BYTES = 63  # what PostgreSQL keeps of an identifier
_NAME_STOP = set(',.:*()"!{}')
FIELD_NAME = "field name (* or [a..z0..9_$])"
"""What PostgREST's parser says it expected where a column name must start."""


class Cursor:
    """A position in one parameter's text, with the helpers the small grammars share."""

    def __init__(self, text: str, what: str, shift: int = 0) -> None:
        self.text, self.pos, self.what = text, 0, what
        self.shift = shift
        """Columns before ``text`` in what PostgREST parses: a logic tree's ``or``, ``not.and``... (PostgREST
        parses ``or=(a.eq.1)`` as ``or(a.eq.1)``, so its columns count from the operator)."""

    def error(self, expected: str, quote: str = "'") -> QueryParseError:
        """PostgREST's 400 for a syntax error here. ``quote``: how its parser quotes the character found, ``'``
        after a keyword or ``"`` where a single character was expected (a name's first, a parenthesis)."""
        found = f"{quote}{self.text[self.pos]}{quote}" if self.pos < len(self.text) else "end of input"
        return QueryParseError(
            f'"failed to parse {self.what} ({self.text})" (line 1, column {self.shift + self.pos + 1})',
            details=f"unexpected {found} expecting {expected}",
        )

    def at_name(self) -> bool:
        """Could a name start here?"""
        return not self.done and (self.text[self.pos] == '"' or self.text[self.pos] not in _NAME_STOP)

    def peek(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def take(self, token: str) -> bool:
        if self.peek(token):
            self.pos += len(token)
            return True
        return False

    def expect(self, token: str) -> None:
        if not self.take(token):
            raise self.error(repr(token))

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    @property
    def done(self) -> bool:
        return self.pos >= len(self.text)

    def name(self) -> str:
        """An identifier: double-quoted (backslash escapes), or a run without reserved characters."""
        if self.take('"'):
            out: list[str] = []
            while not self.done and self.text[self.pos] != '"':
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            self.expect('"')
            return self.checked("".join(out))
        start = self.pos
        while not self.done:
            char = self.text[self.pos]
            if char in _NAME_STOP or (char == "-" and self.text.startswith("->", self.pos)):
                break
            self.pos += 1
        name = self.text[start:self.pos].strip()
        if not name:
            self.pos = start
            raise self.error("a column or relation name")
        return self.checked(name)

    def checked(self, name: str) -> str:
        """Names become quoted SQL identifiers (aliases) or bound JSON keys: no control characters, and no
        longer than PostgreSQL keeps an identifier."""
        if any(ord(char) < 32 for char in name) or len(name.encode()) > MAX_NAME_BYTES:
            raise QueryParseError(f'"failed to parse {self.what}"',
                                  details=f"a name may not hold control characters or exceed {MAX_NAME_BYTES} bytes")
        return name

    def field(self) -> Field:
        column = self.name()
        path: list[tuple[Arrow, str]] = []
        while self.peek("->"):
            arrow: Arrow = "->>" if self.take("->>") else "->"
            if arrow == "->":
                self.expect("->")
            if self.take("-"):
                path.append((arrow, "-" + self._digits()))
            else:
                path.append((arrow, self.name()))
            if len(path) > MAX_DEPTH:
                raise QueryParseError("JSON path too deep", details=f"at most {MAX_DEPTH} steps")
        return Field(column, tuple(path))

    def _digits(self) -> str:
        match = re.match(r"[0-9]+", self.text[self.pos:])
        if match is None:
            raise self.error("digits")
        self.pos += match.end()
        return match.group(0)
