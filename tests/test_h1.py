"""The HTTP/1.1 server of ``gatehouse serve`` (``http/h1.py``, ``http/listener.py``), over real sockets.

A small handler stands in for the request path, so each test sends exact bytes and reads exact bytes:
keep-alive, pipelining, bodies (declared, chunked, ``Expect: 100-continue``), limits, timeouts, client
disconnects and graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httptools
import orjson
import pytest

from gatehouse.errors import ApiError
from gatehouse.http.exchange import HttpRequest, HttpResponse, json_response
from gatehouse.http.h1 import Limits
from gatehouse.http.listener import Listener
from gatehouse.http.responses import error_response

LIMIT = 1000  # the handler's body limit


@dataclass
class Served:
    listener: Listener
    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: list[str] = field(default_factory=list)
    refusals: list[int] = field(default_factory=list)
    """Statuses the connection layer answered itself (the listener's ``on_refusal``)."""

    @property
    def port(self) -> int:
        return self.listener.port


async def _handle(served: Served, request: HttpRequest) -> HttpResponse:
    if request.path == "/refuse":  # answers before reading the body
        return error_response(ApiError("No", code="GH401", status=401))
    if request.path == "/slow":
        served.started.set()
        try:
            await served.release.wait()
        except asyncio.CancelledError:
            served.cancelled.append(request.path)
            raise
    if request.path == "/bad-header":
        return HttpResponse(200, {"x-split": "a\r\nset-cookie: evil=1", "x-wide": "snow \u2603", "x-ok": "yes"})
    if request.path == "/big":
        return HttpResponse(200, {}, b"x" * 64_000_000)
    try:
        body = await request.body(LIMIT)
    except ApiError as exc:
        return error_response(exc)
    return json_response(orjson.dumps({"method": request.method, "path": request.path, "query": request.query_string,
                                       "body": body.decode(), "host": request.headers.get("host"),
                                       "client": request.client}))


@contextlib.asynccontextmanager
async def serving(**limits: float) -> AsyncIterator[Served]:
    served = Served(listener=None)  # type: ignore[arg-type]
    listener = Listener(lambda request: _handle(served, request), Limits(**limits),  # type: ignore[arg-type]
                        on_refusal=served.refusals.append)
    served.listener = listener
    await listener.start("127.0.0.1", 0)
    try:
        yield served
    finally:
        served.release.set()
        await listener.stop(grace=1)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        return orjson.loads(self.body)  # type: ignore[no-any-return]


class _Responses:
    """Parses a byte stream of responses (HEAD responses told apart by the caller)."""

    def __init__(self) -> None:
        self.done: list[Response] = []
        self.parser = httptools.HttpResponseParser(self)
        self.headers: dict[str, str] = {}
        self.body = b""

    def on_message_begin(self) -> None:
        self.headers, self.body = {}, b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append(Response(self.parser.get_status_code(), self.headers, self.body))


async def talk(port: int, *parts: bytes, pause: float = 0.0, wait: float = 5.0) -> tuple[list[Response], bool]:
    """Send ``parts`` (pausing between them), read until the server closes or ``wait`` passes; the
    responses, and whether the server closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for part in parts:
        writer.write(part)
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
    raw, closed = b"", False
    try:
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                raw += chunk
            closed = True
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    writer.close()
    responses = _Responses()
    responses.parser.feed_data(raw)
    return responses.done, closed


def get(path: str, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_keep_alive_answers_several_requests_on_one_connection_and_closes_when_asked() -> None:
    async with serving() as served:
        answers, closed = await talk(served.port, get("/a?x=1"), get("/b", "Connection: close"), pause=0.05)
    assert [(a.status, a.json()["path"], a.json()["query"]) for a in answers] == [(200, "/a", "x=1"), (200, "/b", "")]
    assert "connection" not in answers[0].headers and answers[1].headers["connection"] == "close"
    assert answers[0].headers["date"].endswith(" GMT") and answers[0].json()["client"] == "127.0.0.1"
    assert closed


async def test_http_1_0_closes_unless_it_asks_for_keep_alive() -> None:
    async with serving() as served:
        plain, closed = await talk(served.port, get("/", version="1.0"))
        kept, kept_closed = await talk(served.port, get("/", "Connection: keep-alive", version="1.0"), wait=0.5)
    assert plain[0].status == 200 and closed
    assert kept[0].status == 200 and not kept_closed


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with serving() as served:
        answers, _ = await talk(served.port, get("/1") + post("/2", b"two") + get("/3", "Connection: close"))
    assert [(a.json()["path"], a.json()["body"]) for a in answers] == [("/1", ""), ("/2", "two"), ("/3", "")]


async def test_more_pipelined_requests_than_the_limit_are_refused_after_the_first_ones() -> None:
    async with serving(max_pipelined=2) as served:
        answers, closed = await talk(served.port, get("/1") + get("/2") + get("/3") + get("/4"))
    assert [a.status for a in answers] == [200, 200, 503] and closed
    assert answers[2].json()["code"] == "GH503" and answers[2].headers["connection"] == "close"


async def test_a_chunked_body_is_read_like_a_declared_one() -> None:
    chunked = (b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    async with serving() as served:
        answers, _ = await talk(served.port, chunked, pause=0.05, wait=0.5)
    assert answers[0].status == 200 and answers[0].json()["body"] == "hello world"


async def test_a_body_over_the_limit_is_refused_and_the_connection_closed_unless_it_was_read_whole() -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with serving() as served:
        declared, declared_closed = await talk(served.port, post("/echo", b"x" * (LIMIT + 1))[:-10])
        chunked, chunked_closed = await talk(served.port, head, b"400\r\n" + b"x" * 1024 + b"\r\n", pause=0.1)
        whole, whole_closed = await talk(served.port, post("/echo", b"x" * (LIMIT + 1)) + get("/next"), wait=0.5)
    assert declared[0].status == 413 and declared_closed and declared[0].headers["connection"] == "close"
    assert chunked[0].status == 413 and chunked_closed and chunked[0].headers["connection"] == "close"
    assert [a.status for a in whole] == [413, 200] and not whole_closed  # nothing of it left to skip


async def test_a_malformed_chunked_body_answers_the_handlers_error_and_closes() -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with serving() as served:
        answers, closed = await talk(served.port, head, b"5\r\nhello\r\nZZ\r\n", pause=0.1)
    assert [a.status for a in answers] == [400] and closed and answers[0].headers["connection"] == "close"
    assert answers[0].json()["code"] == "GH400"


async def test_expect_100_continue_is_answered_only_when_the_body_is_wanted() -> None:
    head = b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    async with serving() as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(head % b"/echo")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"hello")
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        refused, closed = await talk(served.port, head % b"/refuse")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n" and final.startswith(b"HTTP/1.1 200 OK")
    assert [a.status for a in refused] == [401] and closed  # no 100: the client never sends the body


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"BLAH\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (get("/" + "a" * 9000), 414),
    (get("/", "X-Big: " + "b" * 40_000), 431),
    (get("/", *[f"X-{n}: v" for n in range(150)]), 431),
])
async def test_a_request_that_cannot_be_read_gets_an_error_and_the_connection_closes(request_bytes: bytes,
                                                                                     status: int) -> None:
    async with serving() as served:
        answers, closed = await talk(served.port, request_bytes)
        after, _ = await talk(served.port, get("/still-up", "Connection: close"))
    assert [a.status for a in answers] == [status] and closed
    assert answers[0].json()["code"] == f"GH{status}"  # PostgREST's shape
    assert after[0].status == 200
    assert served.refusals == [status]  # reported, since no handler (nor its metrics) saw it


async def test_an_upgrade_request_is_answered_as_http_1_1_and_the_connection_closed() -> None:
    upgrade = get("/ws", "Upgrade: websocket", "Connection: upgrade") + b"\x81\x05hello"
    async with serving() as served:
        answers, closed = await talk(served.port, upgrade)
    assert [a.status for a in answers] == [200] and answers[0].headers["connection"] == "close" and closed


async def test_slow_headers_get_408_and_an_idle_connection_is_closed() -> None:
    async with serving(header_timeout=0.3, keepalive_timeout=0.3) as served:
        slow, slow_closed = await talk(served.port, b"GET / HTTP/1.1\r\nHost: te")
        idle, idle_closed = await talk(served.port, get("/"))
        silent, silent_closed = await talk(served.port)
    assert [a.status for a in slow] == [408] and slow_closed
    assert [a.status for a in idle] == [200] and idle_closed
    assert silent == [] and silent_closed
    assert served.refusals == [408]


async def test_connections_over_the_limit_are_refused_with_503() -> None:
    async with serving(max_connections=1) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(get("/"))
        await reader.readuntil(b"\r\n\r\n")
        refused, closed = await talk(served.port, get("/"))
        writer.close()
    assert [a.status for a in refused] == [503] and closed
    assert served.refusals == [503]


async def test_a_client_that_goes_away_cancels_its_request() -> None:
    async with serving() as served:
        _reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(get("/slow"))
        await asyncio.wait_for(served.started.wait(), 5)
        writer.close()
        for _ in range(100):
            if served.cancelled:
                break
            await asyncio.sleep(0.02)
    assert served.cancelled == ["/slow"]


async def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout() -> None:
    async with serving(send_timeout=0.3) as served:
        _reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(get("/big"))
        for _ in range(150):
            if not served.listener.connections:
                break
            await asyncio.sleep(0.02)
        assert not served.listener.connections
        writer.close()


async def test_stopping_finishes_the_request_being_answered_and_refuses_new_connections() -> None:
    async with serving() as served:
        port = served.port
        busy = asyncio.create_task(talk(port, get("/slow")))
        await asyncio.wait_for(served.started.wait(), 5)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", served.port)
        idle_writer.write(get("/"))
        await idle_reader.readuntil(b"\r\n\r\n")
        stopping = asyncio.create_task(served.listener.stop(grace=5))
        await asyncio.sleep(0.1)
        rest = await asyncio.wait_for(idle_reader.read(), 5)  # the idle connection is closed at once
        assert rest.endswith(b"}")  # its body, then the end
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        served.release.set()
        answers, closed = await busy
        await stopping
    assert [a.status for a in answers] == [200] and answers[0].headers["connection"] == "close" and closed
    assert served.cancelled == []


async def test_head_sends_the_headers_of_get_without_a_body() -> None:
    async with serving() as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"HEAD /x HTTP/1.1\r\nHost: test\r\n\r\n" + get("/after", "Connection: close"))
        raw = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: " in head.lower()
    assert rest.startswith(b"HTTP/1.1 200 OK")  # the next response follows the headers directly


async def test_targets_are_decoded_like_asgi_paths() -> None:
    async with serving() as served:
        answers, _ = await talk(served.port, get("/caf%C3%A9?name=eq.caf%C3%A9") +
                                get("http://example.com/abs?q=1", "Connection: close"))
    assert (answers[0].json()["path"], answers[0].json()["query"]) == ("/café", "name=eq.caf%C3%A9")
    assert (answers[1].json()["path"], answers[1].json()["query"]) == ("/abs", "q=1")


async def test_a_header_value_that_would_split_the_response_is_never_written() -> None:
    async with serving() as served:
        answers, _ = await talk(served.port, get("/bad-header", "Connection: close"))
    headers = answers[0].headers
    assert answers[0].status == 200 and headers["x-ok"] == "yes"
    assert "set-cookie" not in headers and "x-split" not in headers and "x-wide" not in headers
