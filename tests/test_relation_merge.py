"""Identical relations are one relation, and `check` flags every embed that is ambiguous in a served version.

The scenario of a table split: a `[[relations]]` entry declared while no foreign key could say it, then the
key added by a migration. Both say the same thing, so embedding answers 200, not PostgREST's 300; two
*different* keys to the same table do make the embed ambiguous, and `check` says so before an app finds out.

Ambiguity is judged per API version, as the server builds it: it breaks only a released API version where a
contract version released with one relation to the target now has several (`migrate plan` names the apps
pinned to those versions, `check` says error); an ambiguity only unreleased versions see is a warning.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import orjson
import pytest

from conftest import ProjectFactory, prepare
from gatehouse import operations
from gatehouse.check import run_check
from gatehouse.check_findings import Finding, exit_code
from gatehouse.contracts import compat
from gatehouse.contracts.ambiguity import find_ambiguities
from gatehouse.contracts.lineage import column_sources
from gatehouse.contracts.lockfile import Checksum, Lock, LockEntry, read_lock, update_lock, write_lock
from gatehouse.contracts.model import ContractVersion, parse_contract_sql
from gatehouse.contracts.relations import DeclaredRelation, Relation, build_relations
from gatehouse.contracts.shape import Column, RelationRef, Signature
from gatehouse.contracts.signature import project_signatures
from gatehouse.db.catalog import Constraint
from gatehouse.project import Project, load_project
from test_usage import call, write

# --- merging, without a database ------------------------------------------------------------------------


def _contract(name: str, sql: str) -> ContractVersion:
    return ContractVersion(name, 1, "main", sql, parse_contract_sql(sql, where=name), "",
                           Path(f"contracts/{name}.v1.sql"))


ORDERS = _contract("orders", "SELECT id, customer_id FROM orders")
CUSTOMERS = _contract("customers", "SELECT id, name FROM customers")
LINEAGES = {c.label: column_sources(c.sql) for c in (ORDERS, CUSTOMERS)}
PRIMARY = [Constraint("customers_pkey", "p", "public", "customers", ("id",), None, None, ()),
           Constraint("orders_pkey", "p", "public", "orders", ("id",), None, None, ())]


def _fk(name: str, column: str = "customer_id") -> Constraint:
    return Constraint(name, "f", "public", "orders", (column,), "public", "customers", ("id",))


DECLARED = [DeclaredRelation("orders", "customer_id", "customers", "id")]


def test_a_declared_relation_repeating_a_foreign_key_is_one_relation() -> None:
    relations = build_relations([ORDERS, CUSTOMERS], LINEAGES, [*PRIMARY, _fk("orders_customer_id_fkey")], DECLARED)
    assert relations == {
        "orders": [Relation("orders", "customers", ("customer_id",), ("id",), True, "orders_customer_id_fkey",
                            ("declared",))],
        "customers": [Relation("customers", "orders", ("id",), ("customer_id",), False, "orders_customer_id_fkey",
                               ("declared",))],
    }
    assert relations["orders"][0].hints == ("orders_customer_id_fkey", "declared")


def test_a_declared_relation_joins_only_versions_that_show_both_columns() -> None:
    older = _contract("orders", "SELECT id FROM orders")  # before customer_id was in the contract
    relations = build_relations([older, CUSTOMERS], {**LINEAGES, older.label: column_sources(older.sql)}, PRIMARY,
                                DECLARED)
    assert relations == {"orders": [], "customers": []}


def test_two_identical_foreign_keys_are_one_relation_named_after_the_first() -> None:
    relations = build_relations([ORDERS, CUSTOMERS], LINEAGES, [*PRIMARY, _fk("a_fk"), _fk("b_fk")])
    assert [(r.name, r.aliases) for r in relations["orders"]] == [("a_fk", ("b_fk",))]
    assert [(r.name, r.aliases) for r in relations["customers"]] == [("a_fk", ("b_fk",))]


def test_different_relations_to_one_target_stay_apart() -> None:
    orders = _contract("orders", "SELECT id, billing_id, shipping_id FROM orders")
    lineages = {**LINEAGES, orders.label: column_sources(orders.sql)}
    relations = build_relations([orders, CUSTOMERS], lineages,
                                [*PRIMARY, _fk("billing_fk", "billing_id"), _fk("shipping_fk", "shipping_id")])
    assert [(r.name, r.source_columns) for r in relations["orders"]] == [
        ("billing_fk", ("billing_id",)), ("shipping_fk", ("shipping_id",))]


# --- served: the table split ----------------------------------------------------------------------------

SPLIT_TOML = """
[project]
name = "split"

