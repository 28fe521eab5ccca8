"""Error responses in PostgREST's shape: ``{code, message, details, hint}`` plus ``Proxy-Status``."""

from __future__ import annotations

import orjson
from starlette.responses import Response

from gatehouse.errors import ApiError

JSON = "application/json; charset=utf-8"


def error_response(error: ApiError, *, head: bool = False) -> Response:
    # PostgREST's clients read the code of a bodiless (HEAD) error from a "PostgREST" Proxy-Status entry.
    headers = {"Proxy-Status": f"PostgREST; error={error.code}", **error.headers}
    body = b"" if head else orjson.dumps(error.body())
    return Response(body, status_code=error.status, headers=headers, media_type=JSON)
