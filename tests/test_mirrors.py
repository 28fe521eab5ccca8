"""Mirrors: a local copy in one database (billing) of an evented contract of another (crm), kept from its outbox.

The events are written by the capture's triggers, which ``gatehouse apply`` installs (events/capture.py), with
their per-aggregate versions. One test swaps them for :func:`emulate_capture`, an outbox writer without versions
(as Debezium-style tooling would write it), where the outbox's ``seq`` stands in for them.

The outbox is read by the rule of :mod:`gatehouse.events.outbox`: nothing after a transaction of its database still
running (and, without ``pg_read_all_stats``, of any database), so "caught up" here means: no committed event of the
contract after the mirror's position (:func:`until_idle`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import ProjectFactory, prepare
from gatehouse import cli
from gatehouse.db.targets import DatabaseTarget, resolve_targets
from gatehouse.errors import ProjectError
from gatehouse.events.mirror_plan import MirrorPlan, plan_mirrors
from gatehouse.events.mirror_runner import MirrorRunner, owner_login, sync_mirrors_once
from gatehouse.events.mirror_sql import SOURCE_TABLES, Table, apply_states, newest_per_key, version_source
from gatehouse.events.mirrors import MIRROR_SINK, MirrorSync, Step
from gatehouse.events.outbox import START, Event, read_after
from gatehouse.project import Project

TOML = """
[project]
name = "mirrors"

[databases.crm]

[databases.billing]

[apps.finance]
grants = [{ contract = "customer_copies", actions = ["read"] }]

[events.customers]
version = 1

[events.order_lines]
version = 1

[mirrors.customers]
database = "billing"
source = "customers"
table = "customers_copy"
poll_ms = 20

[mirrors.names]
database = "billing"
source = "customers"
table = "crm_copy.customer_names"
columns = ["name"]

[mirrors.lines]
database = "billing"
source = "order_lines"
table = "order_lines_copy"
"""
MIGRATIONS = {
    "crm/V001__customers.sql": """
        CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text, tier int,
                                joined timestamptz DEFAULT now(), password_hash text);
        CREATE TABLE order_lines (order_id int, line int, sku text NOT NULL, qty numeric(10,2),
                                  PRIMARY KEY (order_id, line));
        INSERT INTO customers (id, name, email, tier, password_hash)
        SELECT n, 'customer ' || n, 'c' || n || '@example.com', n % 3, 'secret' FROM generate_series(1, 20) n;
    """,
    "billing/V001__invoices.sql": "CREATE TABLE invoices (id int PRIMARY KEY, customer_id int NOT NULL, total numeric);",
}
CONTRACTS = {
    "crm/customers.v1.sql": "SELECT id, name, email, tier, joined FROM customers",
    "crm/order_lines.v1.sql": "SELECT order_id, line, sku, qty FROM order_lines",
    "billing/customer_copies.v1.sql": "-- The customers billing keeps a copy of (mirrors.customers)\n"
                                      "SELECT id, name, email FROM customers_copy WHERE NOT _gh_deleted",
}
CAPTURE = """
CREATE OR REPLACE FUNCTION public.test_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
    shown jsonb;
    key text;
BEGIN
    IF TG_TABLE_NAME = 'customers' THEN
        shown := jsonb_build_object('id', row->'id', 'name', row->'name', 'email', row->'email', 'tier', row->'tier',
                                    'joined', row->'joined');
        key := row->>'id';
    ELSE
        shown := jsonb_build_object('order_id', row->'order_id', 'line', row->'line', 'sku', row->'sku',
                                    'qty', row->'qty');
        key := jsonb_build_array(row->'order_id', row->'line')::text;
    END IF;
    INSERT INTO gatehouse.outbox (aggregatetype, aggregateid, type, payload, contract_version)
    VALUES (TG_TABLE_NAME, key,
            CASE TG_OP WHEN 'INSERT' THEN 'created' WHEN 'UPDATE' THEN 'updated' ELSE 'deleted' END, shown, 1);
    RETURN NULL;
