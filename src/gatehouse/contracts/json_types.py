"""What JSON a column's PostgreSQL type emits, and whether changing a column's type is a widening.

gatehouse writes rows the way PostgreSQL's ``to_json`` does (``json_agg``, ``row_to_json``), so all a reader of
a contract ever sees of a column is the JSON its type emits: whole numbers, decimals (``numeric``: ``"NaN"``
as a string), floats, strings, ``true``/``false``, a JSON value (``json``, ``jsonb``), an array of those.
A change of type is *compatible*, a widening, when

1. every value the old type could hold is emitted identically by the new one: the same JSON type and value,
   and a whole number stays a whole number (``42``, not ``42.00``, which a client decoding an integer
   refuses: Go's ``int``, Rust's ``i64``), and
2. every value a writer could send before is still accepted, and the filters that worked still work.

The new type may hold *more* (bigint's larger numbers, longer strings): a widening only adds values.

:data:`RULES` are tried in order and the first that applies decides (the table in
:mod:`gatehouse.contracts.compat` lists them); an array type follows its elements' rule (``integer[]`` →
``bigint[]`` as ``integer`` → ``bigint``). Whatever no rule knows is breaking: a wrong "breaking" costs a
false alarm, a wrong "compatible" costs an app. Types are read as ``format_type()`` spells them:
``integer``, ``numeric(10,2)``, ``character varying(50)``, ``timestamp(3) with time zone``, ``integer[]``.
Each rule is checked against a real PostgreSQL in ``tests/test_compat_types.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

INTEGER_DIGITS = {"smallint": 5, "integer": 10, "bigint": 19}
"""Decimal digits of each integer type's largest value: numeric(p,0) holds them all when p is at least this."""

FLOATS = frozenset({"real", "double precision"})
EXACT_IN_FLOAT = frozenset({("smallint", "real"), ("smallint", "double precision"), ("integer", "double precision")})
"""Whole numbers that a float holds exactly *and* writes the same (``32767``; ``2147483647`` as ``real`` is
``2.1474836e+09``)."""

VARYING = frozenset({"character varying", "text"})
CHARACTER = "character"
DATE_TIMES = frozenset({"timestamp without time zone", "timestamp with time zone", "time without time zone",
                        "time with time zone"})
"""Types with a precision of fractional seconds (6 when ``format_type`` writes none)."""
DATE = "date"
DEFAULT_SECONDS_PRECISION = 6

_SPELLING = re.compile(r"^(?P<head>[a-z ]+?)\s*\((?P<args>-?\d+(?:\s*,\s*-?\d+)*)\)(?P<tail>[a-z ]*)$")


@dataclass(frozen=True, slots=True)
class PgType:
    """A type as ``format_type()`` spells it, split: ``timestamp(3) with time zone`` is
    ``PgType("timestamp with time zone", (3,))``. A name no pattern knows (a domain, an enum, ``public."T"``)
    is kept whole, so it only ever equals itself."""

    name: str
    modifiers: tuple[int, ...] = ()
    array: bool = False

    @property
    def element(self) -> PgType:
        return PgType(self.name, self.modifiers)


def parse_type(spelling: str) -> PgType:
    text = spelling.strip()
    array = text.endswith("[]")  # format_type writes every array, of any dimension, with one []
    text = text.removesuffix("[]")
    match = _SPELLING.match(text)
    if match is None:
        return PgType(text, (), array)
    name = f"{match['head'].strip()}{match['tail'].rstrip()}"
    return PgType(name, tuple(int(arg) for arg in match["args"].split(",")), array)


def emits(spelling: str) -> str:
    """What JSON a value of the type is, in words: ``a JSON number``, ``a JSON array of JSON strings``."""
    parsed = parse_type(spelling)
    if parsed.array:
        return f"a JSON array of {_emits(parsed.name).removeprefix('a ')}s"
    return _emits(parsed.name)


def _emits(name: str) -> str:
    if name in INTEGER_DIGITS or name in FLOATS or name == "numeric":
        return "a JSON number"
    if name == "boolean":
        return "a JSON boolean"
    if name in ("json", "jsonb"):
        return "a JSON value"
    return "a JSON string"


# --- the parts of a type the rules look at --------------------------------------------------------------


