"""`gatehouse apply` against a real PostgreSQL: idempotent, exact privileges, enforced by the database."""

from __future__ import annotations

import asyncpg
import pytest

from conftest import ProjectFactory, prepare, with_database
from gatehouse import operations
from gatehouse.db.targets import resolve_targets
from gatehouse.project import Project, load_project


async def _owner(project: Project) -> asyncpg.Connection:
    targets = await resolve_targets(project)
    return await targets[project.home_database].connect_owner()


async def test_apply_twice_changes_nothing_the_second_time(shop: Project) -> None:
    await operations.migrate_all(shop)
    first = await operations.apply_all(shop)
    assert any("created view api_v2.products (products.v2)" in c for c in first[0].changes)
    assert any(f"granted SELECT on api_v1.orders to {shop.apps['analytics'].role}" == c for c in first[0].changes)
    second = await operations.apply_all(shop)
    assert second[0].changes == []


async def test_carry_forward_gives_each_version_its_view(shop: Project) -> None:
    await prepare(shop)
    conn = await _owner(shop)
    try:
        rows = await conn.fetch(
            "SELECT table_schema, table_name, array_agg(column_name::text ORDER BY ordinal_position) AS cols "
            "FROM information_schema.columns WHERE table_schema LIKE 'api_v%' GROUP BY 1, 2"
        )
    finally:
        await conn.close()
    views = {(r["table_schema"], r["table_name"]): r["cols"] for r in rows}
    assert views[("api_v1", "products")] == ["id", "name", "price"]
    assert views[("api_v2", "products")] == ["id", "name", "price", "category", "stock"]
    assert views[("api_v1", "orders")] == views[("api_v2", "orders")]  # carried forward unchanged
    assert set(views) == {(f"api_v{n}", c) for n in (1, 2) for c in ("products", "orders", "order_items", "customer_summary")}


async def test_removed_grant_is_revoked_in_the_database(shop: Project) -> None:
    await prepare(shop)
    role = shop.apps["analytics"].role
    toml = shop.root / "gatehouse.toml"
    toml.write_text(toml.read_text().replace('    { contract = "orders", actions = ["read"] },\n', ""))
    report = await operations.apply_all(load_project(shop.root))
    assert f"revoked SELECT on api_v1.orders from {role}" in report[0].changes
    assert f"revoked SELECT on api_v2.orders from {role}" in report[0].changes
    conn = await _owner(shop)
    try:
        assert not await conn.fetchval("SELECT has_table_privilege($1, 'api_v2.orders', 'SELECT')", role)
        assert await conn.fetchval("SELECT has_table_privilege($1, 'api_v2.products', 'SELECT')", role)
    finally:
        await conn.close()


async def test_removed_app_loses_its_role(shop: Project) -> None:
    await prepare(shop)
    role = shop.apps["mobile"].role
    toml = shop.root / "gatehouse.toml"
    text = toml.read_text()
    start = text.index("[apps.mobile]")
    toml.write_text(text[:start] + text[text.index("[apps.analytics]"):])
    report = await operations.apply_all(load_project(shop.root))
    assert f"dropped role {role} (app removed from the project)" in report[0].changes
    conn = await _owner(shop)
    try:
        assert not await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role)
    finally:
        await conn.close()


async def test_authenticator_is_not_superuser_and_owns_nothing(shop: Project) -> None:
    await prepare(shop)
    conn = await _owner(shop)
    try:
        row = await conn.fetchrow("SELECT rolsuper, rolinherit, rolcanlogin, rolcreaterole FROM pg_roles "
                                  "WHERE rolname = $1", shop.authenticator_role)
        assert row is not None
        assert dict(row) == {"rolsuper": False, "rolinherit": False, "rolcanlogin": True, "rolcreaterole": False}
        for app in shop.apps.values():
            assert not await conn.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", app.role)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("app", "sql"),
    [
        ("mobile", "SELECT * FROM public.products"),  # a private table
        ("mobile", "SELECT * FROM api_v1.orders"),  # a view it was not granted
        ("web", "SELECT * FROM api_v2.customer_summary"),
        ("analytics", "SELECT * FROM public.users"),
        ("analytics", "SELECT * FROM gatehouse.keys"),  # gatehouse's own tables
        ("analytics", "DELETE FROM api_v1.products"),  # granted read only
    ],
)
async def test_database_itself_refuses_what_the_app_was_not_granted(
    shop: Project, serve_project: object, app: str, sql: str
) -> None:
    await prepare(shop)
    _, runtime = await serve_project(shop)  # type: ignore[operator]
    pool = runtime.pools.pool(app, "shop")
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_user") == shop.apps[app].role
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(sql)


async def test_granted_view_is_readable_with_raw_sql(shop: Project, serve_project: object) -> None:
    await prepare(shop)
    _, runtime = await serve_project(shop)  # type: ignore[operator]
    async with runtime.pools.pool("mobile", "shop").acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM api_v2.products") == 5000
        assert await conn.fetchval("SELECT current_setting('application_name')") == "gatehouse/mobile"


async def test_contract_change_recreates_only_its_views(make_project: ProjectFactory) -> None:
    project = make_project(from_shop=True)
    await prepare(project)
    path = project.root / "contracts" / "orders.v1.sql"
    path.write_text("SELECT id, user_id, status FROM orders")
    report = await operations.apply_all(load_project(project.root))
    views = [c for c in report[0].changes if "view" in c]
    assert views == ["re-created view api_v1.orders (orders.v1)", "re-created view api_v2.orders (orders.v1)"]
    # privileges on the re-created views were restored in the same apply
    assert any(c.startswith("granted SELECT on api_v1.orders") for c in report[0].changes)


def test_with_database_keeps_socket_query() -> None:
    assert with_database("postgresql://postgres:@/postgres?host=/tmp/x", "d") == "postgresql://postgres:@/d?host=/tmp/x"
