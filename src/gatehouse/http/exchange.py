"""One HTTP exchange as the request path sees it: :class:`HttpRequest` in, :class:`HttpResponse` out.

The data port's code never sees the wire: ``server/rsgi.py`` (granian, for ``gatehouse serve``) and
``http/asgi.py`` (tests, other ASGI servers) turn what arrives into an ``HttpRequest`` and write the
``HttpResponse`` back; for ``HEAD`` they send the headers of the whole body without the body. Both are plain
objects with exactly what gatehouse reads (header names lower-cased, repeated headers joined by commas as
RFC 9110 allows), because building a framework's request and response objects was a measurable share of a
point lookup.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from gatehouse.errors import InvalidUrlEncoding, PayloadTooLarge
from gatehouse.http.deadlines import BodyDeadlines
from gatehouse.http.labels import RequestLabels

JSON = "application/json; charset=utf-8"
_DIGITS = re.compile(r"[0-9]{1,18}")


async def no_body() -> AsyncIterator[bytes]:
    empty: tuple[bytes, ...] = ()
    for chunk in empty:  # an async generator that yields nothing
        yield chunk


def add_header(headers: dict[str, str], name: str, value: str) -> None:
    """Add one request header (name lower-cased); a repeated header's values are joined by commas, which
    RFC 9110 §5.3 gives the same meaning as separate lines."""
    if name in headers:
        headers[name] = f"{headers[name]}, {value}"
    else:
        headers[name] = value


def joined_headers(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Header pairs (names already lower-cased) as a dict, by :func:`add_header`."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        add_header(headers, name, value)
    return headers


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    query_string: str
    """Still percent-encoded, as it arrived."""
    headers: dict[str, str]
    client: str = "unknown"
    scheme: str = "http"
    root_path: str = ""
    body_chunks: Callable[[], AsyncIterator[bytes]] = no_body
    body_whole: Callable[[], Awaitable[bytes]] | None = None
    """The whole body in one read, when the server offers it (RSGI's ``protocol()``). Used only when
    ``Content-Length`` declares a size within the limit: the server's framing (hyper) holds the body to it, so
    nothing unbounded is buffered; a body without a declared size is read in chunks, counted as they come."""
    body_deadlines: BodyDeadlines | None = None
    """The port's deadlines: the whole body must have arrived ``[server] body_timeout_s`` after :meth:`body`
    starts reading it (408). None: no deadline (a body from a test, or from another ASGI server's own limits)."""
    labels: RequestLabels = field(default_factory=RequestLabels)

    @property
    def query_params(self) -> dict[str, str]:
        """The decoded query string as a dict; 400 when it is not UTF-8 once percent-decoded."""
        try:
            return dict(parse_qsl(self.query_string, keep_blank_values=True, errors="strict"))
        except UnicodeDecodeError:
            raise InvalidUrlEncoding("The query string is not valid UTF-8 once percent-decoded") from None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.headers.get('host', 'localhost')}{self.root_path}"

    async def body(self, limit: int) -> bytes:
        """The whole body, refused with 413 as soon as it passes ``limit`` bytes (declared or received), and
        with 408 when it has not arrived within the port's deadline (``body_deadlines``): a client sending one
        byte now and then would otherwise hold its connection and this request forever."""
        declared = self.headers.get("content-length")
        whole = None
        if declared and _DIGITS.fullmatch(declared):
            if int(declared) > limit:
                raise _too_large(limit)
            whole = self.body_whole
        deadlines = self.body_deadlines
        if deadlines is None:
            return await self._read(whole, limit)
        reader = deadlines.enter()
        try:
            return await self._read(whole, limit)
        except asyncio.CancelledError:
            refused = deadlines.refusal(reader)
            if refused is None:
                raise
            raise refused from None
        finally:
            deadlines.leave(reader)

    async def _read(self, whole: Callable[[], Awaitable[bytes]] | None, limit: int) -> bytes:
        if whole is not None:
            return await whole()
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.body_chunks():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge("Payload too large", details=f"The body may be at most {limit} bytes",
                           hint="Split the rows into several requests.")


@dataclass(slots=True)
class HttpResponse:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    media_type: str | None = None

    def body_headers(self) -> list[tuple[str, str]]:
        """``Content-Type`` (when there is a media type) and ``Content-Length`` (never on 1xx, 204, 304)."""
        headers = [] if self.media_type is None else [("Content-Type", self.media_type)]
        if self.status >= 200 and self.status not in (204, 304):
            headers.append(("Content-Length", str(len(self.body))))
        return headers

    def header_list(self) -> list[tuple[str, str]]:
        """Every header to send, names lower-cased (as ASGI wants them), :meth:`body_headers` included."""
        return [(name.lower(), value) for name, value in (*self.headers.items(), *self.body_headers())]


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
"""A port's whole request path: the data port's is ``RequestGuard(DataApp.route)``."""


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> HttpResponse:
    return HttpResponse(status, headers or {}, body, JSON)