def _numeric(t: PgType) -> tuple[int, int] | None:
    """(precision, scale) of ``numeric(p,s)``; None for unconstrained ``numeric``."""
    if not t.modifiers:
        return None
    return t.modifiers[0], t.modifiers[1] if len(t.modifiers) > 1 else 0


def _length(t: PgType) -> float:
    """The longest string ``text`` or ``character varying(n)`` takes."""
    return float(t.modifiers[0]) if t.modifiers else float("inf")


def _seconds(t: PgType) -> int:
    return t.modifiers[0] if t.modifiers else DEFAULT_SECONDS_PRECISION


def _is_numeric(t: PgType, *, constrained: bool) -> bool:
    return t.name == "numeric" and bool(t.modifiers) == constrained


def _integer_to_numeric_fits(old: PgType, new: PgType) -> bool:
    size = _numeric(new)
    return size is None or (size[1] == 0 and size[0] >= INTEGER_DIGITS[old.name])


def _numerics(old: PgType, new: PgType) -> tuple[int, int, int, int] | None:
    """(p, s, q, t) when the change is numeric(p,s) → numeric(q,t)."""
    before, after = _numeric(old), _numeric(new)
    if old.name != "numeric" or new.name != "numeric" or before is None or after is None:
        return None
    return (*before, *after)


def _numeric_rule(test: Callable[[int, int, int, int], bool]) -> Callable[[PgType, PgType], bool]:
    def applies(old: PgType, new: PgType) -> bool:
        sizes = _numerics(old, new)
        return sizes is not None and test(*sizes)
    return applies


def _fits(p: int, s: int, q: int, t: int) -> bool:
    """numeric(q,t) holds every value of numeric(p,s) unrounded: as many digits before the point, and after."""
    return q - t >= p - s and t >= s


# --- the rules ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    change: str
    """The change, as the table in :mod:`gatehouse.contracts.compat` names it."""
    compatible: bool
    why: str
    """Why it is safe, or what breaks: the end of the change's detail."""
    applies: Callable[[PgType, PgType], bool]


SAME_NUMBER = "every value is the same JSON number"
WHOLE_GAINS_DECIMALS = ("whole numbers are written with decimals (42 becomes 42.00): a client that decodes "
                        "an integer (Go's int, Rust's i64) fails")
NO_LONGER_FITS = "larger values no longer fit: writers' values are refused (and the ALTER fails on stored ones)"
FITS_OR_ROUNDED = "larger values no longer fit (writers' values are refused), or decimals are rounded off"
FLOAT_VALUES_CHANGE = ("values change: a float is a binary approximation (2147483647 as real is 2.1474836e+09, "
                       "0.1 + 0.2 as numeric is 0.3) and numeric's 42.00 is 42 as a float")