[databases.main]

[apps.shop]
grants = [{ contract = "orders", actions = ["read"] }, { contract = "customers", actions = ["read"] }]

[[relations]]
from = "orders.customer_id"
to = "customers.id"
"""
BEFORE_SPLIT = """
CREATE TABLE orders (id integer PRIMARY KEY, customer_id integer NOT NULL, customer_name text NOT NULL);
INSERT INTO orders VALUES (1, 10, 'Ada'), (2, 10, 'Ada'), (3, 11, 'Grace');
"""
SPLIT = """
CREATE TABLE customers (id integer PRIMARY KEY, name text NOT NULL);
INSERT INTO customers SELECT DISTINCT customer_id, customer_name FROM orders;
ALTER TABLE orders ADD CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES customers (id);
"""


async def _lock(project: Project) -> None:
    lock, report = update_lock(project, await project_signatures(project), read_lock(project.root))
    assert report.ok, report.lines()
    write_lock(project.root, lock)


async def _get(client: httpx.AsyncClient, key: str, url: str) -> tuple[int, object]:
    response = await client.get(url, headers={"apikey": key})
    return response.status_code, orjson.loads(response.content)


async def test_a_declared_relation_after_a_table_split_still_embeds(make_project: ProjectFactory,
                                                                    serve_project: object) -> None:
    project = make_project(toml=SPLIT_TOML, migrations={"V001__orders.sql": BEFORE_SPLIT, "V002__split.sql": SPLIT},
                           contracts={"orders.v1.sql": "SELECT id, customer_id FROM orders",
                                      "customers.v1.sql": "SELECT id, name FROM customers"})
    keys = await prepare(project)
    await _lock(project)
    async with operations.owner_connection(project) as conn:  # both sources of the relation are there
        assert await conn.fetchval("SELECT count(*) FROM pg_constraint WHERE conname = 'orders_customer_id_fkey'") == 1
    client, _ = await serve_project(project)  # type: ignore[operator]
    key = keys["shop"]
    expected = [{"id": 3, "customer_id": 11, "customers": {"id": 11, "name": "Grace"}}]
    for hint in ("", "!orders_customer_id_fkey", "!declared", "!customer_id"):
        assert await _get(client, key, f"/orders?id=eq.3&select=*,customers{hint}(*)") == (200, expected), hint
    status, body = await _get(client, key, "/customers?id=eq.10&select=id,orders(id)&orders.order=id")
    assert (status, body) == (200, [{"id": 10, "orders": [{"id": 1}, {"id": 2}]}])
    assert [f.code for f in await run_check(project.root)] == []


# --- check: ambiguous embeds ----------------------------------------------------------------------------

TWO_KEYS_TOML = """
[project]
name = "twokeys"

[databases.main]

[apps.shop]
grants = [{ contract = "orders", actions = ["read"] }, { contract = "customers", actions = ["read"] }]
"""
ONE_KEY = """
CREATE TABLE customers (id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id integer PRIMARY KEY, billing_id integer NOT NULL REFERENCES customers (id),
                     shipping_id integer NOT NULL);
