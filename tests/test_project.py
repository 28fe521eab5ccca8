"""Loading a project: every mistake is refused at load with its file, key and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatehouse.demo import copy_shop
from gatehouse.errors import ProjectError
from gatehouse.project import load_project


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    root = tmp_path / "shop"
    copy_shop(root, services=False)  # one database: its contracts in contracts/
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


def test_a_url_with_a_password_is_refused_with_the_way_out(project_dir: Path) -> None:
    _edit_toml(project_dir, "[databases.shop]", '[databases.shop]\nurl = "postgresql://u:s3cret@db/shop"')
    text = _load_error(project_dir)
    assert "gatehouse.toml" in text and "databases.shop.url: holds a password" in text
    assert 'url = "env:SHOP_DATABASE_URL"' in text and "PGPASSWORD" in text and "s3cret" not in text


@pytest.mark.parametrize("url", ["postgresql://app@db.internal:5432/shop", "postgres://db.internal/shop",
                                 "postgresql://app@db.internal/shop?sslmode=require"])
def test_a_url_without_a_password_is_not_a_secret(project_dir: Path, url: str) -> None:
    _edit_toml(project_dir, "[databases.shop]", f'[databases.shop]\nurl = "{url}"')
    assert load_project(project_dir).config.databases["shop"].url == url


@pytest.mark.parametrize("url", ["postgresql://app:pw@db/shop", "postgresql://app@db/shop?password=pw"])
def test_a_password_anywhere_in_the_url_is_a_secret(project_dir: Path, url: str) -> None:
    _edit_toml(project_dir, "[databases.shop]", f'[databases.shop]\nurl = "{url}"')
    assert "holds a password" in _load_error(project_dir)


def test_other_secrets_stay_references_only(project_dir: Path) -> None:
    _edit_toml(project_dir, "[databases.shop]", '[databases.shop]\nauthenticator_password = "hunter2"')
    text = _load_error(project_dir)
    assert "databases.shop.authenticator_password: secrets are never written in the file" in text
    assert "env:SHOP_AUTHENTICATOR_PASSWORD" in text


def test_a_file_is_not_a_project_folder(project_dir: Path) -> None:
    """A path to a file (the project's gatehouse.toml, or anything else) is refused with the folder to pass."""
    toml = project_dir / "gatehouse.toml"
    assert _load_error(toml) == f"{toml} is the project's settings file, not its folder\n" \
                                f"  hint: pass the folder that holds it: --project {project_dir}"
    logic = project_dir / "logic" / "pricing.py"
    assert _load_error(logic).startswith(f"{logic} is a file, not a project folder")
    assert _load_error(logic / "deeper").startswith(f"{logic / 'deeper'} is not a project folder: {logic} is a file")


def _load_error(project_dir: Path) -> str:
    with pytest.raises(ProjectError) as info:
        load_project(project_dir)
    text = str(info.value)
    assert "Extra inputs are not permitted" not in text and "Input should" not in text
    return text


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # a misspelt section, setting or key: the full key path, the closest valid key, the valid keys
        ("[apps.web]", "[aps.x]\n[apps.web]", ["aps: unknown section; did you mean apps?", "valid: project,"]),
        ('grants = [\n    { contract = "products", actions = ["read"] },\n]\n\n[apps.mobile]',
         'grnts = [{ contract = "products" }]\n\n[apps.mobile]',
         ["apps.web.grnts: unknown setting; did you mean grants?", "valid in [apps.web]: description"]),
        ("pool_size = 4, max_rows = 100", "pool_sise = 4, max_rows = 100",
         ["apps.web.quota.pool_sise: unknown setting; did you mean pool_size?",
          "valid in [apps.web.quota]: pool_size, max_rows, statement_timeout_ms"]),
        ("[server]", "[server]\nprot = 3000", ["server.prot: unknown setting; did you mean port?"]),
        # a wrong value: the key, what was given, what is allowed
        ('{ contract = "products", actions = ["read"] },\n]\n\n[apps.mobile]',
         '{ contract = "products", actions = ["raed"] },\n]\n\n[apps.mobile]',
         ["apps.web.grants[0].actions[0] = 'raed': must be one of 'read', 'insert', 'update', 'delete'",
          "did you mean 'read'?"]),
        ("pool_size = 4, max_rows = 100", "pool_size = 400, max_rows = 100",
         ["apps.web.quota.pool_size = 400: must be at most 200"]),
        ("port = 3000", 'port = "3k"', ["server.port = '3k': must be a whole number"]),
        ('name = "shop"', 'name = "My Shop"', ["project.name = 'My Shop': must be a name: a lower-case letter"]),
        ("[apps.web]", "[apps.Web]\n[apps.web]", ["apps.Web: the name 'Web' must be a name"]),
        ('[project]\nname = "shop"', "[project]", ["project.name: required, but missing; add name = ... under "
                                                  "[project]"]),
        ('{ contract = "products", actions = ["read"] },\n]\n\n[apps.mobile]',
         '{ contract = "products", actions = [] },\n]\n\n[apps.mobile]',
         ["apps.web.grants[0].actions: a grant needs at least one action"]),
        # checks made after the file is read name the key the same way
        ("version = 1", "version = 7", ["apps.web.version = 7, but the newest API version is v2",
                                        "hint: use a version from 1 to 2"]),
        ('{ contract = "orders", actions = ["read"] }', '{ contract = "invoices", actions = ["read"] }',
         ["apps.analytics.grants[1].contract = 'invoices': no contract has that name",
          "known contracts: customer_summary, order_items, orders, products"]),
        ('functions = ["order_total"]', 'functions = ["order_totals"]',
         ["apps.analytics.functions: 'order_totals' is not published by any logic/*.py",
          "hint: published: order_total"]),
    ],
)
def test_mistakes_name_the_file_the_key_and_the_fix(project_dir: Path, old: str, new: str,
                                                     expected: list[str]) -> None:
    _edit_toml(project_dir, old, new)
    text = _load_error(project_dir)
    assert text.startswith(f"{project_dir / 'gatehouse.toml'}: ")
    for part in expected:
        assert part in text
    assert "  " not in text.split("\n")[0] and "None" not in text  # no word left out of the sentence


