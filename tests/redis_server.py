"""A Redis to test against: the machine's (127.0.0.1:6379) when it answers, else one started for the session.

``redis_url`` is a session fixture (import it into a test module, or into conftest.py, to use it). When neither
works the tests that need Redis are skipped with the reason, except under ``CI=true``, where they fail: CI must
never pass by skipping what it was meant to test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

MACHINE = ("127.0.0.1", 6379)


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Does a Redis listen there (a PING gets +PONG)?"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(b"*1\r\n$4\r\nPING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def spawned_redis(folder: Path, port: int | None = None) -> Iterator[str]:
    """A ``redis-server`` of our own on ``port`` (a free one by default), without persistence, stopped at the
    end. Raises RuntimeError when it cannot be started."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH")
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not answers("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"no Redis to test against: {reason}")
    pytest.skip(f"no Redis to test against: {reason}")


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """URL of a Redis for tests: the machine's when it answers PING, else one spawned in ``folder``."""
    if answers(*MACHINE):
        yield f"redis://{MACHINE[0]}:{MACHINE[1]}/0"
        return
    try:
        spawned = spawned_redis(folder)
        url = spawned.__enter__()
    except RuntimeError as failed:
        _unavailable(f"127.0.0.1:6379 does not answer and {failed}")
    try:
        yield url
    finally:
        spawned.__exit__(None, None, None)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis URL shared by the session's tests: give every test a key prefix of its own."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url
