"""PostgREST's query-string grammar → :class:`ReadQuery`.

Decoding follows PostgREST: percent-decoding with ``+`` as a space. Reserved keys are ``select``,
``columns``, ``on_conflict``, and any key whose last dotted part is ``order``, ``limit``, ``offset``,
``and`` or ``or`` (the dotted prefix names an embedded resource). Every other key is a filter whose value
reads ``[not.]<operator>[(any|all|<language>)].<value>`` (:mod:`gatehouse.query.conditions`, which also reads
the logic trees). Repeated filters are ANDed.

Errors are 400 ``PGRST100`` with PostgREST's wording where a client might match on it. Every list and
depth is bounded, so no request can make the parser work without limit.

What PostgREST would take by guessing is refused instead: a query string that is not UTF-8 once
percent-decoded (400, as the server already refuses it on the wire, so the ASGI path and a logic function's
``ctx.read(query=...)`` behave the same), a negative ``offset`` or embedded ``limit``, a ``limit`` or ``offset``
that is not a whole number, and anything after the column list of ``columns`` or ``on_conflict``. A negative
top-level ``limit`` is PostgREST's own 416 ``PGRST103``, once the whole query string has parsed (a syntax error
anywhere in it is the 400 PostgREST answers first).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal, cast
from urllib.parse import parse_qsl

from gatehouse.errors import (
    ApiKeyInUrl,
    InvalidUrlEncoding,
    NotImplementedFeature,
    QueryParseError,
    RangeNotSatisfiable,
)
from gatehouse.query.conditions import MAX_CONDITIONS, parse_logic, parse_operation
from gatehouse.query.cursor import FIELD_NAME, MAX_DEPTH, Cursor
from gatehouse.query.tree import (
    ColumnItem,
    EmbedItem,
    Field,
    Level,
    OrderTerm,
    ReadQuery,
    SelectItem,
    StarItem,
)

RESERVED = frozenset({"select", "columns", "on_conflict"})
LEVEL_KEYS = frozenset({"order", "limit", "offset"})
MAX_SELECT_ITEMS = 300
TYPE_NAME = re.compile(r"^(?P<base>[a-z][a-z0-9 ]*?)(\([0-9]{1,4}(,[0-9]{1,4})?\))?(\[\])*$")
# Casts are limited to plain data types: reg* types (regclass, regrole, ...) would turn numbers and strings into
# catalog lookups and tell the caller about tables, schemas and roles it must not see.
CAST_TYPES = frozenset({
    "text", "varchar", "character varying", "char", "character", "name", "citext",
    "smallint", "integer", "int", "bigint", "int2", "int4", "int8", "numeric", "decimal", "real", "float4",
    "double precision", "float8", "float", "money", "boolean", "bool",
    "date", "time", "timetz", "time with time zone", "time without time zone", "timestamp", "timestamptz",
    "timestamp with time zone", "timestamp without time zone", "interval",
    "uuid", "json", "jsonb", "bytea", "inet", "cidr", "macaddr", "tsvector", "int4range", "int8range", "numrange",
    "daterange", "tsrange", "tstzrange",
})


# --- select ------------------------------------------------------------------------------------


def _select_items(cursor: Cursor, depth: int) -> tuple[SelectItem, ...]:
    if depth > MAX_DEPTH:
        raise QueryParseError("select nests too deep", details=f"at most {MAX_DEPTH} levels of embedding")
    items: list[SelectItem] = []
    while True:
        cursor.skip_spaces()
        if cursor.peek(")") or cursor.done:
            break
        items.append(_select_item(cursor, depth))
        if len(items) > MAX_SELECT_ITEMS:
            raise QueryParseError("too many select items", details=f"at most {MAX_SELECT_ITEMS}")
        cursor.skip_spaces()
        if not cursor.take(","):
            break
    return tuple(items)


def _select_item(cursor: Cursor, depth: int) -> SelectItem:
    if cursor.take("*"):
        return StarItem()
    if cursor.peek("..."):
        raise NotImplementedFeature("Feature not implemented", details="spread embeds (...) are not supported")
    alias: str | None = None
    start = cursor.pos
    first = cursor.name()
    if cursor.peek(":") and not cursor.peek("::"):
        cursor.expect(":")
        alias = first
        start = cursor.pos
    else:
        cursor.pos = start
    name_start = cursor.pos
    relation = cursor.name()
    hints: list[str] = []
    while cursor.take("!"):
        hints.append(cursor.name())
    if cursor.take("("):
        inner = "inner" in hints
        named = [h for h in hints if h not in ("inner", "left")]
        if len(named) > 1:
            raise cursor.error("one !hint")
        items = _select_items(cursor, depth + 1)
        cursor.expect(")")
        return EmbedItem(relation, alias, named[0] if named else None, inner, items)
    if hints:
        raise cursor.error("'(' after an embed hint")
    cursor.pos = name_start
    del start
    field = cursor.field()
    type_name: str | None = None
    if cursor.take("::"):
        type_start = cursor.pos
        while not cursor.done and cursor.text[cursor.pos] not in ",)":
            cursor.pos += 1
        type_name = cursor.text[type_start:cursor.pos].strip().lower()
        match = TYPE_NAME.match(type_name)
        if not match or match.group("base").strip() not in CAST_TYPES:
            raise QueryParseError(f'"failed to parse select ({cursor.text})"',
                                  details=f"{type_name!r} is not a type a column can be cast to",
                                  hint="Cast to a plain data type: text, integer, numeric, date, jsonb, ...")
    return ColumnItem(field, alias, type_name)


def parse_select(raw: str) -> tuple[SelectItem, ...]:
    cursor = Cursor(raw, "select")
    items = _select_items(cursor, 0)
    cursor.skip_spaces()
    if not cursor.done:
        raise cursor.error('"," or end of input')
    return items or (StarItem(),)


# --- order, limit, offset --------------------------------------------------------------------------


def parse_order(raw: str) -> tuple[OrderTerm, ...]:
    cursor = Cursor(raw, "order")
    terms: list[OrderTerm] = []
    while True:
        cursor.skip_spaces()
        relation: str | None = None
        start = cursor.pos
        name = cursor.name()
        if cursor.take("("):
            relation = name
            field = cursor.field()
            cursor.expect(")")
        else:
            cursor.pos = start
            field = cursor.field()
        descending = False
        nulls: Literal["first", "last"] | None = None
        while cursor.take("."):
            if cursor.take("asc"):
                descending = False
            elif cursor.take("desc"):
                descending = True
            elif cursor.take("nullsfirst"):
                nulls = "first"
            elif cursor.take("nullslast"):
                nulls = "last"
            else:
                raise cursor.error('"asc", "desc", "nullsfirst" or "nullslast"')
        terms.append(OrderTerm(field, descending, nulls, relation))
        if cursor.done:
            return tuple(terms)
        if not cursor.take(","):
            raise cursor.error('"," or end of input')


NEGATIVE_LIMIT = re.compile(r"\s*-[0-9]{1,18}\s*", re.ASCII)
COUNT = re.compile(r"\s*[0-9]{1,18}\s*", re.ASCII)
"""A limit or an offset, with ASCII white space around it at most: ``str.strip`` and a Unicode ``\\s`` also take
the separators U+001C-U+001F, which ``int`` refuses (a 500 where a 400 belongs)."""


def negative_limit() -> RangeNotSatisfiable:
    """PostgREST's 416 for a negative top-level ``limit``."""
    return RangeNotSatisfiable("Requested range not satisfiable",
                               details="Limit should be greater than or equal to zero.")


