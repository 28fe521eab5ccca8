"""``gatehouse init``: a new project folder with one table, one contract and one app, ready to edit."""

from __future__ import annotations

import re
from pathlib import Path

from gatehouse.errors import ProjectError
from gatehouse.project import CONFIG_FILE

FILES = {
    CONFIG_FILE: """\
[project]
name = "{name}"

[databases.main]
# No url: gatehouse runs an embedded PostgreSQL under .gatehouse/.
# To use your own server:  url = "env:{env}_DATABASE_URL"
# (a URL without a password may be written here as it is: url = "postgresql://app@db.internal:5432/{name}")

[server]
port = 3000
admin_port = 3001

[apps.example]
description = "An application that reads notes."
quota = {{ pool_size = 5, max_rows = 1000, statement_timeout_ms = 5000 }}
grants = [
    {{ contract = "notes", actions = ["read"] }},
]
""",
    "migrations/V001__create_notes.sql": """\
CREATE TABLE notes (
    id          bigserial PRIMARY KEY,
    title       text NOT NULL,
    body        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO notes (title, body) VALUES ('hello', 'served by gatehouse');
""",
    "contracts/notes.v1.sql": """\
-- Notes, as applications see them.
SELECT id, title, body, created_at
FROM notes
""",
    ".gitignore": ".gatehouse/\n",
}


def init_project(folder: Path) -> list[Path]:
    if (folder / CONFIG_FILE).exists():
        raise ProjectError(f"{folder / CONFIG_FILE} already exists", hint="choose an empty folder")
    name = re.sub(r"[^a-z0-9_]", "_", folder.resolve().name.lower()).strip("_") or "project"
    if not name[0].isalpha():
        name = f"p_{name}"
    written: list[Path] = []
    for relative, template in FILES.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(name=name[:40], env=name.upper()), encoding="utf-8")
        written.append(path)
    return written
