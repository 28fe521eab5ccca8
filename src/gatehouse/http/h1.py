"""HTTP/1.1 connections on the event loop's own thread: httptools (Node's llhttp parser) reads the bytes, a
:class:`Connection` turns each request into an :class:`HttpRequest`, awaits ``handle(request)`` and writes the
:class:`HttpResponse` back.

Why gatehouse runs its own connection layer: on a point lookup, handing each request from a server's own
threads to the event loop (granian) cost more than parsing it here, and uvicorn's general ASGI machinery cost
more again (bench/README.md has the measurements). What a server must get right is here, each part bounded:

- keep-alive (HTTP/1.1 by default, HTTP/1.0 when asked) and pipelining: requests are answered one at a time,
  in order; at most ``Limits.max_pipelined`` are read ahead, and reading pauses while any wait;
- the request line and headers are capped in bytes and count (414, 431), and must arrive within
  ``header_timeout`` (408, against slow-header clients); an idle connection closes after ``keepalive_timeout``;
- bodies (declared or chunked) stream to the handler, which enforces its own size limit; reading pauses while
  more than ``_BODY_HIGH_WATER`` bytes wait unread; ``Expect: 100-continue`` is answered when the handler
  first reads the body, so a request refused before that (401, 413) never has its body sent;
- a response that leaves part of its request's body unread, a parse error, an upgrade request and server
  shutdown all end the connection after the response (``Connection: close``, then a lingering close so the
  client reads the answer before the socket goes);
- a client that goes away cancels its request's handler (counted as 499 by the request guard); one that stops
  reading responses is dropped after ``send_timeout``;
- responses are framed by ``http/framing.py``, which never writes a header that would split the response.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote

import httptools

from gatehouse.errors import ApiError, InternalError
from gatehouse.http.exchange import HttpRequest, add_header, no_body
from gatehouse.http.framing import serialize
from gatehouse.http.responses import error_response

if TYPE_CHECKING:
    from gatehouse.http.listener import Listener

log = logging.getLogger("gatehouse.http")

_BODY_HIGH_WATER = 256 * 1024
_LINGER_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection may hold or take; the defaults suit an API behind a load balancer."""

    max_header_bytes: int = 32_768
    """Request line plus headers of one request (431 beyond)."""
    max_url_bytes: int = 8192
    """The request target: path and query string (414 beyond)."""
    max_headers: int = 100
    max_pipelined: int = 32
    """Requests read ahead of the one being answered; more in one go end the connection (503)."""
    header_timeout: float = 10.0
    """From a request's first byte to the end of its headers (408)."""
    keepalive_timeout: float = 5.0
    """Idle time between requests before the connection is closed."""
    body_timeout: float = 30.0
    """Longest wait for the next bytes of a body the handler is reading (408)."""
    send_timeout: float = 30.0
    """Longest wait for a client that reads none of its response (the connection is dropped)."""
    max_connections: int = 4096
    """Open connections per port; one more is answered 503 and closed."""


class _Refused(Exception):
    """Raised in a parser callback to stop reading: answer ``error`` (after any earlier responses), then close."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def _refusal(status: int, message: str, hint: str) -> _Refused:
    return _Refused(ApiError(message, code=f"GH{status}", status=status, hint=hint))


def _gone() -> ApiError:
    """The client closed the connection before the request was whole (nginx's 499; nobody reads the answer)."""
    return ApiError("The client closed the connection", code="GH499", status=499)


class RequestBody:
    """One request's body as it arrives: the parser queues chunks, the handler iterates them."""

    __slots__ = ("buffered", "complete", "connection", "expect_continue", "failure", "queue", "waiter")

    def __init__(self, connection: Connection, *, expect_continue: bool) -> None:
        self.connection = connection
        self.queue: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.failure: ApiError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.expect_continue = expect_continue

    def feed(self, chunk: bytes) -> None:
        self.queue.append(chunk)
        self.buffered += len(chunk)
        self.wake()

    def end(self, failure: ApiError | None = None) -> None:
        self.complete = True
        self.failure = self.failure or failure
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        connection = self.connection
        if self.expect_continue and not self.complete and not self.queue:
            connection.write_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.expect_continue = False
        while True:
            while self.queue:
                chunk = self.queue.popleft()
                self.buffered -= len(chunk)
                connection.update_reading()
                yield chunk
            if self.failure is not None:
                raise self.failure
            if self.complete:
                return
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, connection.limits.body_timeout)
            except TimeoutError:
                raise ApiError("The request body stopped arriving", code="GH408", status=408,
                               hint="Send the whole body without pauses.") from None
            finally:
                self.waiter = None


