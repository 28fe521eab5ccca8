"""``gatehouse serve``'s connection limits from ``[server]``, and the open-files limit they need."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

from gatehouse.config import ServerConfig
from gatehouse.server import limits_of, open_files_limit


def test_the_server_settings_become_the_connection_limits() -> None:
    limits = limits_of(ServerConfig(max_connections=100, max_header_bytes=4096, max_query_length=2048,
                                    header_timeout_s=3, keepalive_timeout_s=2))
    assert (limits.max_connections, limits.max_header_bytes, limits.max_url_bytes) == (100, 4096, 2048)
    assert (limits.header_timeout, limits.keepalive_timeout) == (3, 2)


def test_the_open_files_limit_is_raised_toward_what_is_wanted_but_never_lowered() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert open_files_limit(16) == soft  # already enough: unchanged
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft


def test_connections_are_capped_by_the_files_the_process_may_open() -> None:
    # in a child process whose hard limit is low, so nothing here changes the test run's own limits
    script = textwrap.dedent("""
        import resource
        from gatehouse.config import ServerConfig
        from gatehouse.server import limits_of
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 1256))
        raised = limits_of(ServerConfig(max_connections=400))          # needs 1056: raised to it
        print(raised.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        capped = limits_of(ServerConfig(max_connections=4096))         # needs 8448: only 1256 allowed
        print(capped.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["400", "1056", "500", "1256"]
    assert "serving at most 500 connections per port" in result.stderr