INSERT INTO customers VALUES (1, 'Ada'), (2, 'Grace');
INSERT INTO orders VALUES (1, 1, 2);
"""
SECOND_KEY = "ALTER TABLE orders ADD FOREIGN KEY (shipping_id) REFERENCES customers (id);"


def _ambiguous(findings: list[Finding]) -> dict[str, Finding]:
    return {f.contract or "": f for f in findings if f.code == "GHC056"}


async def test_a_second_key_to_the_same_target_is_an_ambiguous_embed(make_project: ProjectFactory,
                                                                      serve_project: object) -> None:
    project = make_project(toml=TWO_KEYS_TOML, migrations={"V001__tables.sql": ONE_KEY},
                           contracts={"orders.v1.sql": "SELECT id, billing_id, shipping_id FROM orders",
                                      "customers.v1.sql": "SELECT id, name FROM customers"})
    keys = await prepare(project)
    await _lock(project)  # released with one relation between orders and customers
    assert _ambiguous(await run_check(project.root)) == {}

    (project.root / "migrations" / "V002__shipping_key.sql").write_text(SECOND_KEY)
    project = load_project(project.root)
    await operations.migrate_all(project)
    findings = await run_check(project.root)
    ambiguous = _ambiguous(findings)
    assert set(ambiguous) == {"orders.v1", "customers.v1"}
    orders = ambiguous["orders.v1"]
    assert orders.severity == "error" and orders.file == "contracts/orders.v1.sql"
    assert orders.message == ("orders.v1: embedding customers is ambiguous in API v1: 2 relations lead there "
                              "(orders_billing_id_fkey: billing_id → customers(id); "
                              "orders_shipping_id_fkey: shipping_id → customers(id))")
    assert orders.hint is not None and "answers 300" in orders.hint
    assert "customers!orders_billing_id_fkey(...), customers!orders_shipping_id_fkey(...)" in orders.hint
    assert ambiguous["customers.v1"].severity == "error"

    # what check says is what the server answers
    client, _ = await serve_project(project)  # type: ignore[operator]
    key = keys["shop"]
    status, body = await _get(client, key, "/orders?select=id,customers(name)")
    assert status == 300 and isinstance(body, dict) and body["code"] == "PGRST201"
    assert await _get(client, key, "/orders?select=id,customers!orders_shipping_id_fkey(name)") == (
        200, [{"id": 1, "customers": {"name": "Grace"}}])

    # not released: the same ambiguity is a warning (no app's query broke; new ones must pick a relation)
    (project.root / "contracts.lock").unlink()
    warned = _ambiguous(await run_check(project.root))
    assert {label: f.severity for label, f in warned.items()} == {"orders.v1": "warning", "customers.v1": "warning"}


# --- per API version, without a database ----------------------------------------------------------------

EMBEDS_TOML = """
[project]
name = "embeds"