def _count(name: str, raw: str) -> int:
    """A limit or an offset: a whole number, at least 0 (PostgREST ignores a negative offset, which no one can
    mean; a negative top-level limit is its 416, :func:`negative_limit`)."""
    if COUNT.fullmatch(raw) is None:
        raise QueryParseError(f'"failed to parse {name}" ({raw})',
                              details=f"{name} must be a whole number, 0 or more")
    return int(raw)


def _key(key: str) -> tuple[tuple[str, ...], Field]:
    """``a.b.col->x`` → (("a", "b"), Field("col", ...)): the embed path, then the field it names."""
    cursor = Cursor(key, "parameter")
    path: list[str] = []
    while True:
        field = cursor.field()
        if field.json_path or not cursor.take("."):
            break
        path.append(field.column)
        if len(path) > MAX_DEPTH:
            raise QueryParseError("embed path too deep", details=f"at most {MAX_DEPTH} levels")
    if not cursor.done:
        raise cursor.error("end of the parameter name")
    return tuple(path), field


def _level_parameter(level: Level, name: str, value: str) -> None:
    if name == "order":
        level.order = parse_order(value)
    elif name == "limit":
        level.limit = _count("limit", value)
    else:
        level.offset = _count("offset", value)


_LIST_NAME = re.compile(r"[\w $-]+")
"""An unquoted name in ``columns`` or ``on_conflict``: letters, digits, ``_``, ``$``, ``-`` and spaces, as PostgREST
reads it; anything else must be double-quoted."""


