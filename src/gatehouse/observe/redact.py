"""Values out of audited query strings: names and operators kept, values replaced by ``***``.

``id=eq.5&name=in.(a,b)&select=id,name`` is recorded as ``id=eq.***&name=in.***&select=id,name``: the audit
says what was asked without keeping what the caller searched for. It never raises and bounds its output.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_plus

from gatehouse.query.conditions import logic_value_end
from gatehouse.query.tree import IS_VALUES, OPERATORS

MAX_QUERY_CHARS = 2000
MASK = "***"

_KEPT = frozenset({"select", "columns", "on_conflict"})
_KEPT_LAST = frozenset({"order", "limit", "offset"})
_OPERATION = re.compile(r"(not\.)?([a-z]+)(\([A-Za-z_][A-Za-z0-9_]*\))?\.")
_LEAF = re.compile(r'\s*((?:"(?:[^"\\]|\\.)*"|[^."\s])+)\.')
_GROUP = re.compile(r"\s*((?:not\.)?(?:and|or))\(")
_SAFE = "!$'()*+,-./:;=@_~<>[]{}|^\""
_SECRET = re.compile(r"gh_[a-z0-9]{10}_")  # a gatehouse key pasted where it does not belong
_MAX_INPUT = 65536
_MAX_DEPTH = 10


class _Unparsable(Exception):
    pass


def _show(text: str) -> str:
    """Decoded text, with only what would be ambiguous in a query string (``&``, ``%``, spaces…) escaped."""
    return quote(text, safe=_SAFE)


def _operation(value: str) -> str:
    """``[not.]op[(mod)].value`` → the operation with the value masked (``is`` keeps its keyword)."""
    match = _OPERATION.match(value)
    if match is None or match.group(2) not in OPERATORS:
        return MASK
    rest = value[match.end():]
    return match.group(0) + (rest.lower() if match.group(2) == "is" and rest.lower() in IS_VALUES else MASK)


def _logic(text: str, pos: int, depth: int) -> tuple[str, int]:
    """``(child,child,…)`` starting at ``pos`` → its redacted text and the position after it."""
    if depth > _MAX_DEPTH or not text.startswith("(", pos):
        raise _Unparsable
    pos += 1
    parts: list[str] = []
    while True:
        group = _GROUP.match(text, pos)
        if group is not None:
            inner, pos = _logic(text, group.end() - 1, depth + 1)
            parts.append(group.group(1) + inner)
        else:
            end = logic_value_end(text, pos)
            leaf = _LEAF.match(text, pos, end)
            if leaf is None:
                raise _Unparsable
            parts.append(_show(leaf.group(1)) + "." + _operation(text[leaf.end():end]))
            pos = end
        if text.startswith(",", pos):
            pos += 1
        elif text.startswith(")", pos):
            return "(" + ",".join(parts) + ")", pos + 1
        else:
            raise _Unparsable


def _parameter(raw: str) -> str:
    raw_key, has_value, raw_value = raw.partition("=")
    key = unquote_plus(raw_key, errors="replace")
    value = unquote_plus(raw_value, errors="replace")
    if not has_value or _SECRET.search(key) or _SECRET.search(value):
        return MASK if not has_value or _SECRET.search(key) else f"{_show(key)}={MASK}"
    last = key.rsplit(".", 1)[-1]
    try:
        if key in _KEPT or last in _KEPT_LAST:
            shown = _show(value)
        elif last in ("and", "or"):
            shown, end = _logic(value, 0, 0)
            if value[end:].strip():
                raise _Unparsable
        else:
            shown = _operation(value)
    except (_Unparsable, RecursionError):
        shown = MASK
    return f"{_show(key)}={shown}"


def redact_query(query_string: str) -> str:
    """The query string with every filter value replaced by ``***``; names, operators, ``select``, ``order``,
    ``limit``, ``offset``, ``columns`` and ``on_conflict`` kept. At most 2000 characters; never raises."""
    try:
        parts: list[str] = []
        size = 0
        for raw in query_string[:_MAX_INPUT].split("&"):
            if raw:
                parts.append(_parameter(raw))
                size += len(parts[-1]) + 1
                if size > MAX_QUERY_CHARS:
                    break
        text = "&".join(parts)
    except Exception:  # a redaction bug must not cost the request or leak a value
        return MASK
    return text if len(text) <= MAX_QUERY_CHARS else text[: MAX_QUERY_CHARS - 1] + "…"


