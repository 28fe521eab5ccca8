"""Turning what PostgreSQL returned into the response PostgREST would send: status, ``Content-Range``, format.

The JSON body arrives already built by PostgreSQL and goes out as bytes; only the singular and CSV
formats look inside it.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_plus

import orjson

from gatehouse.errors import RangeNotSatisfiable, SingularResultRequired
from gatehouse.http.exchange import HttpResponse
from gatehouse.http.negotiate import CONTENT_TYPES, Format

READ_VARY = "Accept, Accept-Profile, Prefer, Range, Authorization, apikey"
"""What a read's answer depends on besides its URL: PostgREST's ``Accept, Prefer, Range``, and who asks for which
version (the cache's answers carry the same, ``cache/responses.py``)."""


@dataclass(slots=True)  # not frozen: one per request, and a frozen dataclass costs twice as much to make
class Page:
    body: str
    """A JSON array, as PostgreSQL's json_agg wrote it."""
    count: int
    offset: int
    total: int | None = None
    columns: Sequence[str] = ()


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_ESCAPE_ASCII = {c: c if chr(c) in _UNRESERVED else f"%{c:02X}" for c in range(128)}


def _escaped(text: str) -> str:
    """Percent-encoded but for letters, digits and ``-_.~`` (as PostgREST's canonical query string)."""
    return text.translate(_ESCAPE_ASCII) if text.isascii() else quote(text, safe="")


def _decoded(text: str) -> str:
    return unquote_plus(text, errors="replace") if "%" in text or "+" in text else text


_PLAIN_QUERY = re.compile(r"[A-Za-z0-9\-_.~]+=[A-Za-z0-9\-_.~]*(?:&[A-Za-z0-9\-_.~]+=[A-Za-z0-9\-_.~]*)*")
"""A query string whose names and values need no decoding nor escaping, each parameter with one ``=``."""


def content_location(path: str, query_string: str) -> str:
    """``Content-Location`` of a read, as PostgREST sends it: the path, and the query's parameters sorted by name
    (a repeated name's values joined by commas, in the order sent), each percent-encoded but for letters, digits
    and ``-_.~``; no ``?`` when there are none. Requests that differ only in the order of their parameters name
    the same resource.

    Most queries hold only such characters (``id=eq.42``): those are only put in order, without the decoding and
    escaping, which cost more than the rest of the header (a cache does not help: values vary)."""
    if _PLAIN_QUERY.fullmatch(query_string):
        parts = query_string.split("&")
        if len(parts) == 1:
            return f"{path}?{query_string}"
        names = [part[:part.index("=")] for part in parts]
        if len(set(names)) == len(names):
            return f"{path}?{'&'.join(sorted(parts, key=lambda part: part[:part.index('=')]))}"
    return _content_location(path, query_string)


@functools.lru_cache(maxsize=256)  # hot URLs come again and again
def _content_location(path: str, query_string: str) -> str:
    parameters = sorted(map(_canonical, filter(None, query_string.split("&"))), key=_by_name)
    if not parameters:
        return path
    grouped: dict[str, list[str]] = {}
    for _, name, value in parameters:
        grouped.setdefault(name, []).append(value)
    return path + "?" + "&".join([f"{name}={','.join(values)}" for name, values in grouped.items()])


@functools.lru_cache(maxsize=512)
def _canonical(parameter: str) -> tuple[str, str, str]:
    """One ``name=value`` of a query string: its name decoded (to sort by), and its name and value escaped. Kept
    per parameter: a URL whose ``select`` is the same every time and whose ``id`` varies misses the whole-URL
    cache above, but not this one for its ``select``, the parameter that costs most to decode and escape."""
    name, _, value = parameter.partition("=")
    decoded = _decoded(name)
    return decoded, _escaped(decoded), _escaped(_decoded(value))


def _by_name(parameter: tuple[str, str, str]) -> str:
    return parameter[0]


def content_range(first: int, count: int, total: int | None) -> str:
    span = f"{first}-{first + count - 1}" if count else "*"
    return f"{span}/{'*' if total is None else total}"


def page_status(page: Page) -> int:
    if page.total is None:
        return 200
    if page.offset > page.total:
        raise RangeNotSatisfiable(
            "Requested range not satisfiable",
            details=f"An offset of {page.offset} was requested, but there are only {page.total} rows.",
            headers={"Content-Range": f"*/{page.total}"},
        )
    return 206 if page.count < page.total and (page.count or page.total) else 200


def singular(page: Page) -> bytes:
    if page.count != 1:
        raise SingularResultRequired("Cannot coerce the result to a single JSON object",
                                     details=f"The result contains {page.count} rows")
    return page.body.strip()[1:-1].strip().encode()


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def to_csv(page: Page) -> bytes:
    rows = orjson.loads(page.body)
    columns = list(rows[0]) if rows else list(page.columns)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row.get(column)) for column in columns])
    return out.getvalue().removesuffix("\n").encode()


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def encode(page: Page, fmt: Format) -> bytes:
    """The body in the negotiated format; only singular, stripped and CSV formats look inside the JSON."""
    if fmt in ("object", "object_stripped"):
        body = singular(page)
    elif fmt == "csv":
        return to_csv(page)
    else:
        body = page.body.encode()
    if fmt in ("json_stripped", "object_stripped"):
        return orjson.dumps(_without_nulls(orjson.loads(body)))
    return body


def read_response(page: Page, fmt: Format, headers: dict[str, str]) -> HttpResponse:
    """The answer to a read; for ``HEAD`` the server sends its headers (``Content-Length`` included) alone."""
    status = page_status(page)
    body = encode(page, fmt)
    headers["Content-Range"] = content_range(page.offset, page.count, page.total)
    headers["Vary"] = READ_VARY
    return HttpResponse(status, headers, body, CONTENT_TYPES[fmt])
