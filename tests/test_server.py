"""``gatehouse serve`` on granian, over real sockets: each fault the hand-written HTTP/1.1 layer had, shown fixed,
and every limit the README promises (connections, header bytes, URL length, header/idle and body deadlines,
graceful stop), plus TLS and HTTP/2."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from served import Served, Wire, request, rss_kib, small_project, start, stop

LIMITS = {"body_timeout_s": 1, "header_timeout_s": 1, "max_query_length": 2048, "max_header_bytes": 16384}


@pytest.fixture(scope="module")
def project(server_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with small_project(server_uri, tmp_path_factory.mktemp("served") / "project") as served:
        yield served


@pytest.fixture(scope="module")
def served(project: Served) -> Iterator[Served]:
    running = start(project, **LIMITS)
    yield running
    stop(running)


def count_items(served: Served) -> int:
    return int(served.sql("SELECT count(*) FROM items"))  # type: ignore[call-overload]


def bulk_body(size: int) -> tuple[bytes, int]:
    rows = [{"note": "x" * 900} for _ in range(size // 920 + 1)]
    return orjson.dumps(rows), len(rows)


@pytest.mark.parametrize("version, extra", [("HTTP/1.0", ""), ("HTTP/1.1", "Connection: close\r\n")],
                         ids=["http-1.0", "connection-close"])
def test_a_body_sent_after_its_headers_is_read_when_the_connection_will_close(served: Served, version: str,
                                                                              extra: str) -> None:
    # the old layer discarded it: the client waited 30 s for a 408 (nginx talks HTTP/1.0 to upstreams)
    before = count_items(served)
    body, rows = bulk_body(70_000)
    raw = request("POST", "/items", served.key, body=body, extra=extra, version=version)
    head, payload = raw[:-len(body)], raw[-len(body):]
    with Wire(served.port) as wire:
        wire.send(head)
        time.sleep(0.3)  # the body comes later, in pieces
        for start_at in range(0, len(payload), 16_384):
            wire.send(payload[start_at:start_at + 16_384])
        status, _, _ = wire.response(timeout=5)
        assert status == 201
        assert wire.closed(timeout=0.5)
    assert count_items(served) == before + rows
    served.sql(f"DELETE FROM items WHERE id > 20 AND note = '{'x' * 900}'")


def test_an_endless_header_is_cut_at_the_limit_without_growing_the_process(served: Served) -> None:
    # the old layer buffered 52 MB of one header before answering, and stalled every client meanwhile
    assert served.process is not None
    before = rss_kib(served.process.pid)
    sent = 0
    latencies: list[float] = []

    def others() -> None:
        with httpx.Client(base_url=served.url, headers={"apikey": served.key}) as client:
            for _ in range(20):
                began = time.perf_counter()
                assert client.get("/items?id=eq.1").status_code == 200
                latencies.append(time.perf_counter() - began)
                time.sleep(0.02)

    meanwhile = threading.Thread(target=others)
    with Wire(served.port) as wire:
        wire.send(b"GET /items HTTP/1.1\r\nHost: t\r\nX-Flood: ")
        meanwhile.start()
        chunk = b"a" * 65_536
        with pytest.raises(OSError):
            while sent < 52 * 1024 * 1024:
                wire.send(chunk)
                sent += len(chunk)
    meanwhile.join()
    assert sent < 8 * 1024 * 1024  # refused once the kernel's socket buffers are full, not after 52 MB
    assert rss_kib(served.process.pid) - before < 20 * 1024
    assert max(latencies) < 1.0


def test_a_body_trickled_byte_by_byte_is_cut_at_the_body_deadline(served: Served) -> None:
    before = count_items(served)
    with Wire(served.port) as wire:
        wire.send(request("POST", "/items", served.key, extra="Content-Type: application/json\r\n"
                          "Content-Length: 40\r\n"))
        began = time.monotonic()
        status = None
        for byte in b'[{"note": "trickled, never finished"}]':
            try:
                wire.send(bytes([byte]))
            except OSError:
                break
            wire.sock.settimeout(0.3)
            try:
                status, headers, body = wire.response(timeout=0.3)
                break
            except TimeoutError:
                continue
        assert status == 408, status
        assert orjson.loads(body)["code"] == "GH408" and headers.get("connection") == "close"
        assert time.monotonic() - began < 3
    assert count_items(served) == before


def test_a_client_that_leaves_in_the_middle_of_a_declared_body_writes_nothing_and_logs_no_error(
        served: Served) -> None:
    # a body framed by Content-Length is read whole (RSGI's protocol()); a client gone before its end is not an
    # error of ours: nothing is written, no 500 is logged, and the server goes on answering
    before = count_items(served)
    logged = served.log.stat().st_size if served.log is not None else 0
    for _ in range(3):
        with Wire(served.port) as wire:
            wire.send(request("POST", "/items", served.key, extra="Content-Type: application/json\r\n"
                              "Content-Length: 400\r\n") + b'[{"note": "left half')
            time.sleep(0.1)
    time.sleep(0.3)
    assert count_items(served) == before
    with Wire(served.port) as wire:
        wire.send(request("GET", "/items?limit=1", served.key))
        status, _, _ = wire.response(timeout=5)
    assert status == 200
    if served.log is not None:
        with served.log.open("rb") as log:
            log.seek(logged)
            written = log.read().decode(errors="replace")
        assert "Traceback" not in written and "GH500" not in written and "ERROR" not in written, written


@pytest.mark.parametrize("coding", ["gzip, chunked", "chunked, gzip"])
def test_transfer_codings_other_than_chunked_are_refused_and_write_nothing(served: Served, coding: str) -> None:
    # RFC 9112: 501 for a coding the server does not understand; a proxy in front may frame it differently
    before = count_items(served)
    with Wire(served.port) as wire:
        wire.send(request("POST", "/items", served.key, extra=f"Content-Type: application/json\r\n"
                          f"Transfer-Encoding: {coding}\r\n") + b'19\r\n[{"note": "smuggled?!"}]\r\n0\r\n\r\n')
        status, _, _ = wire.response(timeout=5)
        assert status in (400, 501)  # 'chunked, gzip' has no end hyper can find: its own 400
        assert status == 501 or coding.startswith("chunked")
        assert wire.closed(timeout=0.5)
    assert count_items(served) == before


def test_content_length_beside_transfer_encoding_is_framed_by_the_latter_and_the_connection_closed(
        served: Served) -> None:
    # RFC 9112 §6.3: Transfer-Encoding wins, and the server must close the connection after answering, so
    # nothing that followed the body on this connection can be read as a second request
    with Wire(served.port) as wire:
        wire.send(request("POST", "/items?select=note", served.key, extra="Content-Type: application/json\r\n"
                          "Content-Length: 5\r\nTransfer-Encoding: chunked\r\nPrefer: return=representation\r\n")
                  + b'1a\r\n[{"note": "chunked wins"}]\r\n0\r\n\r\n' + request("DELETE", "/items?id=eq.1", served.key))
        status, headers, body = wire.response(timeout=5)
        assert (status, orjson.loads(body)) == (201, [{"note": "chunked wins"}])
        assert headers.get("connection") == "close" and wire.closed(timeout=0.5)
    assert served.sql("SELECT count(*) FROM items WHERE id = 1") == 1  # the smuggled DELETE never ran
    served.sql("DELETE FROM items WHERE note = 'chunked wins'")


def test_a_chunked_upload_and_expect_100_continue_are_read_whole(served: Served) -> None:
    with Wire(served.port) as wire:
        wire.send(request("POST", "/items?select=note", served.key, extra="Content-Type: application/json\r\n"
                          "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\nPrefer: return=representation\r\n"))
        status, _, _ = wire.response(timeout=5, head=True)
        assert status == 100  # asked to go on before the body is sent
        for piece in (b'[{"note": ', b'"in pieces"}]'):
            wire.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            time.sleep(0.1)
        wire.send(b"0\r\n\r\n")
        status, _, body = wire.response(timeout=5)
    assert (status, orjson.loads(body)) == (201, [{"note": "in pieces"}])
    served.sql("DELETE FROM items WHERE note = 'in pieces'")


def test_head_answers_the_length_get_would_and_no_body(served: Served) -> None:
    with Wire(served.port) as wire:
        wire.send(request("GET", "/items?id=lte.5", served.key) + request("HEAD", "/items?id=lte.5", served.key)
                  + request("GET", "/items?id=eq.1", served.key))  # pipelined: a stray body would break the next
        status, get_headers, get_body = wire.response()
        head_status, head_headers, _ = wire.response(head=True)
        last_status, _, last_body = wire.response()
    assert (status, head_status, last_status) == (200, 200, 200)
    assert int(head_headers["content-length"]) == len(get_body) == int(get_headers["content-length"]) > 0
    assert orjson.loads(last_body) == [{"id": 1, "note": "item 1"}]


def test_a_204_is_followed_by_no_body_bytes(served: Served) -> None:
    served.sql("INSERT INTO items (id, note) VALUES (1000, 'to delete')")
    with Wire(served.port) as wire:
        wire.send(request("DELETE", "/items?id=eq.1000", served.key) + request("GET", "/items?id=eq.2", served.key))
        status, headers, _ = wire.response()
        assert status == 204 and "content-length" not in headers
        status, _, body = wire.response()
        assert status == 200 and orjson.loads(body) == [{"id": 2, "note": "item 2"}]


@pytest.mark.parametrize("raw, expected, closes", [
    (b"GET /items HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431, True),
    (b"GET /items?" + b"id=eq.1&" * 300 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, True),
    (b"GET /items HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, True),
    # well framed, with a URL the data app refuses: an ordinary 400, and the connection goes on
    (b"GET /items/%ff HTTP/1.1\r\nHost: t\r\n\r\n", 400, False),
    (b"GET /items?note=eq.%ff%fe HTTP/1.1\r\nHost: t\r\napikey: KEY\r\n\r\n", 400, False),  # after the key
], ids=["header-bytes", "url-length", "two-content-lengths", "path-not-utf8", "query-not-utf8"])
def test_the_request_head_is_bounded_and_must_be_well_formed(served: Served, raw: bytes, expected: int,
                                                             closes: bool) -> None:
    with Wire(served.port) as wire:
        wire.send(raw.replace(b"KEY", served.key.encode()))
        status, _, _ = wire.response()
        assert status == expected
        if closes:  # at once, well before the 1 s header timeout would close an idle connection
            assert wire.closed(timeout=0.5)
        else:
            wire.send(request("GET", "/items?id=eq.1", served.key))
            assert wire.response()[0] == 200


def test_slow_headers_and_idle_keep_alive_are_closed_at_the_header_timeout(served: Served) -> None:
    with Wire(served.port) as slow, Wire(served.port) as idle:
        slow.send(b"GET /items HTTP/1.1\r\nHost: t\r\n")  # and never the end of the headers
        idle.send(request("GET", "/items?id=eq.1", served.key))
        assert idle.response()[0] == 200
        began = time.monotonic()
        assert slow.closed(timeout=4) and idle.closed(timeout=4)
        assert time.monotonic() - began < 3


def test_connections_beyond_max_connections_wait_until_one_closes(project: Served) -> None:
    project = start(project, max_connections=2, header_timeout_s=10)
    try:
        first, second = Wire(project.port), Wire(project.port)
        for wire in (first, second):
            wire.send(request("GET", "/items?id=eq.1", project.key))
            assert wire.response()[0] == 200
        with Wire(project.port) as third:
            third.send(request("GET", "/items?id=eq.1", project.key))
            with pytest.raises(TimeoutError):
                third.response(timeout=1)  # not served while two are open
            first.sock.close()
            assert third.response(timeout=5)[0] == 200
        second.sock.close()
    finally:
        stop(project)


def test_sigterm_finishes_the_request_being_answered_then_exits(project: Served) -> None:
    project = start(project, shutdown_grace_s=10)
    assert project.process is not None
    outcome: dict[str, object] = {}

    def call() -> None:
        response = httpx.post(f"{project.url}/rpc/slow", json={"seconds": 1.5}, headers={"apikey": project.key,
                              "X-Request-Id": "graceful-stop-1"}, timeout=10)
        outcome["status"], outcome["body"] = response.status_code, response.json()

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    began = time.monotonic()
    project.process.send_signal(15)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{project.url}/items", headers={"apikey": project.key}, timeout=2)
    caller.join()
    assert outcome == {"status": 200, "body": {"slept": 1.5}}
    assert project.process.wait(10) == 0  # by itself: the one signal was enough
    assert time.monotonic() - began < 5
    assert project.sql("SELECT count(*) FROM gatehouse.audit_log WHERE request_id = 'graceful-stop-1'") == 1


def test_sigterm_drains_first_ready_turns_503_while_requests_are_still_served(project: Served) -> None:
    """With ``shutdown_drain_s``, SIGTERM makes ``/ready`` answer 503 at once while both ports go on serving (a
    load balancer's health check sees it and sends new requests elsewhere), and the ports close after the drain;
    a second SIGTERM ends the drain early."""
    for second_signal in (False, True):
        served = start(project, shutdown_drain_s=3)
        assert served.process is not None
        admin = f"http://127.0.0.1:{served.admin_port}"
        began = time.monotonic()
        served.process.send_signal(15)
        deadline = time.monotonic() + 2
        while (ready := httpx.get(f"{admin}/ready", timeout=2)).status_code == 200:
            assert time.monotonic() < deadline, "/ready never turned 503"
            time.sleep(0.02)
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert httpx.get(f"{served.url}/items?id=eq.1", headers={"apikey": served.key}).status_code == 200
        if second_signal:
            served.process.send_signal(15)
        assert served.process.wait(10) == 0
        took = time.monotonic() - began
        assert took < 2.5 if second_signal else 3 <= took < 8, took


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_with_http_2_and_http_1_1(project: Served) -> None:
    cert, key = _self_signed(project.project.root)
    project = start(project, tls_cert_file="tls.crt", tls_key_file="tls.key")
    try:
        url = f"https://127.0.0.1:{project.port}/items?id=eq.3"
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(verify=trust, http2=True, headers={"apikey": project.key}) as client:
            response = client.get(url)
            assert (response.status_code, response.http_version) == (200, "HTTP/2")
            assert response.json() == [{"id": 3, "note": "item 3"}]
        with httpx.Client(verify=trust, headers={"apikey": project.key}) as client:
            response = client.get(url)
            assert (response.status_code, response.http_version) == (200, "HTTP/1.1")
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{project.port}/items", headers={"apikey": project.key}, timeout=3)
    finally:
        stop(project)
    assert key.exists()


def test_http_2_with_prior_knowledge_on_a_plain_port(served: Served) -> None:
    with httpx.Client(http1=False, http2=True, headers={"apikey": served.key}) as client:
        response = client.get(f"{served.url}/items?id=eq.4")
    assert (response.status_code, response.http_version) == (200, "HTTP/2")
    assert response.json() == [{"id": 4, "note": "item 4"}]


def test_refusals_of_the_wire_are_counted_in_the_metrics(served: Served) -> None:
    def refused_414() -> float:
        text = httpx.get(f"http://127.0.0.1:{served.admin_port}/metrics").text
        for line in text.splitlines():
            if line.startswith("gatehouse_requests_total{") and 'status="414"' in line and 'app=""' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = refused_414()
    with Wire(served.port) as wire:
        wire.send(b"GET /items?" + b"x" * 3000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        assert wire.response()[0] == 414
    assert refused_414() == before + 1