END $$;
"""


@dataclass
class Mirrored:
    project: Project
    targets: dict[str, DatabaseTarget]
    crm: asyncpg.Connection
    billing: asyncpg.Connection

    def plan(self, name: str = "customers") -> MirrorPlan:
        return next(p for p in plan_mirrors(self.project) if p.name == name)

    def sync(self, name: str = "customers", *, on_applied: Callable[[], Awaitable[None]] | None = None,
             batch: int | None = None) -> MirrorSync:
        plan = self.plan(name)
        plan = plan if batch is None else replace(plan, batch=batch)
        return MirrorSync(plan, owner_login(self.targets[plan.database], name),
                          owner_login(self.targets[plan.source_database], name), on_applied=on_applied)

    async def source(self) -> dict[Any, dict[str, Any]]:
        rows = await self.crm.fetch("SELECT id, to_jsonb(v)::text AS row FROM api_v1.customers v")
        return {r["id"]: json.loads(r["row"]) for r in rows}

    async def copy(self, table: str = "customers_copy") -> dict[Any, dict[str, Any]]:
        rows = await self.billing.fetch(f"SELECT id, (to_jsonb(m) - '_gh_version' - '_gh_deleted' - '_gh_event_at')"
                                        f"::text AS row FROM {table} m WHERE NOT _gh_deleted")
        return {r["id"]: json.loads(r["row"]) for r in rows}

    async def position(self, name: str = "customers") -> asyncpg.Record:
        row = await self.billing.fetchrow("SELECT * FROM gatehouse.mirror_positions WHERE mirror = $1", name)
        assert row is not None
        return row


async def emulate_capture(crm: asyncpg.Connection) -> None:
    """Replace the capture by a plain trigger writing the outbox without versions (``aggregate_version`` 0, no
    ``gatehouse.aggregate_versions``): the mirror then orders by ``seq``, which the trigger takes after the row lock."""
    for table in ("customers", "order_lines"):
        await crm.execute(f"DROP TRIGGER IF EXISTS gatehouse_event_{table} ON {table}")
    await crm.execute("DROP TABLE gatehouse.aggregate_versions")
    await crm.execute(CAPTURE)
    for table in ("customers", "order_lines"):
        await crm.execute(f"CREATE TRIGGER test_capture AFTER INSERT OR UPDATE OR DELETE ON {table} "
                          "FOR EACH ROW EXECUTE FUNCTION public.test_capture()")


@pytest.fixture
async def mirrored(make_project: ProjectFactory) -> AsyncIterator[Mirrored]:
    project = make_project(toml=TOML, migrations=MIGRATIONS, contracts=CONTRACTS)
    await prepare(project)
    targets = await resolve_targets(project)
    crm, billing = await targets["crm"].connect_owner(), await targets["billing"].connect_owner()
    try:
        yield Mirrored(project, targets, crm, billing)
    finally:
        await crm.close()
        await billing.close()


async def until_idle(sync: MirrorSync, within_s: float = 30.0) -> list[Step]:
    """Steps until the mirror is idle with no committed event of its contract left after its position."""
    steps: list[Step] = []
    deadline = asyncio.get_running_loop().time() + within_s
    try:
        while True:
            step = await sync.step()
            steps.append(step)
            if step.kind == "idle" and not await sync.waiting(step.position):
                return steps
            if step.kind in ("idle", "busy"):
                assert asyncio.get_running_loop().time() < deadline, f"never caught up: {steps[-3:]}"
                await asyncio.sleep(0.05)
    finally:
        await sync.close()


def applied(steps: list[Step]) -> int:
    return sum(s.count for s in steps if s.kind == "events")


# --- apply: the table, its shape, its position row ---------------------------------------------------------------


async def test_apply_creates_each_mirror_table_with_the_contracts_types_key_and_own_columns(mirrored: Mirrored) -> None:
    columns = await mirrored.billing.fetch(
        "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null "
        "FROM pg_attribute a WHERE a.attrelid = 'customers_copy'::regclass AND a.attnum > 0 ORDER BY a.attnum")
    assert [(c["name"], c["type"], c["not_null"]) for c in columns] == [
        ("id", "integer", True), ("name", "text", False), ("email", "text", False), ("tier", "integer", False),
        ("joined", "timestamp with time zone", False), ("_gh_version", "bigint", True),
        ("_gh_deleted", "boolean", True), ("_gh_event_at", "timestamp with time zone", False)]
    owner = await mirrored.billing.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = 'customers_copy'")
    assert owner == await mirrored.billing.fetchval("SELECT current_user")
    keys = await mirrored.billing.fetch(
        "SELECT conrelid::regclass::text AS t, pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE contype = 'p' "
        "AND conrelid::regclass::text IN ('customers_copy', 'crm_copy.customer_names', 'order_lines_copy') ORDER BY 1")
    assert [(k["t"], k["def"]) for k in keys] == [
        ("crm_copy.customer_names", "PRIMARY KEY (id)"), ("customers_copy", "PRIMARY KEY (id)"),
        ("order_lines_copy", "PRIMARY KEY (order_id, line)")]
    names = await mirrored.billing.fetch("SELECT attname FROM pg_attribute WHERE attrelid = "
                                         "'crm_copy.customer_names'::regclass AND attnum > 0 ORDER BY attnum")
    assert [n["attname"] for n in names] == ["id", "name", "_gh_version", "_gh_deleted", "_gh_event_at"]  # key added
    qty = await mirrored.billing.fetchval("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                                          "'order_lines_copy'::regclass AND attname = 'qty'")
    assert qty == "numeric(10,2)"
    positions = await mirrored.billing.fetch("SELECT mirror, table_name, source, snapshot_done, txid, seq "
                                             "FROM gatehouse.mirror_positions ORDER BY mirror")
    assert [tuple(p) for p in positions] == [("customers", "public.customers_copy", "customers.v1", False, 0, 0),
                                             ("lines", "public.order_lines_copy", "order_lines.v1", False, 0, 0),
                                             ("names", "crm_copy.customer_names", "customers.v1", False, 0, 0)]
    from gatehouse import operations

    again = await operations.apply_all(mirrored.project)
    assert [r.changes for r in again] == [[], []]  # nothing to change the second time


async def test_a_new_evented_version_adds_its_columns_and_is_copied_anew(mirrored: Mirrored) -> None:
    from gatehouse import operations
    from gatehouse.project import load_project

    await until_idle(mirrored.sync())
    root = mirrored.project.root
    (root / "contracts/crm/customers.v2.sql").write_text(
        "SELECT id, name, email, tier, joined, upper(name) AS shout FROM customers")
    toml = (root / "gatehouse.toml").read_text()
    (root / "gatehouse.toml").write_text(toml.replace("[events.customers]\nversion = 1", "[events.customers]\nversion = 2"))
    project = load_project(root)
    reports = {r.database: r.changes for r in await operations.apply_all(project)}
    assert "added column shout (text) to mirror table public.customers_copy" in reports["billing"]
    assert ("mirror customers now copies customers.v2 (6 columns): it is copied anew by the next sync"
            in reports["billing"])
    assert (await mirrored.position())["snapshot_done"] is False
    assert (await mirrored.copy())[1]["name"] == "customer 1"  # the old copy stays until the new one is complete
    await mirrored.crm.execute("UPDATE customers SET name = 'loud' WHERE id = 1")
    reloaded = Mirrored(project, mirrored.targets, mirrored.crm, mirrored.billing)
    steps = await until_idle(reloaded.sync())
    assert steps[0].kind == "snapshot"
    rows = await mirrored.billing.fetch("SELECT id, name, shout FROM customers_copy WHERE id <= 2 ORDER BY id")
    assert [tuple(r) for r in rows] == [(1, "loud", "LOUD"), (2, "customer 2", "CUSTOMER 2")]
    await mirrored.crm.execute("UPDATE customers SET name = 'quiet' WHERE id = 2")
    await until_idle(reloaded.sync())
    assert (await mirrored.billing.fetchval("SELECT shout FROM customers_copy WHERE id = 2")) == "QUIET"


async def test_a_table_gatehouse_did_not_make_is_never_taken_over(make_project: ProjectFactory) -> None:
    from gatehouse.db.sync import apply_database

    toml = TOML.replace('table = "order_lines_copy"', 'table = "invoices"').replace(
        'grants = [{ contract = "customer_copies", actions = ["read"] }]', "")
    contracts = {k: v for k, v in CONTRACTS.items() if not k.startswith("billing/")}
    project = make_project(toml=toml, migrations=MIGRATIONS, contracts=contracts)
    await prepare(_without_mirrors(project))
    targets = await resolve_targets(project)
    with pytest.raises(ProjectError, match=r"invoices'?: that table exists and is not this mirror's"):
        await apply_database(project, targets["billing"])


def _without_mirrors(project: Project) -> Project:
    return replace(project, config=project.config.model_copy(update={"mirrors": {}}))


async def test_the_consuming_database_may_be_applied_before_the_source(make_project: ProjectFactory) -> None:
    """Apply goes through the databases in the order they are declared: billing's mirror tables are made before
    crm's views exist, from the contract's SQL (a throw-away view), with the same types."""
    toml = TOML.replace("[databases.crm]\n\n[databases.billing]", "[databases.billing]\n\n[databases.crm]")
    project = make_project(toml=toml, migrations=MIGRATIONS, contracts=CONTRACTS)
    await prepare(project)
    targets = await resolve_targets(project)
    billing = await targets["billing"].connect_owner()
    try:
        qty = await billing.fetchval("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                                     "'order_lines_copy'::regclass AND attname = 'qty'")
        assert qty == "numeric(10,2)"
    finally:
        await billing.close()
    reports = await sync_mirrors_once(project)
    assert [(r.mirror, r.snapshot_rows) for r in reports] == [("customers", 20), ("names", 20), ("lines", 0)]


async def test_a_contract_over_a_mirror_table_compiles_before_the_first_apply(make_project: ProjectFactory) -> None:
    """``migrate``'s plan (and ``lock``, ``check``) compile every contract in a transaction they roll back, on a
    fresh deployment before any apply: the stand-in tables let the contract over the mirror table compile there,
    with the source's types read after the source's pending migrations, all rolled back."""
    from gatehouse.contracts.shape import Signature
    from gatehouse.contracts.signature import live_signatures
    from gatehouse.events.mirror_tables import stand_in_mirror_tables

    project = make_project(toml=TOML, migrations=MIGRATIONS, contracts=CONTRACTS)
    targets = await resolve_targets(project)
    billing, crm = await targets["billing"].connect_owner(), await targets["crm"].connect_owner()
    try:
        transaction = billing.transaction()
        await transaction.start()
        made = await stand_in_mirror_tables(billing, project, "billing")
        assert made == ["public.customers_copy", "crm_copy.customer_names", "public.order_lines_copy"]
        signature = (await live_signatures(billing, project, "billing"))["customer_copies.v1"]
        assert isinstance(signature, Signature), signature
        assert [(c.name, c.type) for c in signature.columns] == [("id", "integer"), ("name", "text"),
                                                                 ("email", "text")]
        await transaction.rollback()
        assert await billing.fetchval("SELECT to_regclass('customers_copy')") is None
        assert await crm.fetchval("SELECT to_regclass('customers')") is None  # crm's migrations: rolled back
    finally:
        await billing.close()
        await crm.close()


@pytest.mark.parametrize(("change", "message"), [
    (('source = "order_lines"', 'source = "invoices"'), r"mirrors.lines.source = 'invoices': that contract publishes no events"),
    (('source = "order_lines"', 'source = "nothing"'), r"mirrors.lines.source = 'nothing': no contract has that name"),
    (('columns = ["name"]', 'columns = ["name", "password_hash"]'), r"mirrors.names.columns names password_hash, not a column of customers.v1"),
    (('database = "billing"\nsource = "order_lines"', 'database = "shop"\nsource = "order_lines"'), r"mirrors.lines.database = 'shop': no database"),
    (('table = "order_lines_copy"', 'table = "customers_copy"'), r"mirrors.customers writes that table already"),
    (('[events.order_lines]\nversion = 1', '[events.order_lines]\nversion = 2'), r"\[events.order_lines\] version = 2: there is no order_lines.v2"),
])
def test_a_mirror_that_does_not_hold_together_is_refused_naming_its_key(make_project: ProjectFactory,
                                                                      change: tuple[str, str], message: str) -> None:
    contracts = {**CONTRACTS, "billing/invoices.v1.sql": "SELECT id, total FROM invoices"}
    with pytest.raises(ProjectError, match=message):  # when the project loads
        make_project(toml=TOML.replace(*change), contracts=contracts)


@pytest.mark.parametrize(("table", "message"), [
    ("gatehouse.copy", "schema 'gatehouse' belongs to gatehouse"), ("api_v1.copy", "schema 'api_v1' belongs"),
    ("Copy", "must be text matching"),
])
def test_a_mirror_table_in_a_schema_that_is_not_the_services_is_refused(make_project: ProjectFactory, table: str,
                                                                        message: str) -> None:
    with pytest.raises(ProjectError, match=message):
        make_project(toml=TOML.replace('table = "order_lines_copy"', f'table = "{table}"'), contracts=CONTRACTS)


# --- snapshot, catch-up, tombstones, the contract over the copy ------------------------------------------------


async def test_snapshot_then_events_keep_the_copy_equal_to_the_source_and_serve_it_as_a_contract(
        mirrored: Mirrored, serve_project: object) -> None:
    steps = await until_idle(mirrored.sync())
    assert steps[0].kind == "snapshot" and steps[0].count == 20 and applied(steps) == 0
    assert await mirrored.copy() == await mirrored.source()
    await mirrored.crm.execute("UPDATE customers SET name = 'renamed', password_hash = 'x' WHERE id = 3")
    await mirrored.crm.execute("DELETE FROM customers WHERE id IN (4, 5)")
    await mirrored.crm.execute("INSERT INTO customers (id, name) VALUES (21, 'new')")
    assert applied(await until_idle(mirrored.sync())) == 4
    assert await mirrored.copy() == await mirrored.source()
    tombstones = await mirrored.billing.fetch("SELECT id, name, _gh_version > 0 AS versioned FROM customers_copy "
                                              "WHERE _gh_deleted ORDER BY id")
    assert [tuple(t) for t in tombstones] == [(4, None, True), (5, None, True)]  # kept, emptied
    assert "password_hash" not in (await mirrored.copy())[3]
    # the consuming service reads its copy as a contract of its own (api_v1.customer_copies over the table)
    from gatehouse import operations

    key = (await operations.create_key(mirrored.project, "finance")).secret_key
    client, _ = await serve_project(mirrored.project)  # type: ignore[operator]
    answer = await client.get("/customer_copies?id=lt.7&order=id", headers={"apikey": key})
    assert answer.status_code == 200, answer.text
    assert answer.json() == [{"id": 1, "name": "customer 1", "email": "c1@example.com"},
                             {"id": 2, "name": "customer 2", "email": "c2@example.com"},
                             {"id": 3, "name": "renamed", "email": "c3@example.com"},
                             {"id": 6, "name": "customer 6", "email": "c6@example.com"}]


async def test_a_subset_of_columns_and_a_key_of_two_columns_are_copied(mirrored: Mirrored) -> None:
    await mirrored.crm.execute("INSERT INTO order_lines VALUES (1, 1, 'lamp', 2), (1, 2, 'mug', 1.5), (2, 1, 'pen', 3)")
    await until_idle(mirrored.sync("lines"))
    await mirrored.crm.execute("UPDATE order_lines SET qty = 9.25 WHERE order_id = 1 AND line = 2")
    await mirrored.crm.execute("DELETE FROM order_lines WHERE order_id = 2")
    await until_idle(mirrored.sync("lines"))
    rows = await mirrored.billing.fetch("SELECT order_id, line, sku, qty::text, _gh_deleted FROM order_lines_copy "
                                        "ORDER BY 1, 2")
    assert [tuple(r) for r in rows] == [(1, 1, "lamp", "2.00", False), (1, 2, "mug", "9.25", False),
                                        (2, 1, None, None, True)]
    await mirrored.crm.execute("UPDATE customers SET name = 'only the name', email = 'changed' WHERE id = 1")
    await until_idle(mirrored.sync("names"))
    names = await mirrored.billing.fetch("SELECT id, name FROM crm_copy.customer_names WHERE id <= 2 ORDER BY id")
    assert [tuple(n) for n in names] == [(1, "only the name"), (2, "customer 2")]


async def test_writes_during_the_snapshot_are_caught_up_and_none_is_lost(mirrored: Mirrored) -> None:
    """Three transactions around the snapshot: T1 started writing before it and commits after it (still running
    when the snapshot is taken, so the snapshot's position stops before it); T2 started after T1 and committed
    before the snapshot (in the copy, and read again after the position, where the guard skips it); T3 writes
    while the snapshot is being copied."""
    t1 = await mirrored.targets["crm"].connect_owner()
    t2 = await mirrored.targets["crm"].connect_owner()
    try:
        await t1.execute("BEGIN; UPDATE customers SET name = 't1 first' WHERE id = 1")
        await t2.execute("BEGIN; UPDATE customers SET name = 't2' WHERE id = 2; INSERT INTO customers (id, name) "
                         "VALUES (30, 't2 new'); DELETE FROM customers WHERE id = 3; COMMIT")
        blocker = await mirrored.targets["billing"].connect_owner()
        await blocker.execute("BEGIN; LOCK TABLE customers_copy IN ACCESS EXCLUSIVE MODE")
        sync = mirrored.sync()
        snapshot = asyncio.create_task(sync.step())  # takes its snapshot, then waits for the lock
        await _until(lambda: mirrored.billing.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = "
            "'gatehouse/mirror customers'"))
        await t1.execute("UPDATE customers SET name = 't1 last' WHERE id = 2; COMMIT")  # T1 ends after the snapshot
        await mirrored.crm.execute("UPDATE customers SET tier = 99 WHERE id = 4")  # T3
        await mirrored.crm.execute("DELETE FROM customers WHERE id = 5")
        await mirrored.crm.execute("INSERT INTO customers (id, name) VALUES (31, 't3 new')")
        await blocker.execute("COMMIT")
        await blocker.close()
        step = await snapshot
        await sync.close()
        assert step.kind == "snapshot"
        copied = await mirrored.copy()
        assert copied[2]["name"] == "t2" and 30 in copied and 3 not in copied  # T2: in the snapshot
        assert copied[1]["name"] == "customer 1" and copied[4]["tier"] == 1 and 31 not in copied  # T1, T3: not
        await until_idle(mirrored.sync())
        source = await mirrored.source()
        assert source[1]["name"] == "t1 first" and source[2]["name"] == "t1 last" and source[4]["tier"] == 99
        assert await mirrored.copy() == source
    finally:
        await t1.close()
        await t2.close()


CAPTURES = pytest.mark.parametrize("capture", ["capture", "without"])
"""Each ordering test runs on the capture's versions and on an outbox without them (``seq`` stands in)."""


async def _capture(mirrored: Mirrored, capture: str) -> str:
    if capture == "without":
        await emulate_capture(mirrored.crm)
    return "aggregate_version" if capture == "capture" else "seq"


@CAPTURES
async def test_events_read_out_of_commit_order_end_at_the_newest_state(mirrored: Mirrored, capture: str) -> None:
    """T1 takes its transaction id first (a write of another row), T2 changes row 1 and commits, then T1 changes row
    1 too and commits: the outbox reads T1's event of row 1 first, yet T2's is older. Arrival order would leave
    T2's name; the version guard leaves T1's."""
    versions = await _capture(mirrored, capture)
    await until_idle(mirrored.sync())
    t1 = await mirrored.targets["crm"].connect_owner()
    try:
        await t1.execute("BEGIN; UPDATE customers SET tier = 7 WHERE id = 20")
        await mirrored.crm.execute("UPDATE customers SET name = 'older (t2)' WHERE id = 1")
        await t1.execute("UPDATE customers SET name = 'newer (t1)' WHERE id = 1; COMMIT")
    finally:
        await t1.close()
    events = await read_after(mirrored.crm, START, 100, ["customers"])
    ones = [json.loads(e.payload or "{}")["name"] for e in events if e.key == "1"]
    assert ones == ["newer (t1)", "older (t2)"]  # the order the outbox is read in
    await until_idle(mirrored.sync(batch=1))  # one event per transaction: no help from the batch
    assert (await mirrored.copy())[1]["name"] == "newer (t1)"
    assert await mirrored.copy() == await mirrored.source()
    assert (await mirrored.position())["version_source"] == versions


@CAPTURES
async def test_a_snapshot_taken_while_older_transactions_run_neither_regresses_nor_resurrects(
        mirrored: Mirrored, capture: str) -> None:
    """C is still running when the snapshot is taken, so its position stops before C's transaction id; every
    transaction that began after C is read again after it, including ones the snapshot already shows.

    * Row 1: B (began after C) writes it and commits, then A (began before C) writes it and commits. The snapshot
      shows A's state; B's older event comes after the position and is read again: the row's version (A's) keeps
      it out.
    * Row 2: X (began after C) creates it, then Y (began before C) deletes it. The snapshot has no row 2; X's
      creation is read again after the position, Y's deletion is not: the tombstone the snapshot wrote keeps the
      row from coming back."""
    versions = await _capture(mirrored, capture)
    conns = {name: await mirrored.targets["crm"].connect_owner() for name in "ACYBX"}
    try:
        await conns["A"].execute("BEGIN; UPDATE customers SET tier = 10 WHERE id = 18")
        await conns["Y"].execute("BEGIN; UPDATE customers SET tier = 10 WHERE id = 19")
        await conns["C"].execute("BEGIN; UPDATE customers SET tier = 10 WHERE id = 20")
        await conns["B"].execute("UPDATE customers SET name = 'older (B)' WHERE id = 1")
        await conns["A"].execute("UPDATE customers SET name = 'newer (A)' WHERE id = 1; COMMIT")
        await conns["X"].execute("INSERT INTO customers (id, name) VALUES (50, 'created by X')")
        await conns["Y"].execute("DELETE FROM customers WHERE id = 50; COMMIT")
        sync = mirrored.sync(batch=1)
        assert (await sync.step()).kind == "snapshot"
        await sync.close()
        copied = await mirrored.copy()
        assert copied[1]["name"] == "newer (A)" and 50 not in copied
        await conns["C"].execute("COMMIT")
        await until_idle(mirrored.sync(batch=1))
        assert await mirrored.copy() == await mirrored.source()
        tombstone = await mirrored.billing.fetchval("SELECT _gh_deleted FROM customers_copy WHERE id = 50")
        assert tombstone is True and (await mirrored.position())["version_source"] == versions
    finally:
        for conn in conns.values():
            await conn.close()


async def test_a_tombstone_is_never_brought_back_by_an_older_update(mirrored: Mirrored) -> None:
    await until_idle(mirrored.sync())
    table = Table('"public"."customers_copy"', ("id", "name", "email", "tier", "joined"), ("id",))
    update = '{"id": 7, "name": "late update", "email": null, "tier": 1, "joined": null}'
    await apply_states(mirrored.billing, table, [(update, 10**12, False, None)])
    await apply_states(mirrored.billing, table, [('{"id": 7}', 10**12 + 2, True, None)])  # the delete
    await apply_states(mirrored.billing, table, [(update.replace("late", "older"), 10**12 + 1, False, None)])
    row = await mirrored.billing.fetchrow("SELECT name, _gh_deleted, _gh_version FROM customers_copy WHERE id = 7")
    assert row is not None and tuple(row) == (None, True, 10**12 + 2)
    await apply_states(mirrored.billing, table, [(update.replace("late", "re-created"), 10**12 + 3, False, None)])
    assert (await mirrored.copy())[7]["name"] == "re-created update"


# --- crashes and replays ---------------------------------------------------------------------------------------


async def test_a_crash_between_applying_and_storing_the_position_replays_harmlessly(mirrored: Mirrored) -> None:
    await until_idle(mirrored.sync())
    before_rows, before = await mirrored.copy(), await mirrored.position()
    await mirrored.crm.execute("UPDATE customers SET name = 'changed' WHERE id BETWEEN 1 AND 5")
    await mirrored.crm.execute("DELETE FROM customers WHERE id = 6")

    async def crash() -> None:  # the server dies right after the upserts, before the position is written
        await mirrored.billing.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                           "application_name = 'gatehouse/mirror customers' AND datname = "
                                       "current_database()")
        await asyncio.sleep(0.2)

    crashing = mirrored.sync(on_applied=crash)
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
        await crashing.step()
    await crashing.close()
    assert await mirrored.copy() == before_rows  # nothing of the batch committed
    assert (await mirrored.position())["seq"] == before["seq"]
    await until_idle(mirrored.sync())
    assert await mirrored.copy() == await mirrored.source()
    done = await mirrored.position()
    versions = [tuple(r) for r in await mirrored.billing.fetch("SELECT id, _gh_version, _gh_deleted FROM "
                                                               "customers_copy ORDER BY id")]
    # the position put back (a crash after the commit of an older design, or a restore): everything again
    await mirrored.billing.execute("UPDATE gatehouse.mirror_positions SET txid = $1, seq = $2 WHERE mirror = "
                                   "'customers'", before["txid"], before["seq"])
    assert applied(await until_idle(mirrored.sync())) == 6
    assert await mirrored.copy() == await mirrored.source()
    again = [tuple(r) for r in await mirrored.billing.fetch("SELECT id, _gh_version, _gh_deleted FROM customers_copy "
                                                            "ORDER BY id")]
    assert again == versions and (await mirrored.position())["seq"] == done["seq"]


