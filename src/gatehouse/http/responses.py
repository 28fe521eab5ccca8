"""Error responses in PostgREST's shape: ``{code, message, details, hint}`` plus ``Proxy-Status``."""

from __future__ import annotations

import orjson

from gatehouse.errors import ApiError
from gatehouse.http.exchange import JSON, HttpResponse


def error_response(error: ApiError) -> HttpResponse:
    # PostgREST's clients read the code of a bodiless (HEAD) error from a "PostgREST" Proxy-Status entry.
    headers = {"Proxy-Status": f"PostgREST; error={error.code}", **error.headers}
    return HttpResponse(error.status, headers, orjson.dumps(error.body()), JSON)
