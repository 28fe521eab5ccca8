"""``[server]`` as granian's settings, and the open-files limit the connection limit needs."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gatehouse.config import ServerConfig
from gatehouse.errors import ProjectError
from gatehouse.server.settings import granian_options, open_files_limit


def test_the_server_settings_become_granians(tmp_path: Path) -> None:
    options = granian_options(ServerConfig(max_connections=100, max_header_bytes=20_000, header_timeout_s=3), tmp_path)
    assert options["backpressure"] == 100
    assert options["http1_settings"].max_buffer_size == 20_000
    assert options["http1_settings"].header_read_timeout == 3000
    assert options["http2_settings"].max_headers_size == 20_000
    assert "ssl_cert" not in options
    # hyper's buffer cannot be smaller than 8 KiB: a smaller header limit still cuts at 8 KiB
    assert granian_options(ServerConfig(max_header_bytes=2048), tmp_path)["http1_settings"].max_buffer_size == 8192


def test_tls_files_are_checked_before_the_server_starts(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="there is no file"):
        granian_options(ServerConfig(tls_cert_file="missing.crt", tls_key_file="missing.key"), tmp_path)
    (tmp_path / "a.crt").write_text("x")
    with pytest.raises(ProjectError, match="go together"):
        granian_options(ServerConfig(tls_cert_file="a.crt"), tmp_path)
    (tmp_path / "a.key").write_text("not a key either")
    with pytest.raises(ProjectError, match="cannot be used"):
        granian_options(ServerConfig(tls_cert_file="a.crt", tls_key_file="a.key"), tmp_path)


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    assert ServerConfig(trusted_proxies=("10.0.0.0/8", "::1")).trusted_proxies == ("10.0.0.0/8", "::1")
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        ServerConfig(trusted_proxies=("proxy.internal",))


def test_the_open_files_limit_is_raised_toward_what_is_wanted_but_never_lowered() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert open_files_limit(16) == soft  # already enough: unchanged
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft


def test_connections_are_capped_by_the_files_the_process_may_open() -> None:
    # in a child process whose hard limit is low, so nothing here changes the test run's own limits
    script = textwrap.dedent("""
        import resource
        from gatehouse.config import ServerConfig
        from gatehouse.server.settings import connection_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 1256))
        print(connection_limit(ServerConfig(max_connections=400)), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        print(connection_limit(ServerConfig(max_connections=4096)), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["400", "1056", "500", "1256"]
    assert "serving at most 500 connections per port" in result.stderr