async def test_the_outbox_cleaner_can_keep_the_events_a_mirror_has_not_applied(mirrored: Mirrored) -> None:
    """Each step tells the source database how far the mirror is (``mirror:<name>`` in the relay's
    ``gatehouse.outbox_positions``); a cleaner that counts the mirror among the readers of its contract deletes only
    what the mirror has applied."""
    from gatehouse.events.relay_store import clean

    await mirrored.crm.execute("UPDATE customers SET name = 'applied' WHERE id = 2")
    await until_idle(mirrored.sync())
    published = await mirrored.crm.fetchrow("SELECT txid::text AS txid, seq FROM gatehouse.outbox_positions "
                                            "WHERE sink = $1", MIRROR_SINK + "customers")
    stored = await mirrored.position()
    assert published is not None and (int(published["txid"]), published["seq"]) == (stored["txid"], stored["seq"])
    await mirrored.crm.execute("UPDATE customers SET name = 'not applied yet' WHERE id = 1")
    await clean(mirrored.crm, [(MIRROR_SINK + "customers", "customers")], [], retention_s=0)
    left = await mirrored.crm.fetch("SELECT payload->>'name' AS name, (txid, seq) <= ($1::text::xid8, $2) AS passed "
                                    "FROM gatehouse.outbox WHERE aggregatetype = 'customers'",
                                    published["txid"], published["seq"])
    assert [r["name"] for r in left if not r["passed"]] == ["not applied yet"] and not any(r["passed"] for r in left)
    await until_idle(mirrored.sync())
    assert (await mirrored.copy())[1]["name"] == "not applied yet"


