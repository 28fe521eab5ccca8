"""ASGI in, :class:`HttpRequest` out, and back: how tests (httpx's ASGITransport) and any ASGI server reach the
data and admin ports. ``gatehouse serve`` runs them on granian through RSGI instead (``server/rsgi.py``).

``handle(request) -> HttpResponse`` is the whole data port; each function here only translates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from gatehouse.http.exchange import Handler, HttpRequest, HttpResponse, joined_headers

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


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
    headers = joined_headers([(name.decode("latin-1").lower(), value.decode("latin-1"))
                              for name, value in scope["headers"]])
    return HttpRequest(
        method=scope["method"], path=scope["path"], query_string=scope.get("query_string", b"").decode("latin-1"),
        headers=headers, client=client[0] if client else "unknown", scheme=scope.get("scheme", "http"),
        root_path=scope.get("root_path", ""), body_chunks=chunks,
    )


async def asgi_send(response: HttpResponse, send: Send, *, head: bool = False) -> None:
    """The response; for ``HEAD``, its headers (``Content-Length`` of the whole body included) without the body."""
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.header_list()]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else response.body})


async def serve_asgi(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    await asgi_send(await handler(asgi_request(scope, receive)), send, head=scope["method"] == "HEAD")