def test_relations_name_their_key(project_dir: Path) -> None:
    (project_dir / "gatehouse.toml").write_text((project_dir / "gatehouse.toml").read_text()
                                               + '\n[[relations]]\nfrom = "orders.nope"\nto = "products.id"\n')
    assert "relations[0].from = 'orders.nope': contract 'orders' has no column 'nope'" in _load_error(project_dir)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("GATEHOUSE_SERVER__PORTT", "1", "GATEHOUSE_SERVER__PORTT (in the environment) sets server.portt, which "
                                         "is not a setting; did you mean GATEHOUSE_SERVER__PORT?"),
        ("GATEHOUSE_SERVR__PORT", "1", "GATEHOUSE_SERVR__PORT (in the environment) sets servr.port, but there is "
                                       "no section servr; did you mean GATEHOUSE_SERVER__PORT?"),
        ("GATEHOUSE_SERVER__PORT", "http", "server.port = 'http' (from GATEHOUSE_SERVER__PORT in the environment): "
                                           "must be a whole number"),
        ("GATEHOUSE_SERVER__PORT__X", "1", "GATEHOUSE_SERVER__PORT__X (in the environment) sets server.port.x, but "
                                           "server.port is a setting, not a section"),
    ],
)
def test_environment_overrides_name_their_variable(project_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   variable: str, value: str, expected: str) -> None:
    monkeypatch.setenv(variable, value)
    assert expected in _load_error(project_dir)


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


def test_a_list_setting_can_be_overridden_from_the_environment_in_toml_syntax(tmp_path: Path) -> None:
    from gatehouse.config import load_config

    (tmp_path / "gatehouse.toml").write_text('[project]\nname = "p"\n[databases.main]\n')
    config = load_config(tmp_path / "gatehouse.toml",
                         {"GATEHOUSE_SERVER__TRUSTED_PROXIES": '["10.0.0.0/8", "::1"]'})
    assert config.server.trusted_proxies == ("10.0.0.0/8", "::1")
    with pytest.raises(ProjectError, match=r"GATEHOUSE_SERVER__TRUSTED_PROXIES .* not a TOML list"):
        load_config(tmp_path / "gatehouse.toml", {"GATEHOUSE_SERVER__TRUSTED_PROXIES": '["10.0.0.0/8"'})