async def test_a_snapshot_after_the_cleaner_deleted_the_events_takes_the_versions_it_kept(
        mirrored: Mirrored) -> None:
    """The cleaner keeps each aggregate's newest version in ``gatehouse.aggregate_versions`` as it deletes its events:
    a snapshot taken afterwards gives each row (and each tombstone) that version, and later events go on above it."""
    from gatehouse.events.relay_store import clean, ensure_tables

    await mirrored.crm.execute("UPDATE customers SET name = 'renamed' WHERE id = 4")
    await mirrored.crm.execute("DELETE FROM customers WHERE id = 3")
    newest = {r["aggregateid"]: r["version"] for r in await mirrored.crm.fetch(
        "SELECT aggregateid, max(aggregate_version) AS version FROM gatehouse.outbox WHERE aggregatetype = 'customers' "
        "GROUP BY aggregateid")}
    await ensure_tables(mirrored.crm)
    assert await clean(mirrored.crm, [], [], retention_s=0) == 2
    steps = await until_idle(mirrored.sync())
    assert steps[0].kind == "snapshot"
    rows = {r["id"]: (r["_gh_version"], r["_gh_deleted"]) for r in await mirrored.billing.fetch(
        "SELECT id, _gh_version, _gh_deleted FROM customers_copy")}
    assert rows[4] == (newest["4"], False) and rows[3] == (newest["3"], True) and rows[5] == (0, False)
    await mirrored.crm.execute("UPDATE customers SET name = 'again' WHERE id = 4")
    await until_idle(mirrored.sync())
    assert (await mirrored.copy())[4]["name"] == "again" and 3 not in await mirrored.copy()


