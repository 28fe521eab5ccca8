"""Fixtures: a real PostgreSQL (the machine's when it answers, else an embedded one), and throw-away projects.

Every project gets a database of its own and a unique name, so its roles (which PostgreSQL keeps
cluster-wide) never collide with another test's.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import asyncpg
import httpx
import pytest

from gatehouse.app import create_app
from gatehouse.demo import copy_shop, without_services
from gatehouse.project import Project, load_project
from gatehouse.runtime import Runtime
from redis_server import redis_url  # noqa: F401  (the session's Redis, for every test module)
from replica_cluster import _replica_pair, replica_cluster  # noqa: F401  (a primary and its streaming replica)

REPO = Path(__file__).resolve().parents[1]
SHOP = REPO / "examples" / "shop"
pytest_plugins = ["hang_report"]
T = TypeVar("T")
MACHINE_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
SHOP_MOBILE_RATE = ', rate = "20/s", burst = 20'
"""The demo's rate on its mobile app, left out of the tests' copies of the shop (they call it in bursts)."""
SHOP_PRODUCTS_CACHE = 'cache = "30s"\n'
"""The demo caches products; the tests' copies do not (many write in SQL and read at once: the cache would
answer within its bound, not at once). The cache's own tests put it back."""


async def _answers(uri: str) -> bool:
    try:
        conn = await asyncpg.connect(uri, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def _start_machine_postgres() -> None:
    """Start the machine's cluster if it is installed but stopped (as CI's set-up describes)."""
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        return
    for version in sorted(os.listdir("/etc/postgresql")):
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                       capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="session")
def server_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a PostgreSQL server (database ``postgres``) that tests may create databases and roles on.

    ``GATEHOUSE_TEST_SERVER`` names one, or is ``embedded`` to use the fallback even when the machine's answers.
    The fallback starts the way gatehouse starts a project's (so as root it works under pytest's 0700 folders).
    """
    wanted = os.environ.get("GATEHOUSE_TEST_SERVER")
    if wanted and wanted != "embedded":
        yield wanted
        return
    if not wanted:
        if asyncio.run(_answers(MACHINE_PG)):
            yield MACHINE_PG
            return
        _start_machine_postgres()
        if asyncio.run(_answers(MACHINE_PG)):
            yield MACHINE_PG
            return
    from gatehouse.db.embedded import start_embedded

    server = start_embedded(tmp_path_factory.mktemp("embedded"))
    yield server.uri
    server.stop()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when an event loop is running in this thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def with_database(uri: str, database: str) -> str:
    base, _, query = uri.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


async def drop_project(server: str, databases: list[str], role_prefix: str) -> None:
    conn = await asyncpg.connect(server)
    try:
        for database in databases:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        roles = await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1",
                                 role_prefix.replace("_", r"\_") + "%")
        for row in roles:
            await conn.execute(f'DROP ROLE IF EXISTS "{row["rolname"]}"')
    finally:
        await conn.close()


ProjectFactory = Callable[..., Project]


@pytest.fixture
def make_project(server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProjectFactory]:
    """Build a project folder, give it its own database, and load it.

    ``make_project(toml=..., contracts={...}, migrations={...})`` writes the files given; ``from_shop=True``
    starts from the demo shop, as one database (its other services left out: two databases less to create)
    unless ``services=True``. The database URL is passed the way users pass it: in the environment.
    """
    created: list[tuple[str, str]] = []

    def factory(*, toml: str | None = None, contracts: dict[str, str] | None = None,
                migrations: dict[str, str] | None = None, files: dict[str, str] | None = None,
                from_shop: bool = False, services: bool = False,
                folder: str = "project") -> Project:
        root = tmp_path / folder
        if from_shop:
            copy_shop(root, services=services)
        root.mkdir(exist_ok=True)
        name = f"t{uuid.uuid4().hex[:10]}"
        config = toml if toml is not None else (root / "gatehouse.toml").read_text()
        config = config.replace(SHOP_MOBILE_RATE, "")  # the demo's own; a test that wants a limit sets it
        config = config.replace(SHOP_PRODUCTS_CACHE, "")  # likewise the demo's cache on products
        if from_shop and not services:
            config = without_services(config)  # also from a toml given that starts from the shop's
        config = re.sub(r'(?m)^name = "[a-z0-9_]+"', f'name = "{name}"', config, count=1)
        (root / "gatehouse.toml").write_text(config)
        for relative, text in {**{f"contracts/{k}": v for k, v in (contracts or {}).items()},
                               **{f"migrations/{k}": v for k, v in (migrations or {}).items()},
                               **(files or {})}.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        project = load_project(root)
        for database in project.config.databases:
            db_name = f"{name}_{database}"
            run_sync(_create_database(server_uri, db_name))
            monkeypatch.setenv(f"GATEHOUSE_DATABASES__{database.upper()}__URL", with_database(server_uri, db_name))
            created.append((db_name, project.role_prefix))
        return load_project(root)

    yield factory
    for prefix in {prefix for _, prefix in created}:
        run_sync(drop_project(server_uri, [db for db, p in created if p == prefix], prefix))


async def _create_database(server: str, database: str) -> None:
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


@pytest.fixture
async def serve_project() -> AsyncIterator[Callable[[Project], object]]:
    """Start a Runtime for a project and hand back an httpx client talking to it in-process."""
    runtimes: list[Runtime] = []
    clients: list[httpx.AsyncClient] = []

    async def start(project: Project) -> tuple[httpx.AsyncClient, Runtime]:
        runtime = Runtime(project)
        await runtime.start()
        runtimes.append(runtime)
        transport = httpx.ASGITransport(app=create_app(runtime, manage_runtime=False))
        client = httpx.AsyncClient(transport=transport, base_url="http://gatehouse.test")
        clients.append(client)
        return client, runtime

    yield start
    for client in clients:
        await client.aclose()
    for runtime in runtimes:
        await runtime.stop()


class ServedFolder(NamedTuple):
    """What :func:`served_folder` serves: a client of its data port, app → key, the database's URL, a connection
    to the database as its owner, and the runtime (for its admin app)."""

    client: httpx.AsyncClient
    keys: dict[str, str]
    url: str
    database: asyncpg.Connection
    runtime: Runtime


@asynccontextmanager
async def served_folder(server_uri: str, root: Path, files: dict[str, str], name_in_toml: str,
                        env: dict[str, str]) -> AsyncIterator[ServedFolder]:
    """A one-database project written from ``files`` (path → text) into ``root``, with a database of its own,
    migrated, applied and served in-process, for a module's tests to share. ``name_in_toml`` is the project
    name the toml text carries (made unique here); ``env``: variables its ``env:`` secrets need. Dropped
    afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    files = {**files, "gatehouse.toml": files["gatehouse.toml"].replace(f'name = "{name_in_toml}"',
                                                                         f'name = "{name}"')}
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    database_name = f"{name}_main"
    await _create_database(server_uri, database_name)
    url = with_database(server_uri, database_name)
    role_prefix = f"gh_{name}_"
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("GATEHOUSE_DATABASES__MAIN__URL", url)
            for variable, value in env.items():
                patch.setenv(variable, value)
            project = load_project(root)
            role_prefix = project.role_prefix
            keys = await prepare(project)
            runtime = Runtime(project)
            await runtime.start()
            transport = httpx.ASGITransport(app=create_app(runtime, manage_runtime=False))
            database = await asyncpg.connect(url)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://gatehouse.test") as client:
                    yield ServedFolder(client, keys, url, database, runtime)
            finally:
                await database.close()
                await runtime.stop()
    finally:
        await drop_project(server_uri, [database_name], role_prefix)


async def prepare(project: Project) -> dict[str, str]:
    """Migrate and apply a project, and create one key per app; returns app → key."""
    from gatehouse import operations

    await operations.migrate_all(project)
    await operations.apply_all(project)
    return {app: (await operations.create_key(project, app)).secret_key for app in project.apps}


@pytest.fixture
def shop(make_project: ProjectFactory) -> Project:
    """The demo shop in a database of its own (not yet migrated)."""
    return make_project(from_shop=True)
