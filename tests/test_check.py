"""Schema-change safety: `gatehouse lock` releases contract versions, `gatehouse check` finds what would break.

Against a real PostgreSQL: signatures are compiled by PostgreSQL itself, migrations really run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.check import run_check
from gatehouse.check_findings import Finding, exit_code, render_findings
from gatehouse.contracts import compat
from gatehouse.contracts.lockfile import (
    Lock,
    dumps_lock,
    parse_lock,
    read_lock,
    update_lock,
    write_lock,
)
from gatehouse.contracts.model import check_not_null, declared_not_null
from gatehouse.contracts.reads import ColumnRef, TableRef, columns_read, projection_stars, tables_read
from gatehouse.contracts.shape import CompileError, Signature
from gatehouse.contracts.signature import project_signatures
from gatehouse.errors import ProjectError
from gatehouse.project import Project, load_project

# --- compatibility rules: one case each, signatures compiled by PostgreSQL ------------------------------

COMPAT_TOML = """
[project]
name = "compat"

[databases.main]

[apps.reader]
grants = [{ contract = "items", actions = ["read"] }, { contract = "owners", actions = ["read"] }]
"""
COMPAT_MIGRATION = """
CREATE TABLE owners (id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE items (id integer PRIMARY KEY, owner_id integer REFERENCES owners (id), title text NOT NULL,
                    price numeric(10, 2), qty integer);
"""
ITEMS_V1 = "-- not null: id, title\nSELECT id, owner_id, title, price FROM items"

CASES = [
    # (case, new items.v1, expected {(kind, breaking)})
    ("unchanged", ITEMS_V1, set()),
    ("column dropped", "-- not null: id, title\nSELECT id, owner_id, price FROM items", {(compat.COLUMN_REMOVED, True)}),
    ("column renamed", "-- not null: id, label\nSELECT id, owner_id, title AS label, price FROM items", {(compat.COLUMN_RENAMED, True)}),
    ("type narrowed", "-- not null: id, title\nSELECT id, owner_id, title, price::numeric(8, 2) AS price FROM items", {(compat.COLUMN_TYPE_CHANGED, True)}),
    ("type widened", "-- not null: id, title\nSELECT id, owner_id, title, price::numeric AS price FROM items", {(compat.COLUMN_TYPE_WIDENED, False)}),
    ("type of a key widened", "-- not null: id, title\nSELECT id::bigint AS id, owner_id, title, price FROM items", {(compat.COLUMN_TYPE_WIDENED, False)}),
    ("type changed to a string", "-- not null: id, title\nSELECT id, owner_id, title, price::text AS price FROM items", {(compat.COLUMN_TYPE_CHANGED, True)}),
    ("became nullable", "-- not null: id\nSELECT id, owner_id, title, price FROM items", {(compat.COLUMN_BECAME_NULLABLE, True)}),
    ("became not null", "-- not null: id, title, price\nSELECT id, owner_id, title, coalesce(price, 0)::numeric(10, 2) AS price FROM items", {(compat.COLUMN_BECAME_NOT_NULL, False)}),
    ("column added", "-- not null: id, title\nSELECT id, owner_id, title, price, qty FROM items", {(compat.COLUMN_ADDED, False)}),
    ("columns reordered", "-- not null: id, title\nSELECT id, title, owner_id, price FROM items", {(compat.COLUMNS_REORDERED, False)}),
    ("relation removed", "-- not null: id, title\nSELECT id, owner_id + 0 AS owner_id, title, price FROM items", {(compat.RELATION_REMOVED, True)}),
]


@pytest.mark.parametrize(("case", "new_sql", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_compatibility_rule(make_project: ProjectFactory, case: str, new_sql: str,
                                  expected: set[tuple[str, bool]]) -> None:
    project = make_project(toml=COMPAT_TOML, migrations={"V001__tables.sql": COMPAT_MIGRATION},
                           contracts={"items.v1.sql": ITEMS_V1, "owners.v1.sql": "SELECT id, name FROM owners"})
    await operations.migrate_all(project)
    old = (await project_signatures(project))["items.v1"]
    (project.root / "contracts" / "items.v1.sql").write_text(new_sql)
    new = (await project_signatures(load_project(project.root)))["items.v1"]
    assert isinstance(old, Signature) and isinstance(new, Signature)
    changes = compat.compare(old, new)
    assert {(c.kind, c.breaking) for c in changes} == expected, compat.describe_changes(changes)
    assert compat.is_breaking(changes) == any(breaking for _, breaking in expected)


def test_compat_relation_cardinality_and_messages() -> None:
    from gatehouse.contracts.shape import Column, RelationRef

    old = Signature("a", 1, "db", (Column("id", "integer", False),), (RelationRef("b", ("id",), ("a_id",), True),))
    new = Signature("a", 1, "db", (Column("id", "integer", False),), (RelationRef("b", ("id",), ("a_id",), False),))
    [change] = compat.compare(old, new)
    assert change.kind == compat.RELATION_CARDINALITY_CHANGED and change.breaking
    assert "now embeds a list" in change.detail


# --- lock, then check, on the demo shop -----------------------------------------------------------------


async def _lock(project: Project, *, force: bool = False) -> tuple[Lock, list[str]]:
    new, report = update_lock(project, await project_signatures(project), read_lock(project.root), force=force)
    if report.ok:
        write_lock(project.root, new)
    return new, report.lines()


def _codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


async def test_lock_then_check_is_clean_on_the_shop(shop: Project) -> None:
    await prepare(shop)
    shipped = (shop.root / "contracts.lock").read_text()
    _, again = await _lock(shop)
    assert len(again) == 1 and again[0].startswith("nothing to")  # the demo's committed lock is current
    (shop.root / "contracts.lock").unlink()
    lock, lines = await _lock(shop)
    assert lines == [f"released {label}" for label in
                     ("customer_summary.v1", "order_items.v1", "orders.v1", "products.v1", "products.v2")]
    text = (shop.root / "contracts.lock").read_text()
    assert text.startswith("# contracts.lock") and "[lock]\nformat = 1\n" in text
    assert text == shipped  # deterministic: locking again writes the same bytes
    products = lock.get("products.v1")
    assert products is not None
    assert [(c.name, c.type) for c in products.signature.columns] == [
        ("id", "bigint"), ("name", "text"), ("price", "numeric(10,2)")]
    assert products.checksum.algorithm == "sha256" and len(products.checksum.value) == 64
    assert products.file == "contracts/products.v1.sql"
    orders = lock.get("orders.v1")
    assert orders is not None and {(r.target, r.to_one) for r in orders.signature.relations} == {
        ("customer_summary", True), ("order_items", False)}
    assert parse_lock(text) == lock and dumps_lock(parse_lock(text)) == text  # round trip, deterministic

    assert await run_check(shop.root) == []
    assert await run_check(shop) == []
    _, again = await _lock(shop)
    assert again == ["nothing to change (5 released contract versions)"]


async def test_editing_a_released_contract_is_a_finding(shop: Project) -> None:
    await operations.migrate_all(shop)
    await _lock(shop)
    path = shop.root / "contracts" / "products.v1.sql"
    path.write_text(path.read_text().replace("SELECT id, name, price", "SELECT id, name, price, stock"))
    findings = await run_check(shop.root)
    assert _codes(findings) == ["GHC010", "GHC012"]
    changed, added = findings
    assert changed.contract == "products.v1" and changed.file == "contracts/products.v1.sql"
    assert "products.v3.sql" in (changed.hint or "")
    assert added.severity == "warning" and "column stock was added" in added.message
    assert exit_code(findings) == 1

    _, refused = await _lock(load_project(shop.root))
    assert refused[0].startswith("refused products.v1: its file changed since it was released")
    _, forced = await _lock(load_project(shop.root), force=True)
    assert forced == ["re-locked products.v1 (--force)"]
    assert await run_check(shop.root) == []


async def test_a_new_contract_adds_relations_to_released_versions_compatibly(shop: Project) -> None:
    await operations.migrate_all(shop)
    await _lock(shop)
    (shop.root / "contracts" / "lines.v3.sql").write_text("SELECT order_id, product_id, quantity FROM order_items")
    project = load_project(shop.root)
    findings = await run_check(project.root)
    # (lines is a second junction between orders and products: in v3, embedding one from the other by name alone
    # is ambiguous, a warning since no released embed of it broke)
    ambiguous = {("GHC056", "warning", "orders.v1"), ("GHC056", "warning", "products.v2")}
    assert {(f.code, f.severity, f.contract) for f in findings} == {
        ("GHC012", "warning", "orders.v1"), ("GHC012", "warning", "products.v2"), *ambiguous}
    assert exit_code(findings) == 0
    assert all("relation" in f.message and "lines" in f.message for f in findings)
    _, lines = await _lock(project)  # no --force needed: the files did not change and nothing broke
    assert lines == ["released lines.v3", "updated orders.v1: relation id → lines(order_id) was added (compatible)",
                     "updated products.v2: relation id → lines(product_id) was added (compatible)"]
    assert {(f.code, f.severity, f.contract) for f in await run_check(project.root)} == ambiguous


async def test_column_type_changes_in_a_migration_are_judged_on_their_json(shop: Project) -> None:
    await operations.migrate_all(shop)  # not applied: PostgreSQL itself would refuse to alter a viewed column
    await _lock(shop)
    migration = shop.root / "migrations" / "V003__wider_prices.sql"
    migration.write_text("ALTER TABLE products ALTER COLUMN price TYPE numeric(12, 2);")
    pending = await run_check(shop.root)
    assert _codes(pending) == ["GHC041"] and "V003__wider_prices.sql" in pending[0].message

    await operations.migrate_all(shop)  # a widening: the same JSON numbers, so a warning to record it
    findings = await run_check(shop.root)
    assert [(f.code, f.severity, f.contract) for f in findings] == [
        ("GHC012", "warning", "products.v1"), ("GHC012", "warning", "products.v2")]
    assert all("column price widened: numeric(10,2) → numeric(12,2)" in f.message for f in findings)
    assert exit_code(findings) == 0
    _, lines = await _lock(shop)  # recorded without --force
    assert [line.split(":")[0] for line in lines] == ["updated products.v1", "updated products.v2"]
    assert await run_check(shop.root) == []

    (shop.root / "migrations" / "V004__narrower_prices.sql").write_text(
        "ALTER TABLE products ALTER COLUMN price TYPE numeric(8, 2);")
    await operations.migrate_all(shop)
    findings = await run_check(shop.root)
    assert [(f.code, f.contract) for f in findings] == [("GHC011", "products.v1"), ("GHC011", "products.v2")]
    assert all("column price changed type from numeric(12,2) to numeric(8,2)" in f.message for f in findings)
    assert exit_code(findings) == 1


async def test_dropped_column_does_not_compile_and_names_what_it_read(shop: Project) -> None:
    await operations.migrate_all(shop)
    await _lock(shop)
    (shop.root / "migrations" / "V003__drop_status.sql").write_text("ALTER TABLE orders DROP COLUMN status;")
    await operations.migrate_all(shop)
    findings = await run_check(shop.root)
    by_contract = {f.contract: f for f in findings}
    assert set(_codes(findings)) == {"GHC040"}
    # customer_summary reads orders.status only in its JOIN ... ON: lineage of the select list would miss it
    summary = by_contract["customer_summary.v1"]
    assert 'column o.status does not exist' in summary.message
    assert "orders.status" in (summary.hint or "")
    assert set(by_contract) == {"customer_summary.v1", "orders.v1"}


async def test_new_version_inside_a_released_api_version_is_a_finding(shop: Project) -> None:
    (shop.root / "contracts.lock").unlink()  # start from nothing released
    await operations.migrate_all(shop)
    v2 = shop.root / "contracts" / "products.v2.sql"
    products_v2 = v2.read_text()
    v2.unlink()
    (shop.root / "contracts" / "orders.v2.sql").write_text("SELECT id, user_id, status FROM orders")
    lock, _ = await _lock(load_project(shop.root))
    assert lock.released_api_version == 2 and lock.get("products.v2") is None

    v2.write_text(products_v2)  # API v2 is released: products.v2 would change it
    findings = await run_check(shop.root)
    assert [(f.code, f.contract) for f in findings] == [("GHC020", "products.v2")]
    assert "products.v3.sql" in (findings[0].hint or "")
    _, lines = await _lock(load_project(shop.root))
    assert lines[0].startswith("refused products.v2: API v2 is already released")


async def test_removing_a_served_released_version_is_a_finding(shop: Project) -> None:
    await operations.migrate_all(shop)
    await _lock(shop)
    (shop.root / "contracts" / "products.v1.sql").unlink()
    findings = await run_check(shop.root)
    assert [(f.code, f.contract) for f in findings] == [("GHC013", "products.v1")]


# --- mistakes in the project become findings, not crashes -----------------------------------------------


async def test_project_mistakes_are_findings(shop: Project) -> None:
    toml = shop.root / "gatehouse.toml"
    toml.write_text(toml.read_text().replace('{ contract = "orders", actions = ["read"] }',
                                             '{ contract = "orders", actions = ["read"], filter = "customer=eq.{claims.sub}" }')
                    .replace('{ contract = "order_items", actions = ["read"] }',
                             '{ contract = "reviews", actions = ["read"] }'))
    (shop.root / "contracts" / "everything.v3.sql").write_text("SELECT p.*, 1 AS one FROM products AS p")
    (shop.root / "contracts" / "orders.v3.sql").write_text("-- not null: id, total\nSELECT id, status FROM orders")
    (shop.root / "contracts" / "cleanup.v3.sql").write_text("DELETE FROM orders")
    findings = await run_check(shop.root)
    assert [(f.code, f.contract) for f in findings] == [
        ("GHC002", None), ("GHC003", None), ("GHC050", None), ("GHC051", "orders.v1"), ("GHC051", "orders.v3"),
        ("GHC054", "orders.v3")]
    missing_column = findings[3]
    assert "customer" in missing_column.message and "user_id" in (missing_column.hint or "")
    assert findings[1].file == "contracts/everything.v3.sql" and "p.*" in findings[1].message
    assert "-- not null" in findings[5].message and "total" in findings[5].message
    assert findings[0].file == "contracts/cleanup.v3.sql" and "found DELETE" in findings[0].message
    assert exit_code(findings) == 1


async def test_broken_config_is_one_finding(tmp_path: Path) -> None:
    (tmp_path / "gatehouse.toml").write_text("[project\n")
    [finding] = await run_check(tmp_path)
    assert finding.code == "GHC001" and "not valid TOML" in finding.message


MULTI_TOML = """
[project]
name = "multi"

[databases.shop]

[databases.billing]

[apps.finance]
grants = [{ contract = "products", actions = ["read"] }, { contract = "invoices", actions = ["read"] }]
"""


async def test_reading_another_databases_table_is_a_finding(make_project: ProjectFactory) -> None:
    project = make_project(
        toml=MULTI_TOML,
        migrations={"shop/V001__products.sql": "CREATE TABLE products (id int PRIMARY KEY, name text);",
                    "billing/V001__invoices.sql": "CREATE TABLE invoices (id int PRIMARY KEY, product_id int);"},
        contracts={"shop/products.v1.sql": "SELECT p.id, p.name FROM products AS p "
                                           "WHERE EXISTS (SELECT 1 FROM invoices AS i WHERE i.product_id = p.id)",
                   "billing/invoices.v1.sql": "SELECT id, product_id FROM invoices"},
    )
    await operations.migrate_all(project)
    findings = await run_check(project.root)
    assert [(f.code, f.contract) for f in findings] == [("GHC030", "products.v1"), ("GHC040", "products.v1"),
                                                        ("GHC060", None)]
    assert "invoices, a table of database billing" in findings[0].message
    assert 'relation "invoices" does not exist' in findings[1].message


# --- output and exit codes ------------------------------------------------------------------------------


def test_json_and_table_output_and_exit_codes() -> None:
    findings = [Finding("error", "GHC010", "products.v1 was released, but its file changed since",
                        contract="products.v1", file="contracts/products.v1.sql", hint="restore it"),
                Finding("warning", "GHC060", "no contracts.lock")]
    parsed = json.loads(render_findings(findings, "json"))
    assert parsed == [
        {"severity": "error", "code": "GHC010", "message": "products.v1 was released, but its file changed since",
         "contract": "products.v1", "file": "contracts/products.v1.sql", "hint": "restore it"},
        {"severity": "warning", "code": "GHC060", "message": "no contracts.lock", "contract": None, "file": None,
         "hint": None},
    ]
    assert json.loads(render_findings([], "json")) == []
    table = render_findings(findings)
    assert "GHC010" in table and "hint: restore it" in table and "1 error(s), 1 warning(s)" in table
    assert "\x1b[" not in table and "\x1b[" in render_findings(findings, color=True)
    assert "check passed" in render_findings([])
    assert exit_code(findings) == 1
    assert exit_code(findings[1:]) == 0  # warnings alone pass
    assert exit_code([]) == 0


# --- the pieces: declared nullability, the lock file, what SQL reads ------------------------------------


def test_declared_not_null_header() -> None:
    sql = "-- Products.\n--   NOT NULL: id,name\n-- not null: price\n\nSELECT id, name, price FROM p -- not null: x"
    assert declared_not_null(sql) == {"id", "name", "price"}
    assert declared_not_null("SELECT 1 AS a\n-- not null: a") == frozenset()  # only the leading comments
    assert check_not_null(sql, ["id", "name", "price"], where="f") == {"id", "name", "price"}
    with pytest.raises(ProjectError, match="names price, not a column"):
        check_not_null(sql, ["id", "name"], where="f")


def test_lock_file_is_validated() -> None:
    assert parse_lock("[lock]\nformat = 1\n") == Lock()
    with pytest.raises(ProjectError, match="lock format 2"):
        parse_lock("[lock]\nformat = 2\n")
    with pytest.raises(ProjectError, match="not a valid lock file"):
        parse_lock('[lock]\nformat = 1\n[[contracts]]\ncontract = "a"\n')
    with pytest.raises(ProjectError, match="not valid TOML"):
        parse_lock("[lock")


def test_update_lock_never_locks_what_does_not_compile(shop: Project) -> None:
    broken = CompileError("products", 1, "shop", 'column "price" does not exist')
    lock, report = update_lock(shop, {"products.v1": broken}, None)
    assert lock == Lock() and not report.ok
    assert report.lines() == ['cannot lock products.v1: it does not compile: column "price" does not exist']


def test_reads_include_where_join_and_subqueries() -> None:
    summary = (Path(__file__).parents[1] / "examples/shop/contracts/shop/customer_summary.v1.sql").read_text()
    assert tables_read(summary) == {TableRef(None, None, t) for t in ("users", "orders", "order_items")}
    read = columns_read(summary)
    assert ColumnRef(None, "orders", "status") in read  # only in LEFT JOIN ... ON
    assert ColumnRef(None, "order_items", "order_id") in read

    sql = ("WITH recent AS (SELECT id, user_id FROM orders WHERE created_at > now() - interval '1 day') "
           "SELECT r.id, u.name FROM recent AS r JOIN public.users AS u ON u.id = r.user_id "
           "WHERE EXISTS (SELECT 1 FROM other_db.billing.invoices AS i WHERE i.order_id = r.id) "
           "AND u.tier IN (SELECT tier FROM tiers)")
    assert tables_read(sql) == {TableRef(None, None, "orders"), TableRef(None, "public", "users"),
                                TableRef("other_db", "billing", "invoices"), TableRef(None, None, "tiers")}
    assert columns_read(sql) >= {ColumnRef(None, "orders", "created_at"), ColumnRef("public", "users", "tier"),
                                 ColumnRef("billing", "invoices", "order_id"), ColumnRef(None, "tiers", "tier")}
    # unqualified columns of a join resolve only with the database's columns
    joined = "SELECT id, label FROM products JOIN categories ON category_id = cid WHERE stock > 0"
    assert columns_read(joined) == frozenset()
    schema = {"public": {"products": ["id", "category_id", "stock"], "categories": ["cid", "label"]}}
    assert {str(c) for c in columns_read(joined, schema)} == {
        "products.id", "products.category_id", "products.stock", "categories.cid", "categories.label"}
    # a subquery's unqualified column belongs to the subquery's table, not to a same-named outer column
    nested = "SELECT u.id FROM users AS u WHERE u.id IN (SELECT owner FROM pets WHERE pets.kind = u.kind)"
    users_pets = {"public": {"users": ["id", "owner", "kind"], "pets": ["owner", "kind"]}}
    assert {str(c) for c in columns_read(nested, users_pets)} == {"users.id", "users.kind", "pets.owner", "pets.kind"}
    assert projection_stars("SELECT count(*) AS n, t.* FROM t") == ["t.*"]