async def test_two_servers_never_move_one_mirror_at_the_same_time(mirrored: Mirrored) -> None:
    holder = await mirrored.targets["billing"].connect_owner()
    try:
        await holder.execute("BEGIN; SELECT * FROM gatehouse.mirror_positions WHERE mirror = 'customers' FOR UPDATE")
        other = mirrored.sync()
        assert (await other.step()).kind == "busy"
        await other.close()
        reports = await sync_mirrors_once(mirrored.project, "customers")
        assert reports[0].busy
    finally:
        await holder.close()
    assert (await sync_mirrors_once(mirrored.project, "customers"))[0].snapshot_rows == 20


async def test_serve_keeps_the_mirrors_up_to_date_in_the_background(mirrored: Mirrored) -> None:
    runner = MirrorRunner.for_project(mirrored.project, mirrored.targets)
    assert runner is not None
    await runner.start()
    try:
        await _until(lambda: _equal(mirrored))
        await mirrored.crm.execute("UPDATE customers SET name = 'live' WHERE id = 9")
        await mirrored.crm.execute("INSERT INTO order_lines VALUES (5, 1, 'desk', 1)")
        await _until(lambda: _equal(mirrored))
        await _until(lambda: mirrored.billing.fetchval("SELECT count(*) FROM order_lines_copy"))
        assert runner.counts["customers"].snapshots == 1 and runner.counts["customers"].events == 1
    finally:
        await runner.stop()


