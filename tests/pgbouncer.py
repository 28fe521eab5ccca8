"""A real PgBouncer (Debian's ``pgbouncer``) in transaction mode on a free port, for tests/test_pooler.py and
bench/pooler.py: its ``[databases]`` lines are given (``gatehouse pooler`` writes them), the authenticator logs
in without a password (the machine's PostgreSQL trusts local logins)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from replica_cluster import unavailable

PGBOUNCER_INI = """\
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/users.txt
pool_mode = transaction
max_client_conn = 200
default_pool_size = {pool_size}
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or next((p for p in ("/usr/sbin/pgbouncer",) if os.path.exists(p)), None)
    if found is None:
        unavailable("PgBouncer is not installed (Debian: apt-get install pgbouncer)")
    assert found is not None
    return found


class PgBouncer:
    """A PgBouncer process on a free port, its configuration written from ``databases`` lines."""

    def __init__(self, databases: list[str], authenticator: str, *, pool_size: int = 20) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="gatehouse-pgbouncer-"))
        self.folder.chmod(0o777)  # PgBouncer refuses to run as root: it runs as postgres then, and writes here
        (self.folder / "users.txt").write_text(f'"{authenticator}" ""\n')
        config = PGBOUNCER_INI.format(port=self.port, folder=self.folder, pool_size=pool_size)
        (self.folder / "pgbouncer.ini").write_text("[databases]\n" + "\n".join(databases) + "\n\n" + config)
        for path in self.folder.iterdir():
            path.chmod(0o644)
        command = [pgbouncer_binary(), str(self.folder / "pgbouncer.ini")]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "postgres"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.process.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("pgbouncer did not listen within 10 s")

    def url(self, database: str = "main") -> str:
        return f"postgresql://127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


