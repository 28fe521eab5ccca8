"""A PostgreSQL error → the HTTP error the caller sees.

Statuses follow PostgREST's SQLSTATE table so its clients behave the same. What differs is what is shown:
PostgreSQL's message is passed on only for the error classes whose text is about the caller's own input
(bad values, unknown operators); anything else gets a fixed message, because its text may name private
tables, constraints or SQL. The SQLSTATE itself is always passed on as the ``code``.
"""

from __future__ import annotations

import asyncpg

from gatehouse.errors import ApiError

# Classes whose messages describe the caller's own input and name nothing private.
_SAFE_MESSAGE_PREFIXES = ("22", "42883", "42804", "2201")

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


def status_for(sqlstate: str) -> int:
    return _STATUS_BY_CODE.get(sqlstate) or _STATUS_BY_CLASS.get(sqlstate[:2], 400)


def api_error_from_postgres(exc: asyncpg.PostgresError) -> ApiError:
    sqlstate = str(getattr(exc, "sqlstate", "") or "XX000")
    status = status_for(sqlstate)
    if sqlstate.startswith(_SAFE_MESSAGE_PREFIXES):
        message = str(getattr(exc, "message", "") or _GENERIC.get(status, "Invalid request"))
        hint = getattr(exc, "hint", None)
    else:
        message = _GENERIC.get(status, "The request is not valid for this contract")
        hint = "Ask for a longer statement_timeout in the app's quota, or narrow the query." if status == 504 else None
    return ApiError(message, code=sqlstate, status=status, hint=hint)
