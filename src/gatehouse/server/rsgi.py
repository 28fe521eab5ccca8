"""granian's RSGI in, :class:`HttpRequest` out, and back; plus the checks of the wire that hyper leaves to us.

granian (Rust's hyper) parses HTTP/1.1 and HTTP/2, frames bodies, answers ``Expect: 100-continue``, bounds the
header block (431), times out slow or idle connections and stops gracefully. What it passes through and an API
gateway must still refuse is checked here, before a request reaches any endpoint:

* a URL longer than ``[server] max_query_length`` (414); one that is not UTF-8 once decoded is the data app's
  and the query parser's to refuse (400), as for any other server;
* a ``Transfer-Encoding`` other than plain ``chunked`` (501, as RFC 9112 §6.1 asks: a proxy in front might
  frame ``gzip, chunked`` differently, which is how requests get smuggled). ``Content-Length`` together with
  ``Transfer-Encoding`` is hyper's: it frames the body by the latter and closes the connection after the
  answer, as RFC 9112 §6.3 requires;
* a body that does not arrive whole within ``[server] body_timeout_s`` (408, by :meth:`HttpRequest.body`).

Each refusal is answered in PostgREST's error shape, counted by ``on_refusal`` (the port's metrics), and closes
the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gatehouse.errors import (
    ApiError,
    UnsupportedTransferCoding,
    UrlTooLong,
)
from gatehouse.http.deadlines import BodyDeadlines
from gatehouse.http.exchange import Handler, HttpRequest, HttpResponse, add_header
from gatehouse.http.responses import error_response
from gatehouse.server.proxies import TrustedProxies


def _wire_error(scope: Any, headers: dict[str, str], max_url: int) -> ApiError | None:
    """What is wrong with the request's framing or URL, before any endpoint sees it; None when nothing is."""
    path, query = scope.path, scope.query_string
    if len(path) + len(query) > max_url:
        return UrlTooLong(f"The URL may be at most {max_url} bytes")
    coding = headers.get("transfer-encoding")
    if coding is not None and coding.strip().lower() != "chunked":
        return UnsupportedTransferCoding(f"Transfer-Encoding '{coding[:40]}' is not supported",
                                         hint="Send the body with Content-Length or plain chunked encoding.")
    return None


class RsgiApp:
    """An RSGI application (``__rsgi__``) serving ``handler``: one per port."""

    def __init__(self, handler: Handler, *, max_url_bytes: int, body_timeout_s: float | None,
                 proxies: TrustedProxies | None = None, on_refusal: Callable[[int], None] | None = None) -> None:
        self.handler = handler
        self.max_url_bytes = max_url_bytes
        self.body_deadlines = BodyDeadlines(body_timeout_s) if body_timeout_s is not None else None
        self.proxies = proxies or TrustedProxies()
        self.on_refusal = on_refusal

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        headers: dict[str, str] = {}
        for name, value in scope.headers.items():
            add_header(headers, name, value)
        refused = _wire_error(scope, headers, self.max_url_bytes)
        if refused is not None:
            if self.on_refusal is not None:
                self.on_refusal(refused.status)
            self._send(protocol, error_response(refused), close=True)
            return
        origin = self.proxies.origin(scope.client, scope.scheme, headers)
        # The body is read by the protocol itself: in chunks (its async iterator), or whole (calling it) when
        # Content-Length alone frames it (HttpRequest.body); no generator of ours in between.
        request = HttpRequest(scope.method, scope.path, scope.query_string, headers, origin.client, origin.scheme,
                              body_chunks=lambda: protocol,
                              body_whole=protocol if "transfer-encoding" not in headers else None,
                              body_deadlines=self.body_deadlines)
        self._send(protocol, await self.handler(request))

    def __rsgi_init__(self, loop: Any) -> None:
        """Called by granian once its worker runs; nothing to set up (the runtime is opened by ``serve``)."""

    def __rsgi_del__(self, loop: Any) -> None:
        """Called by granian when its worker stops."""

    @staticmethod
    def _send(protocol: Any, response: HttpResponse, *, close: bool = False) -> None:
        headers = [*response.headers.items()]
        if response.media_type is not None:
            headers.append(("Content-Type", response.media_type))
        if close:
            headers.append(("Connection", "close"))
        # hyper writes Content-Length from the body, and for HEAD the headers of that body without it
        protocol.response_bytes(response.status, headers, response.body)
