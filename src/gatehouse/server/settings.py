"""``[server]`` as granian's settings: the limits of the wire, TLS and HTTP/2, and the open files they need.

What each setting becomes:

* ``max_connections`` → granian's ``backpressure``: connections one port serves at once. A connection beyond
  it is not accepted until one closes; it waits in the listen backlog (``backlog``), which the kernel bounds.
* ``max_header_bytes`` → hyper's read buffer: a request line and headers that do not fit get 431 and the
  connection is closed, without buffering more than the limit.
* ``header_timeout_s`` → hyper's header read timeout. hyper starts it whenever the connection waits for a
  request head, so it bounds both a slow request head and an idle keep-alive connection; the connection is
  closed when it passes.
* ``tls_cert_file`` / ``tls_key_file`` → HTTPS, with HTTP/2 offered by ALPN; ``http`` picks the protocol
  (``auto`` also accepts HTTP/2 with prior knowledge on plain connections).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings, HTTP2Settings
from granian.log import LogLevels

from gatehouse.config import ServerConfig
from gatehouse.errors import ProjectError
from gatehouse.secrets import resolve_secret

log = logging.getLogger("gatehouse.serve")
_SPARE_FILES = 256  # open files kept for everything but client connections: pools, logs, the audit spool
_HYPER_MIN_BUFFER = 8192
_HYPER_MAX_HEADER_TIMEOUT_MS = 60_000


def open_files_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files toward ``wanted`` (never past the hard limit) and return
    the limit now in force; without the ``resource`` module (Windows), ``wanted``."""
    try:
        import resource
    except ImportError:
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def connection_limit(server: ServerConfig) -> int:
    """``max_connections``, lowered (with a warning) when the process may not open enough files for both ports to
    reach it, so that a flood of connections waits in the backlog instead of leaving no file for a database
    connection."""
    wanted = 2 * server.max_connections + _SPARE_FILES
    available = open_files_limit(wanted)
    if available >= wanted:
        return server.max_connections
    connections = max(1, (available - _SPARE_FILES) // 2)
    log.warning("this process may open only %d files: serving at most %d connections per port instead of "
                "[server] max_connections = %d (raise `ulimit -n` to %d to allow them)",
                available, connections, server.max_connections, wanted)
    return connections


def _tls_file(root: Path, value: str | None, key: str) -> Path | None:
    if value is None:
        return None
    path = (root / value).resolve()
    if not path.is_file():
        raise ProjectError(f"[server] {key} = {value!r}: there is no file {path}",
                           where="gatehouse.toml", hint="Give the path of a PEM file, relative to the project.")
    return path


def granian_options(server: ServerConfig, root: Path) -> dict[str, Any]:
    """Keyword arguments of granian's embedded ``Server`` (besides the address) for one port."""
    cert = _tls_file(root, server.tls_cert_file, "tls_cert_file")
    key = _tls_file(root, server.tls_key_file, "tls_key_file")
    if (cert is None) != (key is None):
        raise ProjectError("[server] tls_cert_file and tls_key_file go together", where="gatehouse.toml",
                           hint="Set both (PEM files; the key in PKCS#8) or neither.")
    if server.keepalive_timeout_s is not None:
        log.warning("[server] keepalive_timeout_s is no longer used: header_timeout_s (%g s) bounds idle "
                    "keep-alive connections too; remove it from gatehouse.toml", server.header_timeout_s)
    header_timeout_ms = min(_HYPER_MAX_HEADER_TIMEOUT_MS, max(1, round(server.header_timeout_s * 1000)))
    options: dict[str, Any] = {
        "interface": Interfaces.RSGI,
        "http": HTTPModes(server.http),
        "websockets": False,
        "backlog": 1024,
        "backpressure": connection_limit(server),
        "http1_settings": HTTP1Settings(header_read_timeout=header_timeout_ms, keep_alive=True,
                                        max_buffer_size=max(_HYPER_MIN_BUFFER, server.max_header_bytes)),
        "http2_settings": HTTP2Settings(max_headers_size=server.max_header_bytes),
        # granian's own log lines go to its logger '_granian', which propagates to ours; only its errors matter
        "log_level": LogLevels.error,
        "log_dictconfig": {"version": 1, "disable_existing_loggers": False,
                           "loggers": {"_granian": {"handlers": [], "propagate": True}}},
    }
    if cert is not None and key is not None:
        password = resolve_secret(server.tls_key_password, what="[server] tls_key_password")
        _check_tls_pair(cert, key, password)
        options.update(ssl_cert=cert, ssl_key=key, ssl_key_password=password)
    return options


def _check_tls_pair(cert: Path, key: Path, password: str | None) -> None:
    """Load the pair once as the server will, so that a wrong file is a clear error before anything starts."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password)
    except (ssl.SSLError, ValueError) as exc:
        raise ProjectError(f"[server] tls_cert_file {cert.name} and tls_key_file {key.name} cannot be used: "
                           f"{getattr(exc, 'reason', None) or exc}", where="gatehouse.toml",
                           hint="Both must be PEM: the certificate (chain) and its private key in PKCS#8; a key "
                                "with a password needs tls_key_password = \"env:VAR\".") from None
