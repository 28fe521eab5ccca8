"""A contract's `-- not null:` promise is checked through its lineage, not trusted from the comment.

Which side of an outer join a column comes from is read from the SQL (no database); whether a base column is
NOT NULL is read from PostgreSQL, so `DROP NOT NULL` under a released promise is refused by `migrate plan`
and reported by `check`, like any other breaking change; and `gatehouse lock` does not release a new version
whose promise the tables do not keep (it would record a weaker promise than the file makes).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import ProjectFactory, run_sync
from gatehouse import cli, operations
from gatehouse.check import run_check
from gatehouse.contracts import compat
from gatehouse.contracts.lineage import column_sources
from gatehouse.contracts.lockfile import read_lock, update_lock, write_lock
from gatehouse.contracts.shape import Signature
from gatehouse.contracts.signature import (
    NULLABLE_IN_TABLE,
    OUTER_JOIN,
    nullable_promises,
    project_signatures,
)
from gatehouse.db.targets import resolve_targets
from gatehouse.migrate.plan import plan_database
from gatehouse.project import Project, load_project

# --- which columns come through the nullable side of an outer join (pure) -------------------------------

OUTER_CASES = [
    # (case, SQL, {contract column: outer?}); a column absent from the dict has no traced source
    ("one table", "SELECT id, name FROM t", {"id": False, "name": False}),
    ("inner join", "SELECT a.x, b.y FROM a JOIN b ON b.id = a.id", {"x": False, "y": False}),
    ("left join: right side", "SELECT a.x, b.y FROM a LEFT JOIN b ON b.id = a.id", {"x": False, "y": True}),
    ("left outer join spelled out", "SELECT a.x, b.y FROM a LEFT OUTER JOIN b ON true", {"x": False, "y": True}),
    ("right join: left side", "SELECT a.x, b.y FROM a RIGHT JOIN b ON b.id = a.id", {"x": True, "y": False}),
    ("full join: both sides", "SELECT a.x, b.y FROM a FULL JOIN b ON b.id = a.id", {"x": True, "y": True}),
    ("right join after a left join", "SELECT a.x, b.y, c.z FROM a LEFT JOIN b ON true RIGHT JOIN c ON true",
     {"x": True, "y": True, "z": False}),
    ("inner join after a left join", "SELECT a.x, b.y, c.z FROM a LEFT JOIN b ON true JOIN c ON true",
     {"x": False, "y": True, "z": False}),
    ("aliases and schemas", "SELECT p.id, c.name AS category FROM shop.products AS p "
                            "LEFT JOIN shop.categories AS c ON c.id = p.category_id",
     {"id": False, "category": True}),
    ("computed columns have no source", "SELECT a.x, coalesce(b.y, 0) AS y, count(*) AS n FROM a "
                                        "LEFT JOIN b ON true GROUP BY a.x, b.y", {"x": False}),
]


@pytest.mark.parametrize(("case", "sql", "expected"), OUTER_CASES, ids=[c[0] for c in OUTER_CASES])
def test_outer_join_sides(case: str, sql: str, expected: dict[str, bool]) -> None:
    sources = column_sources(sql)
    assert {name: source.outer for name, source in sources.items()} == expected


def test_sources_still_name_their_table() -> None:
    source = column_sources("SELECT p.id, c.name AS category FROM shop.products AS p "
                            "LEFT JOIN shop.categories AS c ON c.id = p.category_id")["category"]
    assert (source.schema, source.table, source.column) == ("shop", "categories", "name")


# --- against PostgreSQL ---------------------------------------------------------------------------------

TOML = """
[project]
name = "nulls"

[databases.main]
"""
TABLES = """
CREATE TABLE owners (id integer PRIMARY KEY, name text NOT NULL, nickname text);
CREATE TABLE items (id integer PRIMARY KEY, owner_id integer REFERENCES owners (id), name text NOT NULL,
                    note text);
