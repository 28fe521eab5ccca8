"""Turning what PostgreSQL returned into the response PostgREST would send: status, ``Content-Range``, format.

The JSON body arrives already built by PostgreSQL and goes out as bytes; only the singular and CSV
formats look inside it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gatehouse.errors import RangeNotSatisfiable, SingularResultRequired
from gatehouse.http.exchange import HttpResponse
from gatehouse.http.negotiate import CONTENT_TYPES, Format


@dataclass(slots=True)  # not frozen: one per request, and a frozen dataclass costs twice as much to make
class Page:
    body: str
    """A JSON array, as PostgreSQL's json_agg wrote it."""
    count: int
    offset: int
    total: int | None = None
    columns: Sequence[str] = ()


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
    return HttpResponse(status, headers, body, CONTENT_TYPES[fmt])
