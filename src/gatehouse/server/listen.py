"""Can ``gatehouse serve`` listen where it was asked to? Checked first, before the project's databases are
logged in to (which starts an embedded one), so that a port in use is said at once, with what to do."""

from __future__ import annotations

import socket

from gatehouse.errors import ProjectError


def bind_probe(host: str, port: int) -> int:
    """Bind a socket to the address the way the HTTP server will (``SO_REUSEADDR``: a port in TIME_WAIT is
    free) and close it; the port bound (useful with port 0). Raises ``OSError`` when it cannot."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        return int(probe.getsockname()[1])


def cannot_listen(exc: OSError, host: str, port: int, what: str, option: str) -> ProjectError:
    if isinstance(exc, socket.gaierror):
        return ProjectError(f"the {what} address {host!r} does not resolve: {exc.strerror}",
                            hint="Use an IP address or a name this machine resolves.")
    reason = exc.strerror or str(exc)
    return ProjectError(f"cannot listen on {host}:{port} for the {what} port: {reason}",
                        hint=f"Stop what uses it, or choose another port with {option}.")


def check_listenable(host: str, port: int, what: str, option: str) -> int:
    """The port to listen on (a free one for port 0), or a :class:`ProjectError` saying why it cannot be."""
    try:
        return bind_probe(host, port)
    except OSError as exc:
        raise cannot_listen(exc, host, port, what, option) from None


def check_ports(host: str, port: int, admin_host: str, admin_port: int) -> tuple[int, int]:
    """The data and admin ports to listen on (a free one for port 0), or a :class:`ProjectError` saying why
    they cannot be: the same number for both, or one that cannot be bound."""
    if port == admin_port:
        raise ProjectError(f"the data and admin ports are both {port}",
                           hint="Give the admin port another number with --admin-port.")
    return (check_listenable(host, port, "data", "--port"),
            check_listenable(admin_host, admin_port, "admin", "--admin-port"))
