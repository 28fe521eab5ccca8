"""gatehouse's own lint: backfills that hold an ACCESS EXCLUSIVE lock, and large backfills not in batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ProjectFactory
from gatehouse import operations
from gatehouse.migrate import files
from gatehouse.migrate.lint import backfill_findings, lint_migrations

HOLDS = "backfill-holds-access-exclusive"
NOT_BATCHED = "backfill-not-batched"

# (migration, the lines flagged as holding an ACCESS EXCLUSIVE lock through a backfill)
EXCLUSIVE_CASES = [
    ("ALTER TABLE products ADD COLUMN title text;\nUPDATE products SET title = name;", [2]),
    ("ALTER TABLE products ADD COLUMN title text;\n\nDELETE FROM products WHERE name = '';", [3]),
    ("ALTER TABLE products ADD COLUMN n int;\nINSERT INTO products (id, name) SELECT id, name FROM old;", [2]),
    ("ALTER TABLE products ADD COLUMN n int;\nINSERT INTO products (id, name) VALUES (1, 'a');", []),
    ("ALTER TABLE ONLY public.products ALTER COLUMN name TYPE varchar(200);\nUPDATE products SET name = 'x';",
     [2]),
    ("ALTER TABLE products ADD COLUMN t text;\nWITH x AS (SELECT 1)\nUPDATE products SET t = 'a';", [2]),
    ("UPDATE products SET title = name;\nALTER TABLE products ALTER COLUMN title SET NOT NULL;", []),  # lock after
    ("ALTER TABLE orders ADD COLUMN note text;\nUPDATE products SET title = name;", []),
    ("ALTER TABLE products VALIDATE CONSTRAINT title_set;\nUPDATE products SET title = name;", []),
    ("ALTER TABLE products ADD CONSTRAINT fk FOREIGN KEY (shop) REFERENCES shops (id) NOT VALID;\n"
     "UPDATE products SET title = name;", []),
    ("ALTER TABLE products SET (fillfactor = 70), VALIDATE CONSTRAINT c;\nUPDATE products SET title = name;", []),
    ("ALTER TABLE products VALIDATE CONSTRAINT c, ADD COLUMN t text;\nUPDATE products SET t = name;", [2]),
    ("ALTER TABLE \"Products\" ADD COLUMN t text;\nUPDATE products SET t = name;", []),
    ("ALTER TABLE shop.products ADD COLUMN t text;\nUPDATE other.products SET t = name;", []),
    ("-- ALTER TABLE products ADD COLUMN t text;\nUPDATE products SET title = 'ALTER TABLE products';", []),
    ("TRUNCATE summary, totals;\nINSERT INTO totals SELECT shop, count(*) FROM orders GROUP BY shop;", [2]),
    ("LOCK TABLE products;\nUPDATE products SET title = name WHERE id < 10;", [2]),
    ("LOCK TABLE products IN SHARE ROW EXCLUSIVE MODE;\nUPDATE products SET title = name;", []),
    ("LOCK TABLE products IN ACCESS EXCLUSIVE MODE;\nUPDATE products SET title = name;", [2]),
    ("CREATE TABLE products2 (id int, name text);\nALTER TABLE products2 ADD COLUMN t text;\n"
     "INSERT INTO products2 SELECT id, name FROM products;", []),  # a new table: nobody else sees it yet
]


@pytest.mark.parametrize(("sql", "lines"), EXCLUSIVE_CASES)
def test_a_backfill_after_an_access_exclusive_statement_is_flagged(tmp_path: Path, sql: str,
                                                                   lines: list[int]) -> None:
    (tmp_path / "V001__change.sql").write_text(sql + "\n")
    [migration] = files.discover(tmp_path)
    findings = backfill_findings(migration, {})
    assert [f.line for f in findings if f.rule == HOLDS] == lines
    for finding in findings:
        assert finding.level == "warning" and finding.file == migration.path
        assert "through the whole backfill" in finding.message and finding.help is not None
        assert "its own `-- gatehouse: batch` migration" in finding.help


# (statement, the table's estimated rows, flagged as a backfill to batch)
SIZE_CASES = [
    ("UPDATE products SET title = name;", 50_000, True),
    ("DELETE FROM products WHERE name = '';", 50_000, True),
    ("UPDATE products SET title = name;", 9_999, False),
    ("UPDATE products SET title = name WHERE id IN (SELECT id FROM products LIMIT 1000);", 50_000, False),
    ("INSERT INTO products (id, name) SELECT id, name FROM old;", 50_000, False),
    ("UPDATE orders SET note = '';", 50_000, False),  # no estimate for orders: a new or never analyzed table
]


@pytest.mark.parametrize(("sql", "rows", "flagged"), SIZE_CASES)
def test_a_large_backfill_in_one_transaction_is_flagged(tmp_path: Path, sql: str, rows: int, flagged: bool) -> None:
    (tmp_path / "V001__backfill.sql").write_text(sql + "\n")
    [migration] = files.discover(tmp_path)
    findings = backfill_findings(migration, {"products": rows})
    assert [(f.rule, f.line) for f in findings] == ([(NOT_BATCHED, 1)] if flagged else [])
    if flagged:
        assert f"of about {rows:,} rows of products in one transaction" in findings[0].message


def test_batch_and_no_transaction_files_are_not_checked(tmp_path: Path) -> None:
    (tmp_path / "V001__backfill.sql").write_text(
        "-- gatehouse: batch\nUPDATE products SET title = name WHERE id IN "
        "(SELECT id FROM products WHERE title IS NULL LIMIT :batch_size);\n")
    (tmp_path / "V002__again.sql").write_text("-- gatehouse: no-transaction\nUPDATE products SET title = name;\n")
    assert all(backfill_findings(m, {"products": 1e6}) == [] for m in files.discover(tmp_path))


def test_findings_come_with_squawks_in_file_order(tmp_path: Path) -> None:
    (tmp_path / "V001__title.sql").write_text("ALTER TABLE products ADD COLUMN title text;\n"
                                              "UPDATE products SET title = name;\n")
    (tmp_path / "V002__index.sql").write_text("CREATE INDEX products_title ON products (title);\n")
    first, second = files.discover(tmp_path)
    report = lint_migrations([first, second], binary=str(tmp_path / "no-squawk"), row_estimates={"products": 1e5})
    assert [(f.file.name, f.line, f.rule) for f in report.findings] == [("V001__title.sql", 2, HOLDS)]
    assert report.notice is not None  # squawk is missing here; gatehouse's own findings are still given
    assert str(report.findings[0]).startswith("V001__title.sql:2: backfill-holds-access-exclusive: UPDATE holds "
                                              "an ACCESS EXCLUSIVE lock on products through the whole backfill")


async def test_lint_pending_estimates_rows_from_the_live_database(make_project: ProjectFactory) -> None:
    project = make_project(toml="[project]\nname = \"lint\"\n\n[databases.main]\n", migrations={
        "V001__tables.sql": "CREATE TABLE big (id int PRIMARY KEY, n int);\nCREATE TABLE small (id int, n int);\n"
                            "INSERT INTO big SELECT g, 0 FROM generate_series(1, 20000) g;\n"
                            "INSERT INTO small SELECT g, 0 FROM generate_series(1, 100) g;\n",
    })
    await operations.migrate_all(project)
    async with operations.owner_connection(project) as conn:
        await conn.execute("ANALYZE big; ANALYZE small")
    folder = project.migrations_dir("main")
    (folder / "V002__reset.sql").write_text("UPDATE small SET n = 1;\nUPDATE big SET n = 1;\n"
                                            "UPDATE big SET n = 2 WHERE id IN (SELECT id FROM big LIMIT 100);\n")
    (folder / "V003__new.sql").write_text("CREATE TABLE fresh (id int);\nDELETE FROM fresh;\n")
    report = (await operations.lint_pending(project))["main"]
    mine = [(f.file.name, f.line, f.message) for f in report.findings if f.rule == NOT_BATCHED]
    assert len(mine) == 1
    assert mine[0][:2] == ("V002__reset.sql", 2) and "of about 20,000 rows of big" in mine[0][2]


def test_squawk_is_not_given_a_batch_file(tmp_path: Path) -> None:
    """``:batch_size`` is not SQL squawk can parse: it would report a syntax error on every batch file."""
    (tmp_path / "V001__backfill.sql").write_text(
        "-- gatehouse: batch\nUPDATE products SET title = name WHERE id IN "
        "(SELECT id FROM products WHERE title IS NULL LIMIT :batch_size);\n")
    report = lint_migrations(files.discover(tmp_path))
    assert report.notice is None and report.findings == []