[databases.main]
"""
EMBEDS = {  # API v1 serves users.v1 and orders.v1; API v2 serves users.v1 and orders.v2
    "users.v1.sql": "SELECT id, name FROM users",
    "orders.v1.sql": "SELECT id, user_id, referrer_id FROM orders",
    "orders.v2.sql": "SELECT id, user_id, gift_for FROM orders",
}
KEYS = [Constraint("users_pkey", "p", "public", "users", ("id",)),
        Constraint("orders_pkey", "p", "public", "orders", ("id",))]


def _key(column: str, name: str | None = None) -> Constraint:
    return Constraint(name or f"orders_{column}_fkey", "f", "public", "orders", (column,), "public", "users", ("id",))


def _files(root: Path, toml: str, contracts: dict[str, str]) -> Project:
    (root / "contracts").mkdir(parents=True)
    (root / "gatehouse.toml").write_text(toml)
    for name, sql in contracts.items():
        (root / "contracts" / name).write_text(sql)
    return load_project(root)


def _released(relations: dict[str, tuple[RelationRef, ...]]) -> Lock:
    """A lock of these contract versions, with these relations recorded (columns do not matter here)."""
    entries = []
    for label, refs in relations.items():
        name, _, version = label.rpartition(".v")
        signature = Signature(name, int(version), "main", (Column("id", "integer", False),), refs)
        entries.append(LockEntry(signature, f"contracts/{label}.sql", Checksum("sha256", "0")))
    return Lock(tuple(entries))


TO_ORDERS = RelationRef("orders", ("id",), ("user_id",), False)
TO_USERS = RelationRef("users", ("user_id",), ("id",), True)
V1 = _released({"users.v1": (TO_ORDERS,), "orders.v1": (TO_USERS,)})
V2 = _released({"users.v1": (TO_ORDERS,), "orders.v1": (TO_USERS,), "orders.v2": (TO_USERS,)})
V1_NONE = _released({"users.v1": (), "orders.v1": ()})
V1_TWO = _released({"users.v1": (TO_ORDERS, RelationRef("orders", ("id",), ("referrer_id",), False)),
                    "orders.v1": (TO_USERS, RelationRef("users", ("referrer_id",), ("id",), True))})
BOTH = (("orders.v1", "users"), ("users.v1", "orders"))

AMBIGUITY_CASES = [
    # (case, foreign keys, lock, {(label, target): (API versions where ambiguous, released ones it breaks)})
    ("one key: one relation", [_key("user_id")], V1, {}),
    ("the same key twice is one relation", [_key("user_id", "a_fk"), _key("user_id", "b_fk")], V1, {}),
    ("a key only an unreleased version exposes", [_key("user_id"), _key("gift_for")], V1,
     {("orders.v2", "users"): ((2,), ()), ("users.v1", "orders"): ((2,), ())}),
    ("the same, once that version is released", [_key("user_id"), _key("gift_for")], V2,
     {("orders.v2", "users"): ((2,), (2,)), ("users.v1", "orders"): ((2,), (2,))}),
    ("a key on a column a released version exposes", [_key("user_id"), _key("referrer_id")], V1,
     {key: ((1,), (1,)) for key in BOTH}),
    ("ambiguous in a released and an unreleased version", [_key("user_id"), _key("referrer_id"), _key("gift_for")],
     V1, {("orders.v1", "users"): ((1,), (1,)), ("orders.v2", "users"): ((2,), ()),
          ("users.v1", "orders"): ((1, 2), (1,))}),
    ("released with no relation to it: nobody embedded it", [_key("user_id"), _key("referrer_id")], V1_NONE,
     {key: ((1,), ()) for key in BOTH}),
    ("released ambiguous already", [_key("user_id"), _key("referrer_id")], V1_TWO, {key: ((1,), ()) for key in BOTH}),
    ("nothing released", [_key("user_id"), _key("referrer_id")], None, {key: ((1,), ()) for key in BOTH}),
]


@pytest.mark.parametrize(("case", "keys", "lock", "expected"), AMBIGUITY_CASES, ids=[c[0] for c in AMBIGUITY_CASES])
def test_ambiguity_is_judged_per_api_version(tmp_path: Path, case: str, keys: list[Constraint], lock: Lock | None,
                                             expected: dict[tuple[str, str], tuple[tuple[int, ...],
                                                                                   tuple[int, ...]]]) -> None:
    found = find_ambiguities(_files(tmp_path, EMBEDS_TOML, EMBEDS), "main", [*KEYS, *keys], lock)
    assert {(a.label, a.target): (a.api_versions, a.broken_versions) for a in found} == expected
    assert all(a.breaking == bool(a.broken_versions) and (a.released is not None) == a.breaking for a in found)


def test_an_ambiguity_names_every_relation_and_a_hint_for_each(tmp_path: Path) -> None:
    project = _files(tmp_path, EMBEDS_TOML, EMBEDS)
    found = find_ambiguities(project, "main", [*KEYS, _key("user_id"), _key("referrer_id"), _key("gift_for")], V1)
    users = next(a for a in found if a.label == "users.v1")
    assert [r.name for r in users.relations] == ["orders_gift_for_fkey", "orders_referrer_id_fkey",
                                                 "orders_user_id_fkey"]  # v1's two and v2's two
    assert users.described == ("orders_gift_for_fkey: id → orders(gift_for); orders_referrer_id_fkey: id → "
                               "orders(referrer_id); orders_user_id_fkey: id → orders(user_id)")
    assert users.choices == ("orders!orders_gift_for_fkey(...), orders!orders_referrer_id_fkey(...), "
                             "orders!orders_user_id_fkey(...)")
    assert users.released == TO_ORDERS


def test_declared_relations_are_told_apart_by_a_column(tmp_path: Path) -> None:
    """Both are named `declared`: the hint is a column only one of them joins on, on either side."""
    toml = EMBEDS_TOML + ('[[relations]]\nfrom = "orders.user_id"\nto = "users.id"\n\n'
                          '[[relations]]\nfrom = "orders.referrer_id"\nto = "users.id"\n')
    contracts = {name: sql for name, sql in EMBEDS.items() if name != "orders.v2.sql"}
    by_label = {a.label: a for a in find_ambiguities(_files(tmp_path, toml, contracts), "main", KEYS, None)}
    assert set(by_label) == {"orders.v1", "users.v1"}
    assert by_label["orders.v1"].hints == ("referrer_id", "user_id")
    assert by_label["users.v1"].hints == ("referrer_id", "user_id")  # the target's side: the server matches it


# --- end to end: migrate plan and check agree with the server -------------------------------------------

GIFTS_TOML = """
[project]
name = "gifts"

