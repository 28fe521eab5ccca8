"""Who is really calling when gatehouse sits behind a load balancer: ``[server] trusted_proxies``.

``Forwarded`` (RFC 7239), ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are believed only from a peer listed in
``trusted_proxies`` (addresses or CIDRs); from anyone else they are ignored, since any client can write them.
The chain is read from the right (the hop nearest to gatehouse) and every trusted proxy in it is skipped: the
first address that is not a trusted proxy is the client. So a client that writes its own ``X-Forwarded-For:
1.2.3.4`` before the proxy appends the real address gains nothing: the proxy's append is what is read.

The client address found here is what the audit, the request log and the failed-authentication throttle use.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
UNKNOWN = "unknown"
_MAX_HOPS = 32
"""Forwarding chains longer than this are read only at their right end: a client cannot make us parse megabytes."""


def peer_host(peer: str) -> str:
    """``host`` of a transport address written ``host:port`` or ``[v6]:port`` (as granian gives it)."""
    if peer.startswith("["):
        return peer[1:peer.find("]")] if "]" in peer else peer
    host, sep, port = peer.rpartition(":")
    if not sep or ":" in host:  # no port, or a bare IPv6 address
        return peer
    return host if port.isdigit() else peer


def _node_host(node: str) -> str | None:
    """The address in one ``for=`` / ``X-Forwarded-For`` node, without quotes, brackets or port; None when it
    is not an IP address (``unknown``, an obfuscated ``_name``, garbage)."""
    node = node.strip().strip('"').strip()
    host = peer_host(node) if node.startswith("[") or node.count(":") == 1 else node
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Origin:
    client: str
    scheme: str


def _forwarded_elements(value: str) -> list[dict[str, str]]:
    """``Forwarded: for=1.2.3.4;proto=https, for="[2001:db8::1]:80"`` → one dict per element (lower-cased
    parameter names)."""
    elements = []
    for element in value.split(",")[-_MAX_HOPS:]:
        params: dict[str, str] = {}
        for pair in element.split(";"):
            name, sep, raw = pair.partition("=")
            if sep:
                params[name.strip().lower()] = raw.strip().strip('"')
        elements.append(params)
    return elements


class TrustedProxies:
    """The networks whose forwarding headers are believed. With none (the default) every request's client is its
    transport peer, at the cost of one string split."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self._trusted: dict[str, bool] = {}
        """Per address seen: is it one of the networks (bounded: cleared when it grows past 10,000)."""

    def trusts(self, host: str) -> bool:
        known = self._trusted.get(host)
        if known is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                known = False
            else:
                known = any(address in network for network in self.networks)
            if len(self._trusted) > 10_000:
                self._trusted.clear()
            self._trusted[host] = known
        return known

    def origin(self, peer: str, transport_scheme: str, headers: Mapping[str, str]) -> Origin:
        """The client address and scheme of a request that arrived from ``peer`` (``host:port``)."""
        host = peer_host(peer)
        if not self.networks or not self.trusts(host):
            return Origin(host, transport_scheme)
        forwarded = headers.get("forwarded")
        if forwarded is not None:
            elements = _forwarded_elements(forwarded)
            hops = [element.get("for", "") for element in elements]
            protos = [element["proto"] for element in elements if "proto" in element]
        else:
            hops = headers.get("x-forwarded-for", "").split(",")[-_MAX_HOPS:]
            protos = headers.get("x-forwarded-proto", "").split(",")[-1:]
        client = host
        for node in reversed([hop for hop in hops if hop.strip()]):
            address = _node_host(node)
            if address is None:
                client = UNKNOWN
                break
            client = address
            if not self.trusts(address):
                break
        proto = protos[-1].strip().lower() if protos else ""
        return Origin(client, proto if proto in ("http", "https") else transport_scheme)
