"""The audit pages: records filtered as ``gatehouse audit`` filters them (:mod:`gatehouse.observe.audit_query`),
paged on the server, one request's records in full, and the filtered records as CSV.

Paging asks the query for ``offset + page + 1`` records (newest first, over every database of the project, as
:func:`gatehouse.operations.audit_records` merges them) and shows one page of them; the query's own cap
(:data:`~gatehouse.observe.audit_query.MAX_LIMIT`) bounds how deep a page can be.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from gatehouse import operations
from gatehouse.observe.audit_query import MAX_LIMIT, RECORD_COLUMNS
from gatehouse.project import Project

PAGE = 50
FILTERS = ("app", "contract", "status", "user", "since", "until")
_CSV_FORMULA = ("=", "+", "-", "@", "\t", "\r")


class FilterError(ValueError):
    """A filter the page cannot use; its text is shown above the form (400)."""


@dataclass(frozen=True)
class AuditFilters:
    values: dict[str, str]
    """As typed (shown back in the form and kept in every link)."""
    page: int

    @classmethod
    def parse(cls, params: dict[str, str]) -> AuditFilters:
        values = {name: params.get(name, "").strip() for name in FILTERS}
        try:
            page = max(1, int(params.get("page", "1") or "1"))
        except ValueError:
            raise FilterError("page must be a number") from None
        if (page - 1) * PAGE + PAGE + 1 > MAX_LIMIT:
            raise FilterError(f"only the newest {MAX_LIMIT} matching records can be paged: narrow the filters")
        filters = cls({k: v for k, v in values.items() if v}, page)
        filters.query_filters()  # refuse now what the query would refuse
        return filters

    def query_filters(self) -> dict[str, Any]:
        """The keyword arguments of :func:`gatehouse.observe.audit_query.search`."""
        v = self.values
        found: dict[str, Any] = {"app": v.get("app"), "subject": v.get("user"), "target": v.get("contract"),
                                 "since": _time(v.get("since"), "since"), "until": _time(v.get("until"), "until")}
        status = v.get("status")
        if status:
            status = status.lower()
            if not (len(status) == 3 and (status.isdigit() or (status[0] in "12345" and status[1:] == "xx"))):
                raise FilterError("status is a code (404) or a class (4xx)")
            found["status"] = status
        return {k: value for k, value in found.items() if value is not None}


def _time(text: str | None, name: str) -> datetime | None:
    """``2026-12-03T10:00`` (a browser's datetime-local, taken as UTC) or with an offset."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(f"{name} must be a time such as 2026-12-03T10:00 (UTC) or 2026-12-03T10:00+01:00") \
            from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def page_of_records(project: Project, filters: AuditFilters) -> tuple[list[dict[str, Any]], bool]:
    """One page of records, newest first, and whether there is a next page."""
    offset = (filters.page - 1) * PAGE
    records = await operations.audit_records(project, limit=offset + PAGE + 1, **filters.query_filters())
    return records[offset:offset + PAGE], len(records) > offset + PAGE


async def csv_of_records(project: Project, filters: AuditFilters) -> bytes:
    """Every matching record (up to the query's cap) as CSV; a cell that a spreadsheet would run as a formula
    is written with a leading apostrophe."""
    records = await operations.audit_records(project, limit=MAX_LIMIT, **filters.query_filters())
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(RECORD_COLUMNS)
    for record in records:
        writer.writerow([_cell(record[c]) for c in RECORD_COLUMNS])
    return out.getvalue().encode()


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    return "'" + text if text.startswith(_CSV_FORMULA) else text


_ONE = (f"SELECT {', '.join(chr(34) + c + chr(34) for c in RECORD_COLUMNS)} "
        "FROM gatehouse.audit_window('-infinity', 'infinity', $2) WHERE request_id = $1 ORDER BY at, id LIMIT 20")
"""``$2``, the id as JSON, skips every stored batch that does not hold it without unpacking it."""


async def records_of_request(project: Project, request_id: str) -> list[dict[str, Any]]:
    """The records of one request id (one, but for a request that was retried), from every database."""
    async def find(_: str, conn: asyncpg.Connection) -> list[dict[str, Any]]:
        try:
            return [dict(row) for row in await conn.fetch(_ONE, request_id, orjson.dumps(request_id).decode())]
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError):  # nothing applied to it yet
            return []

    found = await operations.each_database(project, find)
    return sorted((r for rows in found.values() for r in rows), key=lambda r: r["at"])
