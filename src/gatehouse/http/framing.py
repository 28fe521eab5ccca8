"""How an :class:`HttpResponse` becomes HTTP/1.1 bytes: status line, headers, ``Date``, ``Connection: close``
when the connection ends after it, and the body (none for ``HEAD``).

A header value holding CR or LF, or a character Latin-1 cannot encode, is never written, whatever a handler
put in it: the header is dropped and logged by name (no response splitting). The check is one pass over
the whole header block, so the usual response pays for no per-header work.
"""

from __future__ import annotations

import logging
import time
from email.utils import formatdate
from http import HTTPStatus

from gatehouse.http.exchange import HttpResponse

log = logging.getLogger("gatehouse.http")
_STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus}


def serialize(response: HttpResponse, *, head: bool, keep_alive: bool) -> bytes:
    """Status line, headers (with ``Content-Type``, ``Content-Length``, ``Date``, and ``Connection: close`` when
    closing) and body, as bytes. Header names go out as the handler spelled them (HTTP/1.1 ignores their case)."""
    status = response.status
    status_line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Status {status}\r\n".encode()
    lines = [f"{name}: {value}\r\n" for name, value in response.headers.items()]
    lines += [f"{name}: {value}\r\n" for name, value in response.body_headers()]
    lines.append(_date_line())
    if not keep_alive:
        lines.append("Connection: close\r\n")
    block = "".join(lines)
    count = len(lines)
    if block.count("\n") != count or block.count("\r") != count or not block.isascii():
        block = _safe_block(lines)
    return b"".join((status_line, block.encode("latin-1"), b"\r\n", b"" if head else response.body))


def _safe_block(lines: list[str]) -> str:
    """The header block without any header line that would break the framing or not encode."""
    kept = []
    for line in lines:
        name = line.partition(":")[0][:64]
        try:
            line.encode("latin-1")
        except UnicodeEncodeError:
            log.warning("dropped the response header %r: its value is not Latin-1", name)
            continue
        if line.count("\n") != 1 or line.count("\r") != 1:
            log.warning("dropped the response header %r: it holds a line break", name)
            continue
        kept.append(line)
    return "".join(kept)


_date_second = 0
_date_line_text = ""


def _date_line() -> str:
    """``Date: <now>\\r\\n``, formatted once a second."""
    global _date_second, _date_line_text
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_line_text = now, f"Date: {formatdate(now, usegmt=True)}\r\n"
    return _date_line_text
