"""Conditions: a filter's value (``[not.]<operator>[(any|all|<language>)].<value>``) and the logic trees of ``and``
and ``or`` (``or=(a.eq.1,and(b.gt.2,c.is.null))``), as PostgREST reads them.

Each list, each tree's depth and the conditions of a whole request are bounded (``budget``: what the request may
still hold), so no query string makes the parser work without limit.
"""

from __future__ import annotations

import re
from typing import Literal, cast

from gatehouse.errors import QueryParseError
from gatehouse.query.cursor import FIELD_NAME, MAX_DEPTH, Cursor
from gatehouse.query.tree import IS_VALUES, OPERATORS, QUANTIFIABLE, Condition, Field, Filter, Logic

MAX_LIST_ITEMS = 1000
MAX_CONDITIONS = 200
"""Filters and logic tree conditions of one request, together."""
LOGIC_ITEM = f"{FIELD_NAME}, negation operator (not) or logic operator (and, or)"
"""What PostgREST's parser says it expected where a condition of a logic tree must start."""


def _list_values(raw: str, what: str) -> tuple[str, ...]:
    """``(a,"b,c",d)`` → values; quotes group and are removed, backslash escapes inside quotes."""
    if not (raw.startswith("(") and raw.endswith(")")):
        raise QueryParseError(f'"failed to parse {what} ({raw})"', details="expecting a list: (a,b,c)")
    body = raw[1:-1]
    if body == "":
        return ()
    values: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(body):
        char = body[i]
        if quoted and char == "\\" and i + 1 < len(body):
            current.append(body[i + 1])
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            values.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    if quoted:
        raise QueryParseError(f'"failed to parse {what} ({raw})"', details='a " is not closed')
    values.append("".join(current))
    if len(values) > MAX_LIST_ITEMS:
        raise QueryParseError("too many values in a list", details=f"at most {MAX_LIST_ITEMS}")
    return tuple(values)


def parse_operation(field: Field, raw: str, what: str) -> Filter:
    """``[not.]op[(modifier)].value`` applied to ``field``."""
    negated = raw.startswith("not.")
    text = raw[4:] if negated else raw
    match = re.match(r"^([a-z]+)(?:\(([A-Za-z_][A-Za-z0-9_]*)\))?\.", text)
    if match is None or match.group(1) not in OPERATORS:
        raise QueryParseError(
            f'"failed to parse {what} ({raw})" (line 1, column 1)',
            details=f'unexpected "{raw[:1]}" expecting "not" or operator (eq, gt, ...)',
        )
    operator, modifier = match.group(1), match.group(2)
    value = text[match.end():]
    quantifier: Literal["any", "all"] | None = None
    language: str | None = None
    if modifier is not None:
        if operator.endswith("fts"):
            language = modifier
        elif modifier in ("any", "all") and operator in QUANTIFIABLE:
            quantifier = cast(Literal["any", "all"], modifier)
        else:
            raise QueryParseError(f'"failed to parse {what} ({raw})"',
                                  details=f"({modifier}) cannot modify {operator}")
    if operator == "in":
        return Filter(field, "in", _list_values(value, what), negated)
    if operator == "is":
        if value.lower() not in IS_VALUES:
            raise QueryParseError(f'"failed to parse {what} ({raw})"',
                                  details="is takes one of: null, not_null, true, false, unknown")
        return Filter(field, "is", value.lower(), negated)
    if operator in ("like", "ilike"):
        value = value.replace("*", "%")
    return Filter(field, operator, value, negated, quantifier, language)


def logic_value_end(text: str, start: int) -> int:
    """End of a value inside and(...)/or(...): the next top-level ',' or ')', quotes and braces taken whole."""
    depth_paren = depth_brace = 0
    quoted = False
    i = start
    while i < len(text):
        char = text[i]
        if quoted:
            if char == "\\":
                i += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "{":
            depth_brace += 1
        elif char == "}":
            depth_brace -= 1
        elif char == "(":
            depth_paren += 1
        elif char == ")":
            if depth_paren == 0 and depth_brace == 0:
                return i
            depth_paren -= 1
        elif char == "," and depth_paren == 0 and depth_brace == 0:
            return i
        i += 1
    return i


def _unquote_value(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _logic_children(cursor: Cursor, depth: int, budget: list[int]) -> tuple[Condition, ...]:
    if depth > MAX_DEPTH:
        raise QueryParseError("logic tree too deep", details=f"at most {MAX_DEPTH} levels")
    cursor.expect("(")
    children: list[Condition] = []
    while True:
        budget[0] -= 1
        if budget[0] < 0:
            raise QueryParseError("too many conditions", details=f"at most {MAX_CONDITIONS} per request")
        cursor.skip_spaces()
        negated = cursor.peek("not.and(") or cursor.peek("not.or(")
        if negated:
            cursor.expect("not.")
        group = next((g for g in ("and", "or") if cursor.peek(g + "(")), None)
        if group is not None:
            cursor.expect(group)
            children.append(Logic(cast(Literal["and", "or"], group), _logic_children(cursor, depth + 1, budget),
                                  negated))
        else:
            if not cursor.at_name():
                raise cursor.error(LOGIC_ITEM, quote='"')
            field = cursor.field()
            cursor.expect(".")
            end = logic_value_end(cursor.text, cursor.pos)
            operation = cursor.text[cursor.pos:end]
            cursor.pos = end
            parsed = parse_operation(field, operation, "logic tree")
            if isinstance(parsed.value, str) and parsed.operator != "is":
                parsed = Filter(parsed.field, parsed.operator, _unquote_value(parsed.value), parsed.negated,
                                parsed.quantifier, parsed.language)
            children.append(parsed)
        if cursor.take(")"):
            return tuple(children)
        cursor.expect(",")


def parse_logic(operator: Literal["and", "or"], raw: str, negated: bool, budget: list[int]) -> Logic:
    cursor = Cursor(raw, "logic tree", len(operator) + (4 if negated else 0))
    children = _logic_children(cursor, 0, budget)
    if not cursor.done:
        raise cursor.error("end of input")
    return Logic(operator, children, negated)
