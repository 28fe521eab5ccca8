"""Which text a column type can never take: decided in Python, before any SQL, for the common types.

Every value reaches PostgreSQL as text cast to the column's type (``$1::text::integer``), so PostgreSQL's input
function has the last word. This module only answers the question the other way round: is this text *certainly*
refused? That is what lets a row filter's claim that cannot match its column be answered 403 before the query
(``query/sql.py``), with nothing of the column's type said.

Each check accepts a superset of what any supported PostgreSQL version takes (PostgreSQL 16 added ``0x1F`` and
``1_000`` to integer and numeric input), so "certainly refused" holds on every version; text the check lets
through may still be refused by an older server, and the caller maps that error instead. Types not listed here
(enums, domains, arrays, ranges, json...) are never judged.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SPACE = r"[ \t\n\r\v\f]*"  # PostgreSQL's isspace(), not Unicode's
_DIGITS = r"[0-9](?:_?[0-9])*"
_PREFIXED = r"0[xX]_?[0-9A-Fa-f](?:_?[0-9A-Fa-f])*|0[oO]_?[0-7](?:_?[0-7])*|0[bB]_?[01](?:_?[01])*"
INTEGER = re.compile(rf"{_SPACE}[+-]?(?:{_PREFIXED}|{_DIGITS}){_SPACE}", re.ASCII)
PLAIN_INTEGER = re.compile(rf"{_SPACE}[+-]?[0-9]+{_SPACE}", re.ASCII)
NUMBER = re.compile(
    rf"{_SPACE}[+-]?(?:{_PREFIXED}|(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][+-]?{_DIGITS})?"
    rf"|nan|inf|infinity){_SPACE}",
    re.ASCII | re.IGNORECASE,
)
PLAIN_DECIMAL = re.compile(rf"{_SPACE}[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+){_SPACE}", re.ASCII)
NUMERIC_TYPMOD = re.compile(r"numeric\((?P<precision>[0-9]+)(?:,(?P<scale>-?[0-9]+))?\)")
INTEGER_RANGES = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}
BOOLEAN_WORDS = ("true", "false", "yes", "no")
DATETIME_WORDS = frozenset({"epoch", "infinity", "+infinity", "-infinity", "now", "today", "tomorrow", "yesterday",
                            "allballs"})


def certainly_refused(value: str, column_type: str) -> bool:
    """Whether PostgreSQL's input function for ``column_type`` (as ``format_type`` spells it) refuses ``value``
    on every version; False whenever in doubt."""
    if "\x00" in value:  # no text input function takes NUL
        return True
    if column_type.endswith("[]"):
        return False
    if column_type in INTEGER_RANGES:
        return _integer_refused(value, INTEGER_RANGES[column_type])
    if column_type == "numeric" or column_type.startswith("numeric("):
        return _numeric_refused(value, column_type)
    if column_type in ("real", "double precision"):
        return NUMBER.fullmatch(value) is None
    if column_type == "uuid":
        return _uuid_refused(value)
    if column_type == "boolean":
        return _boolean_refused(value)
    if column_type == "date" or column_type.startswith(("timestamp", "time")):
        # every date or time has a digit, except PostgreSQL's special values
        return not re.search(r"[0-9]", value) and value.strip().lower() not in DATETIME_WORDS
    return False


def _integer_refused(value: str, bound: int) -> bool:
    if INTEGER.fullmatch(value) is None:
        return True
    if PLAIN_INTEGER.fullmatch(value) is None:
        return False  # 0x1F or 1_000: PostgreSQL 16 takes them, older versions do not
    number = int(value.strip())
    return not -bound <= number < bound


def _numeric_refused(value: str, column_type: str) -> bool:
    if NUMBER.fullmatch(value) is None:
        return True
    typmod = NUMERIC_TYPMOD.fullmatch(column_type)
    if typmod is None or PLAIN_DECIMAL.fullmatch(value) is None:
        return False
    precision, scale = int(typmod["precision"]), int(typmod["scale"] or 0)
    try:  # numeric(p, s) keeps at most p - s digits before the point once rounded to s places
        rounded = round(Decimal(value.strip()), scale)
    except InvalidOperation:
        return False
    return abs(rounded) >= Decimal(10) ** (precision - scale)


def _uuid_refused(value: str) -> bool:
    text = value.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    if text.startswith("-") or text.endswith("-"):
        return True
    return re.fullmatch(r"[0-9A-Fa-f]{32}", text.replace("-", ""), re.ASCII) is None


def _boolean_refused(value: str) -> bool:
    text = value.strip(" \t\n\r\v\f").lower()
    if text in ("1", "0", "on", "of", "off"):
        return False
    return not text or not any(word.startswith(text) for word in BOOLEAN_WORDS)