CREATE VIEW owner_names AS SELECT id, nickname FROM owners;
"""
ITEMS_V1 = "-- Items.\n-- not null: id, name\nSELECT id, name, note FROM items"
DROP_NOT_NULL = "ALTER TABLE items ALTER name DROP NOT NULL;"


def _project(make_project: ProjectFactory, contracts: dict[str, str]) -> Project:
    return make_project(toml=TOML, migrations={"V001__tables.sql": TABLES}, contracts=contracts)


async def _lock(project: Project) -> None:
    lock, report = update_lock(project, await project_signatures(project), read_lock(project.root))
    assert report.ok, report.lines()
    write_lock(project.root, lock)


async def _attnotnull(project: Project, table: str, column: str) -> bool:
    async with operations.owner_connection(project) as conn:
        value = await conn.fetchval("SELECT attnotnull FROM pg_attribute WHERE attrelid = $1::regclass "
                                    "AND attname = $2", table, column)
    assert isinstance(value, bool)
    return value


async def test_drop_not_null_under_a_released_promise_is_breaking(make_project: ProjectFactory) -> None:
    project = _project(make_project, {"items.v1.sql": ITEMS_V1})
    await operations.migrate_all(project)
    await _lock(project)
    assert await run_check(project.root) == []

    (project.root / "migrations" / "V002__name_optional.sql").write_text(DROP_NOT_NULL)
    project = load_project(project.root)
    target = (await resolve_targets(project))["main"]
    plan = await plan_database(project, target, read_lock(project.root))
    assert plan.pending == ["V002 name optional"]
    [impact] = plan.breaking
    assert impact.label == "items.v1"
    assert [(c.kind, c.column, c.breaking) for c in impact.changes] == [(compat.COLUMN_BECAME_NULLABLE, "name", True)]
    assert await _attnotnull(project, "items", "name")  # the plan rolled its migration back

    await operations.migrate_all(project)  # forced through, as `migrate apply --force` would
    assert not await _attnotnull(project, "items", "name")
    signature = (await project_signatures(project))["items.v1"]
    assert isinstance(signature, Signature)
    assert [(c.name, c.nullable) for c in signature.columns] == [("id", False), ("name", True), ("note", True)]

    findings = await run_check(project.root)
    assert sorted(f.code for f in findings) == ["GHC011", "GHC055"]
    by_code = {f.code: f for f in findings}
    assert by_code["GHC011"].message == "items.v1: breaking change: column name may now be null"
    promise = by_code["GHC055"]
    assert promise.severity == "error" and promise.contract == "items.v1" and promise.file == "contracts/items.v1.sql"
    assert "promises name" in promise.message and "items.name, which is nullable in the table" in promise.message
    assert promise.hint is not None
    assert "add NOT NULL to items.name" in promise.hint and "new contract version (items.v2.sql)" in promise.hint


async def test_a_left_joined_column_declared_not_null_is_a_finding(make_project: ProjectFactory) -> None:
    sql = ("-- not null: id, owner_name, label\n"
           "SELECT i.id, o.name AS owner_name, coalesce(o.name, '') AS label\n"
           "FROM items AS i LEFT JOIN owners AS o ON o.id = i.owner_id")
    project = _project(make_project, {"items.v1.sql": sql})
    await operations.migrate_all(project)
    findings = await run_check(project.root)
    assert [f.code for f in findings] == ["GHC055", "GHC060"]  # label is computed: nothing to trace
    finding = findings[0]
    assert finding.message == ("items.v1: `-- not null:` promises owner_name, but it can be null: it comes from "
                               "owners.name through the nullable side of an outer join")
    assert finding.hint is not None and "in this file" in finding.hint and "inner join" in finding.hint
    # the lock records what clients can really get, not the comment
    signature = (await project_signatures(project))["items.v1"]
    assert isinstance(signature, Signature)
    assert [(c.name, c.nullable) for c in signature.columns] == [("id", False), ("owner_name", True),
                                                                 ("label", False)]


PROMISES = [
    # (contract, SQL, {declared column that can be null: reason})
    ("plain", "-- not null: id, name\nSELECT id, name FROM items", {}),
    ("nullable column", "-- not null: id, note\nSELECT id, note FROM items", {"note": NULLABLE_IN_TABLE}),
    ("left join", "-- not null: id, owner\nSELECT i.id, o.name AS owner FROM items i LEFT JOIN owners o "
                  "ON o.id = i.owner_id", {"owner": OUTER_JOIN}),
    ("right join", "-- not null: id, owner\nSELECT i.id, o.name AS owner FROM items i RIGHT JOIN owners o "
                   "ON o.id = i.owner_id", {"id": OUTER_JOIN}),
    ("inner join", "-- not null: id, owner\nSELECT i.id, o.name AS owner FROM items i JOIN owners o "
                   "ON o.id = i.owner_id", {}),
    ("inner join, nullable", "-- not null: id, nick\nSELECT i.id, o.nickname AS nick FROM items i JOIN owners o "
                             "ON o.id = i.owner_id", {"nick": NULLABLE_IN_TABLE}),
    ("schema named", "-- not null: note\nSELECT note FROM public.items", {"note": NULLABLE_IN_TABLE}),
    ("undeclared nullable", "-- not null: id\nSELECT id, note FROM items", {}),
    ("computed", "-- not null: id, note\nSELECT id, coalesce(note, '') AS note FROM items", {}),
    ("from a view: cannot tell", "-- not null: id, nickname\nSELECT id, nickname FROM owner_names", {}),
]


async def test_nullable_promises_table(make_project: ProjectFactory) -> None:
    names = [f"c{index}" for index in range(len(PROMISES))]
    project = _project(make_project, {f"{name}.v1.sql": sql for name, (_, sql, _) in zip(names, PROMISES,
                                                                                             strict=True)})
    await operations.migrate_all(project)
    async with operations.owner_connection(project) as conn:
        found = await nullable_promises(conn, project.contracts)
    for name, (case, _, expected) in zip(names, PROMISES, strict=True):
        got = {p.column: p.reason for p in found.get(f"{name}.v1", [])}
        assert got == expected, case


# --- gatehouse lock: a new version is released only with a promise its tables keep ------------------------

OWNERS_V1 = ("-- not null: id, item\n"
             "SELECT o.id, i.name AS item FROM owners AS o LEFT JOIN items AS i ON i.owner_id = o.id")
NOTE_REQUIRED = "UPDATE items SET note = '' WHERE note IS NULL;\nALTER TABLE items ALTER note SET NOT NULL;"


def test_lock_refuses_a_new_version_whose_promise_the_tables_do_not_keep(make_project: ProjectFactory,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    project = _project(make_project, {"items.v1.sql": "-- not null: id, note\nSELECT id, name, note FROM items",
                                      "owners.v1.sql": OWNERS_V1})
    run_sync(operations.migrate_all(project))

    monkeypatch.delenv("GATEHOUSE_PROJECT", raising=False)
    locked = CliRunner().invoke(cli.app, ["--project", str(project.root), "lock"])
    assert locked.exit_code == 1, locked.output
    assert "refused items.v1" in locked.output and "refused owners.v1" in locked.output
    assert read_lock(project.root) is None  # nothing written

    lock, report = update_lock(project, run_sync(project_signatures(project)), None, force=True)
    assert report.added == [] and lock.entries == ()  # not even with --force: the fix is in the table or the file
    assert dict(report.refused) == {
        "items.v1": "`-- not null:` promises note, but it can be null: it comes from items.note, which is nullable "
                    "in the table; releasing it would record note as nullable: add NOT NULL to items.note in a "
                    "migration (fill its nulls first), or remove note from `-- not null:` in contracts/items.v1.sql",
        "owners.v1": "`-- not null:` promises item, but it can be null: it comes from items.name through the "
                     "nullable side of an outer join; releasing it would record item as nullable: a row without a "
                     "match gives null: remove item from `-- not null:` in contracts/owners.v1.sql, or make it "
                     "never null in the SQL (an inner join, coalesce)",
    }

    # the two fixes: NOT NULL in the table (a migration), the promise taken back in the file
    (project.root / "migrations" / "V002__note_required.sql").write_text(NOTE_REQUIRED)
    (project.root / "contracts" / "owners.v1.sql").write_text(OWNERS_V1.replace("id, item", "id"))
    project = load_project(project.root)
    run_sync(operations.migrate_all(project))
    run_sync(_lock(project))
    released = read_lock(project.root)
    assert released is not None
    columns = {(e.label, c.name): c.nullable for e in released.entries for c in e.signature.columns}
    assert columns == {("items.v1", "id"): False, ("items.v1", "name"): True, ("items.v1", "note"): False,
                       ("owners.v1", "id"): False, ("owners.v1", "item"): True}

    # released, the version is judged by the compatibility rules: a promise broken later is a breaking change
    (project.root / "migrations" / "V003__note_optional.sql").write_text("ALTER TABLE items ALTER note DROP NOT NULL;")
    project = load_project(project.root)
    run_sync(operations.migrate_all(project))
    _, refused = update_lock(project, run_sync(project_signatures(project)), released)
    assert refused.refused == [("items.v1", "its signature changed: column note may now be null (a released version "
                                            "never changes; put the change in a new version, or pass --force if "
                                            "you are sure)")]