RULES: tuple[Rule, ...] = (
    Rule("smallint → integer → bigint", True, SAME_NUMBER,
         lambda o, n: o.name in INTEGER_DIGITS and n.name in INTEGER_DIGITS
         and INTEGER_DIGITS[n.name] > INTEGER_DIGITS[o.name]),
    Rule("bigint → integer → smallint", False, NO_LONGER_FITS,
         lambda o, n: o.name in INTEGER_DIGITS and n.name in INTEGER_DIGITS),
    Rule("integer type → numeric, numeric(p,0) with p ≥ its digits", True,
         SAME_NUMBER + ", written without decimals",
         lambda o, n: o.name in INTEGER_DIGITS and n.name == "numeric" and _integer_to_numeric_fits(o, n)),
    Rule("integer type → numeric(p,s) with s > 0", False, WHOLE_GAINS_DECIMALS,
         lambda o, n: o.name in INTEGER_DIGITS and n.name == "numeric" and (_numeric(n) or (0, 0))[1] > 0),
    Rule("integer type → smaller numeric(p,s)", False, FITS_OR_ROUNDED,
         lambda o, n: o.name in INTEGER_DIGITS and n.name == "numeric"),
    Rule("numeric(p,s) → numeric", True, "every value is the same JSON number, as stored; only the limit is gone",
         lambda o, n: _is_numeric(o, constrained=True) and _is_numeric(n, constrained=False)),
    Rule("numeric → numeric(p,s)", False, FITS_OR_ROUNDED,
         lambda o, n: _is_numeric(o, constrained=False) and _is_numeric(n, constrained=True)),
    Rule("numeric(p,s) → numeric(q,t), q-t ≥ p-s, t = s", True, SAME_NUMBER,
         _numeric_rule(lambda p, s, q, t: _fits(p, s, q, t) and (t == s or t <= 0))),
    Rule("numeric(p,s) → numeric(q,t), q-t ≥ p-s, t > s > 0", True,
         SAME_NUMBER + ", written with more decimals (1.50 becomes 1.500)",
         _numeric_rule(lambda p, s, q, t: _fits(p, s, q, t) and s > 0)),
    Rule("numeric(p,s) → numeric(q,t), q-t < p-s or t < s", False, FITS_OR_ROUNDED,
         _numeric_rule(lambda p, s, q, t: not _fits(p, s, q, t))),
    Rule("numeric(p,s) → numeric(q,t), s ≤ 0 < t", False, WHOLE_GAINS_DECIMALS,
         _numeric_rule(lambda p, s, q, t: s <= 0 < t)),
    Rule("smallint → real; smallint, integer → double precision", True,
         "every value is exact in the float and written the same (42 stays 42)",
         lambda o, n: (o.name, n.name) in EXACT_IN_FLOAT),
    Rule("real → double precision", False,
         "a real's binary value is written with all its digits: 0.1 becomes 0.10000000149011612",
         lambda o, n: (o.name, n.name) == ("real", "double precision")),
    Rule("number ↔ real, double precision (any other)", False, FLOAT_VALUES_CHANGE,
         lambda o, n: (o.name in FLOATS or n.name in FLOATS)
         and {o.name, n.name} <= FLOATS | INTEGER_DIGITS.keys() | {"numeric"}),
    Rule("character varying(n), text → a limit ≥ n, or none", True,
         "every value is the same JSON string; longer ones are now accepted",
         lambda o, n: o.name in VARYING and n.name in VARYING and _length(n) >= _length(o)),
    Rule("character varying, text → a shorter limit", False, "longer strings writers could send are refused",
         lambda o, n: o.name in VARYING and n.name in VARYING),
    Rule("character(n) ↔ any other type", False,
         "character(n) pads with spaces: 'ab' is \"ab \" as character(3) and \"ab\" as text",
         lambda o, n: CHARACTER in (o.name, n.name)),
    Rule("timestamp(p), time(p) → (q ≥ p), same time zone-ness", True,
         "every value is the same JSON string (fractions of a second are written without trailing zeros)",
         lambda o, n: o.name == n.name and o.name in DATE_TIMES and _seconds(n) >= _seconds(o)),
    Rule("timestamp(p), time(p) → (q < p)", False, "fractions of a second are rounded",
         lambda o, n: o.name == n.name and o.name in DATE_TIMES),
    Rule("date, time, timestamp ↔ another of them", False,
         "the JSON string's format changes (\"2024-01-01T10:00:00\" ↔ \"2024-01-01T10:00:00+00:00\")",
         lambda o, n: {o.name, n.name} <= DATE_TIMES | {DATE}),
    Rule("json → jsonb", True,
         "the same JSON value (whitespace and key order may change; of duplicate keys the last is kept, as "
         "JSON parsers do; jsonb refuses \\u0000 in strings, which json took)",
         lambda o, n: (o.name, n.name) == ("json", "jsonb")),
    Rule("jsonb → json", False, "json has no equality: eq, cs and cd filters on the column fail",
         lambda o, n: (o.name, n.name) == ("jsonb", "json")),
)

ARRAY_OR_NOT = Rule("T[] ↔ T", False, "an array becomes a single value, or the other way",
                    lambda o, n: o.array != n.array)
OTHER = Rule("any other change", False, "not a known widening (numbers ↔ strings, enums, domains, other types)",
             lambda o, n: True)


@dataclass(frozen=True, slots=True)
class Verdict:
    rule: Rule
    why: str

    @property
    def compatible(self) -> bool:
        return self.rule.compatible


def judge(old: str, new: str) -> Verdict:
    """The rule that decides a change of a column's type from ``old`` to ``new`` (two different spellings)."""
    before, after = parse_type(old), parse_type(new)
    if ARRAY_OR_NOT.applies(before, after):
        return Verdict(ARRAY_OR_NOT, ARRAY_OR_NOT.why)
    rule = next((r for r in RULES if r.applies(before.element, after.element)), OTHER)
    if rule is OTHER and emits(old) != emits(new):
        return Verdict(rule, f"it was {emits(old)}, now {emits(new)}")
    return Verdict(rule, rule.why)
