"""Loading a project: every mistake is refused at load with its file, key and what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gatehouse.errors import ProjectError
from gatehouse.project import load_project

SHOP = Path(__file__).resolve().parents[1] / "examples" / "shop"


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    root = tmp_path / "shop"
    shutil.copytree(SHOP, root)
    return root


def test_shop_loads_with_carry_forward(project_dir: Path) -> None:
    project = load_project(project_dir)
    assert project.versions.numbers == (1, 2)
    assert project.versions.resolve(1, "products").version == 1  # type: ignore[union-attr]
    assert project.versions.resolve(2, "products").version == 2  # type: ignore[union-attr]
    assert project.versions.resolve(2, "orders").version == 1  # type: ignore[union-attr]  # carried forward
    assert project.contracts[0].description
    assert project.apps["web"].role == "gh_shop_app_web"


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT * FROM products", "SELECT * is not allowed"),
        ("SELECT p.*, c.name FROM products p JOIN categories c ON true", "SELECT * is not allowed"),
        ("WITH x AS (SELECT * FROM products) SELECT id FROM x", "SELECT * is not allowed"),
        ("SELECT id FROM a; SELECT id FROM b", "found 2 statements"),
        ("DELETE FROM products", "a contract is a SELECT"),
        ("SELECT id, price * 2 FROM products", "has no name"),
        ("SELECT id, name AS id FROM products", "column names appear twice"),
        ("SELECT id FROM (", "cannot parse the SQL"),
    ],
)
def test_bad_contract_sql_is_refused(project_dir: Path, sql: str, message: str) -> None:
    (project_dir / "contracts" / "products.v3.sql").write_text(sql)
    with pytest.raises(ProjectError) as info:
        load_project(project_dir)
    assert message in str(info.value)
    assert "products.v3.sql" in str(info.value)


def test_count_star_is_not_select_star(project_dir: Path) -> None:
    (project_dir / "contracts" / "stats.v1.sql").write_text("SELECT count(*) AS n FROM products")
    assert load_project(project_dir).versions.resolve(2, "stats") is not None


def test_badly_named_contract_file(project_dir: Path) -> None:
    (project_dir / "contracts" / "Products-v3.sql").write_text("SELECT id FROM products")
    with pytest.raises(ProjectError, match=r"<name>\.v<N>\.sql"):
        load_project(project_dir)


def _edit_toml(project_dir: Path, old: str, new: str) -> None:
    path = project_dir / "gatehouse.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_grant_of_unknown_contract(project_dir: Path) -> None:
    _edit_toml(project_dir, '{ contract = "orders", actions = ["read"] }',
               '{ contract = "invoices", actions = ["read"] }')
    with pytest.raises(ProjectError) as info:
        load_project(project_dir)
    text = str(info.value)
    assert "apps.analytics" in text and "'invoices'" in text and "gatehouse.toml" in text


def test_secret_literal_in_file_is_refused(project_dir: Path) -> None:
    _edit_toml(project_dir, "[databases.shop]", '[databases.shop]\nurl = "postgresql://u:secret@db/shop"')
    with pytest.raises(ProjectError, match=r"databases\.shop\.url.*env:VARIABLE"):
        load_project(project_dir)


def test_unknown_setting_is_refused(project_dir: Path) -> None:
    _edit_toml(project_dir, "[server]", "[server]\nprot = 3000")
    with pytest.raises(ProjectError, match=r"server\.prot"):
        load_project(project_dir)


def test_app_pinned_to_missing_version(project_dir: Path) -> None:
    _edit_toml(project_dir, "version = 1", "version = 7")
    with pytest.raises(ProjectError, match="newest API version is v2"):
        load_project(project_dir)


def test_env_override_of_a_setting(project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEHOUSE_SERVER__PORT", "4321")
    assert load_project(project_dir).config.server.port == 4321


def test_several_databases_need_folders(project_dir: Path) -> None:
    _edit_toml(project_dir, "[databases.shop]", "[databases.shop]\n[databases.billing]\n")
    with pytest.raises(ProjectError, match=r"contracts/<database>/"):
        load_project(project_dir)
    contracts = project_dir / "contracts"
    (contracts / "shop").mkdir()
    for path in contracts.glob("*.sql"):
        path.rename(contracts / "shop" / path.name)
    (contracts / "billing").mkdir()
    (contracts / "billing" / "invoices.v1.sql").write_text("SELECT id, total FROM invoices")
    project = load_project(project_dir)
    assert project.database_of("invoices") == "billing"
    assert project.database_of("products") == "shop"
    assert project.migrations_dir("billing") == project_dir / "migrations" / "billing"
