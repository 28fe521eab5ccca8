"""Shared by the client-compatibility tests: a real ``gatehouse serve`` process on free ports, over a small
project of its own (authors and their books), for PostgREST clients to talk to.

``compat_server(server_uri, folder)`` is a context manager: it gives the project a database of its own (and a
unique name, so its cluster-wide roles never collide), migrates and applies it, makes a key for the app,
starts ``python -m gatehouse serve`` in the folder with the database URL in the environment (the way users
pass it), waits for ``/ready`` on the admin port, and on exit stops the server and drops what it made.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import drop_project, prepare, run_sync, with_database
from gatehouse.project import load_project

APP = "client"
DATABASE = "main"
DB_ENV = f"GATEHOUSE_DATABASES__{DATABASE.upper()}__URL"
READY_TIMEOUT_S = 60.0

TOML = """
[project]
name = "{name}"

[databases.main]

[apps.client]
grants = [
    {{ contract = "authors", actions = ["read", "insert", "update", "delete"] }},
    {{ contract = "books", actions = ["read", "insert", "update", "delete"] }},
]
"""

# Seed rows that the read checks rely on. Write checks only touch rows they create themselves (handles and
# titles starting with "w-"), and ``CompatServer.forget_writes`` removes those, so checks are independent.
MIGRATION = """
CREATE TABLE authors (
    id serial PRIMARY KEY,
    handle text NOT NULL UNIQUE,
    name text NOT NULL,
    born integer,
    country text DEFAULT 'XX',
    internal_note text DEFAULT 'not in the contract'
);
CREATE TABLE books (
    id serial PRIMARY KEY,
    author_id integer NOT NULL REFERENCES authors (id) ON DELETE CASCADE,
    title text NOT NULL,
    pages integer
);
INSERT INTO authors (handle, name, born, country) VALUES
    ('austen', 'Jane Austen', 1775, 'GB'),
    ('borges', 'Jorge Luis Borges', 1899, 'AR'),
    ('calvino', 'Italo Calvino', 1923, 'IT'),
    ('dickens', 'Charles Dickens', 1812, 'GB'),
    ('anon', 'Anonymous', NULL, NULL);
INSERT INTO books (author_id, title, pages) VALUES
    (1, 'Emma', 474),
    (1, 'Persuasion', 249),
    (2, 'Ficciones', 174),
    (3, 'Invisible Cities', 165),
    (3, 'If on a winter''s night a traveler', 260),
    (3, 'The Baron in the Trees', 217),
    (4, 'Bleak House', 1017);
"""

CONTRACTS = {
    "authors.v1.sql": "-- Authors, as clients see them\nSELECT id, handle, name, born, country FROM authors",
    "books.v1.sql": "-- Books, linked to their author\nSELECT id, author_id, title, pages FROM books",
}

SEED_AUTHORS: list[dict[str, Any]] = [
    {"id": 1, "handle": "austen", "name": "Jane Austen", "born": 1775, "country": "GB"},
    {"id": 2, "handle": "borges", "name": "Jorge Luis Borges", "born": 1899, "country": "AR"},
    {"id": 3, "handle": "calvino", "name": "Italo Calvino", "born": 1923, "country": "IT"},
    {"id": 4, "handle": "dickens", "name": "Charles Dickens", "born": 1812, "country": "GB"},
    {"id": 5, "handle": "anon", "name": "Anonymous", "born": None, "country": None},
]
SEED_BOOKS: list[dict[str, Any]] = [
    {"id": 1, "author_id": 1, "title": "Emma", "pages": 474},
    {"id": 2, "author_id": 1, "title": "Persuasion", "pages": 249},
    {"id": 3, "author_id": 2, "title": "Ficciones", "pages": 174},
    {"id": 4, "author_id": 3, "title": "Invisible Cities", "pages": 165},
    {"id": 5, "author_id": 3, "title": "If on a winter's night a traveler", "pages": 260},
    {"id": 6, "author_id": 3, "title": "The Baron in the Trees", "pages": 217},
    {"id": 7, "author_id": 4, "title": "Bleak House", "pages": 1017},
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class CompatServer:
    base_url: str
    admin_url: str
    key: str
    database_url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def query(self, sql: str, *args: object) -> list[dict[str, Any]]:
        """Rows from the private tables, read as the owner: what a write really left behind."""
        return run_sync(_fetch(self.database_url, sql, *args))

    def forget_writes(self) -> None:
        """Remove every row a write check made, leaving the seed rows (which no check changes)."""
        run_sync(_execute(self.database_url, "DELETE FROM books WHERE title LIKE 'w-%'",
                          "DELETE FROM authors WHERE handle LIKE 'w-%'"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def _fetch(uri: str, sql: str, *args: object) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(uri)
    try:
        return [dict(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def _execute(uri: str, *statements: str) -> None:
    conn = await asyncpg.connect(uri)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def write_project(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gatehouse.toml").write_text(TOML.format(name=name))
    (folder / "migrations").mkdir(exist_ok=True)
    (folder / "migrations" / "V001__authors_and_books.sql").write_text(MIGRATION)
    (folder / "contracts").mkdir(exist_ok=True)
    for file, text in CONTRACTS.items():
        (folder / "contracts" / file).write_text(text)


def _wait_ready(admin_url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{admin_url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise AssertionError(f"gatehouse serve exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gatehouse serve not ready after {READY_TIMEOUT_S:.0f} s:\n{log_path.read_text()}")
        time.sleep(0.1)


@contextmanager
def compat_server(server_uri: str, folder: Path) -> Iterator[CompatServer]:
    """Set up the compat project in ``folder`` on a database of its own and serve it until the block ends."""
    name = f"t{uuid.uuid4().hex[:10]}"
    database = f"{name}_{DATABASE}"
    database_url = with_database(server_uri, database)
    write_project(folder, name)
    run_sync(_execute(server_uri, f'CREATE DATABASE "{database}"'))
    role_prefix = f"gh_{name}_"
    try:
        with pytest.MonkeyPatch.context() as patch:  # load_project reads the URL from the environment
            patch.setenv(DB_ENV, database_url)
            project = load_project(folder)
            role_prefix = project.role_prefix
            key = run_sync(prepare(project))[APP]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEHOUSE_")}
        env[DB_ENV] = database_url
        port, admin_port = free_port(), free_port()
        log_path = folder / "serve.log"
        with log_path.open("wb") as log:  # a file, not a pipe: a full pipe would block the server
            process = subprocess.Popen(
                [sys.executable, "-m", "gatehouse", "serve", "--port", str(port), "--admin-port", str(admin_port),
                 "--log-level", "warning"],
                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        server = CompatServer(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", key, database_url,
                              log_path, process)
        try:
            _wait_ready(server.admin_url, process, log_path)
            yield server
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
    finally:
        run_sync(drop_project(server_uri, [database], role_prefix))