[databases.main]

[apps.analytics]
version = 3
grants = [{ contract = "customer_summary", actions = ["read"] }, { contract = "orders", actions = ["read"] }]
"""
SHOP = """
CREATE TABLE users (id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id integer PRIMARY KEY, user_id integer NOT NULL REFERENCES users (id), status text NOT NULL);
INSERT INTO users VALUES (1, 'Ada'), (2, 'Grace');
INSERT INTO orders VALUES (10, 1, 'paid'), (11, 2, 'open');
"""
GIFT_FOR = "ALTER TABLE orders ADD COLUMN gift_for integer REFERENCES users (id);"
DAY = timedelta(days=1)


async def _has_column(project: Project, table: str, column: str) -> bool:
    async with operations.owner_connection(project) as conn:
        found = await conn.fetchval("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' "
                                    "AND table_name = $1 AND column_name = $2", table, column)
    return bool(found)


async def test_a_key_only_an_unreleased_version_sees_breaks_nobody(make_project: ProjectFactory, tmp_path: Path,
                                                                    serve_project: object) -> None:
    """The issue's repro: `orders.v4` (unreleased) shows a second key to users; v3 still answers 200."""
    project = make_project(toml=GIFTS_TOML, migrations={"V001__shop.sql": SHOP}, contracts={
        "customer_summary.v1.sql": "-- not null: customer_id, name\nSELECT id AS customer_id, name FROM users",
        "orders.v1.sql": "SELECT id, user_id FROM orders",
        "orders.v3.sql": "SELECT id, user_id, status FROM orders"})
    keys = await prepare(project)
    await _lock(project)  # API v3 released
    await write(project, [call("analytics", 3, DAY, target="customer_summary", n=i) for i in range(3)],
                tmp_path / "spool.jsonl")

    (project.root / "migrations" / "V002__gift_for.sql").write_text(GIFT_FOR)
    (project.root / "contracts" / "orders.v4.sql").write_text("SELECT id, user_id, gift_for FROM orders")
    project = load_project(project.root)
    (plan,) = await operations.plan_all(project)
    assert plan.failure is None and plan.breaking == []
    assert not await _has_column(project, "orders", "gift_for")  # rolled back
    impact = next(i for i in plan.impacts if i.label == "customer_summary.v1")
    assert [(c.kind, c.breaking) for c in impact.changes] == [(compat.RELATION_ADDED, False)]
    assert [use.app for use in impact.callers if use.pinned] == ["analytics"] and impact.would_break == []

    await operations.migrate_all(project)
    await operations.apply_all(project)
    findings = await run_check(project.root)
    assert exit_code(findings) == 0, [f"{f.code} {f.message}" for f in findings]
    ambiguous = _ambiguous(findings)
    assert {label: f.severity for label, f in ambiguous.items()} == {"customer_summary.v1": "warning",
                                                                      "orders.v4": "warning"}
    assert ambiguous["customer_summary.v1"].message == (
        "customer_summary.v1: embedding orders is ambiguous in API v4: 2 relations lead there "
        "(orders_gift_for_fkey: customer_id → orders(gift_for); orders_user_id_fkey: customer_id → orders(user_id))")

    client, _ = await serve_project(project)  # type: ignore[operator]
    url = "/customer_summary?customer_id=eq.1&select=*,orders(id)"
    assert await _get(client, keys["analytics"], f"/v3{url}") == (
        200, [{"customer_id": 1, "name": "Ada", "orders": [{"id": 10}]}])
    status, body = await _get(client, keys["analytics"], f"/v4{url}")
    assert status == 300 and isinstance(body, dict) and body["code"] == "PGRST201"


