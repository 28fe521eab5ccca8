"""PostgREST's query-string grammar → :class:`ReadQuery`.

Decoding follows PostgREST: percent-decoding with ``+`` as a space. Reserved keys are ``select``,
``order``, ``limit``, ``offset`` (and, for writes, ``columns`` and ``on_conflict``); every other key is a
filter whose value reads ``[not.]<operator>.<value>``. Repeated filters are ANDed.

Errors are 400 ``PGRST100`` with PostgREST's wording where a client might match on it.
"""

from __future__ import annotations

import re
from typing import Literal, cast, get_args
from urllib.parse import parse_qsl

from gatehouse.errors import ApiError, QueryParseError, RangeNotSatisfiable
from gatehouse.query.tree import Filter, IsValue, Operator, OrderTerm, ReadQuery, SelectItem

OPERATORS: frozenset[str] = frozenset(get_args(Operator))
IS_VALUES: frozenset[str] = frozenset(get_args(IsValue))
RESERVED = frozenset({"select", "order", "limit", "offset", "columns", "on_conflict"})
NOT_YET = frozenset({"and", "or", "not.and", "not.or"})
UNQUOTED_NAME = re.compile(r"^[^,.:*()\"]+$")
MAX_LIST_ITEMS = 1000
MAX_FILTERS = 100


def _unquote_name(raw: str, what: str) -> str:
    text = raw.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    if not text or not UNQUOTED_NAME.match(text):
        raise QueryParseError(f'"failed to parse {what}" ({raw})',
                              details=f"unexpected {raw!r}: expected a column name",
                              hint='Quote names that contain , . : * ( ) with double quotes')
    return text


def split_list(text: str) -> list[str]:
    """Split on top-level commas, keeping double-quoted parts (with backslash escapes) whole."""
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\" and quoted:
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise QueryParseError('"failed to parse list" (unterminated quote)', details="a \" is not closed")
    items.append("".join(current))
    return items


def _in_values(raw: str) -> tuple[str, ...]:
    if not (raw.startswith("(") and raw.endswith(")")):
        raise QueryParseError(f'"failed to parse filter (in.{raw})"',
                              details="the in operator takes a list: in.(1,2,3)")
    body = raw[1:-1]
    if body == "":
        return ()
    values: list[str] = []
    for item in split_list(body):
        if len(item) >= 2 and item[0] == '"' and item[-1] == '"':
            values.append(re.sub(r"\\(.)", r"\1", item[1:-1]))
        else:
            values.append(item)
    if len(values) > MAX_LIST_ITEMS:
        raise QueryParseError("too many values in an in list", details=f"at most {MAX_LIST_ITEMS} values")
    return tuple(values)


def parse_filter(column: str, raw: str) -> Filter:
    negated = raw.startswith("not.")
    text = raw[4:] if negated else raw
    operator, dot, value = text.partition(".")
    if not dot or operator not in OPERATORS:
        raise QueryParseError(
            f'"failed to parse filter ({raw})" (line 1, column 1)',
            details=f'unexpected "{raw[:1]}" expecting "not" or operator ({", ".join(sorted(OPERATORS))})',
        )
    name = _unquote_name(column, "filter")
    if operator == "in":
        return Filter(name, "in", _in_values(value), negated)
    if operator == "is":
        lowered = value.lower()
        if lowered not in IS_VALUES:
            raise QueryParseError(f'"failed to parse filter ({raw})"',
                                  details="is takes one of: null, not_null, true, false, unknown")
        return Filter(name, "is", lowered, negated)
    if operator in ("like", "ilike"):
        value = value.replace("*", "%")
    return Filter(name, cast(Operator, operator), value, negated)


def parse_select(raw: str) -> tuple[SelectItem, ...] | None:
    if raw.strip() in ("", "*"):
        return None
    items: list[SelectItem] = []
    for part in split_list(raw):
        if part.strip() == "*":
            raise QueryParseError('"failed to parse select"', details="* cannot be mixed with other columns yet")
        alias: str | None = None
        if ":" in part and not part.strip().startswith('"'):
            alias_raw, _, part = part.partition(":")
            alias = _unquote_name(alias_raw, "select")
        items.append(SelectItem(_unquote_name(part, "select"), alias))
    return tuple(items)


def _name_and_modifiers(part: str) -> tuple[str, list[str]]:
    """``name.mod.mod`` → (name, mods); a double-quoted name may itself contain dots."""
    if part.startswith('"'):
        match = re.match(r'^"(?:[^"\\]|\\.)*"', part)
        if match is None:
            raise QueryParseError('"failed to parse order"', details='a " is not closed')
        return match.group(0), [m for m in part[match.end():].split(".") if m]
    name, *modifiers = part.split(".")
    return name, modifiers


def parse_order(raw: str) -> tuple[OrderTerm, ...]:
    terms: list[OrderTerm] = []
    for part in split_list(raw):
        column, modifiers = _name_and_modifiers(part)
        descending = False
        nulls: Literal["first", "last"] | None = None
        for modifier in modifiers:
            if modifier in ("asc", "desc"):
                descending = modifier == "desc"
            elif modifier in ("nullsfirst", "nullslast"):
                nulls = "first" if modifier == "nullsfirst" else "last"
            else:
                raise QueryParseError(
                    f'"failed to parse order ({raw})"',
                    details=f"unexpected {modifier!r}: expecting asc, desc, nullsfirst or nullslast",
                )
        terms.append(OrderTerm(_unquote_name(column, "order"), descending, nulls))
    return tuple(terms)


def _integer(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise QueryParseError(f'"failed to parse {name}" ({raw})', details=f"{name} must be an integer") from None
    return value


def parse_read(query_string: str) -> ReadQuery:
    select: tuple[SelectItem, ...] | None = None
    filters: list[Filter] = []
    order: tuple[OrderTerm, ...] = ()
    limit: int | None = None
    offset = 0
    names: list[str] = []
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        names.append(key)
        if key == "select":
            select = parse_select(value)
        elif key == "order":
            order = parse_order(value)
        elif key == "limit":
            limit = _integer("limit", value)
            if limit < 0:
                raise RangeNotSatisfiable("Requested range not satisfiable",
                                          details="Limit should be greater than or equal to zero.")
        elif key == "offset":
            offset = max(0, _integer("offset", value))
        elif key in ("apikey", "api_key"):
            raise ApiError("API keys are not accepted in the URL", code="GH400",
                           hint="URLs end up in logs and browser history: send the key in the 'apikey' header")
        elif key in RESERVED:
            continue
        elif key in NOT_YET or "." in key:
            raise ApiError("Feature not implemented", code="PGRST127",
                           details=f"'{key}' (logical trees and embedded resources) is not supported yet")
        elif value != "":
            filters.append(parse_filter(key, value))
    if len(filters) > MAX_FILTERS:
        raise QueryParseError("too many filters", details=f"at most {MAX_FILTERS} filters per request")
    return ReadQuery(select=select, filters=tuple(filters), order=order, limit=limit, offset=offset,
                     params=tuple(names))
