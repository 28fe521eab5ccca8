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
    """Status line, headers (with ``Date``, and ``Connection: close`` when closing) and body, as bytes."""
    status = response.status
    status_line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Status {status}\r\n".encode()
    pairs = response.header_list()
    pairs.append(("date", _http_date()))
    if not keep_alive:
        pairs.append(("connection", "close"))
    block = "".join([f"{name}: {value}\r\n" for name, value in pairs])
    lines = len(pairs)
    if block.count("\n") != lines or block.count("\r") != lines or not block.isascii():
        block = _safe_block(pairs)
    return b"".join((status_line, block.encode("latin-1"), b"\r\n", b"" if head else response.body))


def _safe_block(pairs: list[tuple[str, str]]) -> str:
    """The header block without any header that would break the framing or not encode."""
    lines = []
    for name, value in pairs:
        line = f"{name}: {value}\r\n"
        try:
            line.encode("latin-1")
        except UnicodeEncodeError:
            log.warning("dropped the response header %r: its value is not Latin-1", name[:64])
            continue
        if line.count("\n") != 1 or line.count("\r") != 1:
            log.warning("dropped the response header %r: it holds a line break", name[:64])
            continue
        lines.append(line)
    return "".join(lines)


_date_second = 0
_date_text = ""


def _http_date() -> str:
    global _date_second, _date_text
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_text = now, formatdate(now, usegmt=True)
    return _date_text
