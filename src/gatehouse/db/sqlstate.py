"""A PostgreSQL error → the HTTP error the caller sees.

Statuses follow PostgREST's SQLSTATE table so its clients behave the same. What differs is what is shown:
PostgreSQL's own text is passed on only where it describes the caller's input and names nothing private
(bad values, unknown operators and types). Constraint violations get messages written here that name at most
the contract's own columns; anything else gets a fixed message, because its text may name private tables,
constraints or SQL. The SQLSTATE is always passed on as the ``code``. With the ``debug`` setting on (never
in production), the original message is added as ``details``.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import asyncpg

from gatehouse.errors import ApiError

# Classes whose messages describe the caller's own input and name nothing private.
_SAFE_MESSAGE_PREFIXES = ("22", "42883", "42804", "42704")

_STATUS_BY_CODE = {
    "23503": 409, "23505": 409, "25006": 405, "42501": 403, "42883": 404, "42P01": 404,
    "42P17": 500, "53400": 500, "57P01": 503, "57014": 504, "P0001": 400,
}
_STATUS_BY_CLASS = {
    "08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500, "39": 500,
    "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500, "57": 500, "58": 500, "F0": 500, "HV": 500,
    "P0": 500, "XX": 500,
}
_GENERIC = {
    403: "Permission denied",
    404: "The request refers to something that does not exist",
    409: "The request conflicts with existing data",
    500: "The database could not complete the request",
    503: "The database is not available",
    504: "The query took longer than this application's statement timeout",
}
_KEY_DETAIL = re.compile(r"^Key \((?P<columns>[^)]*)\)=")


def status_for(sqlstate: str) -> int:
    return _STATUS_BY_CODE.get(sqlstate) or _STATUS_BY_CLASS.get(sqlstate[:2], 400)


def _constraint_message(exc: asyncpg.PostgresError, sqlstate: str,
                        columns: Collection[str]) -> tuple[str, str | None] | None:
    column = getattr(exc, "column_name", None)
    detail = str(getattr(exc, "detail", "") or "")
    if sqlstate == "23502":
        named = f" '{column}'" if column in columns else ""
        return f"A value is required for column{named}", None
    if sqlstate == "23505":
        match = _KEY_DETAIL.match(detail)
        shown = match and all(c.strip() in columns for c in match.group("columns").split(","))
        return "A row with the same key already exists", (detail if shown else None)
    if sqlstate == "23503":
        return "The row refers to a row that does not exist, or is still referred to by other rows", None
    if sqlstate == "23514":
        return "A value is outside what the contract allows", None
    if sqlstate in ("0A000", "44000"):
        return "The change cannot be made through this contract", None
    return None


# Errors PostgreSQL raises as limits or internal errors although the caller's value caused them: 400, not 500.
_CALLER_LIMITS = (
    ("54000", "", "A value in the request exceeds what the database can handle"),
    ("XX000", "tsquery", "The text search query is too complex"),
)


def api_error_from_postgres(exc: asyncpg.PostgresError, *, columns: Collection[str] = (),
                            debug: bool = False) -> ApiError:
    sqlstate = str(getattr(exc, "sqlstate", "") or "XX000")
    status = status_for(sqlstate)
    details: str | None = None
    hint: str | None = None
    custom = _constraint_message(exc, sqlstate, columns)
    text = str(getattr(exc, "message", "") or "")
    limit = next((m for code, prefix, m in _CALLER_LIMITS if code == sqlstate and text.startswith(prefix)), None)
    if limit is not None:
        status, message = 400, limit
    elif custom is not None:
        message, details = custom
    elif sqlstate.startswith(_SAFE_MESSAGE_PREFIXES):
        message = str(getattr(exc, "message", "") or _GENERIC.get(status, "Invalid request"))
        hint = getattr(exc, "hint", None)
    else:
        message = _GENERIC.get(status, "The request is not valid for this contract")
        if status == 504:
            hint = "Ask for a longer statement_timeout in the app's quota, or narrow the query."
    if debug:
        details = f"{details + ' | ' if details else ''}PostgreSQL said: {getattr(exc, 'message', exc)}"
    return ApiError(message, code=sqlstate, status=status, details=details, hint=hint)
