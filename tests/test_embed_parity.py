"""Embedding as PostgREST does it: many-to-many through a junction, embedding by a foreign key's or a column's name,
``!hint`` disambiguation, and PostgREST's 300 (PGRST201) and 400 (PGRST200) bodies, table-driven.

The cases are those of PostgREST's own specs (``EmbedDisambiguationSpec``, ``QuerySpec``, ``EmbedInnerJoinSpec``,
``RelatedQueriesSpec``) and of its resource embedding docs that apply to gatehouse, asked of a fixture of our own
(the same shape of data: clients, projects, tasks, users and their junction, ...). Each expects PostgREST's status
and body; where PostgREST leaves an order unspecified the request adds one. The schema in PGRST200's details is
the profile (:data:`SCHEMA`: ``public`` for the default version), where PostgREST names its exposed schema. A 300's candidates and the hint's
choices are compared as sets: PostgREST lists them in its schema cache's order, gatehouse in constraint order.

``NOT_APPLICABLE`` lists PostgREST's embedding features that gatehouse does not have, with the reason; the
pass rate printed (``-s``) is over the cases that apply.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.contracts.lineage import column_sources
from gatehouse.contracts.model import ContractVersion, parse_contract_sql
from gatehouse.contracts.relations import DeclaredRelation, build_relations, selects
from gatehouse.db.catalog import Constraint
from gatehouse.project import Project
from gatehouse.query.suggest import closest_other

# --- the fixture ----------------------------------------------------------------------------------------------

TABLES = """
CREATE TABLE clients (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE projects (id int PRIMARY KEY, name text NOT NULL, client_id int,
                       CONSTRAINT client FOREIGN KEY (client_id) REFERENCES clients (id));
CREATE TABLE tasks (id int PRIMARY KEY, name text NOT NULL, project_id int,
                    CONSTRAINT project FOREIGN KEY (project_id) REFERENCES projects (id));
CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE users_tasks (user_id int NOT NULL REFERENCES users (id), task_id int NOT NULL REFERENCES tasks (id),
                          PRIMARY KEY (user_id, task_id));
CREATE TABLE users_projects (user_id int NOT NULL REFERENCES users (id),
                             project_id int NOT NULL REFERENCES projects (id), PRIMARY KEY (user_id, project_id));
CREATE TABLE comments (id int PRIMARY KEY, commenter_id int NOT NULL, user_id int NOT NULL, task_id int NOT NULL,
                       content text NOT NULL,
                       CONSTRAINT "user" FOREIGN KEY (commenter_id) REFERENCES users (id),
                       CONSTRAINT commented_task FOREIGN KEY (user_id, task_id) REFERENCES users_tasks (user_id, task_id));
CREATE TABLE files (id int PRIMARY KEY, filename text NOT NULL, content text NOT NULL);
CREATE TABLE touched_files (user_id int NOT NULL, task_id int NOT NULL, file_id int NOT NULL REFERENCES files (id),
                            PRIMARY KEY (user_id, task_id, file_id),
                            FOREIGN KEY (user_id, task_id) REFERENCES users_tasks (user_id, task_id));

CREATE TABLE addresses (id int PRIMARY KEY, address text NOT NULL);
CREATE TABLE orders (id int PRIMARY KEY, name text NOT NULL, billing_address_id int, shipping_address_id int,
                     CONSTRAINT billing FOREIGN KEY (billing_address_id) REFERENCES addresses (id),
                     CONSTRAINT shipping FOREIGN KEY (shipping_address_id) REFERENCES addresses (id));
CREATE TABLE big_projects (big_project_id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE sites (site_id int PRIMARY KEY, name text NOT NULL, main_project_id int,
                    CONSTRAINT main_project FOREIGN KEY (main_project_id) REFERENCES big_projects (big_project_id));
CREATE TABLE jobs (site_id int NOT NULL REFERENCES sites (site_id),
                   big_project_id int NOT NULL REFERENCES big_projects (big_project_id),
                   PRIMARY KEY (site_id, big_project_id));
CREATE TABLE departments (id int PRIMARY KEY, name text NOT NULL, head_id int);
CREATE TABLE agents (id int PRIMARY KEY, name text NOT NULL, department_id int REFERENCES departments (id));
ALTER TABLE departments ADD CONSTRAINT departments_head_id_fkey FOREIGN KEY (head_id) REFERENCES agents (id);
CREATE TABLE country (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE capital (id int PRIMARY KEY, name text NOT NULL, country_id int UNIQUE REFERENCES country (id));
CREATE TABLE second (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE first (id int PRIMARY KEY, name text NOT NULL, second_id_1 int UNIQUE REFERENCES second (id),
                    second_id_2 int UNIQUE REFERENCES second (id));

CREATE TABLE family_tree (id text PRIMARY KEY, name text NOT NULL, parent text REFERENCES family_tree (id));
CREATE TABLE manager (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE organizations (id int PRIMARY KEY, name text NOT NULL, referee int REFERENCES organizations (id),
                            auditor int REFERENCES organizations (id), manager_id int REFERENCES manager (id));

CREATE TABLE end_1 (id int PRIMARY KEY);
CREATE TABLE end_2 (id int PRIMARY KEY);
CREATE TABLE end_junction (end_1_id int NOT NULL REFERENCES end_1 (id), end_2_id int NOT NULL REFERENCES end_2 (id),
                           PRIMARY KEY (end_1_id, end_2_id));
CREATE TABLE films (id int PRIMARY KEY, title text NOT NULL);
CREATE TABLE actors (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE roles (id int NOT NULL, film_id int NOT NULL REFERENCES films (id),
                    actor_id int NOT NULL REFERENCES actors (id), character text NOT NULL,
                    PRIMARY KEY (id, film_id, actor_id));
CREATE TABLE readers (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE books (id int PRIMARY KEY, title text NOT NULL);
CREATE TABLE loans (id int PRIMARY KEY, reader_id int NOT NULL REFERENCES readers (id),
                    book_id int NOT NULL REFERENCES books (id));
"""
ROWS = """
INSERT INTO clients VALUES (1, 'Microsoft'), (2, 'Apple');
INSERT INTO projects VALUES (1, 'Windows 7', 1), (2, 'Windows 10', 1), (3, 'IOS', 2), (4, 'OSX', 2), (5, 'Orphan', NULL);
INSERT INTO tasks VALUES (1, 'Design w7', 1), (2, 'Code w7', 1), (3, 'Design w10', 2), (4, 'Code w10', 2),
    (5, 'Design IOS', 3), (6, 'Code IOS', 3), (7, 'Design OSX', 4), (8, 'Code OSX', 4);
INSERT INTO users VALUES (1, 'Angela Martin'), (2, 'Michael Scott'), (3, 'Dwight Schrute');
INSERT INTO users_tasks VALUES (1, 1), (1, 2), (1, 3), (1, 4), (2, 5), (2, 6), (2, 7), (3, 1), (3, 5);
INSERT INTO users_projects VALUES (1, 1), (1, 2), (2, 3), (2, 4), (3, 1), (3, 3);
INSERT INTO comments VALUES (1, 1, 2, 6, 'Needs to be delivered ASAP');
INSERT INTO files VALUES (1, 'autoexec.bat', '@ECHO OFF'), (2, 'command.com', '#include <unix.h>'),
    (3, 'README.md', '# make $$$!'), (4, 'unused.txt', 'nothing');
INSERT INTO touched_files VALUES (1, 1, 1), (1, 1, 2), (1, 1, 3), (3, 1, 1);
INSERT INTO addresses VALUES (1, 'address 1'), (2, 'address 2'), (3, 'address 3');
INSERT INTO orders VALUES (1, 'order 1', 1, 2), (2, 'order 2', 1, 1), (3, 'order 3', 2, 1);
INSERT INTO big_projects VALUES (1, 'big project 1'), (2, 'big project 2');
INSERT INTO sites VALUES (1, 'site 1', 1), (2, 'site 2', NULL), (3, 'site 3', 2);
INSERT INTO jobs VALUES (1, 1), (2, 1), (2, 2);
INSERT INTO departments VALUES (1, 'sales', NULL);
INSERT INTO agents VALUES (1, 'Ann', 1);
UPDATE departments SET head_id = 1;
INSERT INTO country VALUES (1, 'Afghanistan'), (2, 'Algeria');
INSERT INTO capital VALUES (1, 'Kabul', 1), (2, 'Algiers', 2);
INSERT INTO second VALUES (1, 'uno');
INSERT INTO first VALUES (1, 'one', 1, NULL);
INSERT INTO family_tree VALUES ('1', 'Parental Unit', NULL), ('2', 'Kid One', '1'), ('3', 'Kid Two', '1'),
    ('4', 'Grandkid One', '2'), ('5', 'Grandkid Two', '3');
INSERT INTO manager VALUES (1, 'Referee Manager'), (2, 'Auditor Manager'), (3, 'Acme Manager'),
    (4, 'Umbrella Manager'), (5, 'Cyberdyne Manager'), (6, 'Oscorp Manager');
INSERT INTO organizations VALUES (1, 'Referee Org', NULL, NULL, 1), (2, 'Auditor Org', NULL, NULL, 2),
    (3, 'Acme', 1, 2, 3), (4, 'Umbrella', 1, 2, 4), (5, 'Cyberdyne', 3, 4, 5), (6, 'Oscorp', 3, 4, 6);
INSERT INTO end_1 VALUES (1), (2);
INSERT INTO end_2 VALUES (1), (2);
INSERT INTO end_junction VALUES (1, 2), (2, 1), (2, 2);
INSERT INTO films VALUES (1, 'The Lighthouse'), (2, 'Nosferatu');
INSERT INTO actors VALUES (1, 'Willem Dafoe'), (2, 'Robert Pattinson');
INSERT INTO roles VALUES (1, 1, 1, 'Thomas Wake'), (2, 1, 2, 'Ephraim Winslow'), (3, 1, 1, 'the mermaid''s sailor');
INSERT INTO readers VALUES (1, 'Rae');
INSERT INTO books VALUES (1, 'Dune');
INSERT INTO loans VALUES (1, 1, 1);
"""
COLUMNS = {
    "clients": "id, name", "projects": "id, name, client_id", "tasks": "id, name, project_id", "users": "id, name",
    "users_tasks": "user_id, task_id", "users_projects": "user_id, project_id",
    "comments": "id, commenter_id, user_id, task_id, content", "files": "id, filename, content",
    "touched_files": "user_id, task_id, file_id", "addresses": "id, address",
    "orders": "id, name, billing_address_id, shipping_address_id", "big_projects": "big_project_id, name",
    "sites": "site_id, name, main_project_id", "jobs": "site_id, big_project_id", "departments": "id, name, head_id",
    "agents": "id, name, department_id", "country": "id, name", "capital": "id, name, country_id",
    "second": "id, name", "first": "id, name, second_id_1, second_id_2", "family_tree": "id, name, parent",
    "manager": "id, name", "organizations": "id, name, referee, auditor, manager_id", "end_1": "id", "end_2": "id",
    "end_junction": "end_1_id, end_2_id", "films": "id, title", "actors": "id, name",
    "roles": "id, film_id, actor_id, character", "readers": "id, name", "books": "id, title", "loans": "id, reader_id, book_id",
}
CONTRACTS = {
    **{f"{name}.v1.sql": f"SELECT {columns} FROM {name}" for name, columns in COLUMNS.items()},
    # a second junction over jobs: the jobs of sites that have a main project
    "main_jobs.v1.sql": "SELECT site_id, big_project_id FROM jobs "
                        "WHERE site_id IN (SELECT site_id FROM sites WHERE main_project_id IS NOT NULL)",
}
EVERY = [*COLUMNS, "main_jobs"]


def _grants(names: list[str], extra: str = "") -> str:
    lines = [f'    {{ contract = "{n}", actions = ["read"] }},' for n in names]
    return "grants = [\n" + "\n".join([*lines, *([extra] if extra else [])]) + "\n]\n"


TOML = "\n".join([
    '[project]\nname = "embeds"\n\n[databases.main]\n',
    "[apps.web]", _grants([n for n in EVERY if n != "end_junction"]),
    "[apps.admin]", _grants([n for n in EVERY if n != "users"],
                            '    { contract = "users", actions = ["read", "insert"] },'),
    "[apps.narrow]", _grants(["users", "tasks", "sites", "big_projects", "jobs"]),
    "[apps.tenant_one]", _grants(["users", "tasks"],
                                 '    { contract = "users_tasks", actions = ["read"], filter = "user_id=eq.1" },'),
])


# --- the cases ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    feature: str
    url: str
    status: int
    body: Any
    source: str
    """The PostgREST spec (or docs section) the case comes from."""
    app: str = "web"
    method: str = "GET"
    payload: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    expect_headers: dict[str, str] = field(default_factory=dict)
    partial: bool = False
    """Compare only the keys of ``body`` (an object)."""


def _ids(*ids: int) -> list[dict[str, int]]:
    return [{"id": i} for i in ids]


def not_found(parent: str, child: str, hint: str | None = None, using: str | None = None) -> dict[str, Any]:
    hinted = f"' using the hint '{using}" if using else ""
    return {"code": "PGRST200",
            "message": f"Could not find a relationship between '{parent}' and '{child}' in the schema cache",
            "details": f"Searched for a foreign key relationship between '{parent}' and '{child}{hinted}' in the "
                       f"schema '{SCHEMA}', but no matches were found.",
            "hint": hint}


def ambiguous(parent: str, child: str, candidates: list[tuple[str, str]], choices: list[str]) -> dict[str, Any]:
    return {"code": "PGRST201",
            "message": f"Could not embed because more than one relationship was found for '{parent}' and '{child}'",
            "details": [{"cardinality": c, "embedding": f"{parent} with {child}", "relationship": r}
                        for c, r in candidates],
            "hint": f"Try changing '{child}' to one of the following: {', '.join(repr(c) for c in choices)}. "
                    "Find the desired relationship in the 'details' key."}


SCHEMA = "public"
"""What PGRST200's details name as the schema: the profile the request is served under, as PGRST205 and PGRST202
name it (``public`` for the app's default version, ``vN`` for another)."""
ANGELA, MICHAEL, DWIGHT = "Angela Martin", "Michael Scott", "Dwight Schrute"
ASAP = "Needs to be delivered ASAP"
Q, D, E, R, H = "QuerySpec", "EmbedDisambiguationSpec", "EmbedInnerJoinSpec", "RelatedQueriesSpec", "docs"

M2M = [
    Case("many-to-many", "/tasks?select=id,users(id)&order=id&users.order=id", 200,
         [{"id": 1, "users": _ids(1, 3)}, {"id": 2, "users": _ids(1)}, {"id": 3, "users": _ids(1)},
          {"id": 4, "users": _ids(1)}, {"id": 5, "users": _ids(2, 3)}, {"id": 6, "users": _ids(2)},
          {"id": 7, "users": _ids(2)}, {"id": 8, "users": []}], f"{Q}: requesting many<->many relation"),
    Case("many-to-many", "/tasks?id=eq.1&select=id,theUsers:users(id)&theUsers.order=id", 200,
         [{"id": 1, "theUsers": _ids(1, 3)}], f"{Q}: requesting many<->many relation with rename"),
    Case("many-to-many", "/users?select=id,tasks(id)&order=id&tasks.order=id", 200,
         [{"id": 1, "tasks": _ids(1, 2, 3, 4)}, {"id": 2, "tasks": _ids(5, 6, 7)}, {"id": 3, "tasks": _ids(1, 5)}],
         f"{Q}: requesting many<->many relation reverse"),
    Case("many-to-many", "/files?filename=eq.autoexec.bat&select=filename,users_tasks(user_id,task_id)"
         "&users_tasks.order=user_id", 200,
         [{"filename": "autoexec.bat", "users_tasks": [{"user_id": 1, "task_id": 1}, {"user_id": 3, "task_id": 1}]}],
         f"{Q}: requesting many<->many relation using composite key"),
    Case("many-to-many", "/users_tasks?user_id=eq.1&task_id=eq.1&select=user_id,files(filename,content)"
         "&files.order=id", 200,
         [{"user_id": 1, "files": [{"filename": "autoexec.bat", "content": "@ECHO OFF"},
                                   {"filename": "command.com", "content": "#include <unix.h>"},
                                   {"filename": "README.md", "content": "# make $$$!"}]}],
         f"{Q}: requesting data using many<->many relation defined by composite keys"),
    Case("many-to-many", "/users_tasks?user_id=eq.1&task_id=eq.1&select=user_id,files!touched_files(filename)"
         "&files.order=id", 200,
         [{"user_id": 1, "files": [{"filename": "autoexec.bat"}, {"filename": "command.com"},
                                   {"filename": "README.md"}]}],
         f"{Q}: requesting data using many<->many (composite keys) relation using hint"),
    Case("many-to-many", "/users?select=id,designTasks:tasks(id,name),codeTasks:tasks(id,name)"
         "&designTasks.name=like.*Design*&codeTasks.name=like.*Code*&order=id&designTasks.order=id"
         "&codeTasks.order=id", 200,
         [{"id": 1, "designTasks": [{"id": 1, "name": "Design w7"}, {"id": 3, "name": "Design w10"}],
           "codeTasks": [{"id": 2, "name": "Code w7"}, {"id": 4, "name": "Code w10"}]},
          {"id": 2, "designTasks": [{"id": 5, "name": "Design IOS"}, {"id": 7, "name": "Design OSX"}],
           "codeTasks": [{"id": 6, "name": "Code IOS"}]},
          {"id": 3, "designTasks": [{"id": 1, "name": "Design w7"}, {"id": 5, "name": "Design IOS"}],
           "codeTasks": []}], f"{Q}: aliased embeds work with many to many relation"),
    Case("many-to-many", "/projects?select=id,name,designTasks:tasks(name,users(id,name))"
         "&designTasks.name=like.*Design*&designTasks.users.id=in.(1,2)&order=id&designTasks.users.order=id", 200,
         [{"id": 1, "name": "Windows 7", "designTasks": [{"name": "Design w7", "users": [{"id": 1, "name": ANGELA}]}]},
          {"id": 2, "name": "Windows 10",
           "designTasks": [{"name": "Design w10", "users": [{"id": 1, "name": ANGELA}]}]},
          {"id": 3, "name": "IOS", "designTasks": [{"name": "Design IOS", "users": [{"id": 2, "name": MICHAEL}]}]},
          {"id": 4, "name": "OSX", "designTasks": [{"name": "Design OSX", "users": [{"id": 2, "name": MICHAEL}]}]},
          {"id": 5, "name": "Orphan", "designTasks": []}], f"{Q}: works with an aliased child plus non aliased child"),
    Case("many-to-many", "/users?select=id,tasks(id)&tasks.order=id.desc&tasks.limit=2&tasks.offset=1&order=id", 200,
         [{"id": 1, "tasks": _ids(3, 2)}, {"id": 2, "tasks": _ids(6, 5)}, {"id": 3, "tasks": _ids(1)}],
         f"{H}: embedded filters (limit and offset on the far side)"),
    Case("many-to-many", "/users?select=name,tasks(id,name,projects(id,name))&tasks.order=projects(id).desc,name"
         "&order=id&limit=1", 200,
         [{"name": ANGELA, "tasks": [
             {"id": 4, "name": "Code w10", "projects": {"id": 2, "name": "Windows 10"}},
             {"id": 3, "name": "Design w10", "projects": {"id": 2, "name": "Windows 10"}},
             {"id": 2, "name": "Code w7", "projects": {"id": 1, "name": "Windows 7"}},
             {"id": 1, "name": "Design w7", "projects": {"id": 1, "name": "Windows 7"}}]}],
         f"{R}: related orders work on an embedded resource"),
    Case("many-to-many", "/users?select=*,tasks!inner()&order=id", 200,
         [{"id": 1, "name": ANGELA}, {"id": 2, "name": MICHAEL}, {"id": 3, "name": DWIGHT}],
         f"{Q}: empty embed works on a many-to-many relationship"),
    Case("many-to-many", "/users?select=*,tasks!inner()&tasks.id=eq.3", 200, [{"id": 1, "name": ANGELA}],
         f"{Q}: empty embed works on a many-to-many relationship (filtered)"),
    Case("many-to-many", "/users?select=*,users_tasks(tasks(projects()))&order=id", 200,
         [{"id": 1, "name": ANGELA}, {"id": 2, "name": MICHAEL}, {"id": 3, "name": DWIGHT}],
         f"{Q}: empty embed works on nested relationships"),
    Case("many-to-many", "/users?select=*,users_tasks!inner(tasks!inner(projects()))&users_tasks.tasks.id=eq.3", 200,
         [{"id": 1, "name": ANGELA}], f"{Q}: empty embed works on nested relationships (inner)"),
    Case("many-to-many", "/users?select=*,tasks(projects(clients()),users_tasks())&order=id", 200,
         [{"id": 1, "name": ANGELA}, {"id": 2, "name": MICHAEL}, {"id": 3, "name": DWIGHT}],
         f"{Q}: empty embed works on nested relationships (through a junction)"),
    Case("many-to-many", "/users?select=name,tasks()&tasks.id=eq.1&tasks=not.is.null&order=id", 200,
         [{"name": ANGELA}, {"name": DWIGHT}], f"{R}: null filtering works on a many-to-many relationship"),
    Case("many-to-many", "/users?select=name,tasks()&tasks.id=eq.1&tasks=is.null", 200, [{"name": MICHAEL}],
         f"{R}: null filtering works on a many-to-many relationship (anti-join)"),
    Case("many-to-many", "/projects?select=name,clients!inner(name),users!inner(name)&order=id&users.order=id", 200,
         [{"name": "Windows 7", "clients": {"name": "Microsoft"}, "users": [{"name": ANGELA}, {"name": DWIGHT}]},
          {"name": "Windows 10", "clients": {"name": "Microsoft"}, "users": [{"name": ANGELA}]},
          {"name": "IOS", "clients": {"name": "Apple"}, "users": [{"name": MICHAEL}, {"name": DWIGHT}]},
          {"name": "OSX", "clients": {"name": "Apple"}, "users": [{"name": MICHAEL}]}],
         f"{E}: works with m2o and m2m relationships combined"),
    Case("many-to-many", "/users?select=id,tasks!inner(id)&tasks.id=eq.5&order=id", 200,
         [{"id": 2, "tasks": _ids(5)}, {"id": 3, "tasks": _ids(5)}], f"{E}: !inner on a many-to-many, counted",
         headers={"Prefer": "count=exact"}, expect_headers={"content-range": "0-1/2"}),
    Case("many-to-many", "/users?select=name,tasks(name)&order=tasks(name)", 400,
         {"code": "PGRST118", "message": "A related order on 'tasks' is not possible",
          "details": "'users' and 'tasks' do not form a many-to-one or one-to-one relationship", "hint": None},
         f"{R}: related order fails when it is not a to-one relationship"),
    Case("many-to-many", "/films?select=title,actors(name)&order=id&actors.order=id", 200,
         [{"title": "The Lighthouse", "actors": [{"name": "Willem Dafoe"}, {"name": "Willem Dafoe"},
                                                  {"name": "Robert Pattinson"}]},
          {"title": "Nosferatu", "actors": []}],
         f"{H}: the join table is also detected if the composite key has additional columns (a pair twice: twice)"),
    Case("many-to-many", "/actors?select=name,films(title)&id=eq.2", 200,
         [{"name": "Robert Pattinson", "films": [{"title": "The Lighthouse"}]}], f"{H}: many-to-many relationships"),
    Case("many-to-many", "/end_1?select=id,end_2(id)&order=id&end_2.order=id", 200,
         [{"id": 1, "end_2": _ids(2)}, {"id": 2, "end_2": _ids(1, 2)}],
         f"{D}: works with no ambiguity when there's an exposed view of the junction", app="admin"),
]

VISIBILITY = [
    Case("junction visibility", "/end_1?select=end_2(*)", 400, not_found("end_1", "end_2"),
         f"{D}: doesn't work if the junction is only internal (not granted to the app)"),
    Case("junction visibility", "/users?select=tasks(name)", 400, not_found("users", "tasks"),
         "gatehouse: a junction the app may not read is no relation", app="narrow"),
    Case("junction visibility", "/users?select=task(name)", 400, not_found("users", "task"),
         "gatehouse: no hint names a contract reached through a junction the app may not read", app="narrow"),
    Case("junction visibility", "/sites?select=*,big_projects(*)", 300,
         ambiguous("sites", "big_projects",
                   [("many-to-one", "main_project using sites(main_project_id) and big_projects(big_project_id)"),
                    ("many-to-many", "jobs using jobs_site_id_fkey(site_id) and "
                                     "jobs_big_project_id_fkey(big_project_id)")],
                   ["big_projects!main_project", "big_projects!jobs"]),
         "gatehouse: a 300 lists no relation through a junction the app may not read", app="narrow"),
    Case("junction visibility", "/tasks?select=id,users(id)&order=id&users.order=id", 200,
         [{"id": t, "users": _ids(1) if t <= 4 else []} for t in range(1, 9)],
         "gatehouse: the app's row filter on the junction holds", app="tenant_one"),
    Case("junction visibility", "/users?select=id,tasks!inner(id)&order=id&tasks.order=id", 200,
         [{"id": 1, "tasks": _ids(1, 2, 3, 4)}], "gatehouse: the junction's row filter holds under !inner",
         app="tenant_one", headers={"Prefer": "count=exact"}, expect_headers={"content-range": "0-0/1"}),
]

BY_NAME = [
    Case("key or column as target", "/projects?id=in.(1,3)&select=id,name,client(id,name)&order=id", 200,
         [{"id": 1, "name": "Windows 7", "client": {"id": 1, "name": "Microsoft"}},
          {"id": 3, "name": "IOS", "client": {"id": 2, "name": "Apple"}}], f"{D}: can embed by FK name"),
    Case("key or column as target", "/projects?id=in.(1,3)&select=id,name,client_id,client(id,name)&order=id", 200,
         [{"id": 1, "name": "Windows 7", "client_id": 1, "client": {"id": 1, "name": "Microsoft"}},
          {"id": 3, "name": "IOS", "client_id": 2, "client": {"id": 2, "name": "Apple"}}],
         f"{D}: can embed by FK name and select the FK column at the same time"),
    Case("key or column as target", "/tasks?id=eq.1&select=id,name,projects!project(id,name,client(id,name))", 200,
         [{"id": 1, "name": "Design w7",
           "projects": {"id": 1, "name": "Windows 7", "client": {"id": 1, "name": "Microsoft"}}}],
         f"{D}: can embed parent with view!fk and grandparent by using fk"),
    Case("key or column as target", "/comments?select=content,commented_task(user_id,task_id)", 200,
         [{"content": ASAP, "commented_task": {"user_id": 2, "task_id": 6}}],
         f"{D}: can embed by using a composite FK name"),
    Case("key or column as target", "/users_tasks?user_id=eq.2&task_id=eq.6&select=user_id,commented_task(content)",
         200, [{"user_id": 2, "commented_task": [{"content": ASAP}]}],
         f"{D}: resolves when there's a table and view that point to the same fk (composite pk)"),
    Case("key or column as target", "/orders?id=eq.1&select=id, name, billing(address), shipping(address)", 200,
         [{"id": 1, "name": "order 1", "billing": {"address": "address 1"}, "shipping": {"address": "address 2"}}],
         f"{D}: embeds by using two fks pointing to the same table"),
    Case("key or column as target", "/comments?select=content,user(name)", 200,
         [{"content": ASAP, "user": {"name": ANGELA}}], f"{D}: can request a parent with fk"),
    Case("key or column as target", "/sites?select=name,main_project(name)&site_id=eq.1", 200,
         [{"name": "site 1", "main_project": {"name": "big project 1"}}],
         f"{D}: can disambiguate with the fk in case of an o2m and m2m relationship to the same table"),
    Case("key or column as target", "/projects?id=in.(1,3)&select=id,name,client_id(id,name)&order=id", 200,
         [{"id": 1, "name": "Windows 7", "client_id": {"id": 1, "name": "Microsoft"}},
          {"id": 3, "name": "IOS", "client_id": {"id": 2, "name": "Apple"}}], f"{D}: can embed by column"),
    Case("key or column as target", "/projects?id=in.(1,3)&select=id,name,client_id,client:client_id(id,name)"
         "&order=id", 200,
         [{"id": 1, "name": "Windows 7", "client_id": 1, "client": {"id": 1, "name": "Microsoft"}},
          {"id": 3, "name": "IOS", "client_id": 2, "client": {"id": 2, "name": "Apple"}}],
         f"{D}: can embed by column and select the column at the same time, if aliased"),
    Case("key or column as target", "/tasks?id=eq.1&select=id,name,project:projects!project_id(id,name,"
         "client:client_id(id,name))", 200,
         [{"id": 1, "name": "Design w7",
           "project": {"id": 1, "name": "Windows 7", "client": {"id": 1, "name": "Microsoft"}}}],
         f"{D}: can embed parent by using view!column and grandparent by using the column"),
    Case("key or column as target", "/orders?id=eq.1&select=id, name, billing_address_id(id), shipping_address_id(id)",
         200, [{"id": 1, "name": "order 1", "billing_address_id": {"id": 1}, "shipping_address_id": {"id": 2}}],
         f"{D}: embeds by using two columns pointing to the same table"),
    Case("key or column as target", "/sites?select=name,main_project_id(name)&site_id=eq.1", 200,
         [{"name": "site 1", "main_project_id": {"name": "big project 1"}}],
         f"{D}: can disambiguate with the column in case of an o2m and m2m relationship to the same table"),
    Case("key or column as target", "/orders?id=eq.1&select=id, name, billing_address_id(id), shipping(id)", 200,
         [{"id": 1, "name": "order 1", "billing_address_id": {"id": 1}, "shipping": {"id": 2}}],
         f"{D}: embeds by using a column and a fk pointing to the same table"),
    Case("key or column as target", "/projects?select=name,client_id,client:client_id(name)&client_id=eq.2&order=id",
         200, [{"name": "IOS", "client_id": 2, "client": {"name": "Apple"}},
               {"name": "OSX", "client_id": 2, "client": {"name": "Apple"}}],
         f"{R}: doesn't interfere filtering when embedding using the column name"),
    Case("key or column as target", "/comments?select=*,users_tasks(userId:user_id)", 200,
         [{"id": 1, "commenter_id": 1, "user_id": 2, "task_id": 6, "content": ASAP, "users_tasks": {"userId": 2}}],
         f"{Q}: requesting parent and specifying/renaming one key of the composite primary key"),
    Case("key or column as target", "/users_tasks?user_id=eq.2&task_id=eq.6&select=*, comments(content)", 200,
         [{"user_id": 2, "task_id": 6, "comments": [{"content": ASAP}]}], f"{Q}: requesting children with composite key"),
]

ONE_TO_ONE = [
    Case("one-to-one", "/country?select=name,capital(name)&order=id", 200,
         [{"name": "Afghanistan", "capital": {"name": "Kabul"}}, {"name": "Algeria", "capital": {"name": "Algiers"}}],
         f"{Q}: one to one works when having a fk with a unique constraint"),
    Case("one-to-one", "/capital?select=name,country(name)&order=id", 200,
         [{"name": "Kabul", "country": {"name": "Afghanistan"}}, {"name": "Algiers", "country": {"name": "Algeria"}}],
         f"{Q}: one to one works when having a fk with a unique constraint (reverse)"),
    Case("one-to-one", "/capital?select=name,country_id(name)&order=id", 200,
         [{"name": "Kabul", "country_id": {"name": "Afghanistan"}},
          {"name": "Algiers", "country_id": {"name": "Algeria"}}], f"{Q}: one to one works when using column as target"),
    Case("one-to-one", "/capital?select=name,capital_country_id_fkey(name)&order=id", 200,
         [{"name": "Kabul", "capital_country_id_fkey": {"name": "Afghanistan"}},
          {"name": "Algiers", "capital_country_id_fkey": {"name": "Algeria"}}],
         f"{Q}: one to one works when using the fk as target"),
    Case("one-to-one", "/country?select=name,capital_country_id_fkey(name)&order=id", 200,
         [{"name": "Afghanistan", "capital_country_id_fkey": {"name": "Kabul"}},
          {"name": "Algeria", "capital_country_id_fkey": {"name": "Algiers"}}],
         f"{Q}: one to one works when using the fk as target (reverse)"),
    Case("one-to-one", "/country?select=name,id(name)&order=id", 200,
         [{"name": "Afghanistan", "id": {"name": "Kabul"}}, {"name": "Algeria", "id": {"name": "Algiers"}}],
         f"{Q}: one to one works when using the referenced column as target"),
    *(Case("one-to-one", f"/{parent}?select=name,{target}!{hint}(name)&order=id", 200,
           [{"name": a, target: {"name": b}} for a, b in pairs], f"{Q}: one to one works when using column as hint")
      for parent, target, hint, pairs in [
          ("country", "capital", "id", [("Afghanistan", "Kabul"), ("Algeria", "Algiers")]),
          ("country", "capital", "country_id", [("Afghanistan", "Kabul"), ("Algeria", "Algiers")]),
          ("capital", "country", "id", [("Kabul", "Afghanistan"), ("Algiers", "Algeria")]),
          ("capital", "country", "country_id", [("Kabul", "Afghanistan"), ("Algiers", "Algeria")])]),
]

HINTS = [
    Case("!hint", "/orders?select=name,billing_address:addresses!billing(address),"
         "shipping_address:addresses!shipping(address)&id=eq.1", 200,
         [{"name": "order 1", "billing_address": {"address": "address 1"},
           "shipping_address": {"address": "address 2"}}], f"{H}: multiple many-to-one"),
    Case("!hint", "/addresses?select=address,billing_orders:orders!billing(name),shipping_orders:orders!shipping(name)"
         "&id=eq.1&billing_orders.order=id&shipping_orders.order=id", 200,
         [{"address": "address 1", "billing_orders": [{"name": "order 1"}, {"name": "order 2"}],
           "shipping_orders": [{"name": "order 2"}, {"name": "order 3"}]}], f"{H}: multiple one-to-many"),
    Case("!hint", "/clients?id=eq.1&select=id,projects:projects!client(id,tasks(id))&projects.order=id"
         "&projects.tasks.order=id", 200,
         [{"id": 1, "projects": [{"id": 1, "tasks": _ids(1, 2)}, {"id": 2, "tasks": _ids(3, 4)}]}],
         f"{D}: can specify a table!fk hint and request children 2 levels"),
    Case("!hint", "/sites?select=*,big_projects!jobs(name)&site_id=in.(1,2)&order=site_id"
         "&big_projects.order=big_project_id", 200,
         [{"site_id": 1, "name": "site 1", "main_project_id": 1, "big_projects": [{"name": "big project 1"}]},
          {"site_id": 2, "name": "site 2", "main_project_id": None,
           "big_projects": [{"name": "big project 1"}, {"name": "big project 2"}]}],
         f"{D}: can specify the junction of an m2m relationship"),
    Case("!hint", "/sites?select=*,big_projects!main_jobs(name)&site_id=in.(1,2)&order=site_id", 200,
         [{"site_id": 1, "name": "site 1", "main_project_id": 1, "big_projects": [{"name": "big project 1"}]},
          {"site_id": 2, "name": "site 2", "main_project_id": None, "big_projects": []}],
         f"{D}: can specify the junction of an m2m relationship (a second junction)"),
    Case("!hint", "/orders?select=id,sender:addresses!space(address)&id=lt.4", 400,
         not_found("orders", "addresses", using="space"), f"{D}: fails if the fk is not known"),
    Case("!inner", "/projects?select=id,clients!inner(id)&order=id", 200,
         [{"id": p, "clients": {"id": 1 if p < 3 else 2}} for p in range(1, 5)],
         f"{E}: ignores null embeddings while the default left join doesn't"),
    Case("!inner", "/projects?select=id,clients!left(id)&order=id", 200,
         [{"id": p, "clients": {"id": 1 if p < 3 else 2} if p < 5 else None} for p in range(1, 6)],
         f"{E}: ignores null embeddings while the default left join doesn't (!left)"),
    Case("!inner", "/tasks?select=id,projects!inner(id,clients!inner(id))&projects.clients.id=eq.1&order=id", 200,
         [{"id": t, "projects": {"id": (t + 1) // 2, "clients": {"id": 1}}} for t in range(1, 5)],
         f"{E}: filters source tables when a two levels below embedded table is filtered"),
    Case("!inner", "/tasks?select=id,projects(id,clients!inner(id))&projects.clients.id=eq.2&order=id", 200,
         [{"id": t, "projects": {"id": (t + 1) // 2, "clients": {"id": 2}} if t > 4 else None} for t in range(1, 9)],
         f"{E}: only affects the source table rows if his direct embedding is an inner join"),
    Case("!hint", "/projects?select=id,clients!client!inner(id)&clients.id=eq.2&order=id", 200,
         [{"id": 3, "clients": {"id": 2}}, {"id": 4, "clients": {"id": 2}}], f"{E}: works when using hints"),
    Case("!hint", "/projects?select=id,client!inner(id)&client.id=eq.2&order=id", 200,
         [{"id": 3, "client": {"id": 2}}, {"id": 4, "client": {"id": 2}}], f"{E}: works when using hints (fk target)"),
]

SELF = [
    Case("self reference", "/family_tree?id=in.(3,4)&select=id,parent(id,name,parent(*))&order=id", 200,
         [{"id": "3", "parent": {"id": "1", "name": "Parental Unit", "parent": None}},
          {"id": "4", "parent": {"id": "2", "name": "Kid One",
                                 "parent": {"id": "1", "name": "Parental Unit", "parent": None}}}],
         f"{D}: embeds parents recursively"),
    Case("self reference", "/family_tree?id=eq.1&select=id,name,children:family_tree!parent(id,name,"
         "children:family_tree!parent(id,name))&children.order=id&children.children.order=id", 200,
         [{"id": "1", "name": "Parental Unit", "children": [
             {"id": "2", "name": "Kid One", "children": [{"id": "4", "name": "Grandkid One"}]},
             {"id": "3", "name": "Kid Two", "children": [{"id": "5", "name": "Grandkid Two"}]}]}],
         f"{D}: embeds children recursively"),
    Case("self reference", "/family_tree?id=eq.2&select=id,name,parent(id,name,children:family_tree!parent(id,name))"
         "&parent.children.order=id", 200,
         [{"id": "2", "name": "Kid One", "parent": {"id": "1", "name": "Parental Unit", "children": [
             {"id": "2", "name": "Kid One"}, {"id": "3", "name": "Kid Two"}]}}],
         f"{D}: embeds parent and then embeds children"),
    Case("self reference", "/family_tree?select=id,parent,up:parent(id)&id=in.(1,2)&order=id", 200,
         [{"id": "1", "parent": None, "up": None}, {"id": "2", "parent": "1", "up": {"id": "1"}}],
         f"{D}: works with self reference both ways (m2o)"),
    Case("self reference", "/family_tree?select=id,childs:family_tree(id)&id=in.(2,4)&order=id&childs.order=id", 200,
         [{"id": "2", "childs": [{"id": "4"}]}, {"id": "4", "childs": []}],
         f"{D}: works with self reference both ways (o2m)"),
    Case("self reference", "/organizations?select=id,name,referee(id,name),auditor(id,name)&id=eq.3", 200,
         [{"id": 3, "name": "Acme", "referee": {"id": 1, "name": "Referee Org"},
           "auditor": {"id": 2, "name": "Auditor Org"}}], f"{D}: two self reference foreign keys embed parents"),
    Case("self reference", "/organizations?select=id,name,refereeds:organizations!referee(id,name)&id=eq.1"
         "&refereeds.order=id", 200,
         [{"id": 1, "name": "Referee Org", "refereeds": [{"id": 3, "name": "Acme"}, {"id": 4, "name": "Umbrella"}]}],
         f"{D}: two self reference foreign keys embed children"),
    Case("self reference", "/organizations?select=id,name,auditees:organizations!auditor(id,name)&id=eq.2"
         "&auditees.order=id", 200,
         [{"id": 2, "name": "Auditor Org", "auditees": [{"id": 3, "name": "Acme"}, {"id": 4, "name": "Umbrella"}]}],
         f"{D}: two self reference foreign keys embed children (auditor)"),
    Case("self reference", "/organizations?select=name,manager(name),referee(name,manager(name),auditor(name,"
         "manager(name))),auditor(name,manager(name),referee(name,manager(name)))&id=eq.5", 200,
         [{"name": "Cyberdyne", "manager": {"name": "Cyberdyne Manager"},
           "referee": {"name": "Acme", "manager": {"name": "Acme Manager"},
                       "auditor": {"name": "Auditor Org", "manager": {"name": "Auditor Manager"}}},
           "auditor": {"name": "Umbrella", "manager": {"name": "Umbrella Manager"},
                       "referee": {"name": "Referee Org", "manager": {"name": "Referee Manager"}}}}],
         f"{D}: embeds other relations (manager) besides the self reference"),
    Case("self reference", "/organizations?select=name,manager(name),auditees:organizations!auditor(name,manager(name),"
         "refereeds:organizations!referee(name,manager(name)))&id=eq.2&auditees.order=id&auditees.refereeds.order=id",
         200,
         [{"name": "Auditor Org", "manager": {"name": "Auditor Manager"}, "auditees": [
             {"name": "Acme", "manager": {"name": "Acme Manager"}, "refereeds": [
                 {"name": "Cyberdyne", "manager": {"name": "Cyberdyne Manager"}},
                 {"name": "Oscorp", "manager": {"name": "Oscorp Manager"}}]},
             {"name": "Umbrella", "manager": {"name": "Umbrella Manager"}, "refereeds": []}]}],
         f"{D}: embeds other relations (manager) besides the self reference, children"),
]

ERRORS = [
    Case("300 PGRST201", "/sites?select=*,big_projects(*)", 300,
         ambiguous("sites", "big_projects",
                   [("many-to-one", "main_project using sites(main_project_id) and big_projects(big_project_id)"),
                    ("many-to-many", "jobs using jobs_site_id_fkey(site_id) and "
                                     "jobs_big_project_id_fkey(big_project_id)"),
                    ("many-to-many", "main_jobs using jobs_site_id_fkey(site_id) and "
                                     "jobs_big_project_id_fkey(big_project_id)")],
                   ["big_projects!main_project", "big_projects!jobs", "big_projects!main_jobs"]),
         f"{D}: errs when there are o2m and m2m cardinalities to the target table"),
    Case("300 PGRST201", "/agents?select=*,departments(*)", 300,
         ambiguous("agents", "departments",
                   [("one-to-many", "departments_head_id_fkey using agents(id) and departments(head_id)"),
                    ("many-to-one", "agents_department_id_fkey using agents(department_id) and departments(id)")],
                   ["departments!departments_head_id_fkey", "departments!agents_department_id_fkey"]),
         f"{D}: errs on an ambiguous embed that has a circular reference"),
    Case("300 PGRST201", "/first?select=second(*)", 300,
         ambiguous("first", "second",
                   [("one-to-one", "first_second_id_1_fkey using first(second_id_1) and second(id)"),
                    ("one-to-one", "first_second_id_2_fkey using first(second_id_2) and second(id)")],
                   ["second!first_second_id_1_fkey", "second!first_second_id_2_fkey"]),
         f"{D}: errs on an ambiguous embed that has two one-to-one relationships"),
    Case("300 PGRST201", "/orders?select=*,addresses(*)", 300,
         ambiguous("orders", "addresses",
                   [("many-to-one", "billing using orders(billing_address_id) and addresses(id)"),
                    ("many-to-one", "shipping using orders(shipping_address_id) and addresses(id)")],
                   ["addresses!billing", "addresses!shipping"]), f"{H}: multiple many-to-one (the 300)"),
    Case("400 PGRST200", "/readers?select=books(*)", 400,
         {k: v for k, v in not_found("readers", "books").items() if k != "hint"},
         f"{Q}: no m2m through a table whose keys are not part of its primary key (issue 2070)", partial=True),
    Case("400 PGRST200", "/projects?select=task(*)", 400,
         not_found("projects", "task", hint="Perhaps you meant 'tasks' instead of 'task'."),
         "Error.hs noRelBetweenHint: a close child"),
    Case("400 PGRST200", "/clients?select=zzzz(*)", 400, not_found("clients", "zzzz"),
         "Error.hs noRelBetweenHint: no close alternative"),
    Case("400 PGRST118", "/clients?select=*,projects(*)&order=projects(id)", 400,
         {"code": "PGRST118", "message": "A related order on 'projects' is not possible",
          "details": "'clients' and 'projects' do not form a many-to-one or one-to-one relationship", "hint": None},
         f"{R}: fails when is not a to-one relationship"),
    Case("400 PGRST118", "/clients?select=*,pros:projects(*)&order=pros(id)", 400,
         {"code": "PGRST118", "message": "A related order on 'pros' is not possible",
          "details": "'clients' and 'pros' do not form a many-to-one or one-to-one relationship", "hint": None},
         f"{R}: fails when is not a to-one relationship (aliased)"),
    Case("related order", "/projects?select=id,clients(name)&order=clients(name).nullsfirst,id", 200,
         [{"id": 5, "clients": None}, {"id": 3, "clients": {"name": "Apple"}}, {"id": 4, "clients": {"name": "Apple"}},
          {"id": 1, "clients": {"name": "Microsoft"}}, {"id": 2, "clients": {"name": "Microsoft"}}],
         f"{R}: related order works on a many-to-one relationship"),
    Case("related order", "/projects?select=id,client:clients(name)&order=client(name).asc,id", 200,
         [{"id": 3, "client": {"name": "Apple"}}, {"id": 4, "client": {"name": "Apple"}},
          {"id": 1, "client": {"name": "Microsoft"}}, {"id": 2, "client": {"name": "Microsoft"}},
          {"id": 5, "client": None}], f"{R}: related order works on a many-to-one relationship (aliased)"),
]

WRITES = [  # last: it adds a user
    Case("many-to-many", "/users?select=name,tasks(name)", 201, [{"name": "Pam Beesly", "tasks": []}],
         f"{H}: embedding after an insert", app="admin", method="POST", payload={"id": 4, "name": "Pam Beesly"},
         headers={"Prefer": "return=representation"}),
]

CASES = [*M2M, *VISIBILITY, *BY_NAME, *ONE_TO_ONE, *HINTS, *SELF, *ERRORS, *WRITES]

NOT_APPLICABLE = {
    "spread embeds (...target(...))": "not served: 400 PGRST127 (docs/embedding.md)",
    "computed relationships (functions as relations)": "no SQL functions in contracts; [[relations]] declare links",
    "embedding from /rpc results": "/rpc runs Python logic, not SQL functions",
    "partitioned tables and their partitions": "contracts are views; a partition is not a contract",
    "several view columns showing one base column (issue 2459)": "a contract shows a base column once for relations",
    "a key's or column's name prefers the table over a view": "every contract is a view: several contracts that "
                                                             "expose the referenced table answer 300",
    "legacy target names: the Warning header": "headers are answered elsewhere (docs/postgrest-differences.md)",
}


# --- running them -------------------------------------------------------------------------------------------------

def _choices(hint: str) -> tuple[str, frozenset[str]]:
    """A 300's hint with its choices taken out, and the choices as a set."""
    match = re.fullmatch(r"(Try changing '[^']*' to one of the following: )(.*)(\. Find the desired .*)", hint)
    if match is None:
        return hint, frozenset()
    return match.group(1) + "..." + match.group(3), frozenset(match.group(2).split(", "))


def _comparable(body: Any) -> Any:
    """A 300's details and hint choices as sets (their order is the schema cache's)."""
    if isinstance(body, dict) and body.get("code") == "PGRST201":
        details = sorted(sorted(d.items()) for d in body["details"])
        return {**body, "details": details, "hint": _choices(body["hint"])}
    return body


def _mismatch(case: Case, response: httpx.Response) -> str | None:
    if response.status_code != case.status:
        return f"status {response.status_code}, body {response.text[:400]}"
    got = response.json()
    if case.partial:
        got = {k: v for k, v in got.items() if k in case.body}
    if _comparable(got) != _comparable(case.body):
        return f"body {response.text[:600]}"
    for name, value in case.expect_headers.items():
        if response.headers.get(name) != value:
            return f"header {name}: {response.headers.get(name)!r}"
    return None


@pytest.fixture
async def embeds(make_project: ProjectFactory, serve_project: Any) -> tuple[httpx.AsyncClient, Project, dict[str, str]]:
    project = make_project(toml=TOML, migrations={"V001__embeds.sql": TABLES + ROWS}, contracts=CONTRACTS)
    keys = await prepare(project)
    client, _ = await serve_project(project)
    return client, project, keys


async def test_postgrest_embedding_cases(embeds: tuple[httpx.AsyncClient, Project, dict[str, str]]) -> None:
    client, project, keys = embeds
    failed: list[str] = []
    passed: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for case in CASES:
        response = await client.request(case.method, case.url, json=case.payload,
                                        headers={"apikey": keys[case.app], **case.headers})
        problem = _mismatch(case, response)
        total[case.feature] += 1
        if problem is None:
            passed[case.feature] += 1
        else:
            failed.append(f"{case.source}\n    {case.method} {case.url} ({case.app}): {problem}")
    width = max(len(f) for f in total)
    print(f"\nPostgREST embedding parity: {sum(passed.values())}/{len(CASES)} cases pass "
          f"({100 * sum(passed.values()) / len(CASES):.0f} %)")
    for feature, count in total.items():
        print(f"  {feature:<{width}}  {passed[feature]:>3}/{count}")
    print(f"  not applicable to gatehouse: {len(NOT_APPLICABLE)} features")
    for feature, why in NOT_APPLICABLE.items():
        print(f"    {feature}: {why}")
    assert not failed, "\n".join(failed)

    # what the filtered and the written cases saw is what the database holds
    async with operations.owner_connection(project) as conn:
        assert await conn.fetchval("SELECT count(*) FROM users_tasks WHERE user_id <> 1") == 5  # hidden, not absent
        assert await conn.fetchval("SELECT name FROM users WHERE id = 4") == "Pam Beesly"
        assert await conn.fetchval("SELECT count(*) FROM end_junction") == 3


async def test_a_junction_never_reaches_across_databases(make_project: ProjectFactory, serve_project: Any) -> None:
    """A junction's keys are foreign keys, so both its sides live in its database; a declared link to another
    database makes no junction (the embed is PGRST200), and embedding the junction, then the far side, composes."""
    toml = """
[project]
name = "across"

[databases.people]

[databases.work]

[apps.web]
grants = [
    { contract = "users", actions = ["read"] },
    { contract = "tasks", actions = ["read"] },
    { contract = "users_tasks", actions = ["read"] },
]

[[relations]]
from = "users_tasks.user_id"
to = "users.id"
"""
    project = make_project(
        toml=toml,
        migrations={"people/V001__users.sql": "CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL);\n"
                                              "INSERT INTO users VALUES (1, 'Ann'), (2, 'Bo');",
                    "work/V001__tasks.sql": "CREATE TABLE tasks (id int PRIMARY KEY, name text NOT NULL);\n"
                                            "CREATE TABLE users_tasks (user_id int NOT NULL, task_id int NOT NULL "
                                            "REFERENCES tasks (id), PRIMARY KEY (user_id, task_id));\n"
                                            "INSERT INTO tasks VALUES (1, 'plan'), (2, 'build');\n"
                                            "INSERT INTO users_tasks VALUES (1, 1), (1, 2), (2, 2);"},
        contracts={"people/users.v1.sql": "SELECT id, name FROM users",
                   "work/tasks.v1.sql": "SELECT id, name FROM tasks",
                   "work/users_tasks.v1.sql": "SELECT user_id, task_id FROM users_tasks"})
    keys = await prepare(project)
    client, _ = await serve_project(project)
    web = {"apikey": keys["web"]}
    refused = await client.get("/users?select=id,tasks(name)", headers=web)
    assert refused.status_code == 400, refused.text
    assert refused.json() == not_found("users", "tasks", hint="Perhaps you meant 'users_tasks' instead of 'tasks'.")
    nested = await client.get("/users?select=id,users_tasks(tasks(name))&order=id&users_tasks.order=task_id",
                              headers=web)
    assert nested.status_code == 200, nested.text
    assert nested.json() == [{"id": 1, "users_tasks": [{"tasks": {"name": "plan"}}, {"tasks": {"name": "build"}}]},
                             {"id": 2, "users_tasks": [{"tasks": {"name": "build"}}]}]


# --- the rules, without a database ------------------------------------------------------------------------------

def _contract(name: str, columns: str, table: str | None = None) -> ContractVersion:
    sql = f"SELECT {columns} FROM {table or name}"
    return ContractVersion(name, 1, "main", sql, parse_contract_sql(sql, where=name), "",
                           Path(f"contracts/{name}.v1.sql"))


def _fk(name: str, table: str, columns: tuple[str, ...], ref: str, ref_columns: tuple[str, ...] = ("id",)) -> Constraint:
    return Constraint(name, "f", "public", table, columns, "public", ref, ref_columns)


def _key(table: str, *columns: str, kind: str = "p") -> Constraint:
    return Constraint(f"{table}_{'_'.join(columns)}_{kind}key", kind, "public", table, columns)


USERS, TASKS = _contract("users", "id, name"), _contract("tasks", "id, name")
TO_USERS = _fk("ut_user_fkey", "users_tasks", ("user_id",), "users")
TO_TASKS = _fk("ut_task_fkey", "users_tasks", ("task_id",), "tasks")
ENDS = [_key("users", "id"), _key("tasks", "id"), TO_USERS, TO_TASKS]
JUNCTIONS = [
    # (what, the junction's contract columns, its keys, the m2m relations expected from users)
    ("both keys are its primary key", "user_id, task_id", [_key("users_tasks", "user_id", "task_id")],
     [("tasks", "users_tasks", ("user_id",), ("task_id",))]),
    ("its primary key has more columns", "id, user_id, task_id", [_key("users_tasks", "id", "user_id", "task_id")],
     [("tasks", "users_tasks", ("user_id",), ("task_id",))]),
    ("a key of its own (not a junction)", "id, user_id, task_id", [_key("users_tasks", "id")], []),
    ("one key is unique alone (one-to-one: not a junction)", "user_id, task_id",
     [_key("users_tasks", "user_id", "task_id"), _key("users_tasks", "user_id", kind="u")], []),
    ("no primary key", "user_id, task_id", [], []),
    ("a key column not in the contract", "user_id", [_key("users_tasks", "user_id", "task_id")], []),
]


@pytest.mark.parametrize(("what", "columns", "keys", "expected"), JUNCTIONS, ids=[j[0] for j in JUNCTIONS])
def test_when_a_contract_is_a_junction(what: str, columns: str, keys: list[Constraint],
                                       expected: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]) -> None:
    junction = _contract("users_tasks", columns)
    contracts = [USERS, TASKS, junction]
    relations = build_relations(contracts, {c.label: column_sources(c.sql) for c in contracts}, [*ENDS, *keys])
    through = [r for r in relations["users"] if r.junction is not None]
    assert [(r.target, r.junction.contract, r.junction.source_columns, r.junction.target_columns)
            for r in through if r.junction is not None] == expected
    for relation in through:
        assert (relation.kind, relation.to_one, relation.source_columns, relation.target_columns) == (
            "many-to-many", False, ("id",), ("id",))
        assert relation.relationship == "users_tasks using ut_user_fkey(user_id) and ut_task_fkey(task_id)"
    back = [r for r in relations["tasks"] if r.junction is not None]
    assert len(back) == len(expected)  # and the other way


def test_a_declared_link_makes_no_junction_and_identical_keys_no_pair() -> None:
    junction = _contract("users_tasks", "user_id, task_id")
    contracts = [USERS, TASKS, junction]
    lineages = {c.label: column_sources(c.sql) for c in contracts}
    keys = [_key("users", "id"), _key("tasks", "id"), _key("users_tasks", "user_id", "task_id"), TO_TASKS]
    declared = [DeclaredRelation("users_tasks", "user_id", "users", "id")]
    assert not [r for r in build_relations(contracts, lineages, keys, declared)["users"] if r.junction]
    twice = [*keys, TO_USERS, _fk("ut_user_again_fkey", "users_tasks", ("user_id",), "users")]
    relations = build_relations(contracts, lineages, twice)
    assert [r.target for r in relations["users"] if r.junction] == ["tasks"]  # not users → users through itself


TREE = _contract("family_tree", "id, name, parent")
TREE_KEYS = [_key("family_tree", "id"), _fk("family_tree_parent_fkey", "family_tree", ("parent",), "family_tree")]
# (target, hint) → the cardinality chosen from family_tree to itself, or None: no relation
SELF_EMBEDS = [
    (("family_tree", None), "one-to-many"), (("parent", None), "many-to-one"),
    (("family_tree", "parent"), "one-to-many"), (("family_tree", "family_tree_parent_fkey"), "one-to-many"),
    (("id", None), None), (("family_tree_parent_fkey", None), None),
]


@pytest.mark.parametrize(("embed", "kind"), SELF_EMBEDS, ids=[f"{t}!{h}" for (t, h), _ in SELF_EMBEDS])
def test_a_self_reference_is_named_as_postgrest_names_it(embed: tuple[str, str | None], kind: str | None) -> None:
    relations = build_relations([TREE], {TREE.label: column_sources(TREE.sql)}, TREE_KEYS)["family_tree"]
    found = [r.kind for r in relations if selects(r, *embed)]
    assert found == ([kind] if kind else [])


SUGGESTIONS = [  # PostgREST's own examples (Error.hs noRelBetweenHint), then ours
    ("role", ["directors", "roles", "actors"], "roles"),
    ("actors", ["directors", "roles", "actors"], None),  # the name is there: the hint was wrong, no suggestion
    ("noclosealternative", ["directors", "roles", "actors"], None),
    ("task", ["clients", "tasks", "users"], "tasks"),
    ("Tasks", ["tasks"], None),
    ("zzzz", ["projects"], None),
]


@pytest.mark.parametrize(("name", "candidates", "expected"), SUGGESTIONS, ids=[s[0] for s in SUGGESTIONS])
def test_suggestions_score_as_postgrest_scores(name: str, candidates: list[str], expected: str | None) -> None:
    assert closest_other(name, candidates) == expected
