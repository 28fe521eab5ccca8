"""Behind a load balancer: the client address comes from forwarding headers only when a trusted proxy sent them,
and it is what the audit records and the failed-authentication throttle counts."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gatehouse.server.proxies import TrustedProxies, peer_host
from served import Served, Wire, request, small_project, start, stop

PROXIES = TrustedProxies(["10.0.0.0/8", "2001:db8::/32"])


@pytest.mark.parametrize("peer, headers, client, scheme", [
    ("203.0.113.5:40000", {"x-forwarded-for": "198.51.100.1"}, "203.0.113.5", "http"),  # not a proxy: ignored
    ("10.1.2.3:40000", {"x-forwarded-for": "198.51.100.1"}, "198.51.100.1", "http"),
    ("10.1.2.3:40000", {"x-forwarded-for": "6.6.6.6, 198.51.100.1, 10.9.9.9"}, "198.51.100.1", "http"),
    ("10.1.2.3:40000", {"x-forwarded-for": "10.0.0.7, 10.9.9.9"}, "10.0.0.7", "http"),  # all proxies: leftmost
    ("10.1.2.3:40000", {}, "10.1.2.3", "http"),
    ("10.1.2.3:40000", {"x-forwarded-for": "198.51.100.1", "x-forwarded-proto": "https"}, "198.51.100.1", "https"),
    ("10.1.2.3:40000", {"x-forwarded-proto": "gopher"}, "10.1.2.3", "http"),
    ("10.1.2.3:40000", {"forwarded": 'for=198.51.100.1;proto=https, for="[2001:db8::1]:443"'}, "198.51.100.1",
     "https"),
    ("10.1.2.3:40000", {"forwarded": 'for="[2001:db9::5]:80"'}, "2001:db9::5", "http"),
    ("10.1.2.3:40000", {"forwarded": "for=unknown"}, "unknown", "http"),
    ("10.1.2.3:40000", {"x-forwarded-for": "not-an-address"}, "unknown", "http"),
    ("10.1.2.3:40000", {"forwarded": "for=198.51.100.1", "x-forwarded-for": "6.6.6.6"}, "198.51.100.1", "http"),
    ("[2001:db8::9]:443", {"x-forwarded-for": "198.51.100.2"}, "198.51.100.2", "http"),
    ("[::1]:443", {"x-forwarded-for": "198.51.100.2"}, "::1", "http"),
])
def test_the_client_is_the_first_address_from_the_right_that_is_not_a_trusted_proxy(
        peer: str, headers: dict[str, str], client: str, scheme: str) -> None:
    origin = PROXIES.origin(peer, "http", headers)
    assert (origin.client, origin.scheme) == (client, scheme)


def test_a_long_forwarding_chain_is_read_only_at_its_right_end() -> None:
    chain = ", ".join(["10.0.0.1"] * 100_000 + ["198.51.100.3"])
    assert PROXIES.origin("10.1.2.3:1", "http", {"x-forwarded-for": chain}).client == "198.51.100.3"


def test_peer_addresses() -> None:
    assert [peer_host(p) for p in ("127.0.0.1:5", "[::1]:80", "::1", "host")] == ["127.0.0.1", "::1", "::1", "host"]


@pytest.fixture(scope="module")
def behind_proxy(server_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with small_project(server_uri, tmp_path_factory.mktemp("proxied") / "project") as served:
        running = start(served, trusted_proxies=["127.0.0.1"], auth_failures_per_minute=5)
        yield running
        stop(running)


def test_the_audit_records_the_forwarded_client_only_from_a_trusted_proxy(behind_proxy: Served) -> None:
    served = behind_proxy
    spoof = "X-Forwarded-For: 198.51.100.77\r\n"
    with Wire(served.port) as trusted:  # from 127.0.0.1, the trusted proxy
        trusted.send(request("GET", "/items?id=eq.1", served.key, extra=spoof + "X-Request-Id: via-proxy\r\n"))
        assert trusted.response()[0] == 200
    with Wire(served.port, source="127.0.0.2") as direct:  # a client that writes the header itself
        direct.send(request("GET", "/items?id=eq.1", served.key, extra=spoof + "X-Request-Id: spoofed\r\n"))
        assert direct.response()[0] == 200
    assert served.audit_clients("via-proxy") == ["198.51.100.77"]
    assert served.audit_clients("spoofed") == ["127.0.0.2"]


def test_failures_behind_a_proxy_throttle_the_failing_caller_not_the_others(behind_proxy: Served) -> None:
    served = behind_proxy
    bad = "gh_0000000000_" + "y" * 43

    def get(client: str, key: str) -> int:
        return httpx.get(f"{served.url}/items?id=eq.1", headers={"apikey": key, "X-Forwarded-For": client}).status_code

    statuses = [get("198.51.100.10", bad) for _ in range(8)]
    assert statuses == [401] * 5 + [429] * 3
    assert get("198.51.100.11", "gh_1111111111_" + "z" * 43) == 401  # another caller behind the same proxy
    assert get("198.51.100.10", served.key) == 200  # the failing caller's good key still works
    assert get("198.51.100.12", served.key) == 200