REFERRERS_TOML = """
[project]
name = "referrers"
default_version = 2

[databases.main]

[apps.legacy]
version = 1
grants = [{ contract = "orders", actions = ["read"] }, { contract = "users", actions = ["read"] }]

[apps.mobile]
grants = [{ contract = "orders", actions = ["read"] }, { contract = "users", actions = ["read"] }]
"""
REFERRERS = """
CREATE TABLE users (id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id integer PRIMARY KEY, user_id integer NOT NULL REFERENCES users (id), referrer_id integer);
INSERT INTO users VALUES (1, 'Ada'), (2, 'Grace');
INSERT INTO orders VALUES (10, 1, 2);
"""
REFERRER_KEY = ("ALTER TABLE orders ADD CONSTRAINT orders_referrer_id_fkey FOREIGN KEY (referrer_id) "
                "REFERENCES users (id);")


async def test_a_key_on_a_column_a_released_version_exposes_breaks_its_pinned_apps(
        make_project: ProjectFactory, tmp_path: Path) -> None:
    project = make_project(toml=REFERRERS_TOML, migrations={"V001__tables.sql": REFERRERS}, contracts={
        "users.v1.sql": "SELECT id, name FROM users",
        "orders.v1.sql": "SELECT id, user_id, referrer_id FROM orders",
        "orders.v2.sql": "SELECT id, user_id FROM orders"})
    await prepare(project)
    await _lock(project)
    await write(project, [call("legacy", 1, DAY, target="orders"), call("legacy", 1, DAY, target="users"),
                          call("mobile", 1, 3 * DAY, target="users"), call("mobile", 2, DAY, target="users"),
                          call("mobile", 2, DAY, target="orders")], tmp_path / "spool.jsonl")

    (project.root / "migrations" / "V002__referrer_key.sql").write_text(REFERRER_KEY)
    project = load_project(project.root)
    (plan,) = await operations.plan_all(project)
    broken = {impact.label: impact for impact in plan.breaking}
    assert set(broken) == {"orders.v1", "users.v1"}
    users = broken["users.v1"]  # served in v1 and v2, ambiguous in v1 only: callers looked up there
    assert users.api_versions == (1,)
    assert [(u.app, u.pinned, u.latest) for u in users.callers] == [("legacy", True, 1), ("mobile", False, 2)]
    assert users.would_break == ["legacy"] and broken["orders.v1"].would_break == ["legacy"]
    [ambiguity] = [c for c in users.changes if c.breaking]
    assert (ambiguity.kind, ambiguity.column) == (compat.RELATION_BECAME_AMBIGUOUS, "id")
    assert ambiguity.detail == (
        "embedding orders is ambiguous in released API v1: 2 relations lead to it (orders_referrer_id_fkey: id → "
        "orders(referrer_id); orders_user_id_fkey: id → orders(user_id)), so select=*,orders(*) answers 300 "
        "there; clients would have to name one: orders!orders_referrer_id_fkey(...), orders!orders_user_id_fkey(...)")
    async with operations.owner_connection(project) as conn:  # the plan rolled its key back
        assert await conn.fetchval("SELECT count(*) FROM pg_constraint WHERE conname = 'orders_referrer_id_fkey'") == 0

    await operations.migrate_all(project)  # forced through
    ambiguous = _ambiguous(await run_check(project.root))
    assert {label: f.severity for label, f in ambiguous.items()} == {"orders.v1": "error", "users.v1": "error"}
    hint = ambiguous["users.v1"].hint
    assert hint is not None and "in released API v1 now answers 300" in hint