async def _equal(mirrored: Mirrored) -> bool:
    return await mirrored.copy() == await mirrored.source()


async def _until(check: Callable[[], Awaitable[Any]], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "never became true"
        await asyncio.sleep(0.02)


# --- gatehouse mirrors status / sync ------------------------------------------------------------------------------


def _cli(monkeypatch: pytest.MonkeyPatch, project: Project) -> Callable[..., Any]:
    monkeypatch.delenv("GATEHOUSE_PROJECT", raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(cli.app, ["--project", str(project.root), *args])


async def test_status_shows_rows_last_event_lag_and_waiting_events(mirrored: Mirrored,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gatehouse = _cli(monkeypatch, mirrored.project)
    before = json.loads((await asyncio.to_thread(gatehouse, "mirrors", "status", "--format", "json")).stdout)
    assert [(s["mirror"], s["snapshot"], s["rows"], s["waiting"]) for s in before] == [
        ("customers", "pending", 0, 0), ("names", "pending", 0, 0), ("lines", "pending", 0, 0)]
    synced = await asyncio.to_thread(gatehouse, "mirrors", "sync")
    assert synced.exit_code == 0, synced.output
    assert "customers: snapshot of 20 rows, 0 event(s) applied; up to date at position" in synced.stdout
    await mirrored.crm.execute("UPDATE customers SET name = 'a' WHERE id = 1")
    assert "customers: 1 event(s) applied" in (await asyncio.to_thread(gatehouse, "mirrors", "sync", "customers")).stdout
    last = (await read_after(mirrored.crm, START, 1000, ["customers"]))[-1]
    await mirrored.crm.execute("UPDATE customers SET name = 'b' WHERE id IN (2, 3)")
    status = json.loads((await asyncio.to_thread(gatehouse, "mirrors", "status", "--format", "json")).stdout)[0]
    assert status["snapshot"] == "done" and status["rows"] == 20 and status["tombstones"] == 0
    assert status["last_event_id"] == last.id and status["applied"] == 1 and status["waiting"] == 2
    assert 0 <= status["lag_s"] < 60 and 0 <= status["behind_s"] < 60 and status["problem"] is None
    table = await asyncio.to_thread(gatehouse, "mirrors", "status")
    assert table.exit_code == 0
    assert "customers: customers.v1 (crm) -> public.customers_copy (billing)" in table.stdout
    assert "rows        20\n" in table.stdout and f"last event  {last.id} of " in table.stdout
    assert "waiting     2 event(s) (the oldest" in table.stdout and "lines: order_lines.v1 (crm)" in table.stdout
    unknown = await asyncio.to_thread(gatehouse, "mirrors", "sync", "nope")
    assert unknown.exit_code == 1 and "no mirror named 'nope'" in unknown.output


# --- hypothesis: writes, snapshots, replays and reorderings converge ---------------------------------------------

Op = tuple[str, int, str, int | None]
ops = st.lists(st.tuples(st.sampled_from(["insert", "update", "update", "delete"]), st.integers(1, 6),
                         st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6),
                         st.none() | st.integers(-3, 3)), min_size=1, max_size=4)


async def _write(conn: asyncpg.Connection, transaction: list[Op]) -> None:
    for op, key, name, tier in transaction:
        if op == "insert":
            await conn.execute("INSERT INTO customers (id, name, tier) VALUES ($1, $2, $3) ON CONFLICT (id) DO "
                               "UPDATE SET name = excluded.name, tier = excluded.tier", key, name, tier)
        elif op == "update":
            await conn.execute("UPDATE customers SET name = $2, tier = $3 WHERE id = $1", key, name, tier)
        else:
            await conn.execute("DELETE FROM customers WHERE id = $1", key)


@settings(max_examples=int(os.environ.get("MIRROR_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(transactions=st.lists(ops, min_size=1, max_size=10), long_ops=ops,
       long_span=st.tuples(st.integers(0, 10), st.integers(0, 10)), syncs=st.sets(st.integers(0, 10), max_size=4),
       seed=st.integers(0, 2**32))
async def test_a_mirror_converges_after_random_writes_replays_and_reorderings(
        mirrored: Mirrored, transactions: list[list[Op]], long_ops: list[Op], long_span: tuple[int, int],
        syncs: set[int], seed: int) -> None:
    await _reset(mirrored)
    start, end = min(long_span), max(long_span)
    long = await mirrored.targets["crm"].connect_owner()  # a transaction that takes its id early, commits late
    sync = mirrored.sync()
    try:
        for index in range(len(transactions) + 1):
            if index == start:
                await long.execute("BEGIN; UPDATE customers SET tier = tier WHERE id = 100")
            if index in syncs:  # the mirror moves while writes go on: the first step is the snapshot
                await sync.step()
            if index == end:
                await _write(long, long_ops)
                await long.execute("COMMIT")
            if index < len(transactions):
                async with mirrored.crm.transaction():
                    await _write(mirrored.crm, transactions[index])
    finally:
        await long.close()
        await sync.close()
    await until_idle(mirrored.sync())
    source = await mirrored.source()
    assert await mirrored.copy() == source
    # every event delivered again, duplicated and shuffled, in batches of random size: nothing changes
    events = await read_after(mirrored.crm, START, 100_000, ["customers"])
    table = Table('"public"."customers_copy"', ("id", "name", "email", "tier", "joined"), ("id",))
    found = await mirrored.crm.fetchrow(SOURCE_TABLES)
    assert found is not None
    column = version_source(found["versions"], found["versioned_events"])
    await _deliver(mirrored, table, events, column, random.Random(seed))
    assert await mirrored.copy() == source
    # and a copy made from the events alone, in that disorder, is the source too
    await mirrored.billing.execute("DELETE FROM customers_copy")
    await _deliver(mirrored, table, events, column, random.Random(seed + 1))
    assert await mirrored.copy() == source


async def _deliver(mirrored: Mirrored, table: Table, events: list[Event], column: str, rng: random.Random) -> None:
    delivery = events + rng.sample(events, k=len(events) // 2)  # at-least-once: some twice
    rng.shuffle(delivery)
    while delivery:
        size = rng.randint(1, 8)
        batch, delivery = delivery[:size], delivery[size:]
        async with mirrored.billing.transaction():
            await apply_states(mirrored.billing, table, newest_per_key(batch, table, column))


async def _reset(mirrored: Mirrored) -> None:
    await mirrored.crm.execute("TRUNCATE customers, gatehouse.outbox")  # no row triggers: no events
    await mirrored.crm.execute("INSERT INTO customers (id, name) VALUES (100, 'held by the long transaction')")
    await mirrored.billing.execute("DELETE FROM customers_copy")
    await mirrored.billing.execute("UPDATE gatehouse.mirror_positions SET txid = 0, seq = 0, snapshot_done = false "
                                   "WHERE mirror = 'customers'")
