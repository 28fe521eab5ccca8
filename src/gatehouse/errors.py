"""One error tree for everything gatehouse reports.

Two families:

* :class:`ProjectError` — a mistake in the project folder or the command line, reported by the CLI with
  the file, the key or line, and what to do. Never reaches HTTP.
* :class:`ApiError` — an error answered over HTTP in PostgREST's shape ``{code, message, details, hint}``
  with a status. Codes follow PostgREST where the meaning is the same (``PGRST1xx`` request, ``PGRST2xx``
  schema cache, ``PGRST3xx`` authentication) so its clients parse them; ``GH`` codes are gatehouse's own.

Nothing in an ApiError may contain SQL, a stack trace, a secret or a private table name: messages are
written here or built from names the caller already used.
"""

from __future__ import annotations

from typing import Any


class GatehouseError(Exception):
    """Root of every error gatehouse raises on purpose."""


class ProjectError(GatehouseError):
    """The project folder (or a command's arguments) is wrong; the message says where and what to do."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.where = where
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        text = f"{self.where}: {self.args[0]}" if self.where else str(self.args[0])
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class DatabaseUnavailable(GatehouseError):
    """A database could not be reached or started."""


class ApiError(GatehouseError):
    """An error answered over HTTP in PostgREST's JSON shape."""

    status: int = 400
    code: str = "PGRST100"

    def __init__(
        self,
        message: str,
        *,
        details: str | None = None,
        hint: str | None = None,
        status: int | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.hint = hint
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details, "hint": self.hint}


# --- 4xx: the request ---------------------------------------------------------------------------


class QueryParseError(ApiError):
    """The query string does not follow PostgREST's grammar."""

    status, code = 400, "PGRST100"


class RangeNotSatisfiable(ApiError):
    status, code = 416, "PGRST103"


class UnknownProfile(ApiError):
    """The requested API version (schema profile) is not served."""

    status, code = 406, "PGRST106"


class NotAcceptable(ApiError):
    status, code = 406, "PGRST107"


class MethodNotAllowed(ApiError):
    status, code = 405, "PGRST117"


class InvalidPath(ApiError):
    status, code = 404, "PGRST125"


class UnknownContract(ApiError):
    """No such contract in this version, or the calling app may not see it: the two look the same."""

    status, code = 404, "PGRST205"


class UnknownColumn(ApiError):
    status, code = 400, "PGRST204"


class VersionRetired(ApiError):
    status, code = 410, "GH410"


# --- 401: who is calling -------------------------------------------------------------------------


class Unauthenticated(ApiError):
    """No usable credentials. Raised before any database work."""

    status, code = 401, "PGRST301"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(
            message,
            hint=hint,
            headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{message}"'},
        )


class MissingCredentials(Unauthenticated):
    code = "PGRST302"

    def __init__(self, message: str = "No API key was sent", *,
                 hint: str = "Send your application's key in the 'apikey' header or as 'Authorization: Bearer <key>'.",
                 ) -> None:
        ApiError.__init__(self, message, hint=hint, headers={"WWW-Authenticate": "Bearer"})


# --- 5xx: ours -----------------------------------------------------------------------------------


class ServiceUnavailable(ApiError):
    status, code = 503, "PGRST000"


class PoolTimeout(ApiError):
    status, code = 504, "PGRST003"


class InternalError(ApiError):
    status, code = 500, "GH500"
