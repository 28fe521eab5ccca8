"""The request headers PostgREST clients use to shape a response: ``Accept``, ``Prefer`` and ``Range``.

``Prefer`` follows PostgREST: several headers and comma-separated values are accepted, the first
occurrence of each preference wins, and unknown ones are ignored unless ``handling=strict`` (then 400
``PGRST122``). ``Preference-Applied`` lists, in PostgREST's fixed order, the ones that took effect.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Literal

from gatehouse.errors import AmbiguousRange, InvalidPreferences, NotAcceptable, RangeNotSatisfiable

Format = Literal["json", "object", "csv", "openapi", "json_stripped", "object_stripped"]
MEDIA_TYPES: dict[str, Format] = {
    "application/json": "json",
    "application/*": "json",
    "*/*": "json",
    "application/vnd.pgrst.object+json": "object",
    "application/vnd.pgrst.object": "object",
    "application/vnd.pgrst.array+json": "json",
    "text/csv": "csv",
    "text/*": "csv",
    "application/openapi+json": "openapi",
}
CONTENT_TYPES: dict[Format, str] = {
    "json": "application/json; charset=utf-8",
    "object": "application/vnd.pgrst.object+json; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
    "openapi": "application/openapi+json; charset=utf-8",
    "json_stripped": "application/vnd.pgrst.array+json;nulls=stripped; charset=utf-8",
    "object_stripped": "application/vnd.pgrst.object+json;nulls=stripped; charset=utf-8",
}
STRIPPED: dict[Format, Format] = {"json": "json_stripped", "object": "object_stripped"}
PREFERENCE_VALUES = {
    "return": {"minimal", "headers-only", "representation"},
    "count": {"exact", "planned", "estimated"},
    "resolution": {"merge-duplicates", "ignore-duplicates"},
    "missing": {"default", "null"},
    "handling": {"lenient", "strict"},
    "tx": {"commit", "rollback"},
    "read-from": {"primary"},
}
APPLIED_ORDER = ("resolution", "missing", "return", "count", "tx", "handling", "max-affected", "read-from",
                 "max-staleness")
ALWAYS_APPLIED = frozenset({"tx", "handling"})
"""Preferences every request honours when sent, so PostgREST echoes them on reads, writes and functions alike:
``tx`` (a read or a function rolled back changes nothing, a write rolled back is not kept) and ``handling``."""
MAX_STALENESS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,3})?")
"""``Prefer: max-staleness=<seconds>``: how old a replica's data this read accepts (at most the app's bound)."""


@functools.lru_cache(maxsize=256)  # clients send a handful of Accept headers, over and over
def response_format(accept: str | None,
                    allowed: tuple[Format, ...] = ("json", "object", "csv", "json_stripped", "object_stripped"),
                    ) -> Format:
    """The first acceptable media type by q-value then order; absent means JSON."""
    if not accept or not accept.strip():
        return "json"
    ranked: list[tuple[float, int, str, bool]] = []
    for index, part in enumerate(accept.split(",")):
        media, *params = [p.strip() for p in part.split(";")]
        quality, stripped = 1.0, False
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
            elif name.strip() == "nulls" and value.strip() == "stripped":
                stripped = media.lower().startswith("application/vnd.pgrst.")
        if quality > 0:
            ranked.append((-quality, index, media.lower(), stripped))
    for _, _, media, stripped in sorted(ranked):
        fmt = MEDIA_TYPES.get(media)
        if fmt is not None and stripped:
            fmt = STRIPPED.get(fmt, fmt)
        if fmt in allowed:
            return fmt
    raise NotAcceptable(f"None of these media types are available: {accept}")


@dataclass(slots=True)
class Preferences:
    values: dict[str, str] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    @property
    def strict(self) -> bool:
        return self.values.get("handling") == "strict"

    def applied(self, names: set[str]) -> str | None:
        """``Preference-Applied``: the preferences that were sent and took effect (those in ``names``, and ``tx``
        and ``handling`` always), in PostgREST's order."""
        if not self.values:
            return None
        shown = [f"{n}={self.values[n]}" for n in APPLIED_ORDER
                 if (n in names or n in ALWAYS_APPLIED) and n in self.values]
        return ", ".join(shown) or None


def parse_prefer(header: str | None) -> Preferences:
    """``Prefer`` (repeated headers already joined by commas)."""
    prefs = Preferences()
    if header:
        for token in header.split(","):
            token = token.strip()
            if not token:
                continue
            name, _, value = token.partition("=")
            name, value = name.strip().lower(), value.strip()
            counted = (name == "max-affected" and re.fullmatch(r"[0-9]{1,9}", value) is not None) or (
                name == "max-staleness" and MAX_STALENESS.fullmatch(value) is not None)
            valid = value in PREFERENCE_VALUES.get(name, ()) or counted
            if not valid:
                prefs.invalid.append(token)
            elif name not in prefs.values:
                prefs.values[name] = value
    if prefs.strict and prefs.invalid:
        raise InvalidPreferences("Invalid preferences given with handling=strict",
                                 details=f"Invalid preferences: {', '.join(prefs.invalid)}")
    return prefs


RANGE = re.compile(r"^\s*(?:items=)?([0-9]{1,18})-([0-9]{0,18})\s*$", re.IGNORECASE)
ITEMS_RANGE = re.compile(r"^\s*(?:items\s*=|[-+0-9])", re.IGNORECASE)
"""What a range of rows starts with: the ``items`` unit, or a number without one."""


def range_header(value: str | None) -> tuple[int, int | None] | None:
    """``Range: 0-9`` → (offset, limit); ``Range: 5-`` → (5, None). A range of another unit (``bytes=0-9``) is
    ignored, as PostgREST does; a range of rows that is not ``first-[last]`` in whole numbers (``items=-5-3``:
    the last five? rows -5 to 3?) is refused rather than guessed at."""
    if not value:
        return None
    match = RANGE.match(value)
    if match is None:
        if ITEMS_RANGE.match(value):
            raise AmbiguousRange("The Range header is not a range of rows",
                                 details=f"Range: {value[:60]}",
                                 hint="Send Range: items=<first>-<last> (or <first>-) in whole numbers, from 0.")
        return None
    first = int(match.group(1))
    if not match.group(2):
        return first, None
    last = int(match.group(2))
    if last < first:
        raise RangeNotSatisfiable("Requested range not satisfiable",
                                  details="The lower boundary must be lower than or equal to the upper boundary "
                                          "in the Range header.")
    return first, last - first + 1
