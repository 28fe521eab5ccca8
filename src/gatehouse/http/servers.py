"""The edge between an HTTP server and the request path: ASGI and RSGI in, :class:`HttpRequest` out, and back.

``handle(request) -> HttpResponse`` is the whole data port; each function here only translates. ASGI is what
tests (httpx's ASGITransport) and any ASGI server speak; RSGI is granian's own interface, which hands over a
parsed request without building an ASGI scope and message dicts for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from gatehouse.errors import ApiError
from gatehouse.http.exchange import HttpRequest, HttpResponse

Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _joined(pairs: list[tuple[str, str]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in pairs:
        if name in headers:
            headers[name] = f"{headers[name]}, {value}"  # RFC 9110 §5.3: same meaning as separate lines
        else:
            headers[name] = value
    return headers


# -- ASGI -----------------------------------------------------------------------------------------------


def asgi_request(scope: Scope, receive: Receive) -> HttpRequest:
    async def chunks() -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    client = scope.get("client")
    headers = _joined([(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in scope["headers"]])
    return HttpRequest(
        method=scope["method"], path=scope["path"], query_string=scope.get("query_string", b"").decode("latin-1"),
        headers=headers, client=client[0] if client else "unknown", scheme=scope.get("scheme", "http"),
        root_path=scope.get("root_path", ""), body_chunks=chunks,
    )


async def asgi_send(response: HttpResponse, send: Send) -> None:
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.header_list()]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


async def serve_asgi(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    await asgi_send(await handler(asgi_request(scope, receive)), send)


# -- RSGI (granian) -------------------------------------------------------------------------------------


class RsgiScope(Protocol):
    method: str
    path: str
    query_string: str
    client: str
    scheme: str

    @property
    def headers(self) -> Any: ...


def rsgi_request(scope: RsgiScope, protocol: Any) -> HttpRequest:
    headers = _joined(scope.headers.items())

    async def chunks() -> AsyncIterator[bytes]:
        # granian hands over the body whole (its chunk iterator fails here), so only a body whose size is
        # declared, and already checked against the limit by HttpRequest.body, is ever read.
        if "content-length" not in headers:
            if headers.get("transfer-encoding"):
                raise ApiError("A request body needs a Content-Length header", code="GH411", status=411,
                               hint="Send the body with its length instead of chunked transfer encoding.")
            return
        yield await protocol()

    client = scope.client.rsplit(":", 1)[0].strip("[]") if scope.client else "unknown"
    return HttpRequest(
        method=scope.method, path=scope.path, query_string=scope.query_string, headers=headers,
        client=client, scheme=scope.scheme, body_chunks=chunks,
    )


async def serve_rsgi(handler: Handler, scope: RsgiScope, protocol: Any) -> None:
    response = await handler(rsgi_request(scope, protocol))
    protocol.response_bytes(response.status, response.header_list(), response.body)