def _names(value: str, what: str) -> tuple[str, ...]:
    """``a,b,"c d"``: the column list of ``columns`` or ``on_conflict``, and nothing after it (at least one name:
    a blank list is PostgREST's 400)."""
    cursor = Cursor(value, f"{what} parameter")
    names: list[str] = []
    while True:
        cursor.skip_spaces()
        if cursor.peek('"'):
            names.append(cursor.name())
        else:
            match = _LIST_NAME.match(cursor.text, cursor.pos)
            if match is None or not match.group(0).strip():
                raise cursor.error(FIELD_NAME, quote='"')
            cursor.pos = match.end()
            names.append(cursor.checked(match.group(0).strip()))
        cursor.skip_spaces()
        if cursor.done:
            return tuple(dict.fromkeys(names))  # a set of columns, as PostgREST reads it: each once
        if not cursor.take(","):
            raise cursor.error('"," or end of input')


def query_pairs(query_string: str) -> list[tuple[str, str]]:
    """The decoded ``(key, value)`` pairs of a query string, blank values kept (as ``parse_qsl`` gives them).

    Most query strings hold nothing to decode (``id=eq.17``): those are split directly, at a fraction of
    ``parse_qsl``'s cost. Percent-escapes that do not decode to UTF-8 are refused (400), never replaced."""
    if "%" in query_string or "+" in query_string:
        try:
            return parse_qsl(query_string, keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise InvalidUrlEncoding("The query string is not valid UTF-8 once percent-decoded",
                                     hint="Percent-encode the UTF-8 bytes of each character.") from None
    pairs: list[tuple[str, str]] = []
    for pair in query_string.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            pairs.append((name, value))
    return pairs


def parse_query(query_string: str) -> ReadQuery:
    return parse_pairs(query_pairs(query_string))


def parse_pairs(pairs: Iterable[tuple[str, str]]) -> ReadQuery:
    """The query tree of already percent-decoded ``(key, value)`` pairs, in query string order."""
    query = ReadQuery()
    budget = [MAX_CONDITIONS]
    negative = False  # the last top-level limit was negative: 416 once everything else has parsed
    for key, value in pairs:
        if key in ("apikey", "api_key"):
            raise ApiKeyInUrl("API keys are not accepted in the URL",
                              hint="URLs end up in logs and browser history: send the key in the 'apikey' header")
        if key == "select":
            query.select = parse_select(value)
        elif key == "columns":
            query.columns = _names(value, "columns")
        elif key == "on_conflict":
            query.on_conflict = _names(value, "on_conflict")
        else:
            path, field = _key(key)
            last = field.column if not field.json_path else ""
            negated = bool(path) and path[-1] == "not" and last in ("and", "or")
            level = query.level(path[:-1] if negated else path)
            if last in LEVEL_KEYS:
                if last == "limit" and not path:
                    negative = NEGATIVE_LIMIT.fullmatch(value) is not None and int(value) < 0
                    if negative:
                        continue
                _level_parameter(level, last, value)
            elif last in ("and", "or"):
                level.where.append(parse_logic(cast(Literal["and", "or"], last), value, negated, budget))
            elif value != "":
                budget[0] -= 1
                if budget[0] < 0:
                    raise QueryParseError("too many filters", details=f"at most {MAX_CONDITIONS} per request")
                level.where.append(parse_operation(field, value, "filter"))
    if negative:
        raise negative_limit()
    return query
