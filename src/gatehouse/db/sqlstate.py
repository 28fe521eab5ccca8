"""A PostgreSQL error → the HTTP error the caller sees (:class:`DatabaseError`).

Statuses follow PostgREST's SQLSTATE table so its clients behave the same, and the SQLSTATE is always passed on
as the ``code``. What differs is what is shown: every message, detail and hint is written here, never taken
from PostgreSQL, whose text may quote our SQL, name private tables, constraints or columns, or spell out a
column's type. A refused value gets a message that names its kind of problem (not valid for its column's type,
out of range, too long); a constraint violation one that names at most the contract's own columns; anything
else a fixed message per status. With the ``debug`` setting on (never in production), PostgreSQL's message is
added as ``details``.

A database that is going away or out of resources answers 503 with ``Retry-After``, as PostgREST does while
it reconnects: connection errors (class 08), insufficient resources (class 53, but not 53400, a configured
limit), and the server ending sessions (57P01 admin shutdown, 57P02 crash of another backend, 57P03 not
accepting connections yet, 57P05 idle session timeout).
"""

from __future__ import annotations

import re
from collections.abc import Collection

import asyncpg

from gatehouse.db.faults import RETRY_AFTER_S, retry_after
from gatehouse.errors import DatabaseError

# PostgreSQL's refusals of a value or a name the caller sent, each told in words of our own: its text quotes
# the value with the column's type, or the operator of our SQL that could not take it.
_CALLER_MESSAGES = {
    "22001": "A value in the request is too long for its column",
    "22003": "A number in the request is out of range for its column",
    "22007": "A date or time in the request is not valid",
    "22008": "A date or time in the request is out of range",
    "22012": "The request divides by zero",
    "22021": "A value in the request holds a character that text cannot hold",
    "22023": "A value in the request is not valid where it is used",
    "22025": "A pattern in the request has an escape that is not valid",
    "2201B": "A regular expression in the request is not valid",
    "22P02": "A value in the request is not valid for its column's type",
    "22P05": "A value in the request holds a character that text cannot hold",
    "42804": "A value in the request has the wrong type for its column",
    "42883": "An operator or function in the request does not apply to its column's type",
    "42704": "Something the request names does not exist (e.g. a text search configuration)",
}
_CALLER_CLASS_MESSAGE = {"22": "A value in the request is not valid"}

_STATUS_BY_CODE = {
    "23503": 409, "23505": 409, "25006": 405, "42501": 403, "42883": 404, "42P01": 404,
    "42P17": 500, "53400": 500, "57P01": 503, "57P02": 503, "57P03": 503, "57P05": 503, "57014": 504,
    "P0001": 400,
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
    if sqlstate == "23505":  # the key's columns when the contract has them all; never its values
        match = _KEY_DETAIL.match(detail)
        names = [c.strip() for c in match.group("columns").split(",")] if match else []
        shown = bool(names) and all(name in columns for name in names)
        return "A row with the same key already exists", (f"Key columns: {', '.join(names)}" if shown else None)
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
                            debug: bool = False) -> DatabaseError:
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
    elif sqlstate in _CALLER_MESSAGES or sqlstate[:2] in _CALLER_CLASS_MESSAGE:
        message = _CALLER_MESSAGES.get(sqlstate) or _CALLER_CLASS_MESSAGE[sqlstate[:2]]
    else:
        message = _GENERIC.get(status, "The request is not valid for this contract")
        if status == 504:
            hint = "Ask for a longer statement_timeout in the app's quota, or narrow the query."
        elif status == 503:
            hint = "Try again shortly."
    if debug:
        details = f"{details + ' | ' if details else ''}PostgreSQL said: {getattr(exc, 'message', exc)}"
    headers = retry_after(RETRY_AFTER_S) if status == 503 else None
    return DatabaseError(message, sqlstate=sqlstate, status=status, details=details, hint=hint, headers=headers)