# A request waiting for its answer: the request (None when it could not be read), whether the connection may
# stay open after it, its body (None without one), and the error to answer instead of calling the handler.
# A plain tuple: one is made per request, and a class's __init__ costs a Python call.
_Exchange = tuple[HttpRequest | None, bool, "RequestBody | None", ApiError | None]


class Connection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order, close when it should."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.limits = listener.limits
        self.handler = listener.handler
        self.loop = listener.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client = "unknown"
        self.pending: deque[_Exchange] = deque()
        self.responder: asyncio.Task[None] | None = None
        """The task answering this connection's requests in order, from its first request until it closes."""
        self.next_request: asyncio.Future[None] | None = None
        """What the responder awaits while no request is queued (one future per wait is cheaper than a task
        per request)."""
        self.receiving: RequestBody | None = None
        self.deadline: float | None = None
        self.in_request = False  # between a request's first byte and the end of its headers
        self.busy = False  # the responder is answering a request taken off the queue
        self.read_done = False  # no further request will be read (close after what is queued)
        self.finished = False  # the last response is written: lingering until the client closes
        self.lost = False
        self.reading_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_bytes = 0

    # -- transport events --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        if not self.listener.admit(self):
            self.read_done = self.finished = True
            busy = ApiError("Too many connections", code="GH503", status=503, hint="Retry in a moment.")
            self.listener.refused(503)
            transport.write(serialize(error_response(busy), head=False, keep_alive=False))
            transport.close()
            return
        self.deadline = self.loop.time() + self.limits.header_timeout

    def data_received(self, data: bytes) -> None:
        if self.read_done:
            return  # after the last request this connection reads: lingering, or waiting to close
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # no protocol upgrades: the request is answered as HTTP/1.1, then the connection closes
            self.read_done = True
            if self.pending:
                request, _, body, refusal = self.pending[-1]
                self.pending[-1] = (request, False, body, refusal)
        except httptools.HttpParserError as exc:
            refused = exc.__context__ if isinstance(exc.__context__, _Refused) else None
            error = refused.error if refused else ApiError("Malformed HTTP request", code="GH400", status=400,
                                                           hint="Send a valid HTTP/1.1 request.")
            self.stop_reading(error)

    def eof_received(self) -> bool | None:
        return None  # the client closed its side: it is gone (the transport closes, connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.listener.forget(self)
        if self.receiving is not None:
            self.receiving.end(_gone())
        if self.responder is not None:
            self.responder.cancel()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    # -- parser callbacks (httptools calls these while feed_data runs) -------------------------------------

    def on_message_begin(self) -> None:
        self.in_request = True
        self.url = b""
        self.headers = {}
        self.header_bytes = 0
        self.deadline = self.loop.time() + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)
        if len(self.url) > self.limits.max_url_bytes:
            raise _refusal(414, "URI too long", "Send a shorter URL: fewer or shorter filters.")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.limits.max_header_bytes:
            raise _refusal(431, "Request header fields too large", "Send fewer or smaller headers.")
        add_header(self.headers, name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        limits, pending, headers = self.limits, self.pending, self.headers
        if len(headers) > limits.max_headers:  # (their bytes are capped as they arrive)
            raise _refusal(431, "Too many request header fields", f"Send at most {limits.max_headers} headers.")
        if len(pending) >= limits.max_pipelined:
            raise _refusal(503, "Too many pipelined requests",
                           f"Send at most {limits.max_pipelined} requests ahead of their answers.")
        self.in_request = False
        self.deadline = None
        url = self.url
        if url[:1] == b"/" and b"%" not in url:  # origin form, nothing to decode: almost every request
            path, _, query = url.decode("latin-1").partition("?")
        else:
            path, query = self._target()
        body = None
        if "content-length" in headers or "transfer-encoding" in headers:
            body = self.receiving = RequestBody(
                self, expect_continue=headers.get("expect", "").lower() == "100-continue")
        request = HttpRequest(method=self.parser.get_method().decode("ascii"), path=path, query_string=query,
                              headers=headers, client=self.client,
                              body_chunks=body.chunks if body is not None else no_body)
        keep_alive = self.parser.should_keep_alive() and not self.listener.closing
        pending.append((request, keep_alive, body, None))
        if not keep_alive:
            self.read_done = True
        self.wake_responder()
        if self.busy or len(pending) > 1:
            self.update_reading()

    def on_body(self, chunk: bytes) -> None:
        if self.receiving is not None:
            self.receiving.feed(chunk)
            self.update_reading()

    def on_message_complete(self) -> None:
        if self.receiving is not None:
            self.receiving.end()
            self.receiving = None

    def _target(self) -> tuple[str, str]:
        """Path (percent-decoded, as ASGI gives it) and query string (as sent) of any request-target form."""
        target = self.url.decode("latin-1")
        if target[:1] != "/":  # absolute form (a proxy's) or "*"
            if target == "*":
                return "*", ""
            url = httptools.parse_url(self.url)
            target = (url.path or b"/").decode("latin-1") + (f"?{url.query.decode('latin-1')}" if url.query else "")
        path, _, query = target.partition("?")
        return (unquote(path) if "%" in path else path), query

    # -- answering ---------------------------------------------------------------------------------------

    def wake_responder(self) -> None:
        """A request was queued: start the responder, or wake it if it waits for one."""
        if self.responder is None:
            self.responder = self.loop.create_task(self.respond())
        elif self.next_request is not None:
            self.next_request.set_result(None)
            self.next_request = None

    @property
    def answering(self) -> bool:
        """A request is being answered or queued to be (the responder is not idle)."""
        return self.responder is not None and self.next_request is None

    async def respond(self) -> None:
        """Answer the queued requests in order; between them, wait for the next (the connection's one task)."""
        pending = self.pending
        try:
            while not self.lost:
                if not pending:
                    if self.finished:
                        return
                    if self.read_done:
                        self.linger()
                        return
                    # the next request has its whole header timeout from now, if it has begun
                    wait = self.limits.header_timeout if self.in_request else self.limits.keepalive_timeout
                    self.deadline = self.loop.time() + wait
                    if self.reading_paused:
                        self.update_reading()
                    self.next_request = self.loop.create_future()
                    await self.next_request
                    continue
                request, keep_alive, body, refusal = pending.popleft()
                self.busy = True
                if self.reading_paused:
                    self.update_reading()
                if refusal is not None or request is None:
                    response = error_response(refusal or InternalError("Internal error"))
                    self.listener.refused(response.status)
                else:
                    try:
                        response = await self.handler(request)
                    except Exception as exc:  # the data port's guard answers its own errors: a last resort
                        log.error("unhandled %s answering %s %s", type(exc).__name__, request.method, request.path)
                        response = error_response(InternalError("Internal error"))
                # the connection is reusable only if this request's body was read to its end, without error
                whole = body is None or (body.complete and body.failure is None)
                keep_alive = keep_alive and whole and not self.listener.closing
                self.write_raw(serialize(response, head=request is not None and request.method == "HEAD",
                                         keep_alive=keep_alive))
                self.busy = False
                if not keep_alive:
                    pending.clear()
                    self.linger()
                    return
                if self.drained is not None:
                    await self._drain()
        except Exception as exc:  # a bug here must not leave the connection hanging
            log.error("connection from %s failed: %s", self.client, type(exc).__name__)
            self.abort()
        finally:
            self.responder = self.next_request = None
            self.busy = False

    async def _drain(self) -> None:
        assert self.drained is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.drained), self.limits.send_timeout)
        except TimeoutError:
            self.abort()

    def write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def update_reading(self) -> None:
        """Read while nothing is queued and the body being received is not piling up; else pause."""
        transport = self.transport
        if transport is None or self.lost or self.finished:
            return
        body = self.receiving
        # one request in hand (being answered, or queued with nobody answering yet) is not reading ahead
        want = len(self.pending) + self.busy <= 1 and (body is None or body.buffered < _BODY_HIGH_WATER)
        if want and self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        elif not want and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()

    def stop_reading(self, error: ApiError) -> None:
        """A request could not be read: its body reader (if the handler has one) or the queue gets ``error``."""
        self.read_done = True
        if self.receiving is not None:
            self.receiving.end(error)
            self.receiving = None
            return
        self.pending.append((None, False, None, error))
        self.wake_responder()

    # -- ending ------------------------------------------------------------------------------------------

    def linger(self) -> None:
        """Send FIN after the last response and read (and drop) until the client closes, for a short while,
        so the client is not reset before it reads the answer."""
        if self.transport is None or self.lost or self.finished:
            return
        self.finished = True
        self.read_done = True
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.deadline = self.loop.time() + _LINGER_SECONDS

    def expire(self) -> None:
        """The deadline passed: idle or lingering connections close; one stuck in its headers gets a 408."""
        self.deadline = None
        if self.finished or (not self.answering and not self.in_request):
            self.close()
        elif not self.answering:
            self.stop_reading(ApiError("Request header timeout", code="GH408", status=408,
                                       hint="Send the request line and headers without pauses."))

    def shutdown(self) -> None:
        """The server stops: a connection closes now unless a request of it is being answered, in which case
        it closes after that response (a request still arriving is dropped)."""
        if not self.answering:
            self.close()
        else:
            self.read_done = True

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
